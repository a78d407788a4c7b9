"""DICOMweb round trips with dicomweb-client against the app over embedded deps.

The app runs under uvicorn on a free loopback port; indexing is driven by the
test (the outbox relay drained synchronously), so nothing waits on timing.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pydicom
import pytest
import uvicorn
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from services.dicomweb.app import served_app
from tests.support.processes import free_port, wait_for
from vna.bootstrap import Deps, build
from vna.cli import subscribe_indexer
from vna.config import Settings
from vna.dicom.part10 import file_meta_bytes, read_header
from vna.testing.synthetic import ct_instance
from vna.usecases.relay import OutboxRelay

pytestmark = pytest.mark.integration

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


@dataclass
class Web:
    base: str
    deps: Deps
    relay: OutboxRelay
    woken: list[int]

    @property
    def root(self) -> str:
        return f"{self.base}/dicomweb"

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(url=self.root)

    def index_all(self) -> None:
        """Relay the outbox until empty: the local bus indexes synchronously."""
        while self.relay.drain_once():
            pass
        assert self.deps.index.counts()["unindexed"] == 0


@contextmanager
def serve(tmp_path: Path, **overrides: Any) -> Iterator[Web]:
    values: dict[str, Any] = {
        "data_dir": tmp_path, "storage_url": "", "index_url": "", "bus_url": "local://",
        "redis_url": "", "log_format": "text", "qido_max_results": 5, **overrides}
    deps = build(Settings(**values))
    subscribe_indexer(deps)
    deps.bus.start()
    relay = OutboxRelay(index=deps.index, bus=deps.bus)
    woken: list[int] = []
    deps.extras["on_stored"] = lambda: woken.append(1)
    port = free_port()
    # As ``vna run`` serves it: whole-study retrievals go out by sendfile.
    server = uvicorn.Server(uvicorn.Config(served_app(deps),
                                           host="127.0.0.1", port=port,
                                           log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, 0.02, "uvicorn to start")
    try:
        yield Web(f"http://127.0.0.1:{port}", deps, relay, woken)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        deps.close()


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    with serve(tmp_path) as running:
        yield running


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dataset_bytes(part10: bytes) -> bytes:
    """The data set behind the File Meta: what must come back unchanged."""
    return part10[read_header(io.BytesIO(part10)).dataset_offset:]


def multipart_parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part, parsed by the standard library."""
    head = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + response.content)
    assert msg.is_multipart()
    out: list[tuple[str, bytes]] = []
    for p in msg.iter_parts():
        payload = p.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((str(p.get("Content-Type", "")).replace('"', ""), payload))
    return out


