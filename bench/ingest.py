"""Ingest benchmark: dcmtk ``storescu`` into VNA, Orthanc and ``storescp --ignore``.

Figures, not assertions (DESIGN.md §6). One run measures every target on the same
files, one association and four in parallel, each into a fresh server:

    .venv/bin/python -m bench.ingest [--count 1000] [--quick] [--profile 300]

``--profile N`` instead runs ``vna run`` under cProfile (all threads) for N instances
over one association and prints where the time goes.

``--ablate orthanc-sync`` (or ``no-hash``, or both joined by a comma) adds a VNA
target that skips some of what the store path guarantees (``bench/ablation``), to
say what the difference to Orthanc is made of. Never a setting of the product.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
LOOPBACK = "127.0.0.1"
PARALLEL = 4
ROWS = COLUMNS = 512

# Debian's dcmtk (and Orthanc) leave Nagle's algorithm on unless told: ~40-50 ms a
# message on loopback, which would measure the kernel's timer instead of the servers.
NODELAY_ENV = {"TCP_NODELAY": "1"}
# make up's backends (the Makefile's defaults; the environment overrides them).
UP_BACKENDS = {
    "VNA_INDEX_URL": os.environ.get("VNA_INDEX_URL", "postgresql://postgres@127.0.0.1:5432/vna"),
    "VNA_BUS_URL": os.environ.get("VNA_BUS_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    "VNA_REDIS_URL": os.environ.get("VNA_REDIS_URL", "redis://127.0.0.1:6379/0"),
}


# ---------------------------------------------------------------- processes ---------

_live: list[subprocess.Popen[bytes]] = []


def spawn(argv: list[str], *, env: dict[str, str] | None = None, log: Path,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a server in its own process group, so it and its children stop together."""
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
    _live.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM the process group we created; SIGKILL it if it does not go in time."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # A child may outlive its parent in the group (e.g. storescp --fork).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc in _live:
        _live.remove(proc)


_run_dirs: list[Path] = []


@contextlib.contextmanager
def run_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory for one target's run, removed when the whole benchmark ends.

    Not right after the run: on ext4 without a journal (this VM's disk), every file
    created in a block group skips, one by one, the inodes removed there in the last
    60-300 s (ialloc.c, ``recently_deleted``). Removing one target's 1,000 files
    right before the next target's run cost each file that run created 0.1-0.5 ms,
    and which target paid depended only on the order."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=OUT_DIR))
    _run_dirs.append(path)
    yield path


def warm_memory(megabytes: float) -> None:
    """Touch as much memory as the next run will write, right before it, for every
    target alike.

    A VM's memory (Firecracker, here) is backed by the host only when first touched,
    and pages freed for long enough are given back to it: writing 0.5 MB into the
    page cache cost 1.3 ms of system CPU on such memory and 0.1 ms on memory touched
    shortly before, so a target's figure depended on what ran before it. Freed, the
    touched pages go back to the kernel, which hands them out to the page cache.
    Costs about two seconds a GiB when the memory was given back, less otherwise."""
    try:
        available = next(int(line.split()[1]) // 1024 for line in
                         Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return
    size = int(min(megabytes * 1.5, available - 4096))
    if size <= 0:
        return
    touched = bytearray(size << 20)  # zero-filled: every page written
    del touched


def remove_run_dirs() -> None:
    while _run_dirs:
        shutil.rmtree(_run_dirs.pop(), ignore_errors=True)


def stop_all() -> None:
    for proc in list(_live):
        stop(proc)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.1,
               proc: subprocess.Popen[bytes] | None = None, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def echo_ok(aet: str, port: int) -> bool:
    r = subprocess.run(["echoscu", "-to", "2", "-aec", aet, LOOPBACK, str(port)],
                       env={**os.environ, **NODELAY_ENV}, capture_output=True, timeout=10)
    return r.returncode == 0


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # only loopback URLs are built
        body: bytes = resp.read()
        return body


# ---------------------------------------------------------------- memory ------------

def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User and system CPU of ``pid`` itself (its children are counted on their own)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return 0.0


def _vm_hwm_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class PeakRss:
    """Polls VmHWM over a process tree; the figure is the sum of each process's peak.

    Each process's own high-water mark is kept even after it exits (forked storescp
    children, Orthanc threads are in-process), so the sum bounds the tree's peak.
    The CPU each process used is kept the same way (as last seen: a process that
    exits between two polls loses at most ``interval`` of it).
    """

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root = root
        self.interval = interval
        self.peaks: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.cpu_before: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-poll", daemon=True)

    def _sample(self) -> None:
        todo, seen = [self.root], set[int]()
        while todo and len(seen) < 10_000:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            hwm = _vm_hwm_kib(pid)
            if hwm:
                self.peaks[pid] = max(self.peaks.get(pid, 0), hwm)
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), _cpu_seconds(pid))
            todo += _children(pid)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._sample()
        self.cpu_before = dict(self.cpu)  # what starting up used is not counted
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sample()
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def mib(self) -> float:
        return sum(self.peaks.values()) / 1024

    @property
    def cpu_seconds(self) -> float:
        return sum(used - self.cpu_before.get(pid, 0.0) for pid, used in self.cpu.items())


