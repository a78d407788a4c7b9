"""The ``vna`` command: ``vna run`` (embedded), ``vna ingest|index|dicomweb``, admin verbs."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from vna.bootstrap import Deps, build
from vna.config import Settings
from vna.events import Event
from vna.logging import configure

log = logging.getLogger("vna")

INDEX_QUEUE = "vna.index"


def declare_indexer_queue(deps: Deps) -> None:
    """Publishers make the indexer's queue exist, retrying while the broker is away."""
    import time

    from vna.ports import Unavailable

    def attempt() -> None:
        delay = 0.5
        while True:
            try:
                deps.bus.declare(INDEX_QUEUE, ["instance.stored"])
                return
            except Unavailable:
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    threading.Thread(target=attempt, name="declare-queues", daemon=True).start()


def subscribe_indexer(deps: Deps) -> None:
    from vna.ports import BatchHandler
    from vna.usecases.index import index_isolating

    def handle(events: list[Event]) -> None:
        index_isolating(events, blobs=deps.blobs, index=deps.index,
                        extended=deps.extended)

    # In batches: one index transaction (one commit) for what is waiting.
    deps.bus.subscribe(INDEX_QUEUE, ["instance.stored"], BatchHandler(handle))


def start_backfill(deps: Deps) -> Any:
    """Backfill newly configured extended query attributes in the background."""
    from vna.usecases.backfill import BackgroundBackfill

    backfill = BackgroundBackfill(deps.extended, index=deps.index)
    backfill.start()
    return backfill


def _serve_http(deps: Deps, stop: StopSignal) -> Any:
    import uvicorn

    from services.dicomweb.app import served_app

    config = uvicorn.Config(served_app(deps), host=deps.settings.bind,
                            port=deps.settings.http_port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    # uvicorn leaves signals alone outside the main thread: we handle them, so that
    # every part stops together.
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    return server, thread


class HttpFront:
    """The HTTP side of ``vna run`` / ``vna dicomweb``: uvicorn in a thread of this
    process (one worker), or ``VNA_HTTP_WORKERS`` processes sharing the port."""

    def __init__(self, deps: Deps, stop: StopSignal, on_stored: Any) -> None:
        self.workers = None
        self.server = self.thread = None
        count = _http_workers(deps.settings)
        if count == 1:
            deps.extras["on_stored"] = on_stored
            self.server, self.thread = _serve_http(deps, stop)
            return
        from services.dicomweb.workers import HttpWorkers

        self.workers = HttpWorkers(deps.settings.bind, deps.settings.http_port, count,
                                   on_stored=on_stored)
        self.workers.start()

    def wait_ready(self) -> None:
        if self.workers is not None and not self.workers.wait_ready(timeout=90):
            raise SystemExit("the HTTP worker processes did not start")

    def check(self) -> None:
        """Replace a worker process that died."""
        if self.workers is not None:
            self.workers.replace_exited()

    def stop(self) -> None:
        if self.workers is not None:
            self.workers.close()
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=10)


def _processes(configured: int) -> int:
    """Worker processes (DIMSE receivers, HTTP workers): as configured, else one per
    core plus one. Each is busy in Python for most of an instance but also waits on
    the network and its fsyncs, and the main process indexes beside them. On two
    cores, STOW-RS from 4 clients: 2 HTTP workers 277-298 inst/s, 3 314-330, 4 236-330."""
    import os

    return configured if configured > 0 else (os.cpu_count() or 1) + 1


def _http_workers(settings: Settings) -> int:
    return _processes(settings.http_workers)