def stow_body(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> tuple[bytes, str]:
    body = b"".join(f"--{boundary}\r\nContent-Type: {ct}\r\n\r\n".encode() + data + b"\r\n"
                    for ct, data in parts) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def a_study(n_series: int = 2, per_series: int = 3, **kw: Any) -> list[Dataset]:
    study = generate_uid()
    out = []
    for s in range(n_series):
        series = generate_uid()
        out += [ct_instance(study_uid=study, series_uid=series, instance_number=i + 1,
                            series_number=s + 1, **kw) for i in range(per_series)]
    return out


def value(obj: dict[str, Any], tag: str) -> Any:
    return obj[tag]["Value"][0]


# ---------------------------------------------------------------------- STOW + QIDO
def test_stow_then_search_at_every_resource(web: Web) -> None:
    sent = a_study()
    study = sent[0].StudyInstanceUID
    client = web.client()
    response = client.store_instances(sent)
    refs = response.ReferencedSOPSequence
    assert {r.ReferencedSOPInstanceUID for r in refs} == {d.SOPInstanceUID for d in sent}
    # dicomweb-client sends 'Host: 127.0.0.1' without the port, and RetrieveURL
    # follows the Host header (as it must behind a proxy): compare paths.
    urls = [urlparse(r.RetrieveURL).path for r in refs]
    assert all(u.startswith(f"/dicomweb/studies/{study}/series/") for u in urls), urls
    assert "FailedSOPSequence" not in response
    assert web.woken, "the relay wake hook was not called"
    web.index_all()

    studies = client.search_for_studies(search_filters={"PatientID": "PAT001"})
    assert len(studies) == 1
    assert value(studies[0], "0020000D") == study
    assert urlparse(value(studies[0], "00081190")).path == f"/dicomweb/studies/{study}"
    assert value(studies[0], "00201208") == 6  # NumberOfStudyRelatedInstances
    assert value(studies[0], "00080056") == "ONLINE"  # InstanceAvailability

    series = client.search_for_series(study_instance_uid=study)
    assert len(series) == 2
    series_uid = value(series[0], "0020000E")
    assert urlparse(value(series[0], "00081190")).path == \
        f"/dicomweb/studies/{study}/series/{series_uid}"
    assert len(client.search_for_series(search_filters={"Modality": "CT"})) == 2

    in_series = client.search_for_instances(study_instance_uid=study,
                                            series_instance_uid=series_uid)
    assert len(in_series) == 3
    assert all(value(i, "0020000E") == series_uid for i in in_series)
    assert all(value(i, "00080056") == "ONLINE" for i in in_series)
    assert all(value(i, "00280100") == 16 for i in in_series)  # BitsAllocated
    # The fixture caps results at 5: the client pages on past the 299 Warning.
    assert len(client.search_for_instances(study_instance_uid=study)) == 5
    everything = client.search_for_instances(study_instance_uid=study, get_remaining=True)
    assert sorted(value(i, "00080018") for i in everything) == \
        sorted(d.SOPInstanceUID for d in sent)
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []


def test_qido_paging_is_stable_and_capped_with_a_warning(web: Web) -> None:
    sent = a_study(n_series=1, per_series=7)
    web.client().store_instances(sent)
    web.index_all()
    r = httpx.get(f"{web.root}/instances")
    assert r.status_code == 200
    assert len(r.json()) == 5
    assert r.headers["warning"].startswith("299 ")
    seen: list[str] = []
    for offset in range(0, 8, 2):
        page = httpx.get(f"{web.root}/instances", params={"limit": 2, "offset": offset})
        assert "warning" not in page.headers
        seen += [value(o, "00080018") for o in page.json()]
    assert len(seen) == 7 and len(set(seen)) == 7
    again = httpx.get(f"{web.root}/instances", params={"limit": 4}).json()
    assert [value(o, "00080018") for o in again] == seen[:4]
    # Beyond any database integer: past the end, and capped, as smaller ones are.
    past = httpx.get(f"{web.root}/instances", params={"offset": "9" * 20})
    assert past.status_code == 200 and past.json() == []
    many = httpx.get(f"{web.root}/instances", params={"limit": "9" * 20})
    assert many.status_code == 200 and len(many.json()) == 5
    assert many.headers["warning"].startswith("299 ")


def test_qido_matching_includefield_fuzzy_and_encoded_wildcards(web: Web) -> None:
    sent = a_study(n_series=1, per_series=1, patient_name="Müller^Jürgen", patient_id="PX-77")
    web.client().store_instances(sent)
    web.index_all()
    q = f"{web.root}/studies"
    # %2A is '*', percent-encoded by the client: still a wildcard.
    assert len(httpx.get(q + "?PatientID=PX%2A").json()) == 1
    assert httpx.get(q + "?PatientID=PY%2A").json() == []
    assert len(httpx.get(q, params={"PatientName": "muller", "fuzzymatching": "true"}).json()) \
        == 1
    assert len(httpx.get(q, params={"PatientName": "jurg", "fuzzymatching": "true"}).json()) \
        == 1
    assert httpx.get(q, params={"PatientName": "muller"}).json() == []
    assert len(httpx.get(q, params={"StudyDate": "20240101-20240131"}).json()) == 1
    assert httpx.get(q, params={"StudyDate": "20250101-"}).json() == []
    found = httpx.get(f"{web.root}/series",
                      params={"includefield": "Manufacturer,00180050"}).json()[0]
    assert value(found, "00080070") == "VNA-SYNTHETIC"
    assert value(found, "00180050") == 1.0
    every = httpx.get(f"{web.root}/instances", params={"includefield": "all"}).json()[0]
    assert value(every, "00080020") == "20240102"  # StudyDate, from above the level
    plain = httpx.get(f"{web.root}/instances").json()[0]
    assert "00080020" not in plain


def test_qido_accepts_a_timezone_offset_and_matches_dates_as_stored(web: Web) -> None:
    # As C-FIND does: checked, not applied (stored dates mostly carry no offset).
    sent = a_study(n_series=1, per_series=1, patient_id="TZ-1")
    web.client().store_instances(sent)
    web.index_all()
    q = f"{web.root}/studies"
    plain = httpx.get(q, params={"PatientID": "TZ-1", "StudyDate": sent[0].StudyDate})
    assert len(plain.json()) == 1
    for name in ("TimezoneOffsetFromUTC", "00080201"):
        with_offset = httpx.get(q, params={"PatientID": "TZ-1", "StudyDate": sent[0].StudyDate,
                                           name: "-0500"})
        assert with_offset.status_code == 200
        assert with_offset.json() == plain.json()


@pytest.mark.parametrize(("params", "reason"), [
    ({"StudyDate": "20241345"}, "not a valid date"),
    ({"StudyDate": "yesterday"}, "not a date"),
    ({"NoSuchAttribute": "1"}, "unknown attribute"),
    ({"StudyInstanceUID": "1.2.abc"}, "not a valid UID"),
    ({"limit": "ten"}, "not an integer"),
    ({"offset": "-1"}, "negative"),
    ({"fuzzymatching": "maybe"}, "fuzzymatching"),
    ({"includefield": "Nonsense"}, "unknown attribute"),
    ({"SOPInstanceUID": "1.2.3"}, "below the STUDY level"),
    ({"TimezoneOffsetFromUTC": "0100"}, "not an offset"),
    ({"00080201": "+2500"}, "not an offset"),
    # Echoed in the reason: a control character must not cost the answer its Warning
    # header (the HTTP server refuses such a header and drops the connection).
    ({"includefield": "\x00"}, "NUL character"),
    ({"Modality\x01": "CT"}, "unknown attribute"),
    # No stored value holds one; PostgreSQL refuses one in a query (was a 500 there).
    ({"PatientID": "DOE\x00"}, "NUL character"),
])
def test_qido_bad_parameters_get_400_with_a_reason(web: Web, params: dict[str, str],
                                                    reason: str) -> None:
    r = httpx.get(f"{web.root}/studies", params=params)
    assert r.status_code == 400
    assert reason in r.json()["detail"]
    assert r.headers["warning"].startswith("299 ")


@pytest.mark.parametrize("url", [
    "/dicomweb/studies/1.2%003/series",  # in the path
    "/worklist/orders?patient_id=PAT%0001",  # the worklist's API too
])
def test_a_nul_anywhere_in_the_url_is_400_with_the_reason(web: Web, url: str) -> None:
    r = httpx.get(web.base + url)
    assert r.status_code == 400
    assert "NUL" in r.json()["detail"]
    assert r.headers["warning"].startswith("299 ")


def test_qido_malformed_uid_in_path_is_400(web: Web) -> None:
    r = httpx.get(f"{web.root}/studies/not..a.uid/series")
    assert r.status_code == 400
    assert "not a valid UID" in r.json()["detail"]


# ---------------------------------------------------------------------- WADO
def test_retrieve_returns_the_sent_data_sets_byte_for_byte(web: Web) -> None:
    sent = a_study()
    encoded = {d.SOPInstanceUID: dataset_bytes(encode(d)) for d in sent}
    study, series, sop = sent[0].StudyInstanceUID, sent[0].SeriesInstanceUID, \
        sent[0].SOPInstanceUID
    client = web.client()
    client.store_instances(sent)
    web.index_all()

    retrieved = client.retrieve_study(study)
    assert sorted(d.SOPInstanceUID for d in retrieved) == sorted(encoded)
    for ds in retrieved:
        assert dataset_bytes(encode(ds)) == encoded[ds.SOPInstanceUID]
    assert len(client.retrieve_series(study, series)) == 3
    one = client.retrieve_instance(study, series, sop)
    assert one.SOPInstanceUID == sop

    raw = httpx.get(f"{web.root}/studies/{study}",
                    headers={"Accept": 'multipart/related; type="application/dicom"; '
                                       "transfer-syntax=*"})
    parts = multipart_parts(raw)
    assert len(parts) == 6
    for content_type, body in parts:
        assert content_type == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
        ds = pydicom.dcmread(io.BytesIO(body))
        assert dataset_bytes(body) == encoded[ds.SOPInstanceUID]

    not_stored = httpx.get(f"{web.root}/studies/{study}",
                           headers={"Accept": 'multipart/related; type="application/dicom"; '
                                              f"transfer-syntax={JPEG_BASELINE}"})
    # 12-bit CT does not fit JPEG Baseline's 8 bits: it cannot be produced.
    assert not_stored.status_code == 406
    assert "8-bit unsigned pixels only" in not_stored.json()["detail"]
    assert "(6 instances)" in not_stored.json()["detail"]
    assert httpx.get(f"{web.root}/studies/{generate_uid()}").status_code == 404


def assert_bulk_data(url: str, expected: bytes, *, first: int, last: int) -> None:
    """``url`` serves ``expected``: whole, and bytes ``first``-``last`` by Range."""
    whole = httpx.get(url, headers={"Accept": "application/octet-stream"})
    assert whole.status_code == 200
    assert whole.content == expected
    part = httpx.get(url, headers={"Range": f"bytes={first}-{last}"})
    assert part.status_code == 206
    assert part.content == expected[first:last + 1]
    assert part.headers["content-range"] == f"bytes {first}-{last}/{len(expected)}"


def test_a_value_json_cannot_hold_is_given_by_bulkdata_uri_and_empty_values_by_f_2_5(
        web: Web) -> None:
    # A modality's "1A" in an IS: the JSON model has no way to write it, and it
    # used to vanish from the metadata; it is now a BulkDataURI to the bytes as
    # stored. Empty values are as PS3.18 F.2.5 has them.
    [sent] = a_study(n_series=1, per_series=1)
    sent.AcquisitionNumber = "17"
    sent.ImageType = ["DERIVED", "", "MPR"]
    out = io.BytesIO()
    sent.save_as(out, enforce_file_format=True)
    raw = out.getvalue().replace(b"\x20\x00\x12\x00IS\x02\x0017", b"\x20\x00\x12\x00IS\x02\x001A")
    assert b"IS\x02\x001A" in raw
    study, series, sop = sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + raw
            + f"\r\n--{boundary}--\r\n".encode())
    stored = httpx.post(f"{web.root}/studies", content=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert stored.status_code == 200
    web.index_all()
    meta = web.client().retrieve_instance_metadata(study, series, sop)
    assert meta["00080008"] == {"vr": "CS", "Value": ["DERIVED", None, "MPR"]}
    uri = meta["00200012"]["BulkDataURI"]
    assert meta["00200012"]["vr"] == "IS"
    got = httpx.get(web.base + uri, headers={"Accept": "application/octet-stream"})
    assert got.status_code == 200
    assert got.content == b"1A"


def test_bulk_data_inside_sequences_has_uris_of_its_own(web: Web) -> None:
    # An ECG's samples sit in WaveformSequence: inlined, a long recording made the
    # metadata as large as the recording. Its BulkDataURI names the item's path.
    [sent] = a_study(n_series=1, per_series=1)
    wave = Dataset()
    wave.NumberOfWaveformChannels = 1
    wave.NumberOfWaveformSamples = 2000
    wave.WaveformBitsAllocated = 16
    wave.WaveformSampleInterpretation = "SS"
    wave.WaveformData = bytes(range(256)) * 16  # 4,096 bytes: bulk data
    small = Dataset()
    small.WaveformBitsAllocated = 16
    small.WaveformData = b"\x01\x02"  # small: inline, as at the top level
    sent.WaveformSequence = [small, wave]
    web.client().store_instances([sent])
    web.index_all()
    study, series, sop = sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID
    meta = web.client().retrieve_instance_metadata(study, series, sop)
    first, second = meta["54000100"]["Value"]
    assert first["54001010"] == {"vr": "OW", "InlineBinary": "AQI="}
    uri = second["54001010"]["BulkDataURI"]
    assert uri == (f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"
                   "/bulkdata/54000100/2/54001010")
    assert_bulk_data(web.base + uri, wave.WaveformData, first=256, last=511)
    root = f"{web.root}/studies/{study}/series/{series}/instances/{sop}/bulkdata"
    assert httpx.get(f"{root}/54000100/3/54001010").status_code == 404  # no third item
    assert httpx.get(f"{root}/54000100/0/54001010").status_code == 400  # items from 1
    assert httpx.get(f"{root}/54000100/2").status_code == 400  # no tag at the end


def test_metadata_with_bulkdata_uris_ranges_and_etag(web: Web) -> None:
    sent = a_study(n_series=1, per_series=2)
    study, series = sent[0].StudyInstanceUID, sent[0].SeriesInstanceUID
    client = web.client()
    client.store_instances(sent)
    web.index_all()

    meta = client.retrieve_study_metadata(study)
    assert len(meta) == 2
    assert len(client.retrieve_series_metadata(study, series)) == 2
    by_sop = {value(m, "00080018"): m for m in meta}
    first = sent[0]
    uri = by_sop[first.SOPInstanceUID]["7FE00010"]["BulkDataURI"]
    assert uri.startswith(f"/dicomweb/studies/{study}/series/{series}/instances/")
    assert_bulk_data(web.base + uri, first.PixelData, first=100, last=199)
    tail = httpx.get(web.base + uri, headers={"Range": "bytes=-10"})
    assert tail.content == first.PixelData[-10:]
    assert httpx.get(web.base + uri, headers={"Range": "bytes=99999999-"}).status_code == 416
    assert client.retrieve_bulkdata(web.base + uri) == [first.PixelData]

    url = f"{web.root}/studies/{study}/metadata"
    r1 = httpx.get(url)
    etag = r1.headers["etag"]
    assert httpx.get(url, headers={"If-None-Match": etag}).status_code == 304
    zipped = httpx.get(url, headers={"Accept-Encoding": "gzip"})
    assert zipped.headers.get("content-encoding") == "gzip"
    assert zipped.json() == r1.json()
    # The second gzip answer comes from the compressed cache, with the same ETag.
    assert zipped.headers["etag"] == etag
    plain = httpx.get(url, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert plain.json() == r1.json()
    # A new instance changes the ETag: a cached copy is not served for the new set.
    extra = ct_instance(study_uid=study, series_uid=series, instance_number=3)
    client.store_instances([extra])
    web.index_all()
    r2 = httpx.get(url, headers={"If-None-Match": etag})
    assert r2.status_code == 200
    assert r2.headers["etag"] != etag
    assert len(r2.json()) == 3


def test_cached_metadata_follows_a_correction_made_elsewhere(web: Web) -> None:
    """The cache is keyed by the index's study revision, not invalidated in-process:
    a correction made by another process (here: straight in the index, behind the
    app's back) changes the ETag and the body at once, at the study and series level."""
    sent = a_study(n_series=1, per_series=2, patient_name="WRONG^NAME")
    study, series = sent[0].StudyInstanceUID, sent[0].SeriesInstanceUID
    web.client().store_instances(sent)
    web.index_all()
    urls = [f"{web.root}/studies/{study}/metadata",
            f"{web.root}/studies/{study}/series/{series}/metadata"]
    before = {}
    for url in urls:
        for encoding in ("gzip", "identity"):  # both cached forms
            r = httpx.get(url, headers={"Accept-Encoding": encoding})
            assert value(r.json()[0], "00100010") == {"Alphabetic": "WRONG^NAME"}
            before[url] = r.headers["etag"]
        assert httpx.get(url, headers={"If-None-Match": before[url]}).status_code == 304

    web.deps.index.correct_study(study, {"PatientName": "RIGHT^ANNA"}, reason="test",
                                 actor="test")

    for url in urls:
        for encoding in ("gzip", "identity"):
            r = httpx.get(url, headers={"If-None-Match": before[url],
                                        "Accept-Encoding": encoding})
            assert r.status_code == 200
            assert r.headers["etag"] != before[url]
            assert {value(doc, "00100010")["Alphabetic"] for doc in r.json()} == {
                "RIGHT^ANNA"}
    assert httpx.get(f"{web.root}/studies/{study}/series/{generate_uid()}/metadata"
                     ).status_code == 404
    assert httpx.get(f"{web.root}/studies/{generate_uid()}/metadata").status_code == 404


def test_frames_native_and_encapsulated(web: Web) -> None:
    study, series = generate_uid(), generate_uid()
    multi = ct_instance(study_uid=study, series_uid=series, rows=16, columns=16)
    multi.NumberOfFrames = 3
    multi.PixelData = bytes(range(256)) * 2 * 3  # 3 frames of 16x16x2 bytes
    frame_len = 16 * 16 * 2
    jpeg = ct_instance(study_uid=study, series_uid=series, instance_number=2,
                       transfer_syntax=JPEG_BASELINE)
    # Even lengths: fragments are padded to even length when encapsulated.
    fragments = [b"\xff\xd8frame-one!\xff\xd9", b"\xff\xd8frame-two!\xff\xd9"]
    jpeg.NumberOfFrames = 2
    jpeg.PixelData = encapsulate(fragments)
    jpeg["PixelData"].VR = "OB"
    client = web.client()
    client.store_instances([multi, jpeg])
    web.index_all()

    frames = client.retrieve_instance_frames(study, series, multi.SOPInstanceUID, [2, 3])
    assert frames == [multi.PixelData[frame_len:2 * frame_len],
                      multi.PixelData[2 * frame_len:]]
    url = f"{web.root}/studies/{study}/series/{series}/instances/{jpeg.SOPInstanceUID}/frames/2,1"
    r = httpx.get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"; '
                                          "transfer-syntax=*"})
    assert r.status_code == 200
    parts = multipart_parts(r)
    assert [body for _ct, body in parts] == [fragments[1], fragments[0]]
    assert parts[0][0] == f"application/octet-stream; transfer-syntax={JPEG_BASELINE}"
    jpeg_typed = httpx.get(url, headers={"Accept": 'multipart/related; type="image/jpeg"'})
    assert multipart_parts(jpeg_typed)[0][0] == f"image/jpeg; transfer-syntax={JPEG_BASELINE}"
    decoded = httpx.get(url, headers={
        "Accept": 'multipart/related; type="application/octet-stream"; '
                  "transfer-syntax=1.2.840.10008.1.2.1"})
    # The fragments are not real JPEG: nothing decodes them, so no syntax but the stored.
    assert decoded.status_code == 406
    assert "could not be converted" in decoded.json()["detail"]
    missing = httpx.get(url.replace("/frames/2,1", "/frames/4"))
    assert missing.status_code == 404
    assert httpx.get(url.replace("/frames/2,1", "/frames/0")).status_code == 400


