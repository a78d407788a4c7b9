"""Every DICOMweb resource through dicomweb-client, against `vna run` and `vna up`.

One pass per world: STOW-RS stores a study in three transfer syntaxes
(Explicit and Implicit VR Little Endian, JPEG Baseline); QIDO-RS finds it at
each resource; WADO-RS returns, in the stored transfer syntax, the data sets
that were sent byte for byte, their metadata, frames, bulk data and rendered
images. The in-process edge cases live in tests/integration/test_dicomweb.py.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from tests.support.processes import VnaProcess, vna_up, wait_for
from vna.dicom.part10 import read_header
from vna.testing.synthetic import ct_instance

pytestmark = pytest.mark.e2e

PATIENT = "DWC-E2E"
# Everything here goes through HTTP: one DIMSE receiver (not one per core) starts faster.
ONE_RECEIVER = {"VNA_INGEST_WORKERS": "1"}


def _jpeg_instance(study: str, series: str) -> tuple[Dataset, bytes]:
    """An 8-bit CT slice compressed with JPEG Baseline (a real JPEG from Pillow)."""
    ramp = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8) * 2
    out = io.BytesIO()
    Image.fromarray(ramp, mode="L").save(out, format="JPEG", quality=90)
    jpeg = out.getvalue()
    jpeg += b"\0" * (len(jpeg) % 2)  # an encapsulated fragment has an even length
    ds = ct_instance(study_uid=study, series_uid=series, patient_id=PATIENT, series_number=3,
                     transfer_syntax=JPEGBaseline8Bit)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    return ds, jpeg


def _a_study() -> tuple[list[Dataset], bytes]:
    study = generate_uid()
    explicit = generate_uid()
    request = Dataset()
    request.ScheduledProcedureStepID = "SPS-E2E"
    request.RequestedProcedureID = "RP-E2E"
    sent = [ct_instance(study_uid=study, series_uid=explicit, instance_number=n,
                        patient_id=PATIENT, pixel_seed=n,
                        attributes={"RequestAttributesSequence": [request]})
            for n in (1, 2)]
    sent.append(ct_instance(study_uid=study, patient_id=PATIENT, series_number=2,
                            transfer_syntax=ImplicitVRLittleEndian))
    jpeg_ds, jpeg = _jpeg_instance(study, generate_uid())
    sent.append(jpeg_ds)
    return sent, jpeg


def _data_set(part10: bytes) -> bytes:
    """The data set behind the File Meta: what must come back unchanged."""
    return part10[read_header(io.BytesIO(part10)).dataset_offset:]


def _encoded(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return _data_set(buf.getvalue())


def _value(obj: dict[str, Any], tag: str) -> Any:
    return obj[tag]["Value"][0]


@pytest.fixture(params=["run", "up"])
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VnaProcess]:
    """`vna run` (embedded) or `vna up` (PostgreSQL, RabbitMQ, Redis, S3)."""
    if request.param == "run":
        process = VnaProcess(tmp_path / "data", env=ONE_RECEIVER).start()
        try:
            yield process
        finally:
            process.stop()
    else:
        backends = request.getfixturevalue("backends")
        with vna_up(tmp_path / "data", backends, env=ONE_RECEIVER) as process:
            yield process


def test_every_resource_round_trips(archive: VnaProcess) -> None:
    root = f"{archive.base_url}/dicomweb"
    client = DICOMwebClient(url=root)
    sent, jpeg = _a_study()
    by_sop = {d.SOPInstanceUID: d for d in sent}
    study = sent[0].StudyInstanceUID
    explicit, implicit, compressed = sent[0], sent[2], sent[3]

    # STOW-RS
    stored = client.store_instances(sent)
    assert "FailedSOPSequence" not in stored
    assert {r.ReferencedSOPInstanceUID for r in stored.ReferencedSOPSequence} == set(by_sop)
    assert client.store_instances([explicit]).ReferencedSOPSequence  # again: no change
    wait_for(lambda: len(client.search_for_instances(study_instance_uid=study)) == 4, 60, 0.1,
             "4 instances indexed")

    # QIDO-RS at each resource
    studies = client.search_for_studies(search_filters={"PatientID": PATIENT})
    assert [_value(s, "0020000D") for s in studies] == [study]
    assert _value(studies[0], "00201208") == 4
    assert len(client.search_for_studies(search_filters={"PatientID": "DWC-E2*"},
                                         fuzzymatching=True)) == 1
    series = client.search_for_series(study_instance_uid=study)
    assert len(series) == 3
    assert {_value(s, "0020000E") for s in series} == {d.SeriesInstanceUID for d in sent}
    everywhere = client.search_for_series(search_filters={"StudyInstanceUID": study,
                                                          "Modality": "CT"})
    assert len(everywhere) == 3
    (requested,) = client.search_for_series(search_filters={
        "RequestAttributesSequence.ScheduledProcedureStepID": "SPS-E2E"})
    assert _value(requested, "0020000E") == explicit.SeriesInstanceUID
    assert _value(requested, "00400275")["00401001"]["Value"] == ["RP-E2E"]
    assert len(client.search_for_instances(search_filters={"PatientID": PATIENT})) == 4
    in_series = client.search_for_instances(study_instance_uid=study,
                                            series_instance_uid=explicit.SeriesInstanceUID)
    assert sorted(_value(i, "00080018") for i in in_series) == \
        sorted(d.SOPInstanceUID for d in sent[:2])
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []

    # WADO-RS: the data sets as sent, in the syntaxes they were stored in ('*' for
    # the whole study: dicomweb-client takes one application/dicom media range only).
    retrieved = client.retrieve_study(study, media_types=(("application/dicom", "*"),))
    assert sorted(d.SOPInstanceUID for d in retrieved) == sorted(by_sop)
    for ds in retrieved:
        original = by_sop[ds.SOPInstanceUID]
        assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert _encoded(ds) == _encoded(original)
    one_series = client.retrieve_series(study, explicit.SeriesInstanceUID,
                                        media_types=(("application/dicom",
                                                      ExplicitVRLittleEndian),))
    assert len(one_series) == 2
    got = client.retrieve_instance(study, compressed.SeriesInstanceUID,
                                   compressed.SOPInstanceUID,
                                   media_types=(("application/dicom", JPEGBaseline8Bit),))
    assert _encoded(got) == _encoded(compressed)
    # PS3.18 lists no Implicit VR Little Endian for WADO-RS: it comes as stored, with '*'.
    got = client.retrieve_instance(study, implicit.SeriesInstanceUID, implicit.SOPInstanceUID)
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert _encoded(got) == _encoded(implicit)
    # And the bytes on the wire, not only what pydicom made of them.
    raw = httpx.get(f"{root}/studies/{study}", timeout=30, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    head = f"Content-Type: {raw.headers['content-type']}\r\n\r\n".encode()
    parts = [p.get_payload(decode=True) for p in
             BytesParser(policy=HTTP).parsebytes(head + raw.content).iter_parts()]
    assert sorted(_data_set(p) for p in parts) == sorted(_encoded(d) for d in sent)

    # Metadata at each level; bulk data through its BulkDataURI.
    metadata = client.retrieve_study_metadata(study)
    assert sorted(_value(m, "00080018") for m in metadata) == sorted(by_sop)
    assert len(client.retrieve_series_metadata(study, explicit.SeriesInstanceUID)) == 2
    meta = client.retrieve_instance_metadata(study, explicit.SeriesInstanceUID,
                                             explicit.SOPInstanceUID)
    assert _value(meta, "00100020") == PATIENT and _value(meta, "00280010") == 64
    uri = meta["7FE00010"]["BulkDataURI"]
    if uri.startswith("/"):
        uri = archive.base_url + uri
    assert client.retrieve_bulkdata(uri) == [explicit.PixelData]

    # Frames: native pixels, and the JPEG's compressed bitstream as stored.
    assert client.retrieve_instance_frames(
        study, explicit.SeriesInstanceUID, explicit.SOPInstanceUID, [1],
        media_types=(("application/octet-stream", "*"),)) == [explicit.PixelData]
    frames = client.retrieve_instance_frames(
        study, compressed.SeriesInstanceUID, compressed.SOPInstanceUID, [1],
        media_types=(("image/jpeg", JPEGBaseline8Bit),))
    assert frames == [jpeg]

    # Rendered: a PNG of the instance, a JPEG of a frame, thumbnails.
    png = client.retrieve_instance_rendered(study, explicit.SeriesInstanceUID,
                                            explicit.SOPInstanceUID, media_types=("image/png",))
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    frame_jpeg = client.retrieve_instance_frames_rendered(
        study, compressed.SeriesInstanceUID, compressed.SOPInstanceUID, [1],
        media_types=("image/jpeg",))
    assert Image.open(io.BytesIO(frame_jpeg)).format == "JPEG"
    series_path = f"/studies/{study}/series/{explicit.SeriesInstanceUID}"
    for path in (f"/studies/{study}", series_path,
                 f"{series_path}/instances/{explicit.SOPInstanceUID}"):
        thumb = httpx.get(f"{root}{path}/thumbnail", headers={"Accept": "image/png"},
                          timeout=30)
        assert thumb.status_code == 200 and thumb.content.startswith(b"\x89PNG")

    # The viewer's configuration is served by this world's HTTP process too.
    config = httpx.get(f"{archive.base_url}/viewer/app-config.js", timeout=10)
    assert config.status_code == 200 and '"/dicomweb"' in config.text