def _use_multiprocess_metrics(processes: int) -> str | None:
    """With several processes, each writes its metrics to files in one directory and
    ``/metrics`` (in any of them) adds them up (prometheus_client's multiprocess mode).

    Must run before ``prometheus_client`` is imported: children inherit the setting.
    Returns the directory, to remove on exit (None: one process, nothing to share).
    """
    import os
    import tempfile

    if processes <= 1:
        return None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or "prometheus_client" in sys.modules:
        return None  # set up by whoever started us, or too late to switch
    directory = tempfile.mkdtemp(prefix="vna-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory


class StopSignal:
    """Set by SIGINT/SIGTERM; waited on by the main thread.

    A signal handler must not take locks: ``threading.Event.set`` from a handler
    that interrupts ``Event.wait`` in the same thread deadlocks on the Event's
    own lock. The handler only flips a flag; ``wait`` polls it.
    """

    def __init__(self) -> None:
        self.received = False

    def handle(self, signum: int, _frame: Any) -> None:
        self.received = True

    def is_set(self) -> bool:
        return self.received

    def wait(self, timeout: float | None = None) -> bool:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.received:
            left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if left <= 0:
                break
            time.sleep(left)
        return self.received


def _wait_for_signal() -> StopSignal:
    stop = StopSignal()
    signal.signal(signal.SIGINT, stop.handle)
    signal.signal(signal.SIGTERM, stop.handle)
    return stop


def _wait_for_archive() -> StopSignal:
    """A worker process's signals: SIGTERM stops it; SIGINT is ignored.

    Ctrl-C in a terminal goes to the whole process group. The archive that
    started the worker stops its workers itself, in order (dispatcher first);
    a worker that also quit on its own was reported as lost, at ERROR, on every
    clean stop."""
    stop = StopSignal()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop.handle)
    return stop


def cmd_run(settings: Settings) -> int:
    """Everything in one process on embedded defaults."""
    import shutil

    # First: what is imported next imports prometheus_client.
    metrics_dir = _use_multiprocess_metrics(
        max(_http_workers(settings), _ingest_workers(settings)))
    from vna.usecases.relay import OutboxRelay

    deps = build(settings)
    stop = _wait_for_signal()
    subscribe_indexer(deps)
    hl7 = _start_worklist(deps)
    deps.bus.start()
    backfill = start_backfill(deps)
    relay = OutboxRelay(index=deps.index, bus=deps.bus)
    relay.start()
    receivers = Receivers(settings, deps, on_stored=relay.wake)
    # STOW-RS wakes the relay as C-STORE does (from a worker process: over its channel).
    # HTTP workers start while the receivers do.
    http = HttpFront(deps, stop, on_stored=relay.wake)
    receivers.start()
    http.wait_ready()
    log.info("VNA running", extra={"ae_title": settings.ae_title, "dimse_port":
                                   settings.dimse_port, "http_port": settings.http_port,
                                   "data_dir": str(settings.data_dir)})
    print(f"VNA ready: DIMSE {settings.ae_title}@{settings.bind}:{settings.dimse_port}, "
          f"HTTP http://{settings.bind}:{settings.http_port}/dicomweb", flush=True)
    while not stop.wait(1.0):
        receivers.check()
        http.check()
    print("VNA stopping", flush=True)
    if hl7 is not None:
        hl7.stop()
    receivers.stop()
    http.stop()
    backfill.stop()
    relay.stop()
    deps.close()
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _start_worklist(deps: Deps) -> Any:
    """Embedded: orders bound to images, and the HL7 listener, in this process."""
    try:
        from services.worklist.service import start_hl7, subscribe_binder
    except ImportError:
        return None
    subscribe_binder(deps)
    return start_hl7(deps)