# ---------------------------------------------------------------------- STOW failures
def test_stow_parts_fail_alone(web: Web) -> None:
    study = generate_uid()
    good = ct_instance(study_uid=study)
    other_study = ct_instance(study_uid=generate_uid())
    body, content_type = stow_body([("application/dicom", encode(good)),
                                    ("application/dicom", b"this is not DICOM" * 20),
                                    ("application/dicom", encode(other_study))])
    r = httpx.post(f"{web.root}/studies/{study}", content=body,
                   headers={"Content-Type": content_type})
    assert r.status_code == 202
    result = Dataset.from_json(r.json())
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == \
        [good.SOPInstanceUID]
    failed = {i.get("ReferencedSOPInstanceUID", ""): i.FailureReason
              for i in result.FailedSOPSequence}
    assert failed == {"": 0xC000, other_study.SOPInstanceUID: 0xA900}
    assert result.RetrieveURL == f"{web.root}/studies/{study}"
    web.index_all()
    assert web.deps.index.counts()["instances"] == 1

    # Resending the same instance succeeds and changes nothing (idempotence).
    body, content_type = stow_body([("application/dicom", encode(good))])
    again = httpx.post(f"{web.root}/studies", content=body,
                       headers={"Content-Type": content_type})
    assert again.status_code == 200

    # Same SOP Instance UID, other content: refused; nothing stored -> 409.
    changed = ct_instance(study_uid=study, sop_uid=good.SOPInstanceUID)
    body, content_type = stow_body([("application/dicom", encode(changed))])
    conflict = httpx.post(f"{web.root}/studies", content=body,
                          headers={"Content-Type": content_type})
    assert conflict.status_code == 409
    assert Dataset.from_json(conflict.json()).FailedSOPSequence[0].FailureReason == 0xC001