# ---------------------------------------------------------------- data --------------

def generate(count: int) -> list[Path]:
    """``count`` CT instances of 512x512x16 bit (one series), cached under bench/out/."""
    from vna.testing.synthetic import write_ct_series

    cache = OUT_DIR / f"ct{ROWS}-{count}"
    done = cache / ".complete"
    if done.exists():
        files = sorted(cache.glob("*.dcm"))
        if len(files) == count:
            return files
    shutil.rmtree(cache, ignore_errors=True)
    print(f"generating {count} CT instances ({ROWS}x{COLUMNS}) in {cache} ...", flush=True)
    files = write_ct_series(cache, count, rows=ROWS, columns=COLUMNS,
                            patient_id="BENCH001", patient_name="BENCH^CT")
    done.write_text(str(count))
    return files


def study_uid_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def split(files: list[Path], parts: int) -> list[list[Path]]:
    return [files[i::parts] for i in range(parts)]


# ---------------------------------------------------------------- sending -----------

@dataclass
class SendResult:
    seconds: float
    failed_processes: int
    stderr_tail: str = ""


def send(files: list[Path], aet: str, port: int, parallel: int, workdir: Path) -> SendResult:
    """storescu over ``parallel`` associations; time from the first start to the last exit."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    env = {**os.environ, **NODELAY_ENV}
    started = time.perf_counter()
    try:
        for i, part in enumerate(split(files, parallel)):
            err = workdir / f"storescu-{parallel}-{i}.log"
            with err.open("wb") as out:
                # Files on the command line (not +sd): each process gets its exact share.
                argv = ["storescu", "-aet", "BENCH", "-aec", aet, LOOPBACK, str(port),
                        *map(str, part)]
                procs.append((subprocess.Popen(argv, env=env, stdout=out,
                                               stderr=subprocess.STDOUT), err))
        deadline = time.monotonic() + 60 + 2.0 * len(files)
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        seconds = time.perf_counter() - started
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    failed = [log for proc, log in procs if proc.returncode != 0]
    tail = failed[0].read_text(errors="replace")[-400:] if failed else ""
    return SendResult(seconds, len(failed), tail)


# ---------------------------------------------------------------- servers -----------

@dataclass
class Measurement:
    target: str
    associations: int
    count: int
    megabytes: float
    seconds: float
    rss_mib: float
    failed: int
    received: int | None = None
    indexed_seconds: float | None = None
    cpu_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    round: int = 0

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.megabytes / self.seconds if self.seconds else 0.0


class Server:
    """A fresh server for one measurement: start, count what it kept, stop."""

    name = "server"
    aet = "ANY"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def received(self) -> int | None:
        return None

    def after_send(self, expected: int, study_uid: str) -> float | None:
        """Seconds from the last storescu exit until the server's work is done, if any."""
        return None

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def vna_command(command: str) -> list[str]:
    """``vna <command>`` from this environment."""
    script = Path(sys.executable).with_name("vna")
    return [str(script), command] if script.exists() else [sys.executable, "-m", "vna", command]