class Receivers:
    """This process's DIMSE port: served here, or, with several receivers
    (``VNA_INGEST_WORKERS``), by receiver processes this one accepts for, each
    association handed to the least busy. Receiving is then not bound to one GIL;
    a receiver that dies is replaced (``check``)."""

    def __init__(self, settings: Settings, deps: Deps, *,
                 on_stored: Callable[[], None]) -> None:
        from services.ingest.scp import start_dimse
        from vna.dispatch import Dispatcher

        self.dimse: Any = None
        self.dispatcher: Any = None
        self.processes: list[Any] = []
        workers = _ingest_workers(settings)
        if workers == 1:
            self.dimse = start_dimse(deps, on_stored=on_stored, registrars=_registrars())
            return
        # Receivers report each instance stored: the relay here publishes it at once.
        self.dispatcher = Dispatcher(settings.bind, settings.dimse_port, on_stored=on_stored)
        self.processes = [_spawn_worker(self.dispatcher.add_receiver()) for _ in range(workers)]

    def start(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.start()
            if not self.dispatcher.wait_ready(timeout=90):
                raise SystemExit("the receiver processes did not start")

    def check(self) -> None:
        if self.dispatcher is not None:
            _replace_exited(self.processes, self.dispatcher)

    def stop(self) -> None:
        from services.ingest.scp import stop_dimse

        if self.dispatcher is not None:
            self.dispatcher.close()
        for proc in self.processes:
            proc.terminate()
        for proc in self.processes:
            proc.wait(timeout=15)
        if self.dimse is not None:
            stop_dimse(self.dimse)


def _ingest_workers(settings: Settings) -> int:
    return _processes(settings.ingest_workers)


def _replace_exited(receivers: list[Any], dispatcher: Any) -> None:
    """A receiver process that died (OOM-killed, a crash) is replaced; meanwhile the
    dispatcher hands associations to the others."""
    for i, proc in enumerate(receivers):
        if proc.poll() is not None:
            log.error("a receiver process exited; starting another",
                      extra={"pid": proc.pid, "returncode": proc.returncode})
            receivers[i] = _spawn_worker(dispatcher.add_receiver())


def _spawn_worker(channel: Any) -> Any:
    """A receiver process, given its end of the dispatcher's channel."""
    import os
    import subprocess

    from vna.dispatch import CHANNEL_FD_ENV

    fd = channel.fileno()
    proc = subprocess.Popen([sys.executable, "-m", "vna", "ingest-worker"], pass_fds=[fd],
                            env={**os.environ, CHANNEL_FD_ENV: str(fd)})
    channel.close()  # the receiver holds it now
    return proc


def cmd_ingest_worker(settings: Settings) -> int:
    """A receiver process of ``vna run`` or ``vna ingest``: stores only; the process
    that dispatches to it relays."""
    import os
    import socket

    from services.ingest.scp import start_dimse, stop_dimse
    from vna.dispatch import CHANNEL_FD_ENV, StoredReports

    parent = os.getppid()
    deps = build(settings)
    stop = _wait_for_archive()
    channel = socket.socket(fileno=int(os.environ[CHANNEL_FD_ENV]))
    dimse = start_dimse(deps, registrars=_registrars(), channel=channel,
                        on_stored=StoredReports(channel))
    # A receiver does not outlive its archive (killed -9).
    while not stop.wait(1.0) and os.getppid() == parent:
        pass
    stop_dimse(dimse)
    deps.close()
    return 0


def _registrars() -> list[Any]:
    """Optional DIMSE services that plug into the archive's AE (Q/R, storage
    commitment, worklist)."""
    found = []
    try:
        from services.ingest.qr import register_query_retrieve

        found.append(register_query_retrieve)
    except ImportError:
        pass
    try:
        from services.ingest.commitment import register_commitment

        found.append(register_commitment)
    except ImportError:
        pass
    try:
        from services.worklist.scp import register_worklist

        found.append(register_worklist)
    except ImportError:
        pass
    return found


def cmd_ingest(settings: Settings) -> int:
    """The DIMSE front door alone: stores, relays its outbox to the bus."""
    import shutil

    # First: what is imported next imports prometheus_client.
    metrics_dir = _use_multiprocess_metrics(_ingest_workers(settings))
    from vna import metrics
    from vna.usecases.relay import OutboxRelay

    deps = build(settings)
    stop = _wait_for_signal()
    deps.bus.start()
    declare_indexer_queue(deps)
    relay = OutboxRelay(index=deps.index, bus=deps.bus)
    relay.start()
    receivers = Receivers(settings, deps, on_stored=relay.wake)
    receivers.start()
    if settings.metrics_port:
        metrics.serve(settings.bind, settings.metrics_port)
    print(f"VNA ingest ready on {settings.bind}:{settings.dimse_port}", flush=True)
    while not stop.wait(1.0):
        receivers.check()
    receivers.stop()
    relay.stop()
    deps.close()
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def cmd_index(settings: Settings) -> int:
    """The indexer alone: consumes instance.stored from the bus."""
    from vna import metrics
    from vna.usecases.relay import OutboxRelay

    deps = build(settings)
    stop = _wait_for_signal()
    subscribe_indexer(deps)
    deps.bus.start()
    relay = OutboxRelay(index=deps.index, bus=deps.bus)  # instance.indexed events
    relay.start()
    backfill = start_backfill(deps)
    if settings.metrics_port:
        metrics.serve(settings.bind, settings.metrics_port)
    print("VNA index ready", flush=True)
    stop.wait()
    backfill.stop()
    relay.stop()
    deps.close()
    return 0


def cmd_dicomweb(settings: Settings) -> int:
    """HTTP alone. STOW-RS events go through the shared outbox; this process relays too."""
    import shutil

    metrics_dir = _use_multiprocess_metrics(_http_workers(settings))  # before any import
    from vna.usecases.relay import OutboxRelay

    deps = build(settings)
    stop = _wait_for_signal()
    deps.bus.start()
    declare_indexer_queue(deps)
    relay = OutboxRelay(index=deps.index, bus=deps.bus)
    relay.start()
    http = HttpFront(deps, stop, on_stored=relay.wake)
    http.wait_ready()
    print(f"VNA dicomweb ready on http://{settings.bind}:{settings.http_port}", flush=True)
    while not stop.wait(1.0):
        http.check()
    http.stop()
    relay.stop()
    deps.close()
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def cmd_http_worker(settings: Settings) -> int:
    """An HTTP process of ``vna run`` / ``vna dicomweb``: serves the connections the
    archive hands it; stores go to the outbox, which the archive relays."""
    import os
    import socket

    import uvicorn

    from services.dicomweb.app import served_app
    from services.dicomweb.workers import CHANNEL_FD_ENV, HandedConnectionsServer
    from vna.dispatch import StoredReports

    parent = os.getppid()
    deps = build(settings)
    stop = _wait_for_archive()
    channel = socket.socket(fileno=int(os.environ[CHANNEL_FD_ENV]))
    deps.extras["on_stored"] = StoredReports(channel)
    config = uvicorn.Config(served_app(deps), log_config=None, access_log=False)
    server = HandedConnectionsServer(config, channel)
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    # A worker does not outlive its archive (killed -9).
    while not stop.wait(1.0) and os.getppid() == parent and thread.is_alive():
        pass
    server.should_exit = True
    thread.join(timeout=10)
    deps.close()
    return 0


def cmd_reindex(settings: Settings) -> int:
    from vna.usecases.reindex import reindex

    deps = build(settings)
    report = reindex(blobs=deps.blobs, index=deps.index, extended=deps.extended)
    print(f"reindexed {report.indexed} instances from {report.blobs} blobs "
          f"({report.failed} unreadable); replayed {report.replayed} of {report.journal} "
          f"correction journal entries ({report.orphaned} not committed, left out; "
          f"{len(report.mismatched)} replayed differently)", flush=True)
    for line in report.mismatched:
        print(f"  replayed differently: {line}", flush=True)
    if report.refused:
        print(f"left out {report.refused} blobs not accepted when they were stored", flush=True)
    for line in report.conflicts:
        print(f"  conflict, not indexed (the first blob found with its SOP Instance UID "
              f"was): {line}", flush=True)
    deps.close()
    return 0 if report.failed == 0 and not report.mismatched and not report.conflicts else 1


def cmd_backfill(settings: Settings, *, restart: bool = False) -> int:
    """Backfill the extended query attributes now, in the foreground (resumable).

    ``restart``: from the first instance again, for every configured attribute
    (after indexers with an older setting kept indexing past a completed backfill).
    """
    from vna.usecases.backfill import backfill_extended

    deps = build(settings)
    if restart:
        deps.index.extended_forget(set())
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stop = _wait_for_signal()  # stops between batches; the next run resumes
    try:
        report = backfill_extended(
            deps.extended, index=deps.index, should_stop=stop.is_set,
            on_batch=lambda pk: print(f"backfilled up to instance {pk}", flush=True))
    finally:
        deps.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if report.forgotten:
        print("no longer configured: " + ", ".join(report.forgotten), flush=True)
    if not report.attributes:
        print("extended query attributes: nothing to backfill", flush=True)
        return 0
    state = "completed" if report.completed else "stopped (resumes where it was)"
    print(f"backfill of {', '.join(report.attributes)} {state}: {report.instances} "
          f"instances, {report.values} values", flush=True)
    return 0 if report.completed else 1


def cmd_up(settings: Settings) -> int:
    """The distributed world on one machine: ingest, index and dicomweb as processes.

    A small supervisor: a child that dies is started again (as Kubernetes would),
    so killing any one of them loses nothing and the archive comes back.
    """
    import os
    import subprocess
    import time

    from vna.adapters.index.sqlalchemy import ensure_database

    env = dict(os.environ)
    rclone = None
    if not settings.storage_url:
        from vna.testing.s3server import start_rclone_s3

        root = settings.data_dir.resolve() / "s3"
        root.mkdir(parents=True, exist_ok=True)
        url, access, secret, rclone = start_rclone_s3(root, None)
        env.update(VNA_STORAGE_URL=f"s3://vna?endpoint={url}", VNA_S3_ACCESS_KEY=access,
                   VNA_S3_SECRET_KEY=secret)
        print(f"S3 (rclone serve s3) on {url}", flush=True)
    ensure_database(settings.db_url())
    build(Settings(**{**settings.model_dump(), "storage_url": env.get("VNA_STORAGE_URL", ""),
                      "s3_access_key": env.get("VNA_S3_ACCESS_KEY", settings.s3_access_key),
                      "s3_secret_key": env.get("VNA_S3_SECRET_KEY", settings.s3_secret_key)})
          ).close()  # migrations and bucket, once, before the children race for them
    stop = _wait_for_signal()
    commands = {name: [sys.executable, "-m", "vna", name]
                for name in ("ingest", "index", "dicomweb")}
    commands["worklist"] = [sys.executable, "-m", "services.worklist", "--dimse-port",
                            str(settings.worklist_port)]
    # ingest and index have no HTTP port: each serves /metrics on one of its own.
    envs = {name: env for name in commands}
    envs["ingest"] = {**env, "VNA_METRICS_PORT": str(settings.up_ingest_metrics_port)}
    envs["index"] = {**env, "VNA_METRICS_PORT": str(settings.up_index_metrics_port)}
    children: dict[str, subprocess.Popen[bytes]] = {}
    for name, argv in commands.items():
        children[name] = subprocess.Popen(argv, env=envs[name])
    (settings.data_dir / "up.pids").write_text(
        "".join(f"{n} {p.pid}\n" for n, p in children.items()))
    print("VNA up: " + ", ".join(f"{n} pid {p.pid}" for n, p in children.items()), flush=True)
    while not stop.wait(0.5):
        for name, proc in list(children.items()):
            if proc.poll() is not None:
                log.warning("child exited; restarting", extra={"service": name,
                                                               "code": proc.returncode})
                children[name] = subprocess.Popen(commands[name], env=envs[name])
                (settings.data_dir / "up.pids").write_text(
                    "".join(f"{n} {p.pid}\n" for n, p in children.items()))
    for proc in children.values():
        proc.terminate()
    deadline = time.monotonic() + 15
    for proc in children.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    if rclone is not None:
        rclone.terminate()
        rclone.wait(timeout=10)
    return 0


COMMANDS = {
    "up": cmd_up,
    "run": cmd_run,
    "ingest": cmd_ingest,
    "ingest-worker": cmd_ingest_worker,
    "index": cmd_index,
    "dicomweb": cmd_dicomweb,
    "http-worker": cmd_http_worker,
    "reindex": cmd_reindex,
    "backfill": cmd_backfill,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vna", description="VNA: vendor neutral archive")
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--restart", action="store_true",
                        help="backfill: start again from the first instance")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:  # a setting's name and why, not a traceback
        for error in exc.errors():
            name = "VNA_" + "_".join(str(part) for part in error["loc"]).upper()
            print(f"vna: {name}={error.get('input')!r}: "
                  f"{error['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format)
    if args.command == "backfill":
        return cmd_backfill(settings, restart=args.restart)
    return COMMANDS[args.command](settings)


if __name__ == "__main__":
    sys.exit(main())