def test_stow_parts_are_framed_as_c_store_frames_them(web: Web) -> None:
    # A part goes straight into the store path's staging file as it arrives (its own
    # File Meta replaced by VNA's): the blob holds exactly the data set sent, framed as
    # for C-STORE, whether or not the client sent the 128-byte preamble.
    study = generate_uid()
    ds = ct_instance(study_uid=study)
    part10 = encode(ds)
    without_preamble = part10[132:]
    empty = ct_instance(study_uid=study)
    meta_only = encode(empty)
    meta_only = meta_only[:read_header(io.BytesIO(meta_only)).dataset_offset]
    body, content_type = stow_body([("application/dicom", without_preamble),
                                    ("application/dicom", meta_only)])
    r = httpx.post(f"{web.root}/studies/{study}", content=body,
                   headers={"Content-Type": content_type})
    assert r.status_code == 202
    result = Dataset.from_json(r.json())
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == \
        [ds.SOPInstanceUID]
    # The part with nothing after its File Meta fails alone, named by its UIDs.
    failed = result.FailedSOPSequence[0]
    assert failed.FailureReason == 0xC000
    assert failed.ReferencedSOPInstanceUID == empty.SOPInstanceUID
    claim = web.deps.index.find_claim(ds.SOPInstanceUID)
    assert claim is not None
    with web.deps.blobs.open(claim.blob_key) as fp:
        stored = fp.read()
    ts = str(ds.file_meta.TransferSyntaxUID)
    assert stored == file_meta_bytes(ts, ds.SOPClassUID, ds.SOPInstanceUID) + \
        dataset_bytes(part10)
    assert list(web.deps.staging_dir().iterdir()) == []  # nothing left behind