class VnaServer(Server):
    name = "VNA (vna run)"
    aet = "VNA"

    def __init__(self, workdir: Path, *, profile_to: Path | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        super().__init__(workdir)
        self.http_port = free_port()
        self.profile_to = profile_to
        self.extra_env = extra_env or {}
        self.log = workdir / "vna.log"

    def start(self) -> None:
        # Worklist and HL7 on free ports too: another archive may hold the defaults.
        env = {"VNA_DATA_DIR": str(self.workdir / "data"), "VNA_DIMSE_PORT": str(self.port),
               "VNA_HTTP_PORT": str(self.http_port), "VNA_BIND": LOOPBACK,
               "VNA_WORKLIST_PORT": str(free_port()), "VNA_HL7_PORT": str(free_port()),
               **self.extra_env}
        if self.profile_to is not None:
            argv = [sys.executable, "-m", "bench.vna_profiled", str(self.profile_to)]
        else:
            argv = vna_command("run")
        self.proc = spawn(argv, env=env, log=self.log, cwd=REPO)
        self.wait_ready("VNA ready", "vna run")

    def wait_ready(self, banner: str, what: str) -> None:
        wait_until(lambda: banner in self.log.read_text(errors="replace"),
                   timeout=90, proc=self.proc, what=f"{what} started")
        wait_until(lambda: echo_ok(self.aet, self.port), timeout=60, interval=0.3,
                   proc=self.proc, what=f"{what} echo")

    def metric(self, name: str) -> float | None:
        try:
            text = http_get(f"http://{LOOPBACK}:{self.http_port}/metrics").decode()
        except (OSError, urllib.error.URLError):
            return None
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def study_count(self, study_uid: str) -> int:
        url = (f"http://{LOOPBACK}:{self.http_port}/dicomweb/studies?StudyInstanceUID="
               f"{study_uid}&includefield=NumberOfStudyRelatedInstances")
        try:
            found = json.loads(http_get(url))
        except (OSError, urllib.error.URLError, ValueError):
            return -1
        if not found:
            return 0
        return int(found[0].get("00201208", {}).get("Value", [0])[0])

    def after_send(self, expected: int, study_uid: str) -> float | None:
        started = time.perf_counter()

        def indexed() -> bool:
            lag = self.metric("vna_index_lag")
            return lag == 0 and self.study_count(study_uid) >= expected

        try:
            wait_until(indexed, timeout=120 + 0.5 * expected, interval=0.1, proc=self.proc,
                       what="VNA indexed everything")
        except TimeoutError:
            return None
        self._received = self.study_count(study_uid)
        return time.perf_counter() - started

    def received(self) -> int | None:
        return getattr(self, "_received", None)


class VnaUpServer(VnaServer):
    """``vna up`` (as ``make up`` runs it): ingest, index, dicomweb and worklist as
    separate processes on PostgreSQL, RabbitMQ and Redis from the environment (the
    machine's by default), with the S3 server ``vna up`` starts itself."""

    name = "VNA (vna up)"

    def start(self) -> None:
        tag = f"bench{os.getpid()}x{self.port}"
        self.database = f"vna_{tag}"
        self.namespace = f"vna-{tag}"
        env = {"VNA_DATA_DIR": str(self.workdir / "data"), "VNA_DIMSE_PORT": str(self.port),
               "VNA_HTTP_PORT": str(self.http_port), "VNA_BIND": LOOPBACK,
               "VNA_WORKLIST_PORT": str(free_port()), "VNA_HL7_PORT": str(free_port()),
               "VNA_INDEX_URL": f"{UP_BACKENDS['VNA_INDEX_URL'].rsplit('/', 1)[0]}/"
                                f"{self.database}",
               "VNA_BUS_URL": UP_BACKENDS["VNA_BUS_URL"], "VNA_BUS_NAMESPACE": self.namespace,
               "VNA_REDIS_URL": UP_BACKENDS["VNA_REDIS_URL"], "VNA_STORAGE_URL": "",
               **self.extra_env}
        self.proc = spawn(vna_command("up"), env=env, log=self.log, cwd=REPO)
        self.wait_ready("VNA up:", "vna up")
        wait_until(lambda: self.metric("vna_index_lag") is not None, timeout=60,
                   interval=0.3, proc=self.proc, what="vna up http")

    def stop(self) -> None:
        super().stop()
        # What this run made on the shared backends goes with it.
        with contextlib.suppress(Exception):
            from vna.adapters.bus.rabbitmq import RabbitBus

            bus = RabbitBus(UP_BACKENDS["VNA_BUS_URL"], namespace=self.namespace)
            try:
                bus.delete_namespace(["vna.index", "vna.worklist"])
            finally:
                bus.stop()
        with contextlib.suppress(Exception):
            import sqlalchemy

            admin = sqlalchemy.create_engine(
                UP_BACKENDS["VNA_INDEX_URL"].rsplit("/", 1)[0] + "/postgres",
                isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.database}"')
            admin.dispose()


class OrthancServer(Server):
    name = "Orthanc"
    aet = "ORTHANC"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.http_port = free_port()
        self.log = workdir / "orthanc.log"

    def config(self) -> dict[str, object]:
        """Orthanc's JSON configuration: its own storage under the work directory."""
        storage = self.workdir / "orthanc-db"
        return {
            "Name": "bench", "DicomAet": self.aet, "DicomPort": self.port,
            "HttpPort": self.http_port, "StorageDirectory": str(storage),
            "IndexDirectory": str(storage), "StorageCompression": False,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [], "DicomCheckCalledAet": False, "SaveJobs": False,
            # Any calling AE may store, as with the other targets (no modality table).
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True,
        }

    def start(self) -> None:
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        self.proc = spawn(["Orthanc", str(path)], env=NODELAY_ENV, log=self.log)
        wait_until(lambda: echo_ok(self.aet, self.port), timeout=60, interval=0.3,
                   proc=self.proc, what="Orthanc echo")

    def after_send(self, expected: int, study_uid: str) -> float | None:
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            stats = json.loads(http_get(f"http://{LOOPBACK}:{self.http_port}/statistics"))
            self._received = int(stats["CountInstances"])
        return None  # Orthanc indexes before it answers the C-STORE

    def received(self) -> int | None:
        return getattr(self, "_received", None)


class StorescpServer(Server):
    name = "storescp --ignore"
    aet = "STORESCP"

    def start(self) -> None:
        log = self.workdir / "storescp.log"
        # --fork: one process per association, else four senders would queue on one.
        self.proc = spawn(["storescp", "--ignore", "--fork", "-aet", self.aet, str(self.port)],
                          env=NODELAY_ENV, log=log, cwd=self.workdir)
        wait_until(lambda: echo_ok(self.aet, self.port), timeout=30, interval=0.2,
                   proc=self.proc, what="storescp echo")


# ---------------------------------------------------------------- running -----------

def measure(make: Callable[[Path], Server], files: list[Path], parallel: int,
            study_uid: str, megabytes: float) -> Measurement:
    with run_dir("vna-bench-") as workdir:
        server = make(workdir)
        warm_memory(megabytes)
        try:
            server.start()
            assert server.proc is not None
            with PeakRss(server.proc.pid) as rss:
                sent = send(files, server.aet, server.port, parallel, workdir)
                indexed = server.after_send(len(files), study_uid)
            m = Measurement(server.name, parallel, len(files), megabytes, sent.seconds,
                            rss.mib, sent.failed_processes, server.received(), indexed,
                            rss.cpu_seconds)
            if sent.failed_processes:
                m.notes.append(f"storescu failed: {sent.stderr_tail.strip()[-200:]}")
            if isinstance(server, VnaServer) and indexed is None:
                m.notes.append("not fully indexed within the time limit")
            return m
        finally:
            server.stop()


def fmt_row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                     enumerate(zip(cells, widths, strict=True)))


