"""A 2 GB study through STOW-RS and back through WADO-RS, the archive staying small.

Issue #3: "a 2 GB upload keeps the process under 300 MB resident" and
"retrieving a 2 GB study never holds it in memory". The instances are made on the
fly (a header, then 50 MiB of pixel data written from one reused chunk), so the
test itself never holds a whole instance either.
"""

from __future__ import annotations

import io
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.support.processes import VnaProcess, wait_for
from vna.testing.synthetic import ct_instance

SIDE = 5120  # 5120 x 5120 x 16 bit = 50 MiB of pixel data an instance
PIXELS = SIDE * SIDE * 2
COUNT = 41  # 41 x 50 MiB > 2 GiB
CHUNK = bytes(range(256)) * 4096  # 1 MiB, reused
LIMIT_MIB = 300


def _header(study: str, series: str, number: int) -> tuple[str, bytes]:
    """A Part-10 CT header up to (not including) the pixel data's value."""
    ds = ct_instance(study_uid=study, series_uid=series, instance_number=number,
                     rows=8, columns=8)
    del ds.PixelData
    ds.Rows = ds.Columns = SIDE
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved, 4-byte length.
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, PIXELS)
    return str(ds.SOPInstanceUID), out.getvalue() + element


def _body(boundary: str, headers: list[bytes]) -> Iterator[bytes]:
    for header in headers:
        yield (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode()
        yield header
        for _ in range(PIXELS // len(CHUNK)):
            yield CHUNK
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _indexed(client: httpx.Client, study: str) -> int:
    found = client.get("/dicomweb/studies", params={
        "StudyInstanceUID": study, "includefield": "NumberOfStudyRelatedInstances"}).json()
    return int(found[0]["00201208"]["Value"][0]) if found else 0


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[VnaProcess]:
    # One process receives, indexes and serves HTTP: the one whose memory counts.
    vna = VnaProcess(tmp_path / "data", env={"VNA_INGEST_WORKERS": "1"}).start()
    try:
        yield vna
    finally:
        vna.stop()


def test_two_gigabyte_study_streams_in_and_out(archive: VnaProcess) -> None:
    assert archive.proc is not None
    study, series = generate_uid(), generate_uid()
    made = [_header(study, series, n + 1) for n in range(COUNT)]
    boundary = uuid.uuid4().hex
    with httpx.Client(base_url=archive.base_url, timeout=600) as client:
        stored = client.post(
            f"/dicomweb/studies/{study}",
            content=_body(boundary, [h for _, h in made]),
            headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                     f"boundary={boundary}",
                     "Accept": "application/dicom+json"})
        assert stored.status_code == 200, stored.text[:500]
        referenced = stored.json()["00081199"]["Value"]
        assert sorted(r["00081155"]["Value"][0] for r in referenced) == sorted(
            uid for uid, _ in made)
        after_store = _peak_rss_mib(archive.proc.pid)
        assert after_store < LIMIT_MIB, f"{after_store:.0f} MiB resident after a 2 GB STOW"

        # Indexing follows the answer (the outbox): retrieve once all are indexed.
        wait_for(lambda: _indexed(client, study) == COUNT, 120, what="all indexed")
        total = 0
        with client.stream(
                "GET", f"/dicomweb/studies/{study}",
                headers={"Accept": 'multipart/related; type="application/dicom"; '
                                   "transfer-syntax=*"}) as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes(1 << 20):
                total += len(chunk)
    # Every instance came back whole: at least its data set's bytes each.
    assert total > COUNT * PIXELS
    peak = _peak_rss_mib(archive.proc.pid)
    assert peak < LIMIT_MIB, f"{peak:.0f} MiB resident after retrieving a 2 GB study"
