"""`vna run` with several HTTP worker processes: one port, one archive.

STOW-RS from concurrent clients lands in different workers; everything is stored
once and indexed by the main process; every worker answers QIDO, WADO and
metadata from the shared index (the metadata ETag changes when an instance is
added, whichever worker answers); /metrics in any worker counts every worker's
stores; a worker that dies is replaced; Ctrl-C stops them all.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.support.processes import VnaProcess, wait_for
from vna.dicom.part10 import read_header
from vna.testing.synthetic import ct_instance

pytestmark = pytest.mark.e2e

WORKERS = 2
DICOM_JSON = "application/dicom+json"


def _children(pid: int, command: str) -> list[int]:
    """Processes whose parent is ``pid`` running ``vna <command>``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and command.encode() in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _connections(pid: int, port: int) -> int:
    """Established TCP connections on local ``port`` that process ``pid`` holds."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    inodes.add(fields[9])
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:[") and target[8:-1] in inodes:
                held += 1
    return held


def _instances(study: str, series: str, first: int, count: int) -> list[bytes]:
    out = []
    for n in range(first, first + count):
        ds = ct_instance(study_uid=study, series_uid=series, instance_number=n,
                         patient_id="HTTPW-1", pixel_seed=n)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def _stow(base: str, files: list[bytes]) -> httpx.Response:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + f + b"\r\n" for f in files) + f"--{boundary}--\r\n".encode()
    # A new connection each time: requests go round the workers.
    return httpx.post(f"{base}/dicomweb/studies", content=body, timeout=60, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": DICOM_JSON})


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _study_instances(base: str, study: str) -> int:
    r = httpx.get(f"{base}/dicomweb/studies", params={"StudyInstanceUID": study}, timeout=10)
    found = r.json() if r.status_code == 200 else []
    return int(found[0]["00201208"]["Value"][0]) if found else 0


def test_stow_from_concurrent_clients_over_several_http_workers(tmp_path: Path) -> None:
    archive = VnaProcess(tmp_path / "data", env={
        "VNA_HTTP_WORKERS": str(WORKERS), "VNA_INGEST_WORKERS": "1"}).start()
    try:
        assert archive.proc is not None
        pid = archive.proc.pid
        workers = _children(pid, "http-worker")
        assert len(workers) == WORKERS
        # /readyz answers once one worker serves; the archive says "ready" once all do
        # (until then connections go to the workers that serve).
        wait_for(lambda: "VNA ready" in archive.log.read_text(), 90, 0.2,
                 "every HTTP worker to serve")

        # Clients connecting together are spread over the workers, not all in one.
        clients = [httpx.Client(timeout=10) for _ in range(2 * WORKERS)]
        try:
            with ThreadPoolExecutor(len(clients)) as pool:
                list(pool.map(lambda c: c.get(f"{archive.base_url}/healthz"), clients))
            assert sorted(_connections(w, archive.http_port) for w in workers) == [2] * WORKERS
        finally:
            for client in clients:
                client.close()

        study, series = generate_uid(), generate_uid()
        batches = [_instances(study, series, 10 * k + 1, 10) for k in range(8)]
        # The first batch twice: an identical resend is stored once.
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda b: _stow(archive.base_url, b),
                                    [*batches, batches[0]]))
        assert [a.status_code for a in answers] == [200] * 9, [a.text[-300:] for a in answers]
        wait_for(lambda: _study_instances(archive.base_url, study) == 80, 60,
                 what="80 instances indexed")

        # Every worker answers from the shared index (new connections go round them).
        etags = set()
        for _ in range(2 * WORKERS):
            meta = httpx.get(f"{archive.base_url}/dicomweb/studies/{study}/metadata",
                             timeout=30)
            assert meta.status_code == 200
            assert len(meta.json()) == 80
            etags.add(meta.headers["etag"])
        assert len(etags) == 1
        old_etag = etags.pop()
        retrieved = httpx.get(f"{archive.base_url}/dicomweb/studies/{study}", timeout=60,
                              headers={"Accept": 'multipart/related; type="application/dicom"'
                                                 "; transfer-syntax=*"})
        assert retrieved.status_code == 200
        assert int(retrieved.headers["content-length"]) == len(retrieved.content)
        sent = {pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID: _data_set(f)
                for batch in batches for f in batch}
        assert _parts(retrieved) == sent

        # Counted in every worker's /metrics, whichever worker stored them.
        for _ in range(2 * WORKERS):
            assert _metric(archive.base_url, "vna_instances_stored_total") == 80
            assert _metric(archive.base_url, "vna_instances_duplicate_total") == 10
        wait_for(lambda: _metric(archive.base_url, "vna_instances_indexed_total") == 80, 30,
                 what="the main process's indexing in /metrics")

        # One more instance: every worker's metadata has it, under another ETag.
        assert _stow(archive.base_url, _instances(study, series, 81, 1)).status_code == 200
        wait_for(lambda: _study_instances(archive.base_url, study) == 81, 30,
                 what="the 81st instance indexed")
        for _ in range(2 * WORKERS):
            meta = httpx.get(f"{archive.base_url}/dicomweb/studies/{study}/metadata",
                             headers={"If-None-Match": old_etag}, timeout=30)
            assert meta.status_code == 200
            assert len(meta.json()) == 81
            assert meta.headers["etag"] != old_etag

        # A worker that dies is replaced; the others serve meanwhile.
        os.kill(workers[0], signal.SIGKILL)
        assert _study_instances(archive.base_url, study) == 81
        wait_for(lambda: len(_children(pid, "http-worker")) == WORKERS
                 and workers[0] not in _children(pid, "http-worker"),
                 30, what="the HTTP worker replaced")
        for _ in range(2 * WORKERS):
            assert _study_instances(archive.base_url, study) == 81

        # Ctrl-C stops every worker with the archive.
        remaining = _children(pid, "http-worker")
        assert archive.stop() == 0
        assert not [p for p in remaining if Path(f"/proc/{p}").exists()
                    and b"http-worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
    finally:
        archive.stop()


def _parts(response: httpx.Response) -> dict[str, bytes]:
    import email.parser
    import email.policy

    head = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + response.content)
    out = {}
    for part in msg.iter_parts():
        data = part.get_payload(decode=True)
        out[pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID] = _data_set(data)
    return out


def _data_set(raw: bytes) -> bytes:
    return raw[read_header(io.BytesIO(raw)).dataset_offset:]
