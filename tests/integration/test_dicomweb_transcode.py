"""WADO-RS transfer syntax negotiation and transcoding, with dicomweb-client.

Instances are really compressed (tests/support/compressed.py), stored through
STOW-RS, and retrieved in other syntaxes; decoded pixels are compared with the
pixels decoded from what was sent. The stored blobs must not change.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests.integration.test_dicomweb import Web, dataset_bytes, multipart_parts, serve
from tests.support.compressed import (
    compressed_ct,
    jpeg_baseline,
    native_8bit,
    native_ct,
    part10,
)

pytestmark = pytest.mark.integration

EXPLICIT_LE = str(ExplicitVRLittleEndian)
COMPRESSED = [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEG2000, JPEGBaseline8Bit]


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    with serve(tmp_path) as running:
        yield running


def _instance(ts: str, **kw: object) -> Dataset:
    if ts == JPEGBaseline8Bit:
        return jpeg_baseline(**kw)  # type: ignore[arg-type]
    return compressed_ct(ts, **kw)  # type: ignore[arg-type]


def _pixels(ds: Dataset) -> np.ndarray:  # type: ignore[type-arg]
    """Decoded pixels of ``ds`` as it would be read from its Part-10 bytes."""
    return pydicom.dcmread(io.BytesIO(part10(ds))).pixel_array


def _blob_digests(web: Web) -> dict[str, str]:
    out = {}
    for i in web.deps.index.instances():
        with web.deps.blobs.open(i.blob_key) as fp:
            out[i.ref.sop_instance_uid] = hashlib.sha256(fp.read()).hexdigest()
    return out


def _accept_dicom(*syntaxes: str) -> dict[str, str]:
    return {"Accept": ", ".join(f'multipart/related; type="application/dicom"; {s}'
                                for s in syntaxes)}


@pytest.mark.parametrize("ts", COMPRESSED, ids=lambda ts: ts.name)
def test_compressed_instance_retrieved_as_explicit_little_endian(web: Web, ts: str) -> None:
    sent = _instance(ts)
    expected = _pixels(sent)
    study, series, sop = sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID
    client = web.client()
    client.store_instances([sent])
    web.index_all()
    assert web.deps.index.instances()[0].transfer_syntax_uid == ts
    before = _blob_digests(web)

    # What viewers ask for: Explicit VR Little Endian, named.
    asked = client.retrieve_instance(study, series, sop,
                                     media_types=(("application/dicom", EXPLICIT_LE),))
    assert asked.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert not asked["PixelData"].is_undefined_length
    assert np.array_equal(asked.pixel_array, expected)
    assert asked.SOPInstanceUID == sop and asked.PatientID == sent.PatientID
    if ts == JPEGBaseline8Bit:
        assert asked.LossyImageCompression == "01"

    # application/dicom naming no syntax means PS3.18's default, explicit LE.
    default = client.retrieve_instance(study, series, sop, media_types=("application/dicom",))
    assert default.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert np.array_equal(default.pixel_array, expected)
    # dicomweb-client's own default asks for transfer-syntax=*: as stored.
    assert client.retrieve_instance(study, series, sop).file_meta.TransferSyntaxUID == ts

    # transfer-syntax=* is the stored bytes, typed with the stored syntax.
    url = f"{web.root}/studies/{study}/series/{series}/instances/{sop}"
    raw = httpx.get(url, headers=_accept_dicom("transfer-syntax=*"))
    [(content_type, body)] = multipart_parts(raw)
    assert content_type == f"application/dicom; transfer-syntax={ts}"
    assert dataset_bytes(body) == dataset_bytes(part10(sent))
    assert _blob_digests(web) == before, "a stored blob changed"


def test_study_of_mixed_syntaxes_streams_each_in_the_asked_syntax(web: Web) -> None:
    study, series = generate_uid(), generate_uid()
    sent = [_instance(ts, study_uid=study, series_uid=series, instance_number=n + 1)
            for n, ts in enumerate(COMPRESSED)]
    sent.append(native_ct(study_uid=study, series_uid=series, instance_number=9))
    expected = {d.SOPInstanceUID: _pixels(d) for d in sent}
    client = web.client()
    client.store_instances(sent)
    web.index_all()


    r = httpx.get(f"{web.root}/studies/{study}",
                  headers=_accept_dicom(f"transfer-syntax={ImplicitVRLittleEndian}"))
    assert r.status_code == 200
    # Every part is in the one acceptable syntax, so the response says so as a whole.
    assert r.headers["content-type"].startswith(
        f'multipart/related; type="application/dicom"; transfer-syntax={ImplicitVRLittleEndian};')
    parts = multipart_parts(r)
    assert len(parts) == len(sent)
    for content_type, body in parts:
        assert content_type == f"application/dicom; transfer-syntax={ImplicitVRLittleEndian}"
        ds = pydicom.dcmread(io.BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert np.array_equal(ds.pixel_array, expected[ds.SOPInstanceUID])
    retrieved = client.retrieve_series(study, series,
                                       media_types=(("application/dicom", EXPLICIT_LE),))
    assert {d.SOPInstanceUID for d in retrieved} == set(expected)


def test_q_values_pick_the_best_syntax_that_can_be_made(web: Web) -> None:
    sent = native_ct()
    client = web.client()
    client.store_instances([sent])
    web.index_all()
    url = (f"{web.root}/studies/{sent.StudyInstanceUID}/series/{sent.SeriesInstanceUID}"
           f"/instances/{sent.SOPInstanceUID}")

    # JPEG Baseline is preferred but impossible (8 bits only, 12-bit data): JPEG-LS next.
    r = httpx.get(url, headers=_accept_dicom(
        "transfer-syntax=*; q=0.1", f"transfer-syntax={JPEGBaseline8Bit}",
        f"transfer-syntax={JPEGLSLossless}; q=0.8", f"transfer-syntax={RLELossless}; q=0.5"))
    assert r.status_code == 200
    [(content_type, body)] = multipart_parts(r)
    assert content_type == f"application/dicom; transfer-syntax={JPEGLSLossless}"
    ds = pydicom.dcmread(io.BytesIO(body))
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert np.array_equal(ds.pixel_array, sent.pixel_array)
    # Equal q: the client's order.
    r = httpx.get(url, headers=_accept_dicom(f"transfer-syntax={RLELossless}",
                                             f"transfer-syntax={JPEGLSLossless}"))
    assert multipart_parts(r)[0][0] == f"application/dicom; transfer-syntax={RLELossless}"


def test_406_only_when_no_acceptable_syntax_can_be_made(web: Web) -> None:
    study, series = generate_uid(), generate_uid()
    ct = native_ct(study_uid=study, series_uid=series)  # 16-bit: no JPEG Baseline
    photo = jpeg_baseline(study_uid=study, series_uid=series, instance_number=2)
    client = web.client()
    client.store_instances([ct, photo])
    web.index_all()

    ct_url = f"{web.root}/studies/{study}/series/{series}/instances/{ct.SOPInstanceUID}"
    refused = httpx.get(ct_url, headers=_accept_dicom(f"transfer-syntax={JPEGBaseline8Bit}"))
    assert refused.status_code == 406
    assert "8-bit unsigned pixels only" in refused.json()["detail"]
    assert "8-bit unsigned pixels only" in refused.headers["warning"]
    video = httpx.get(ct_url, headers=_accept_dicom("transfer-syntax=1.2.840.10008.1.2.4.102"))
    assert video.status_code == 406
    assert "no encoder" in video.json()["detail"]
    frames = httpx.get(f"{ct_url}/frames/1", headers={"Accept": 'multipart/related; '
                                                                'type="image/jpeg"'})
    assert frames.status_code == 406
    assert "8-bit unsigned pixels only" in frames.json()["detail"]

    # The study: the JPEG instance is stored as asked, the CT cannot be: 206, Warning.
    partial = httpx.get(f"{web.root}/studies/{study}",
                        headers=_accept_dicom(f"transfer-syntax={JPEGBaseline8Bit}"))
    assert partial.status_code == 206
    assert "1 instance(s) not sent" in partial.headers["warning"]
    [(content_type, body)] = multipart_parts(partial)
    assert content_type == f"application/dicom; transfer-syntax={JPEGBaseline8Bit}"
    assert pydicom.dcmread(io.BytesIO(body)).SOPInstanceUID == photo.SOPInstanceUID


def test_jpeg_baseline_is_made_from_8_bit_data_when_asked_and_marked_lossy(web: Web) -> None:
    from PIL import Image

    study, series = generate_uid(), generate_uid()
    grey = native_8bit(study_uid=study, series_uid=series)
    colour = native_8bit(colour=True, study_uid=study, series_uid=series, instance_number=2)
    client = web.client()
    client.store_instances([grey, colour])
    web.index_all()
    for sent, photometric in ((grey, "MONOCHROME2"), (colour, "YBR_FULL")):
        url = f"{web.root}/studies/{study}/series/{series}/instances/{sent.SOPInstanceUID}"
        r = httpx.get(url, headers=_accept_dicom(f"transfer-syntax={JPEGBaseline8Bit}"))
        assert r.status_code == 200, r.text
        [(content_type, body)] = multipart_parts(r)
        assert content_type == f"application/dicom; transfer-syntax={JPEGBaseline8Bit}"
        made = pydicom.dcmread(io.BytesIO(body))
        assert made.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert made.SOPInstanceUID == sent.SOPInstanceUID
        assert made.PhotometricInterpretation == photometric
        assert made.LossyImageCompression == "01"
        assert made.LossyImageCompressionMethod == "ISO_10918_1"
        assert float(made.LossyImageCompressionRatio) > 1
        error = np.abs(made.pixel_array.astype(int) - sent.pixel_array.astype(int))
        assert error.max() <= 8  # lossy, but the image it was
        # A frame as image/jpeg: one codestream of the frame's size.
        frame = httpx.get(f"{url}/frames/1",
                          headers={"Accept": 'multipart/related; type="image/jpeg"'})
        assert frame.status_code == 200, frame.text
        [(frame_type, codestream)] = multipart_parts(frame)
        assert frame_type.startswith("image/jpeg")
        image = Image.open(io.BytesIO(codestream))
        assert (image.format, image.size) == ("JPEG", (sent.Columns, sent.Rows))
        # What is stored is untouched: as stored, the bytes that were sent.
        as_stored = httpx.get(url, headers=_accept_dicom("transfer-syntax=*"))
        [(_, stored)] = multipart_parts(as_stored)
        assert pydicom.dcmread(io.BytesIO(stored)).PixelData == sent.PixelData


def test_an_instance_that_fails_to_decode_is_never_replaced_silently(web: Web) -> None:
    study, series = generate_uid(), generate_uid()
    good = compressed_ct(JPEGLSLossless, study_uid=study, series_uid=series)
    corrupt = compressed_ct(JPEGLSLossless, study_uid=study, series_uid=series,
                            instance_number=2)
    corrupt.PixelData = encapsulate([b"\xff\xd8 not a JPEG-LS codestream \xff\xd9"])
    client = web.client()
    client.store_instances([good])
    web.index_all()
    client.store_instances([corrupt])  # indexed second: retrieved second
    web.index_all()
    url = f"{web.root}/studies/{study}"

    # Only explicit LE is acceptable: the header checks pass, the first part goes,
    # then the second cannot be decoded: the response ends without its closing
    # boundary rather than pretending the study had one instance.
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, headers=_accept_dicom(f"transfer-syntax={EXPLICIT_LE}")).read()

    # With the stored form acceptable too, the corrupt one goes as stored, labelled so.
    r = httpx.get(url, headers=_accept_dicom(f"transfer-syntax={EXPLICIT_LE}",
                                             "transfer-syntax=*; q=0.1"))
    assert r.status_code == 200
    assert "transfer-syntax" not in r.headers["content-type"]  # parts may differ
    types = {pydicom.dcmread(io.BytesIO(body)).SOPInstanceUID: content_type
             for content_type, body in multipart_parts(r)}
    assert types == {
        good.SOPInstanceUID: f"application/dicom; transfer-syntax={EXPLICIT_LE}",
        corrupt.SOPInstanceUID: f"application/dicom; transfer-syntax={JPEGLSLossless}"}


def test_frames_decoded_for_the_default_accept_and_encoded_on_request(web: Web) -> None:
    original = native_ct(frames=3)
    j2k = compressed_ct(JPEG2000Lossless, frames=3, sop_uid=generate_uid(),
                        study_uid=original.StudyInstanceUID,
                        series_uid=original.SeriesInstanceUID, instance_number=2)
    client = web.client()
    client.store_instances([original, j2k])
    web.index_all()
    study, series = original.StudyInstanceUID, original.SeriesInstanceUID
    frame = [original.pixel_array[i].astype("<u2").tobytes() for i in range(3)]

    # dicomweb-client's octet-stream request (transfer-syntax 1.2.840.10008.1.2.1).
    decoded = client.retrieve_instance_frames(
        study, series, j2k.SOPInstanceUID, [3, 1],
        media_types=(("application/octet-stream", EXPLICIT_LE),))
    assert decoded == [frame[2], frame[0]]

    url = f"{web.root}/studies/{study}/series/{series}/instances/{j2k.SOPInstanceUID}/frames/2"
    plain = httpx.get(url, headers={"Accept": 'multipart/related; '
                                              'type="application/octet-stream"'})
    [(content_type, body)] = multipart_parts(plain)
    assert content_type == f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
    assert f"transfer-syntax={EXPLICIT_LE}" in plain.headers["content-type"]
    assert body == frame[1]
    # Its default, */*, gets the stored codestreams, typed as such.
    stored = client.retrieve_instance_frames(study, series, j2k.SOPInstanceUID, [2])
    assert stored[0][:2] == b"\xff\x4f"  # a JPEG 2000 codestream (SOC marker)
    as_stored = httpx.get(url, headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert multipart_parts(as_stored)[0][0] == f"image/jp2; transfer-syntax={JPEG2000Lossless}"

    # Native frames encoded on request: JPEG-LS, decoded back to the same pixels.
    native_url = url.replace(j2k.SOPInstanceUID, original.SOPInstanceUID)
    jls = httpx.get(native_url, headers={"Accept": 'multipart/related; type="image/jls"'})
    [(content_type, codestream)] = multipart_parts(jls)
    assert content_type == f"image/jls; transfer-syntax={JPEGLSLossless}"
    one = native_ct()
    one.PixelData = encapsulate([codestream])
    one["PixelData"].VR = "OB"
    one.file_meta.TransferSyntaxUID = JPEGLSLossless
    assert np.array_equal(one.pixel_array, original.pixel_array[1])
    # A type with a syntax that is not its own cannot be served: 406.
    mismatch = httpx.get(native_url, headers={
        "Accept": f'multipart/related; type="image/jls"; transfer-syntax={RLELossless}'})
    assert mismatch.status_code == 406


# ---------------------------------------------------------------------- STOW-RS JSON + bulk data
def _json_and_bulk(ds: Dataset, base: str) -> tuple[dict[str, object], dict[str, bytes]]:
    """DICOM JSON of ``ds`` with its large values moved to bulk parts (uri -> bytes)."""
    bulk: dict[str, bytes] = {}

    def to_uri(elem: pydicom.DataElement) -> str:
        uri = f"{base}/{ds.SOPInstanceUID}/{elem.tag:08X}"
        value = elem.value
        bulk[uri] = bytes(value) if isinstance(value, bytes | bytearray) else b""
        return uri

    return ds.to_json_dict(bulk_data_threshold=256, bulk_data_element_handler=to_uri), bulk


def _stow_json(web: Web, instances: list[dict[str, object]],
               bulk: list[tuple[str, str, bytes]], study: str | None = None,
               boundary: str = "json-b0undary") -> httpx.Response:
    import json

    parts = [f"--{boundary}\r\nContent-Type: application/dicom+json\r\n\r\n".encode()
             + json.dumps(instances).encode() + b"\r\n"]
    for location, content_type, data in bulk:
        parts.append(f"--{boundary}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Location: {location}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    url = f"{web.root}/studies" + (f"/{study}" if study else "")
    return httpx.post(url, content=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom+json"; '
                        f"boundary={boundary}"})


def test_stow_json_with_bulk_pixel_data_round_trips(web: Web) -> None:
    sent = native_ct(rows=48, columns=40, frames=2)
    obj, bulk = _json_and_bulk(sent, "http://client.example/bulk")
    assert "BulkDataURI" in obj["7FE00010"]  # type: ignore[operator]
    r = _stow_json(web, [obj], [(uri, "application/octet-stream", data)
                                for uri, data in bulk.items()])
    assert r.status_code == 200, r.text
    result = Dataset.from_json(r.json())
    assert result.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sent.SOPInstanceUID
    web.index_all()

    client = web.client()
    back = client.retrieve_instance(sent.StudyInstanceUID, sent.SeriesInstanceUID,
                                    sent.SOPInstanceUID)
    assert back.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert back.PixelData == sent.PixelData
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID",
                    "Rows", "Columns", "NumberOfFrames", "BitsStored", "AccessionNumber"):
        assert back[keyword].value == sent[keyword].value, keyword
    frames = client.retrieve_instance_frames(sent.StudyInstanceUID, sent.SeriesInstanceUID,
                                             sent.SOPInstanceUID, [2])
    assert frames == [sent.PixelData[48 * 40 * 2:]]
    # The same instance again, the same way: idempotent, nothing new stored.
    assert _stow_json(web, [obj], [(uri, "application/octet-stream", data)
                                   for uri, data in bulk.items()]).status_code == 200
    web.index_all()
    assert web.deps.index.counts()["instances"] == 1


def test_stow_json_with_compressed_pixel_data(web: Web) -> None:
    original = native_ct()
    jls = compressed_ct(JPEGLSLossless, sop_uid=original.SOPInstanceUID,
                        study_uid=original.StudyInstanceUID,
                        series_uid=original.SeriesInstanceUID)
    from pydicom.encaps import generate_frames

    codestream = next(generate_frames(jls.PixelData, number_of_frames=1))
    obj = jls.to_json_dict(bulk_data_threshold=256,
                           bulk_data_element_handler=lambda _e: "pixels-1")
    r = _stow_json(web, [obj], [("pixels-1", "image/jls", codestream)])
    assert r.status_code == 200, r.text
    web.index_all()
    [stored] = web.deps.index.instances()
    assert stored.transfer_syntax_uid == JPEGLSLossless  # kept as sent: no transcode on store
    client = web.client()
    as_sent = client.retrieve_instance(original.StudyInstanceUID, original.SeriesInstanceUID,
                                       original.SOPInstanceUID)
    assert as_sent.file_meta.TransferSyntaxUID == JPEGLSLossless
    decoded = client.retrieve_instance(original.StudyInstanceUID, original.SeriesInstanceUID,
                                       original.SOPInstanceUID,
                                       media_types=(("application/dicom", EXPLICIT_LE),))
    assert np.array_equal(decoded.pixel_array, original.pixel_array)


def test_stow_json_with_compressed_multi_frame_pixel_data_one_part_a_frame(web: Web) -> None:
    # PS3.18 names a frame of a multi-frame instance {BulkDataURI}/frames/{n}: each
    # frame's codestream comes in a part of its own, and is encapsulated as sent.
    original = native_ct(frames=3)
    jls = compressed_ct(JPEGLSLossless, frames=3, sop_uid=original.SOPInstanceUID,
                        study_uid=original.StudyInstanceUID,
                        series_uid=original.SeriesInstanceUID)
    from pydicom.encaps import generate_frames

    codestreams = list(generate_frames(jls.PixelData, number_of_frames=3))
    obj = jls.to_json_dict(bulk_data_threshold=256,
                           bulk_data_element_handler=lambda _e: "pixels")
    r = _stow_json(web, [obj], [(f"pixels/frames/{n}", "image/jls", codestream)
                                for n, codestream in enumerate(codestreams, start=1)])
    assert r.status_code == 200, r.text
    web.index_all()
    client = web.client()
    assert client.retrieve_instance_frames(
        original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID, [2],
        media_types=(("image/jls", JPEGLSLossless),)) == [codestreams[1]]
    decoded = client.retrieve_instance(original.StudyInstanceUID, original.SeriesInstanceUID,
                                       original.SOPInstanceUID,
                                       media_types=(("application/dicom", EXPLICIT_LE),))
    assert np.array_equal(decoded.pixel_array, original.pixel_array)
    # One frame short of NumberOfFrames: that instance fails, with the reason.
    other = compressed_ct(JPEGLSLossless, frames=3, study_uid=original.StudyInstanceUID)
    short = other.to_json_dict(bulk_data_threshold=256,
                               bulk_data_element_handler=lambda _e: "other")
    r = _stow_json(web, [short], [(f"other/frames/{n}", "image/jls", codestream)
                                  for n, codestream in enumerate(codestreams[:2], start=1)])
    assert r.status_code == 409, r.text
    assert "2 frame parts for NumberOfFrames 3" in r.headers["warning"]


def test_stow_json_failures_are_per_instance(web: Web) -> None:
    study = generate_uid()
    good = native_ct(study_uid=study)
    orphan = native_ct(study_uid=study, instance_number=2)
    elsewhere = native_ct(study_uid=generate_uid(), instance_number=3)
    good_obj, good_bulk = _json_and_bulk(good, "b")
    orphan_obj, _never_sent = _json_and_bulk(orphan, "b")
    other_obj, other_bulk = _json_and_bulk(elsewhere, "b")
    r = _stow_json(web, [good_obj, orphan_obj, other_obj],
                   [(u, "application/octet-stream", d)
                    for u, d in {**good_bulk, **other_bulk}.items()], study=study)
    assert r.status_code == 202, r.text
    result = Dataset.from_json(r.json())
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == \
        [good.SOPInstanceUID]
    failed = {i.ReferencedSOPInstanceUID: i.FailureReason for i in result.FailedSOPSequence}
    assert failed == {orphan.SOPInstanceUID: 0xC000, elsewhere.SOPInstanceUID: 0xA900}
    assert "matches no part's Content-Location" in r.headers["warning"]
    web.index_all()
    assert web.deps.index.counts()["instances"] == 1

    broken = _stow_json(web, [], [])
    assert broken.status_code == 400  # an empty array stores nothing: no part to report
    not_json = httpx.post(f"{web.root}/studies", content=(
        b"--b\r\nContent-Type: application/dicom+json\r\n\r\n{not json\r\n--b--\r\n"),
        headers={"Content-Type": 'multipart/related; type="application/dicom+json"; '
                                 "boundary=b"})
    assert not_json.status_code == 409
    assert Dataset.from_json(not_json.json()).FailedSOPSequence[0].FailureReason == 0xC000
    xml = httpx.post(f"{web.root}/studies", content=b"--b--\r\n", headers={
        "Content-Type": 'multipart/related; type="application/dicom+xml"; boundary=b'})
    assert xml.status_code == 415
    assert "application/dicom+xml is not supported" in xml.json()["detail"]


def test_instances_too_large_to_transcode_whole_are_refused_with_advice(
        web: Web, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.dicomweb import wado

    sent = compressed_ct(RLELossless, frames=2)  # 32x32x2 frames x 2 bytes = 4 KiB decoded
    client = web.client()
    client.store_instances([sent])
    web.index_all()
    monkeypatch.setattr(wado, "_MAX_DECODED_BYTES", 4095)
    url = (f"{web.root}/studies/{sent.StudyInstanceUID}/series/{sent.SeriesInstanceUID}"
           f"/instances/{sent.SOPInstanceUID}")
    r = httpx.get(url, headers=_accept_dicom(f"transfer-syntax={EXPLICIT_LE}"))
    assert r.status_code == 406
    assert "transcodes whole" in r.json()["detail"]
    # Frames are decoded one at a time: still served.
    frames = client.retrieve_instance_frames(
        sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID, [2],
        media_types=(("application/octet-stream", EXPLICIT_LE),))
    assert frames == [sent.pixel_array[1].astype("<u2").tobytes()]
    monkeypatch.setattr(wado, "_MAX_DECODED_BYTES", 4096)
    assert httpx.get(url, headers=_accept_dicom(
        f"transfer-syntax={EXPLICIT_LE}")).status_code == 200


@pytest.mark.parametrize("storage", ["memory", "s3"])
def test_transcoding_reads_blobs_by_ranges_on_s3_alike(
        storage: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Blobs without a local path are read through ranged reads: transcoding too."""
    overrides: dict[str, str] = {"storage_url": "memory://"}
    if storage == "s3":
        s3 = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        overrides = {"storage_url": s3.bucket_url(bucket), "s3_access_key": s3.access_key,
                     "s3_secret_key": s3.secret_key}
    with serve(tmp_path, **overrides) as web:
        sent = compressed_ct(JPEG2000Lossless, frames=3)
        client = web.client()
        client.store_instances([sent])
        web.index_all()
        [stored] = web.deps.index.instances()
        assert web.deps.blobs.local_path(stored.blob_key) is None
        args = (sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID)
        back = client.retrieve_instance(*args, media_types=(("application/dicom",
                                                              EXPLICIT_LE),))
        assert np.array_equal(back.pixel_array, _pixels(sent))
        frames = client.retrieve_instance_frames(
            *args, [3], media_types=(("application/octet-stream", EXPLICIT_LE),))
        assert frames == [_pixels(sent)[2].astype("<u2").tobytes()]