def test_stow_rejects_what_is_not_multipart_dicom(web: Web) -> None:
    r = httpx.post(f"{web.root}/studies", content=b"{}",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 415
    truncated, content_type = stow_body([("application/dicom", encode(ct_instance()))])
    r = httpx.post(f"{web.root}/studies", content=truncated[:-20],
                   headers={"Content-Type": content_type})
    assert r.status_code == 400
    assert "closing boundary" in r.json()["detail"]
    assert web.deps.index.counts()["claims"] == 0


def test_health_ready_metrics_still_served(web: Web) -> None:
    assert httpx.get(f"{web.base}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{web.base}/readyz").status_code == 200
    assert "vna_" in httpx.get(f"{web.base}/metrics").text
    capabilities = httpx.get(web.root).json()
    assert "/studies/{study}/series" in capabilities["qido-rs"]["resources"]


def test_ranged_blob_reads_and_503_when_storage_is_unavailable(tmp_path: Path) -> None:
    """Blobs without a local path (memory here, S3 alike) are read by ranges."""
    with serve(tmp_path, storage_url="memory://") as web:
        study, series = generate_uid(), generate_uid()
        multi = ct_instance(study_uid=study, series_uid=series, rows=16, columns=16)
        multi.NumberOfFrames = 2
        multi.PixelData = bytes(range(256)) * 4
        client = web.client()
        client.store_instances([multi])
        web.index_all()
        assert web.deps.blobs.local_path(
            web.deps.index.instances(study)[0].blob_key) is None
        frames = client.retrieve_instance_frames(study, series, multi.SOPInstanceUID, [2])
        assert frames == [multi.PixelData[512:]]
        uri = (f"{web.root}/studies/{study}/series/{series}/instances/"
               f"{multi.SOPInstanceUID}/bulkdata/7FE00010")
        r = httpx.get(uri, headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == multi.PixelData[10:20]

        web.deps.blobs.available = False  # type: ignore[attr-defined]
        body, content_type = stow_body([("application/dicom", encode(ct_instance()))])
        down = httpx.post(f"{web.root}/studies", content=body,
                          headers={"Content-Type": content_type})
        assert down.status_code == 503
        assert down.headers["retry-after"]
        failed = Dataset.from_json(down.json()).FailedSOPSequence
        assert failed[0].FailureReason == 0xA700


def test_rendered_and_thumbnails(web: Web) -> None:
    from PIL import Image

    study, series = generate_uid(), generate_uid()
    ds = ct_instance(study_uid=study, series_uid=series, rows=32, columns=64, pixel_seed=1)
    # Left half stored 0 (-1024 HU), right half 2024 (+1000 HU): a window of 0,400
    # must render them black and white.
    ds.PixelData = ((b"\x00\x00" * 32 + b"\xe8\x07" * 32) * 32)
    web.client().store_instances([ds])
    web.index_all()
    base = f"{web.root}/studies/{study}/series/{series}/instances/{ds.SOPInstanceUID}"

    png = httpx.get(f"{base}/rendered", params={"window": "0,400"},
                    headers={"Accept": "image/png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (64, 32)
    assert image.getpixel((5, 5)) == 0 and image.getpixel((60, 5)) == 255
    # Without a window parameter, the data set's own window (40,400) applies.
    own = Image.open(io.BytesIO(httpx.get(f"{base}/rendered",
                                          headers={"Accept": "image/png"}).content))
    assert own.getpixel((5, 5)) == 0 and own.getpixel((60, 5)) == 255
    jpeg = httpx.get(f"{base}/frames/1/rendered", params={"viewport": "32,16", "quality": "50"})
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg.content)).size == (32, 16)
    # A study's and a series' rendered image: its representative instance, full size.
    for url in (f"{web.root}/studies/{study}/rendered",
                f"{web.root}/studies/{study}/series/{series}/rendered"):
        whole = httpx.get(url, params={"window": "0,400"}, headers={"Accept": "image/png"})
        assert whole.status_code == 200 and whole.headers["content-type"] == "image/png"
        assert whole.content == png.content
    assert httpx.get(f"{web.root}/studies/{generate_uid()}/rendered").status_code == 404
    for url in (f"{web.root}/studies/{study}/thumbnail",
                f"{web.root}/studies/{study}/series/{series}/thumbnail", f"{base}/thumbnail"):
        thumb = Image.open(io.BytesIO(httpx.get(url).content))
        assert max(thumb.size) <= 128
    assert httpx.get(f"{base}/rendered", params={"window": "wide"}).status_code == 400
    assert httpx.get(f"{base}/rendered", headers={"Accept": "image/gif"}).status_code == 406
    assert httpx.get(f"{base}/frames/2/rendered").status_code == 404


def test_cors_is_off_by_default_and_configurable(web: Web, tmp_path: Path) -> None:
    origin = {"Origin": "https://viewer.example"}
    assert "access-control-allow-origin" not in httpx.get(web.root + "/studies",
                                                          headers=origin).headers
    with serve(tmp_path / "cors", cors_origins="https://viewer.example") as other:
        r = httpx.get(other.root + "/studies", headers=origin)
        assert r.headers["access-control-allow-origin"] == "https://viewer.example"
        assert "warning" in r.headers["access-control-expose-headers"].lower()
