"""`vna run` as a user runs it: storescu in, findscu / QIDO / WADO out, restart."""

from __future__ import annotations

import email.parser
import email.policy
import io
import shutil
import subprocess
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.support.processes import VnaProcess, wait_for
from vna.dicom import status
from vna.dicom.part10 import read_header
from vna.testing.synthetic import ct_instance, write_ct_series

pytestmark = pytest.mark.e2e

STORESCU = shutil.which("storescu")


def _need_dcmtk() -> None:
    if STORESCU is None:
        pytest.fail("dcmtk is missing: apt-get install -y dcmtk")


def _data_set(raw: bytes) -> bytes:
    return raw[read_header(io.BytesIO(raw)).dataset_offset:]


def _study_count(base: str, patient_id: str) -> int:
    r = httpx.get(f"{base}/dicomweb/studies", params={"PatientID": patient_id}, timeout=10)
    r.raise_for_status()
    found = r.json()
    return int(found[0]["00201208"]["Value"][0]) if found else 0


def _multipart_parts(response: httpx.Response) -> list[bytes]:
    head = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + response.content)
    return [part.get_payload(decode=True) for part in msg.iter_parts()]


def test_store_find_retrieve_and_restart(tmp_path: Path) -> None:
    _need_dcmtk()
    study_dir = tmp_path / "a-ct-study"
    study_uid = generate_uid()
    sent = write_ct_series(study_dir, 300, study_uid=study_uid, patient_id="E2E-1")
    archive = VnaProcess(tmp_path / "data").start()
    try:
        done = subprocess.run(
            [STORESCU, "-aec", "VNA", "127.0.0.1", str(archive.dimse_port), "+sd", "+r",
             str(study_dir)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Failed" not in done.stderr
        wait_for(lambda: _study_count(archive.base_url, "E2E-1") == 300, 120,
                 what="300 instances indexed")

        # WADO-RS: every instance comes back with the data set it was sent with.
        r = httpx.get(f"{archive.base_url}/dicomweb/studies/{study_uid}", timeout=60)
        assert r.status_code == 200
        returned = {pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID: _data_set(p)
                    for p in _multipart_parts(r)}
        assert len(returned) == 300
        for path in sent[:: 37]:
            ds = pydicom.dcmread(path)
            assert returned[ds.SOPInstanceUID] == _data_set(path.read_bytes())

        meta = httpx.get(f"{archive.base_url}/dicomweb/studies/{study_uid}/metadata",
                         timeout=30)
        assert meta.status_code == 200
        assert len(meta.json()) == 300
        assert "BulkDataURI" in meta.json()[0]["7FE00010"]

        # Ctrl-C stops cleanly (nothing logged as an error on the way: the terminal
        # signals the worker processes too); a restart finds everything again.
        assert archive.stop() == 0
        assert '"level": "error"' not in archive.log.read_text()
        archive.start()
        assert _study_count(archive.base_url, "E2E-1") == 300
    finally:
        archive.stop()


def _raw_file(tmp: Path, name: str, meta_sop: str, dataset: bytes, ts: str) -> Path:
    """A Part-10 file whose data set bytes are exactly ``dataset`` (maybe broken)."""
    from vna.dicom.part10 import file_meta_bytes

    path = tmp / name
    path.write_bytes(file_meta_bytes(ts, str(CTImageStorage), meta_sop) + dataset)
    return path


def test_bad_input_gets_a_failure_and_the_association_keeps_working(tmp_path: Path) -> None:
    archive = VnaProcess(tmp_path / "data").start()
    try:
        good = ct_instance(rows=128, columns=128)
        good_path = tmp_path / "good.dcm"
        good.save_as(good_path, enforce_file_format=True)
        raw = good_path.read_bytes()
        dataset = _data_set(raw)
        ts = str(good.file_meta.TransferSyntaxUID)
        truncated = _raw_file(tmp_path, "trunc.dcm", good.SOPInstanceUID, dataset[:-4000], ts)
        garbage = _raw_file(tmp_path, "garbage.dcm", generate_uid(), b"\x08\x00\x16" * 50, ts)

        bad_uid = ct_instance()
        bad_uid.SOPInstanceUID = "1.2.abc"
        bad_uid.file_meta.MediaStorageSOPInstanceUID = "1.2.abc"
        bad_uid_path = tmp_path / "baduid.dcm"
        bad_uid.save_as(bad_uid_path, enforce_file_format=True)
        long_uid = ct_instance()
        long_uid.StudyInstanceUID = "1." + "2" * 70
        long_uid_path = tmp_path / "longuid.dcm"
        long_uid.save_as(long_uid_path, enforce_file_format=True)

        ae = AE(ae_title="BADSCU")
        ae.add_requested_context(CTImageStorage, ts)
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes exactly as in the file
        try:
            assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title="VNA")
            assert assoc.is_established
            statuses = {}
            for name, path in (("truncated", truncated), ("garbage", garbage),
                               ("bad uid", bad_uid_path), ("long uid", long_uid_path)):
                rsp = assoc.send_c_store(path)
                assert assoc.is_established, f"association dropped after {name}"
                statuses[name] = (rsp.Status, str(rsp.get("ErrorComment", "")))
            rsp = assoc.send_c_store(good_path)
            assert rsp.Status == status.SUCCESS
            assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
        for name, (code, comment) in statuses.items():
            assert code & 0xF000 in (0xA000, 0xC000), f"{name}: 0x{code:04X}"
            assert comment, f"{name}: no Error Comment"
        assert "truncated" in statuses["truncated"][1]
        assert "64" in statuses["long uid"][1]
        blobs = [p for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file()
                 and ".tmp" not in p.parts]
        assert len(blobs) == 1  # only the good instance was written
    finally:
        archive.stop()