def ratio_text(ratios: list[float], unit: str = "") -> str:
    """The median of the rounds' ratios to the reference, with their range when
    there are several (this benchmark's and the DICOMweb one's tables)."""
    text = f"{statistics.median(ratios):.2f}{unit}"
    return text + f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else text


def print_table(results: list[Measurement], files: int, megabytes: float) -> None:
    """One row per target and association count: the round with the median inst/s,
    and its ratio to Orthanc as the median of the rounds' ratios (each round's VNA
    against that round's Orthanc), with their range."""
    rounds = max(m.round for m in results) + 1
    orthanc = {(m.round, m.associations): m.per_second for m in results
               if m.target == "Orthanc"}
    header = ["target", "assoc", "inst/s", "MB/s", "seconds", "CPU ms/inst", "peak RSS MiB",
              "kept", "stored->indexed s", "vs Orthanc"]
    rows = []
    groups: dict[tuple[str, int], list[Measurement]] = {}
    for m in results:
        groups.setdefault((m.target, m.associations), []).append(m)
    for (target, associations), ms in sorted(groups.items(), key=lambda g: g[0][1]):
        m = sorted(ms, key=lambda x: x.per_second)[(len(ms) - 1) // 2]
        ratios = [x.per_second / orthanc[x.round, associations] for x in ms
                  if orthanc.get((x.round, associations)) and target != "Orthanc"]
        ratio = ratio_text(ratios) if ratios else "-"
        rows.append([m.target, str(m.associations), f"{m.per_second:.0f}",
                     f"{m.mb_per_second:.1f}", f"{m.seconds:.2f}",
                     f"{m.cpu_seconds * 1000 / m.count:.2f}", f"{m.rss_mib:.0f}",
                     "-" if m.received is None else str(m.received),
                     "-" if m.indexed_seconds is None else f"{m.indexed_seconds:.2f}",
                     ratio])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    print(f"Ingest with dcmtk storescu (TCP_NODELAY=1): {files} CT instances, "
          f"{megabytes:.0f} MB, {os.cpu_count()} CPUs, {rounds} round(s)")
    print(fmt_row(header, widths))
    print(fmt_row(["-" * w for w in widths], widths))
    for row in rows:
        print(fmt_row(row, widths))
    for m in results:
        for note in m.notes:
            print(f"  note: {m.target}, {m.associations} assoc, round {m.round + 1}: {note}")
    print("inst/s and MB/s: first storescu start to last storescu exit (what the sender "
          "sees).\nstored->indexed: from then until every instance is queryable "
          "(VNA indexes after it answers).\nCPU ms/inst: user and system CPU of the "
          "server's process tree while sending and indexing, per instance (vna up: without\n"
          "PostgreSQL, RabbitMQ and Redis). peak RSS: sum of VmHWM over the server's "
          "process tree.")
    if rounds > 1:
        print("Each round measures every target once, in turn, on a fresh server; a row "
              "shows the round with the median inst/s.\nvs Orthanc: the median of the "
              "rounds' ratios (range in brackets): on a shared machine one round's ratio\n"
              "can swing by a fifth.")


ABLATIONS = ("orthanc-sync", "no-hash")
"""What ``bench/ablation/sitecustomize.py`` can leave out of ``vna run``."""


def ablated(variant: str, vna_env: dict[str, str]) -> Callable[[Path], Server]:
    """A ``vna run`` target that leaves out ``variant`` (``ABLATIONS``, comma-joined)."""
    env = {**vna_env, "VNA_BENCH_ABLATE": variant,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR / "ablation"),
                                                        os.environ.get("PYTHONPATH")]))}

    def make(workdir: Path) -> Server:
        server = VnaServer(workdir, extra_env=env)
        server.name = f"VNA ablated ({variant})"
        return server
    return make


