"""DICOMweb benchmark: VNA against Orthanc with its DICOMweb plugin, in the same run.

Figures, not assertions (DESIGN.md §6). Each target is started fresh on loopback
with its own temporary storage, then, in this order:

1. STOW-RS: the CT series of ``bench.ingest`` (``--count`` instances of 512x512,
   one study), ``multipart/related; type="application/dicom"`` requests of
   ``--batch`` instances from ``--clients`` concurrent clients; instances/s from
   the first request to the last answer.
2. WADO-RS: that study whole, as stored (``transfer-syntax=*``: nobody transcodes),
   MB/s of the multipart body, read by three clients: httpx (as a Python
   application reads it; on two cores httpx itself is the limit, near 500 MB/s),
   a lean client (a socket read into one large buffer: what the server can send
   to one connection), and ``--wado-clients`` lean clients at once (aggregate);
   the study's metadata, cold once then warm (p50); single frames as
   ``application/octet-stream`` (p50).
3. QIDO-RS: ``--qido-instances`` small synthetic instances (8x8 pixels, many
   patients, studies and series, varied names, modalities, dates and accession
   numbers) are stored by dcmtk ``storescu`` over four associations (each
   server's fast path; how long it took is printed), then five typical queries
   are each repeated ``--repeat`` times on different keys: p50/p95.

    .venv/bin/python -m bench.dicomweb [--quick] [--count 1000] [--qido-instances 100000]
                                       [--target vna --target orthanc --target vna-up]

The default index is smaller than issue #3's 100,000 instances so that the run
stays within minutes on two cores; the table says so, and
``--qido-instances 100000`` runs the full size.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.ingest import (
    LOOPBACK,
    NODELAY_ENV,
    OUT_DIR,
    OrthancServer,
    Server,
    VnaServer,
    VnaUpServer,
    cleanup_on_signals,
    fmt_row,
    generate,
    http_get,
    ratio_text,
    run_dir,
    wait_until,
    warm_memory,
)

ISSUE_QIDO_INSTANCES = 100_000
DICOM_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
FRAME_ANY = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
DICOM_JSON = "application/dicom+json"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
UID_ROOT = "1.2.826.0.1.3680043.8.498.77"  # pydicom's root; deterministic suffixes below


# ---------------------------------------------------------------- servers -----------

class OrthancDicomWeb(OrthancServer):
    """Orthanc with Debian's DICOMweb plugin, its settings otherwise the defaults."""

    name = "Orthanc+DICOMweb"

    def config(self) -> dict[str, object]:
        return {**super().config(), "Plugins": [str(DICOMWEB_PLUGIN)],
                "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}}

    def start(self) -> None:
        super().start()
        wait_until(lambda: _ok(f"{self.root}/studies?limit=1"), timeout=60, interval=0.3,
                   proc=self.proc, what="Orthanc DICOMweb")

    @property
    def root(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}/dicom-web"

    def instance_count(self) -> int:
        stats = json.loads(http_get(f"http://{LOOPBACK}:{self.http_port}/statistics"))
        return int(stats["CountInstances"])

    def wait_indexed(self, total: int) -> float:
        return 0.0  # Orthanc indexes before it answers


class VnaDicomWeb(VnaServer):
    @property
    def root(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}/dicomweb"

    def instance_count(self) -> int:
        return -1  # not needed: the index lag says when everything is queryable

    def wait_indexed(self, total: int) -> float:
        """Seconds until the index lag is zero (everything stored is queryable)."""
        started = time.perf_counter()
        wait_until(lambda: self.metric("vna_index_lag") == 0, timeout=600 + total / 20,
                   interval=0.2, proc=self.proc, what="VNA indexed everything")
        return time.perf_counter() - started


class VnaUpDicomWeb(VnaUpServer, VnaDicomWeb):
    pass


def _ok(url: str) -> bool:
    try:
        http_get(url)
    except (OSError, urllib.error.URLError):
        return False
    return True


# ---------------------------------------------------------------- measuring ---------

@dataclass
class Figures:
    """What one target measured; None where it could not be measured."""

    target: str
    stow_per_s: float | None = None
    stow_failed: int = 0
    stow_indexed_s: float | None = None
    stow_rounds: list[float] = field(default_factory=list)
    """inst/s of each STOW-RS round (``--stow-rounds``), the first included; in a
    round every target is measured once, in turn, on a fresh server."""
    wado_mb_s: float | None = None
    wado_client_busy: float | None = None
    """The httpx client's CPU time over the read's wall time (median): near 1, the
    httpx row measures the client rather than the server."""
    wado_lean_mb_s: float | None = None
    wado_parallel_mb_s: float | None = None
    wado_bytes: int = 0
    metadata_cold_ms: float | None = None
    metadata_p50_ms: float | None = None
    metadata_count: int = 0
    frame_p50_ms: float | None = None
    populate_s: float | None = None
    populate_indexed_s: float | None = None
    qido: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    load_start: float | None = None
    load_end: float | None = None
    notes: list[str] = field(default_factory=list)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``, linear between order statistics."""
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    lo = int(at)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (at - lo)


def multipart_body(paths: list[Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for path in paths:
        parts += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                  path.read_bytes(), b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(root: str, files: list[Path], batch: int, clients: int) -> tuple[float, int]:
    """(seconds, failed instances) for STOW-RS of ``files`` in batches from ``clients``."""
    batches = [files[i:i + batch] for i in range(0, len(files), batch)]
    lock = threading.Lock()
    failed = [0]
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not batches:
                        return
                    mine = batches.pop(0)
                body, content_type = multipart_body(mine)
                try:
                    r = http.post(f"{root}/studies", content=body, headers={
                        "Content-Type": content_type, "Accept": DICOM_JSON})
                except httpx.HTTPError as exc:
                    with lock:
                        failed[0] += len(mine)
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                bad = len(mine)
                if r.status_code in (200, 202):
                    with contextlib.suppress(ValueError):
                        doc = r.json()
                        bad = len(doc.get("00081198", {}).get("Value", []))
                if bad:
                    with lock:
                        failed[0] += bad
                        errors.append(f"{r.status_code} {r.headers.get('warning', '')[:300]}"
                                      f" {r.text[-300:]}")

    threads = [threading.Thread(target=client, name=f"stow-{i}") for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors:
        print(f"  STOW-RS errors (first): {errors[0]}", flush=True)
    return seconds, failed[0]


def timed_get(http: httpx.Client, url: str, accept: str) -> tuple[float, int, httpx.Response]:
    """(seconds, bytes) of a GET read to the end as a stream."""
    started = time.perf_counter()
    size = 0
    with http.stream("GET", url, headers={"Accept": accept}) as r:
        for chunk in r.iter_bytes():
            size += len(chunk)
    if r.status_code >= 300:
        raise RuntimeError(f"GET {url}: {r.status_code}")
    return time.perf_counter() - started, size, r


def lean_get(url: str, accept: str) -> tuple[float, int]:
    """(seconds, body bytes) of a GET read by a bare socket into one large buffer.

    HTTP/1.1 with ``Connection: close``, read to the end: the bytes after the
    headers are counted (a chunked body's few bytes of chunk framing included).
    ``recv_into`` releases the GIL, so several of these in threads measure the
    server rather than this process.
    """
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request = (f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: {accept}\r\n"
               "Connection: close\r\n\r\n").encode()
    buffer = bytearray(4 << 20)
    view = memoryview(buffer)
    started = time.perf_counter()
    with socket.create_connection((parts.hostname, parts.port or 80)) as sock:
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            n = sock.recv_into(view)
            if not n:
                raise RuntimeError(f"GET {url}: connection closed before the headers")
            head += bytes(view[:n])
        status = head.split(b" ", 2)[1]
        if not status.startswith(b"2"):
            raise RuntimeError(f"GET {url}: {status.decode()}")
        size = len(head) - head.index(b"\r\n\r\n") - 4
        while n := sock.recv_into(view):
            size += n
    return time.perf_counter() - started, size


def lean_parallel(url: str, accept: str, clients: int) -> tuple[float, int]:
    """(seconds, bytes in all) of ``clients`` lean GETs of ``url`` at once."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        sizes = [size for _, size in pool.map(lambda _: lean_get(url, accept), range(clients))]
    return time.perf_counter() - started, sum(sizes)


def _serve_files(files: list[Path], ready: Any) -> None:
    """A bare HTTP server: to any request, ``files`` one after the other by sendfile.

    The fastest a server can send these bytes on this machine: no multipart, no
    index, no Python between the page cache and the socket."""
    import signal
    import socket

    # Forked: the benchmark's own SIGTERM handler (raise, to stop the servers) would
    # print a traceback here when the benchmark ends this process.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    length = sum(f.stat().st_size for f in files)
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(64)
    ready.put(listener.getsockname()[1])

    def serve(conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % length)
            for path in files:
                with open(path, "rb") as fp:
                    size, offset = os.fstat(fp.fileno()).st_size, 0
                    while offset < size:
                        offset += os.sendfile(conn.fileno(), fp.fileno(), offset, size - offset)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


@dataclass(frozen=True)
class Ceiling:
    """What a bare sendfile server reaches with the benchmark's lean clients."""

    one_mb_s: float
    together_mb_s: float


def wado_ceiling(files: list[Path], args: argparse.Namespace) -> Ceiling:
    """The same files, read by the same lean clients, from ``_serve_files`` in its own
    process: the most any server can be measured at here."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    ready = context.Queue()
    proc = context.Process(target=_serve_files, args=(files, ready), daemon=True)
    proc.start()
    try:
        url = f"http://{LOOPBACK}:{ready.get(timeout=30)}/"
        lean_get(url, "*/*")  # the files into the page cache, as for the servers
        one = [lean_get(url, "*/*") for _ in range(args.wado_repeat)]
        together = [lean_parallel(url, "*/*", args.wado_clients) for _ in range(args.wado_repeat)]
    finally:
        proc.terminate()
        proc.join(timeout=10)
    ceiling = Ceiling(statistics.median(size / 1e6 / s for s, size in one),
                      statistics.median(size / 1e6 / s for s, size in together))
    print(f"bare sendfile server (the ceiling): {ceiling.one_mb_s:.0f} MB/s to one lean "
          f"client, {ceiling.together_mb_s:.0f} MB/s to {args.wado_clients} at once",
          flush=True)
    return ceiling


def latencies_ms(http: httpx.Client, urls: list[str], accept: str) -> tuple[list[float], int]:
    """Milliseconds of each GET to its last byte (parsing the JSON is not timed: that is
    the client's speed), and the number of results in all."""
    out: list[float] = []
    results = 0
    for url in urls:
        started = time.perf_counter()
        r = http.get(url, headers={"Accept": accept})
        out.append((time.perf_counter() - started) * 1e3)
        body = r.json() if r.status_code == 200 and r.content else []
        if r.status_code not in (200, 204):
            raise RuntimeError(f"GET {url}: {r.status_code} {r.text[:200]}")
        results += len(body)
    return out, results


# ---------------------------------------------------------------- QIDO data ---------

SURNAMES = ["SMITH", "JONES", "GARCIA", "MULLER", "DUBOIS", "ROSSI", "SILVA", "NOVAK",
            "JANSEN", "KOWALSKI", "NIELSEN", "PAPADOPOULOS", "HORVATH", "MURPHY", "BERG",
            "LAMBERT", "FISCHER", "MORENO", "PETERS", "CLARK", "LEWIS", "WALKER", "YOUNG",
            "KING", "WRIGHT", "LOPEZ", "HILL", "SCOTT", "GREEN", "ADAMS", "BAKER", "NELSON",
            "CARTER", "MITCHELL", "PEREZ", "ROBERTS", "TURNER", "PHILLIPS", "CAMPBELL",
            "PARKER", "EVANS", "EDWARDS", "COLLINS", "STEWART", "SANCHEZ", "MORRIS",
            "ROGERS", "REED", "COOK", "MORGAN"]
GIVEN = ["ANNA", "BEN", "CLARA", "DAVID", "EMMA", "FELIX", "GRACE"]
MODALITIES = ["CT", "MR", "CR", "US", "DX"]
SERIES_PER_STUDY = 2
INSTANCES_PER_SERIES = 20
STUDIES_PER_PATIENT = 4
FIRST_DATE = dt.date(2015, 1, 1)


@dataclass(frozen=True)
class QidoLayout:
    """Where every synthetic study is, computed (not read back) from the total."""

    total: int

    @property
    def per_study(self) -> int:
        return SERIES_PER_STUDY * INSTANCES_PER_SERIES

    @property
    def studies(self) -> int:
        return max(1, self.total // self.per_study)

    def study_uid(self, k: int) -> str:
        return f"{UID_ROOT}.{self.total}.{k}"

    def series_uid(self, k: int, s: int) -> str:
        return f"{UID_ROOT}.{self.total}.{k}.{s}"

    def patient(self, k: int) -> int:
        return k // STUDIES_PER_PATIENT

    def patient_id(self, k: int) -> str:
        return f"QP{self.patient(k):07d}"

    def patient_name(self, k: int) -> str:
        p = self.patient(k)
        return f"{SURNAMES[p % len(SURNAMES)]}^{GIVEN[p % len(GIVEN)]}"

    def modality(self, k: int) -> str:
        return MODALITIES[k % len(MODALITIES)]

    def study_date(self, k: int) -> dt.date:
        return FIRST_DATE + dt.timedelta(days=(k * 37) % 3650)

    def sample(self, n: int) -> list[int]:
        """``n`` studies spread over the whole index."""
        return [(i * 7919) % self.studies for i in range(n)]


def _write_studies(layout: QidoLayout, ks: range, directory: Path) -> None:
    from pydicom.uid import UID, CTImageStorage

    from vna.testing.synthetic import ct_instance

    directory.mkdir(parents=True, exist_ok=True)
    for k in ks:
        base = ct_instance(patient_id=layout.patient_id(k), patient_name=layout.patient_name(k),
                           study_uid=layout.study_uid(k), rows=8, columns=8,
                           study_date=layout.study_date(k).strftime("%Y%m%d"),
                           accession=f"A{layout.total % 1000:03d}{k:08d}",
                           modality=layout.modality(k), pixel_seed=k)
        base.StudyDescription = f"{layout.modality(k)} STUDY {k % 13}"
        base.file_meta.MediaStorageSOPClassUID = CTImageStorage
        for s in range(SERIES_PER_STUDY):
            base.SeriesInstanceUID = layout.series_uid(k, s)
            base.SeriesNumber = s + 1
            for i in range(INSTANCES_PER_SERIES):
                sop = UID(f"{layout.series_uid(k, s)}.{i}")
                base.SOPInstanceUID = sop
                base.file_meta.MediaStorageSOPInstanceUID = sop
                base.InstanceNumber = i + 1
                base.save_as(directory / f"{k:07d}-{s}-{i}.dcm", enforce_file_format=True)


def generate_qido(layout: QidoLayout, parts: int) -> list[Path]:
    """The synthetic index's instances in ``parts`` directories, cached under bench/out/."""
    cache = OUT_DIR / f"qido-{layout.total}"
    dirs = [cache / f"part{i}" for i in range(parts)]
    if (cache / ".complete").exists() and all(d.is_dir() for d in dirs):
        return dirs
    shutil.rmtree(cache, ignore_errors=True)
    print(f"generating {layout.studies * layout.per_study} small instances in {cache} ...",
          flush=True)
    started = time.perf_counter()
    for d in dirs:
        d.mkdir(parents=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        chunk = max(1, min(250, -(-layout.studies // parts)))
        futures = [pool.submit(_write_studies, layout,
                               range(at, min(at + chunk, layout.studies)),
                               dirs[(at // chunk) % parts])
                   for at in range(0, layout.studies, chunk)]
        for f in futures:
            f.result()
    (cache / ".complete").write_text(str(layout.total))
    print(f"  generated in {time.perf_counter() - started:.0f} s", flush=True)
    return dirs


def populate(dirs: list[Path], aet: str, port: int, workdir: Path, total: int) -> float:
    """storescu over one association per directory; seconds until the last one exits."""
    env = {**os.environ, **NODELAY_ENV}
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    started = time.perf_counter()
    try:
        for i, d in enumerate(dirs):
            logs.append(workdir / f"populate-{i}.log")
            with logs[-1].open("wb") as out:
                procs.append(subprocess.Popen(
                    ["storescu", "-aet", "BENCH", "-aec", aet, "+sd", "+r", "+sp", "*.dcm",
                     LOOPBACK, str(port), str(d)], env=env, stdout=out,
                    stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 600 + total / 10
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    for proc, log in zip(procs, logs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {log.read_text(errors='replace')[-300:]}")
    return time.perf_counter() - started


def qido_queries(layout: QidoLayout, repeat: int) -> dict[str, list[str]]:
    """Five typical queries, each ``repeat`` times on different keys (paths under root)."""
    ks = layout.sample(repeat)
    prefixes = [SURNAMES[layout.patient(k) % len(SURNAMES)][:3] for k in ks]
    ranges = []
    for k in ks:
        first = layout.study_date(k)
        last = first + dt.timedelta(days=30)
        ranges.append(f"{first:%Y%m%d}-{last:%Y%m%d}")
    return {
        "studies by PatientID": [f"/studies?PatientID={layout.patient_id(k)}" for k in ks],
        "studies by PatientName wildcard": [
            f"/studies?PatientName={p}*&limit=100" for p in prefixes],
        "studies by StudyDate range + CT": [
            f"/studies?StudyDate={r}&ModalitiesInStudy=CT" for r in ranges],
        "series of a study": [f"/studies/{layout.study_uid(k)}/series" for k in ks],
        "instances of a study": [f"/studies/{layout.study_uid(k)}/instances" for k in ks],
    }


# ---------------------------------------------------------------- one target --------

def measure(label: str, make: Callable[[Path], Server], files: list[Path], study_uid: str,
            args: argparse.Namespace, qido_dirs: list[Path] | None, layout: QidoLayout
            ) -> Figures:
    fig = Figures(label, load_start=os.getloadavg()[0])
    with run_dir("vna-dwbench-") as workdir:
        server = make(workdir)
        warm_memory(sum(f.stat().st_size for f in files) / 1e6)  # what STOW-RS writes
        try:
            print(f"{label}: starting", flush=True)
            server.start()
            root: str = getattr(server, "root")  # noqa: B009 - both server kinds have one
            wait_indexed: Callable[[int], float] = getattr(server, "wait_indexed")  # noqa: B009
            _measure_stow(fig, root, files, args, wait_indexed)
            _measure_wado(fig, root, files, study_uid, args)
            if qido_dirs:
                _measure_qido(fig, server, root, qido_dirs, layout, args, wait_indexed, workdir)
        except Exception as exc:  # noqa: BLE001 - a figure missing is printed, not fatal
            fig.notes.append(f"stopped early: {type(exc).__name__}: {str(exc)[:300]}")
            print(f"  {fig.notes[-1]}", flush=True)
        finally:
            fig.load_end = os.getloadavg()[0]
            server.stop()
    return fig


def _measure_stow(fig: Figures, root: str, files: list[Path], args: argparse.Namespace,
                  wait_indexed: Callable[[int], float]) -> None:
    seconds, failed = stow(root, files, args.batch, args.clients)
    fig.stow_per_s = (len(files) - failed) / seconds
    fig.stow_failed = failed
    fig.stow_rounds.append(fig.stow_per_s)
    fig.stow_indexed_s = wait_indexed(len(files))
    print(f"  STOW-RS {fig.stow_per_s:.0f} inst/s ({failed} failed), "
          f"then {fig.stow_indexed_s:.1f} s until queryable", flush=True)


def stow_again(fig: Figures, make: Callable[[Path], Server], files: list[Path],
               args: argparse.Namespace) -> None:
    """One more STOW-RS round for ``fig``'s target, on a fresh server."""
    with run_dir("vna-dwbench-") as workdir:
        server = make(workdir)
        warm_memory(sum(f.stat().st_size for f in files) / 1e6)
        try:
            server.start()
            seconds, failed = stow(getattr(server, "root"), files,  # noqa: B009
                                   args.batch, args.clients)
            fig.stow_failed += failed
            fig.stow_rounds.append((len(files) - failed) / seconds)
            print(f"  {fig.target}: STOW-RS {fig.stow_rounds[-1]:.0f} inst/s "
                  f"({failed} failed)", flush=True)
        except Exception as exc:  # noqa: BLE001 - a round missing is printed, not fatal
            fig.notes.append(f"a STOW-RS round stopped: {type(exc).__name__}: "
                             f"{str(exc)[:300]}")
        finally:
            server.stop()


def stow_summary(vna: Figures, ref: Figures) -> tuple[float | None, str]:
    """The STOW-RS ratio: the median of the rounds' ratios (each round's VNA against
    that round's reference), and its text with the range."""
    ratios = [v / r for v, r in zip(vna.stow_rounds, ref.stow_rounds, strict=False) if r]
    if not ratios:
        return None, "-"
    return statistics.median(ratios), ratio_text(ratios, "x")


def _measure_wado(fig: Figures, root: str, files: list[Path], study_uid: str,
                  args: argparse.Namespace) -> None:
    import pydicom

    with httpx.Client(timeout=600) as http:
        rates, busy = [], []
        for _ in range(args.wado_repeat):
            cpu = time.process_time()  # only this thread works meanwhile
            seconds, size, r = timed_get(http, f"{root}/studies/{study_uid}", DICOM_ANY)
            busy.append((time.process_time() - cpu) / seconds)
            rates.append(size / 1e6 / seconds)
            fig.wado_bytes = size
        fig.wado_mb_s = statistics.median(rates)
        fig.wado_client_busy = statistics.median(busy)
        url = f"{root}/studies/{study_uid}"
        lean = [lean_get(url, DICOM_ANY) for _ in range(args.wado_repeat)]
        fig.wado_lean_mb_s = statistics.median(size / 1e6 / s for s, size in lean)
        together = [lean_parallel(url, DICOM_ANY, args.wado_clients)
                    for _ in range(args.wado_repeat)]
        fig.wado_parallel_mb_s = statistics.median(size / 1e6 / s for s, size in together)
        print(f"  WADO-RS study {fig.wado_mb_s:.0f} MB/s httpx, {fig.wado_lean_mb_s:.0f} MB/s "
              f"lean, {fig.wado_parallel_mb_s:.0f} MB/s {args.wado_clients} lean clients "
              f"({fig.wado_bytes / 1e6:.0f} MB, median of {len(rates)})", flush=True)

        url = f"{root}/studies/{study_uid}/metadata"
        started = time.perf_counter()
        r = http.get(url, headers={"Accept": DICOM_JSON})
        fig.metadata_cold_ms = (time.perf_counter() - started) * 1e3
        fig.metadata_count = len(r.json())
        warm, _ = latencies_ms(http, [url] * args.repeat, DICOM_JSON)
        fig.metadata_p50_ms = statistics.median(warm)
        print(f"  study metadata ({fig.metadata_count} instances): cold "
              f"{fig.metadata_cold_ms:.0f} ms, warm p50 {fig.metadata_p50_ms:.1f} ms",
              flush=True)

        picks = [files[(i * 37) % len(files)] for i in range(args.repeat)]
        urls = []
        for path in picks:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            urls.append(f"{root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                        f"/instances/{ds.SOPInstanceUID}/frames/1")
        frames = [timed_get(http, u, FRAME_ANY)[0] * 1e3 for u in urls]
        fig.frame_p50_ms = statistics.median(frames)
        print(f"  frame p50 {fig.frame_p50_ms:.1f} ms", flush=True)


def _measure_qido(fig: Figures, server: Server, root: str, dirs: list[Path], layout: QidoLayout,
                  args: argparse.Namespace, wait_indexed: Callable[[int], float],
                  workdir: Path) -> None:
    total = layout.studies * layout.per_study
    print(f"  populating the QIDO index: {total} instances by storescu, {len(dirs)} "
          "associations ...", flush=True)
    fig.populate_s = populate(dirs, server.aet, server.port, workdir, total)
    fig.populate_indexed_s = wait_indexed(total)
    print(f"  stored in {fig.populate_s:.0f} s ({total / fig.populate_s:.0f} inst/s), "
          f"queryable {fig.populate_indexed_s:.0f} s later", flush=True)
    with httpx.Client(timeout=600) as http:
        for name, paths in qido_queries(layout, args.repeat).items():
            urls = [root + p for p in paths]
            latencies_ms(http, urls[:3], DICOM_JSON)  # warm the connection and caches
            ms, results = latencies_ms(http, urls, DICOM_JSON)
            fig.qido[name] = (pct(ms, 0.5), pct(ms, 0.95), results)
            print(f"  QIDO {name}: p50 {pct(ms, 0.5):.1f} ms, p95 {pct(ms, 0.95):.1f} ms, "
                  f"{results} results", flush=True)


# ---------------------------------------------------------------- the table ---------

@dataclass(frozen=True)
class Row:
    metric: str
    vna: float | None
    ref: float | None
    unit: str
    target: str
    met: Callable[[float, float | None], bool] | None
    digits: int = 0
    ratio: tuple[float | None, str] | None = None
    """Set where the ratio is not vna/ref: (the ratio the target is checked on, text)."""


def _cell(value: float | None, unit: str, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f} {unit}".strip()


def _median(values: list[float], otherwise: float | None) -> float | None:
    return statistics.median(values) if values else otherwise


def rows(vna: Figures, ref: Figures) -> list[Row]:
    out = [
        # Other work on the machine changes between targets: say how busy it was.
        Row("machine load (1 min) at start", vna.load_start, ref.load_start, "", "", None, 2),
        Row("machine load (1 min) at end", vna.load_end, ref.load_end, "", "", None, 2),
        Row("STOW-RS inst/s", _median(vna.stow_rounds, vna.stow_per_s),
            _median(ref.stow_rounds, ref.stow_per_s), "/s", ">= 1.5x",
            lambda v, r: r is not None and v >= 1.5 * r, ratio=stow_summary(vna, ref)),
        Row("  after STOW: s until queryable", vna.stow_indexed_s, ref.stow_indexed_s, "s",
            "", None, 1),
        Row("WADO-RS study MB/s (httpx)", vna.wado_mb_s, ref.wado_mb_s, "MB/s", ">= 2x",
            lambda v, r: r is not None and v >= 2 * r),
        Row("  lean client", vna.wado_lean_mb_s, ref.wado_lean_mb_s, "MB/s", ">= 2x",
            lambda v, r: r is not None and v >= 2 * r),
        Row("  lean clients at once (sum)", vna.wado_parallel_mb_s, ref.wado_parallel_mb_s,
            "MB/s", ">= 2x", lambda v, r: r is not None and v >= 2 * r),
        Row("study metadata cold", vna.metadata_cold_ms, ref.metadata_cold_ms, "ms", "", None),
        Row("study metadata warm p50", vna.metadata_p50_ms, ref.metadata_p50_ms, "ms",
            "< 50 ms", lambda v, r: v < 50, 1),
        Row("frame p50", vna.frame_p50_ms, ref.frame_p50_ms, "ms", "", None, 1),
    ]
    if vna.qido or ref.qido:
        out.append(Row("QIDO index: storescu s", vna.populate_s, ref.populate_s, "s", "", None))
        out.append(Row("  then s until queryable", vna.populate_indexed_s,
                       ref.populate_indexed_s, "s", "", None, 1))
    for name in dict.fromkeys([*vna.qido, *ref.qido]):
        v = vna.qido.get(name)
        r = ref.qido.get(name)
        out.append(Row(f"QIDO {name} p50", v and v[0], r and r[0], "ms", "", None, 1))
        out.append(Row(f"QIDO {name} p95", v and v[1], r and r[1], "ms", "<= 1x",
                       lambda a, b: b is not None and a <= b, 1))
    return out


def print_table(figures: list[Figures], args: argparse.Namespace, layout: QidoLayout,
                megabytes: float, ceiling: Ceiling | None = None) -> None:
    ref = next((f for f in figures if f.target.startswith("Orthanc")), Figures("Orthanc"))
    for vna in (f for f in figures if f is not ref):
        table = rows(vna, ref)
        header = ["metric", vna.target, ref.target, "VNA/Orthanc", "target", "met?"]
        cells = []
        for row in table:
            ratio = (f"{row.vna / row.ref:.2f}x" if row.vna is not None and row.ref
                     and not row.metric.startswith("machine") else "-")
            met = ("-" if row.met is None or row.vna is None
                   else "yes" if row.met(row.vna, row.ref) else "NO")
            if row.ratio is not None and row.ratio[0] is not None:
                ratio = row.ratio[1]
                met = "yes" if row.met is not None and row.met(row.ratio[0], 1.0) else "NO"

            cells.append([row.metric, _cell(row.vna, row.unit, row.digits),
                          _cell(row.ref, row.unit, row.digits), ratio, row.target or "-", met])
        widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
        print()
        print(f"DICOMweb, {vna.target} vs {ref.target}, same run, {os.cpu_count()} CPUs, "
              "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        print(fmt_row(header, widths))
        print(fmt_row(["-" * w for w in widths], widths))
        for cell in cells:
            print(fmt_row(cell, widths))
        for f in (vna, ref):
            for note in f.notes:
                print(f"  note: {f.target}: {note}")
    total = layout.studies * layout.per_study
    print("VNA/Orthanc: above 1 is better for /s and MB/s, below 1 for ms and s.")
    print(f"STOW-RS: {args.count} CT 512x512 instances ({megabytes:.0f} MB, one study), "
          f"{args.batch} per request, {args.clients} clients; failed: "
          + ", ".join(f"{f.target} {f.stow_failed}" for f in figures) + ".")
    rounds = max((len(f.stow_rounds) for f in figures), default=0)
    if rounds > 1:
        print(f"  {rounds} rounds, each target in turn on a fresh server: inst/s is the "
              "median; the ratio the median of the rounds' ratios (range in brackets). "
              "Per round: " + "; ".join(
                  f"{f.target} " + " ".join(f"{x:.0f}" for x in f.stow_rounds)
                  for f in figures) + ".")
    print(f"WADO-RS: that study as stored ({DICOM_ANY}), median of {args.wado_repeat}; "
          "read by httpx (one client, keep-alive), by a lean client (a socket into a 4 MB "
          f"buffer), and by {args.wado_clients} lean clients at once (MB/s of all of them); "
          f"metadata and frames: {args.repeat} requests each, one client, keep-alive.")
    busy = [f"{f.target} {f.wado_client_busy:.0%}" for f in figures
            if f.wado_client_busy is not None]
    if busy:
        print("The httpx client's CPU over its read time: " + ", ".join(busy)
              + " (near 100 %, that row measures the client, not the server).")
    if ceiling is not None:
        orthanc = next((f for f in figures if f.target.startswith("Orthanc")), None)
        need = ("" if orthanc is None or not orthanc.wado_lean_mb_s
                or not orthanc.wado_parallel_mb_s
                else f"; twice {orthanc.target} would be {2 * orthanc.wado_lean_mb_s:.0f} "
                     f"and {2 * orthanc.wado_parallel_mb_s:.0f} MB/s")
        print(f"WADO-RS ceiling here: a bare server sending the same files by sendfile "
              f"(no multipart, no index) reached {ceiling.one_mb_s:.0f} MB/s to one lean "
              f"client and {ceiling.together_mb_s:.0f} MB/s to {args.wado_clients} at "
              f"once{need}.")
    if args.qido_instances:
        below = ("" if total >= ISSUE_QIDO_INSTANCES else
                 f"  BELOW issue #3's {ISSUE_QIDO_INSTANCES:,}: "
                 f"--qido-instances {ISSUE_QIDO_INSTANCES} for the full size.")
        print(f"QIDO-RS: index of {total:,} instances (+ the STOW study), {layout.studies:,} "
              f"studies of {SERIES_PER_STUDY}x{INSTANCES_PER_SERIES}, "
              f"{STUDIES_PER_PATIENT} per patient; each query {args.repeat}x on different "
              f"keys, one client.{below}")
    print("Results per query (summed over the repeats) must agree between servers:")
    for f in figures:
        if f.qido:
            print(f"  {f.target}: " + ", ".join(f"{n} {r}" for n, (_, _, r) in f.qido.items()))


# ---------------------------------------------------------------- main --------------

TARGETS: dict[str, tuple[str, Callable[[Path], Server]]] = {
    "vna": ("VNA (vna run)", VnaDicomWeb),
    "vna-up": ("VNA (vna up)", VnaUpDicomWeb),
    "orthanc": ("Orthanc+DICOMweb", OrthancDicomWeb),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=1000,
                        help="CT instances for STOW-RS and WADO-RS (default 1000)")
    parser.add_argument("--batch", type=int, default=50, help="instances per STOW request")
    parser.add_argument("--clients", type=int, default=4, help="concurrent STOW clients")
    parser.add_argument("--stow-rounds", type=int, default=3,
                        help="STOW-RS rounds, every target in turn on a fresh server "
                             "(default 3; the table shows medians)")
    parser.add_argument("--qido-instances", type=int, default=10_000,
                        help="size of the QIDO index (default 10000; issue #3 asks 100000; "
                             "0 skips QIDO)")
    parser.add_argument("--repeat", type=int, default=50,
                        help="requests per query, metadata and frame figure (default 50)")
    parser.add_argument("--wado-repeat", type=int, default=3, help="whole-study retrievals")
    parser.add_argument("--wado-clients", type=int, default=4,
                        help="lean clients retrieving the study at once (default 4)")
    parser.add_argument("--quick", action="store_true",
                        help="a small run: 100 CT instances, a 2,000-instance index, 10 repeats")
    parser.add_argument("--target", action="append", choices=list(TARGETS), default=[],
                        help="targets (default: vna and orthanc)")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.qido_instances = min(args.count, 100), min(args.qido_instances, 2000)
        args.repeat, args.wado_repeat = min(args.repeat, 10), min(args.wado_repeat, 2)
        args.stow_rounds = 1
    for tool in ("storescu", "echoscu"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install -y dcmtk", file=sys.stderr)
            return 2
    chosen = args.target or ["vna", "orthanc"]
    if "orthanc" in chosen and not (shutil.which("Orthanc") and DICOMWEB_PLUGIN.exists()):
        print("Orthanc or its DICOMweb plugin is not installed "
              "(apt-get install orthanc orthanc-dicomweb): no reference figures")
        chosen = [c for c in chosen if c != "orthanc"]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    files = generate(args.count)
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    from bench.ingest import study_uid_of

    study_uid = study_uid_of(files[0])
    layout = QidoLayout(args.qido_instances)
    dirs = generate_qido(layout, 4) if args.qido_instances else None
    with cleanup_on_signals():
        try:
            figures = [measure(TARGETS[c][0], TARGETS[c][1], files, study_uid, args, dirs,
                               layout) for c in chosen]
            for round_ in range(2, args.stow_rounds + 1):
                print(f"STOW-RS round {round_}/{args.stow_rounds}", flush=True)
                for c, fig in zip(chosen, figures, strict=True):
                    stow_again(fig, TARGETS[c][1], files, args)
            ceiling = wado_ceiling(files, args)
        except KeyboardInterrupt:
            print("\ninterrupted: servers stopped", file=sys.stderr)
            return 130
    print_table(figures, args, layout, megabytes, ceiling)
    return 0


if __name__ == "__main__":
    sys.exit(main())
