"""`vna up` as a user runs it: separate processes on PostgreSQL, RabbitMQ, Redis, S3.

Kill any one of ingest, index and dicomweb: nothing stored is lost, and the
archive answers again once the supervisor has started the process again.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.support.commitment import (
    CommitmentListener,
    commitment_request,
    referenced,
    request_commitment,
)
from tests.support.processes import VnaProcess, delete_bus_namespace, free_port, wait_for
from vna.dicom.part10 import read_header
from vna.testing.synthetic import write_ct_series

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def _pids(data_dir: Path) -> dict[str, int]:
    out = {}
    for line in (data_dir / "up.pids").read_text().splitlines():
        name, pid = line.split()
        out[name] = int(pid)
    return out


def _instances(base: str, patient_id: str) -> int:
    r = httpx.get(f"{base}/dicomweb/studies", timeout=10,
                  params={"PatientID": patient_id,
                          "includefield": "NumberOfStudyRelatedInstances"})
    if r.status_code != 200:
        return -1
    return sum(int(s["00201208"]["Value"][0]) for s in r.json())


def _store(port: int, directory: Path) -> None:
    storescu = shutil.which("storescu")
    assert storescu, "dcmtk is missing: apt-get install -y dcmtk"
    done = subprocess.run([storescu, "-aec", "VNA", "127.0.0.1", str(port), "+sd", "+r",
                           str(directory)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _kill_and_wait_restart(archive: VnaProcess, name: str) -> None:
    old = _pids(archive.data_dir)[name]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: _pids(archive.data_dir)[name] != old, 60, 0.1, f"{name} restarted")


def test_make_up_survives_killing_each_service(tmp_path: Path, backends: dict[str, str]) -> None:
    db = f"vna_e2e_{uuid.uuid4().hex[:8]}"
    env = {
        "VNA_INDEX_URL": f"postgresql://postgres@127.0.0.1:5432/{db}",
        "VNA_BUS_URL": backends["amqp"],
        "VNA_BUS_NAMESPACE": f"vna-e2e-{uuid.uuid4().hex[:8]}",
        "VNA_REDIS_URL": backends["redis"],
        "VNA_STORAGE_URL": "",
        "VNA_UP_INGEST_METRICS_PORT": str(free_port()),
        "VNA_UP_INDEX_METRICS_PORT": str(free_port()),
    }
    modality = CommitmentListener("CT_SCANNER").start()
    env["VNA_PEERS"] = modality.peer
    archive = VnaProcess(tmp_path / "data", command="up", env=env)
    archive.start(timeout=120)
    try:
        first = write_ct_series(tmp_path / "s1", 40, study_uid=generate_uid(), patient_id="UP-1")
        _store(archive.dimse_port, first[0].parent)
        wait_for(lambda: _instances(archive.base_url, "UP-1") == 40, 120, 0.2, "40 indexed")
        # ingest and index have no HTTP port: each serves /metrics on one of its own,
        # counting what its processes did (ingest: all of its receiver processes).
        assert _metric(env["VNA_UP_INGEST_METRICS_PORT"], "vna_instances_stored_total") == 40
        wait_for(lambda: _metric(env["VNA_UP_INDEX_METRICS_PORT"],
                                 "vna_instances_indexed_total") == 40, 30, 0.2, "index metrics")

        # The indexer dies: what is stored meanwhile waits in RabbitMQ.
        _kill_and_wait_restart(archive, "index")
        second = write_ct_series(tmp_path / "s2", 30, study_uid=generate_uid(),
                                 patient_id="UP-1")
        _store(archive.dimse_port, second[0].parent)
        wait_for(lambda: _instances(archive.base_url, "UP-1") == 70, 120, 0.2, "70 indexed")

        # The front door dies: it comes back on the same port and stores again.
        _kill_and_wait_restart(archive, "ingest")
        third = write_ct_series(tmp_path / "s3", 10, study_uid=generate_uid(), patient_id="UP-1")
        wait_for(lambda: subprocess.run(["echoscu", "-aec", "VNA", "127.0.0.1",
                                         str(archive.dimse_port)]).returncode == 0,
                 60, 0.2, "ingest answering again")
        _store(archive.dimse_port, third[0].parent)
        wait_for(lambda: _instances(archive.base_url, "UP-1") == 80, 120, 0.2, "80 indexed")

        # C-FIND and C-GET answer from PostgreSQL and S3 as they do embedded.
        out = tmp_path / "find"
        out.mkdir()
        subprocess.run(["findscu", "-S", "-aec", "VNA", "-X", "-od", str(out),
                        "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=UP-1",
                        "-k", "StudyInstanceUID", "-k", "NumberOfStudyRelatedInstances",
                        "127.0.0.1", str(archive.dimse_port)], check=True, timeout=60)
        found = sorted(int(pydicom.dcmread(p).NumberOfStudyRelatedInstances)
                       for p in out.iterdir())
        assert found == [10, 30, 40]
        got = tmp_path / "got"
        got.mkdir()
        study = pydicom.dcmread(second[0]).StudyInstanceUID
        subprocess.run(["getscu", "-S", "-aec", "VNA", "-od", str(got),
                        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                        "127.0.0.1", str(archive.dimse_port)], timeout=120)
        received = {pydicom.dcmread(p).SOPInstanceUID: _data_set(p.read_bytes())
                    for p in got.iterdir()}
        assert len(received) == 30
        for path in second[::7]:
            assert received[pydicom.dcmread(path).SOPInstanceUID] == _data_set(
                path.read_bytes())

        # Storage Commitment: the claim in PostgreSQL and the blob in S3 say "committed".
        transaction = generate_uid()
        kept = [pydicom.dcmread(p, stop_before_pixels=True) for p in second[:2]]
        unknown = generate_uid()
        rsp = request_commitment(archive.dimse_port, commitment_request(
            transaction, [(ds.SOPClassUID, ds.SOPInstanceUID) for ds in kept]
            + [(kept[0].SOPClassUID, unknown)]), ae_title=modality.ae_title)
        assert rsp.Status == 0
        event_type, info = modality.reports.get(timeout=60)
        assert (event_type, info.TransactionUID) == (2, transaction)
        assert referenced(info.ReferencedSOPSequence) == {
            ds.SOPInstanceUID: ds.SOPClassUID for ds in kept}
        assert [item.ReferencedSOPInstanceUID for item in info.FailedSOPSequence] == [unknown]

        # HTTP dies and comes back with the same answers.
        _kill_and_wait_restart(archive, "dicomweb")
        wait_for(lambda: _instances(archive.base_url, "UP-1") == 80, 60, 0.2, "dicomweb back")

        # Blobs live in S3 (rclone), not in the data directory's blob folder.
        assert not (tmp_path / "data" / "blobs").exists()
        assert archive.stop() == 0
    finally:
        archive.stop()
        modality.stop()
        _drop_database(db)
        delete_bus_namespace(backends["amqp"], env["VNA_BUS_NAMESPACE"])


def _metric(port: str, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def _data_set(raw: bytes) -> bytes:
    return raw[read_header(io.BytesIO(raw)).dataset_offset:]


def _drop_database(name: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                           isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()