def run_benchmark(count: int, vna_env: dict[str, str], only: set[str], rounds: int = 1,
                  ablate: list[str] | None = None) -> int:
    files = generate(count)
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    study_uid = study_uid_of(files[0])
    targets: list[tuple[str, Callable[[Path], Server]]] = [
        ("vna", lambda d: VnaServer(d, extra_env=vna_env)),
        ("vna-up", lambda d: VnaUpServer(d, extra_env=vna_env))]
    if shutil.which("Orthanc"):
        targets.append(("orthanc", OrthancServer))
    else:
        print("Orthanc is not installed (apt-get install orthanc): no reference figure")
    targets.append(("storescp", StorescpServer))
    targets = [t for t in targets if not only or t[0] in only]
    if any(label == "vna" for label, _ in targets):  # the ablated ones measured beside it
        targets[1:1] = [(f"vna ablated {variant}", ablated(variant, vna_env))
                        for variant in ablate or []]
    results: list[Measurement] = []
    for round_ in range(rounds):
        for parallel in (1, PARALLEL):
            for label, make in targets:
                print(f"round {round_ + 1}/{rounds}: measuring {label}, {parallel} "
                      "association(s) ...", flush=True)
                m = measure(make, files, parallel, study_uid, megabytes)
                m.round = round_
                results.append(m)
                print(f"  {m.per_second:.0f} inst/s, {m.mb_per_second:.1f} MB/s", flush=True)
    print_table(results, count, megabytes)
    return 0


