"""Every transfer syntax modalities send is accepted over DIMSE and kept as received."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.support.processes import VnaProcess, wait_for
from vna.dicom import status
from vna.dicom.part10 import read_header
from vna.testing.synthetic import ct_instance

pytestmark = pytest.mark.e2e

NATIVE = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
          DeflatedExplicitVRLittleEndian]
ENCAPSULATED = [JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
                JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless,
                HTJ2KLossless]


def _instance_file(directory: Path, ts: UID) -> Path:
    ds = ct_instance(rows=32, columns=32, transfer_syntax=ts)
    if ts in ENCAPSULATED:
        # The archive never decodes pixel data, so opaque fragments are enough to
        # prove that the bytes are kept exactly as they came.
        ds.PixelData = encapsulate([bytes(range(256)) * 7 + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = ts
        if ts == RLELossless:
            ds.file_meta.TransferSyntaxUID = ts
    path = directory / f"{ts}.dcm"
    if ts == ExplicitVRBigEndian:
        ds.save_as(path, implicit_vr=False, little_endian=False, enforce_file_format=True)
    else:
        ds.save_as(path, enforce_file_format=True)
    return path


def _data_set(raw: bytes) -> bytes:
    return raw[read_header(io.BytesIO(raw)).dataset_offset:]


def test_every_transfer_syntax_is_stored_as_received(tmp_path: Path) -> None:
    files = {ts: _instance_file(tmp_path, ts) for ts in NATIVE + ENCAPSULATED}
    archive = VnaProcess(tmp_path / "data").start()
    try:
        ae = AE(ae_title="MODALITY")
        for ts in files:
            ae.add_requested_context(CTImageStorage, ts)
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes, not re-encoded
        try:
            assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title="VNA")
            assert assoc.is_established
            accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
            assert accepted == {str(ts) for ts in files}
            for ts, path in files.items():
                rsp = assoc.send_c_store(path)
                assert rsp.Status == status.SUCCESS, f"{ts.name}: 0x{rsp.Status:04X}"
            assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old

        import httpx

        def indexed() -> int:
            r = httpx.get(f"{archive.base_url}/dicomweb/studies", timeout=10,
                          params={"PatientID": "PAT001"})
            return sum(int(s["00201208"]["Value"][0]) for s in r.json())

        wait_for(lambda: indexed() == len(files), 60, what="all indexed")
        blobs = [p for p in (tmp_path / "data" / "blobs").rglob("*")
                 if p.is_file() and ".tmp" not in p.parts]
        stored = {}
        for blob in blobs:
            raw = blob.read_bytes()
            stored[read_header(io.BytesIO(raw)).transfer_syntax_uid] = _data_set(raw)
        for ts, path in files.items():
            assert stored[str(ts)] == _data_set(path.read_bytes()), ts.name
            pydicom.dcmread(io.BytesIO(stored[str(ts)]), force=True)  # still parses
    finally:
        archive.stop()
