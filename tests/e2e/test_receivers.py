"""`vna run`'s receiver processes: a receiver that dies is replaced, nothing is refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from tests.support.processes import VnaProcess, wait_for
from vna.testing.synthetic import write_ct_series

pytestmark = pytest.mark.e2e

STORESCU = shutil.which("storescu")


def _receivers(parent: int) -> set[int]:
    """Live ``vna ingest-worker`` children of ``parent``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and fields[0] != "Z" and b"ingest-worker" in cmdline:
            found.add(int(entry.name))
    return found


def _indexed(base: str, study: str) -> int:
    r = httpx.get(f"{base}/dicomweb/studies", params={"StudyInstanceUID": study,
                                                      "includefield": "00201208"}, timeout=10)
    found = r.json() if r.status_code == 200 else []
    return int(found[0]["00201208"]["Value"][0]) if found else 0


def test_a_receiver_that_dies_is_replaced(tmp_path: Path) -> None:
    if STORESCU is None:
        pytest.fail("dcmtk is missing: apt-get install -y dcmtk")
    archive = VnaProcess(tmp_path / "data", env={"VNA_INGEST_WORKERS": "2"}).start()
    try:
        assert archive.proc is not None
        before = wait_for(lambda: (r := _receivers(archive.proc.pid)) and len(r) == 2 and r,
                          30, what="two receivers")
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        after = wait_for(lambda: (r := _receivers(archive.proc.pid)) and len(r) == 2
                         and victim not in r and r, 60, what="the dead receiver replaced")
        assert len(after - before) == 1
        # Four associations at once, all stored: none was handed to the dead one.
        study = generate_uid()
        files = write_ct_series(tmp_path / "in", 8, study_uid=study)
        senders = [subprocess.Popen(
            [STORESCU, "-aec", "VNA", "127.0.0.1", str(archive.dimse_port),
             *map(str, files[i::4])], stderr=subprocess.PIPE, text=True) for i in range(4)]
        for sender in senders:
            _, err = sender.communicate(timeout=120)
            assert sender.returncode == 0, err[-1000:]
        wait_for(lambda: _indexed(archive.base_url, study) == 8, 60, what="8 indexed")
    finally:
        archive.stop()