def run_profile(count: int, vna_env: dict[str, str], top: int = 15) -> int:
    files = generate(count)
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    study_uid = study_uid_of(files[0])
    prof = OUT_DIR / f"vna-{count}.prof"
    m = measure(lambda d: VnaServer(d, profile_to=prof, extra_env=vna_env), files, 1,
                study_uid, megabytes)
    print(f"\nvna run under cProfile (all threads), {count} instances, 1 association: "
          f"{m.per_second:.0f} inst/s (profiling slows it), "
          f"stored->indexed {m.indexed_seconds} s")
    print(f"profile: {prof} (open with python -m pstats)")
    stats = pstats.Stats(str(prof))
    stats.strip_dirs().sort_stats("cumulative")
    print(f"--- top {top} cumulative, without thread plumbing and idle waits ---")
    stats.print_stats(NOT_IDLE, top)
    print(f"--- top {top} own time (idle waits included: they show the polling) ---")
    stats.sort_stats("tottime").print_stats(top)
    print("--- the store path and the indexer, one level down ---")
    stats.sort_stats("cumulative").print_callees(r"\(store_instance\)|\(index_instance\)")
    return 0


# Threads spend most of their wall time waiting; these lines would hide the work.
NOT_IDLE = (r"^(?!.*(threading\.py|selectors\.py|socketserver\.py|base_events\.py|runners\.py"
            r"|_compat\.py|uvicorn|server\.py:\d+\((run|serve|main_loop|on_tick)"
            r"|cli\.py|relay\.py:\d+\(_run\)|vna_profiled|'acquire'|'poll'|time\.sleep"
            r"|\(<module>\)|built-in method builtins\.(exec|__import__)|importlib)).*")


@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """Ctrl-C or SIGTERM: raise in the main thread, so ``finally`` stops every server."""
    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT explicitly too: a shell starts background jobs with SIGINT ignored.
    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, handler) for signum in watched}
    try:
        yield
    finally:
        stop_all()
        remove_run_dirs()
        for signum, old in previous.items():
            signal.signal(signum, old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=1000, help="instances (default 1000)")
    parser.add_argument("--quick", action="store_true",
                        help="a small run: 40 instances, one round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times each target is measured, in turn (default 3): the "
                             "table shows medians")
    parser.add_argument("--profile", type=int, metavar="N", default=0,
                        help="profile vna run for N instances over one association instead")
    parser.add_argument("--vna-env", action="append", default=[], metavar="VNA_X=VALUE",
                        help="extra setting for vna run, e.g. VNA_INGEST_WORKERS=2 "
                             "(default: the embedded defaults)")
    parser.add_argument("--ablate", action="append", default=[], metavar="VARIANT",
                        help="also measure vna run without some of its guarantees: "
                             f"{', '.join(ABLATIONS)}, or several joined by a comma "
                             "(bench/ablation; figures to explain, never a setting)")
    parser.add_argument("--only", action="append", default=[],
                        choices=["vna", "vna-up", "orthanc", "storescp"], help="measure only these")
    args = parser.parse_args(argv)
    vna_env = dict(item.split("=", 1) for item in args.vna_env if "=" in item)
    for variant in args.ablate:
        if not set(variant.split(",")) <= set(ABLATIONS):
            parser.error(f"--ablate {variant}: choose from {', '.join(ABLATIONS)}")
    for tool in ("storescu", "echoscu", "storescp"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install -y dcmtk", file=sys.stderr)
            return 2
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    count = 40 if args.quick else args.count
    with cleanup_on_signals():
        try:
            if args.profile:
                return run_profile(args.profile, vna_env)
            return run_benchmark(count, vna_env, set(args.only),
                                 1 if args.quick else max(1, args.rounds), args.ablate)
        except KeyboardInterrupt:
            print("\ninterrupted: servers stopped", file=sys.stderr)
            return 130


if __name__ == "__main__":
    if __package__ in (None, ""):  # `python bench/ingest.py`: make `vna` importable
        sys.path.insert(0, str(REPO))
    sys.exit(main())
