"""The ``vna`` command: ``vna run`` (embedded), ``vna ingest|index|dicomweb``, admin verbs."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from functools import partial
from typing import Any

from vna.bootstrap import Deps, build
from vna.config import Settings
from vna.logging import configure

log = logging.getLogger("vna")

INDEX_QUEUE = "vna.index"


def subscribe_indexer(deps: Deps) -> None:
    from vna.usecases.index import index_instance

    deps.bus.subscribe(INDEX_QUEUE, ["instance.stored"],
                       partial(index_instance, blobs=deps.blobs, index=deps.index))


def _serve_http(deps: Deps, stop: threading.Event) -> Any:
    import uvicorn

    from services.dicomweb.app import create_app

    config = uvicorn.Config(create_app(deps), host=deps.settings.bind,
                            port=deps.settings.http_port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    # Signals are handled here, not by uvicorn, so that every part stops together.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    return server, thread


def _wait_for_signal() -> threading.Event:
    stop = threading.Event()

    def _handler(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    return stop


def cmd_run(settings: Settings) -> int:
    """Everything in one process on embedded defaults."""
    from services.ingest.scp import start_dimse
    from vna.usecases.relay import OutboxRelay

    deps = build(settings)
    stop = _wait_for_signal()
    subscribe_indexer(deps)
    deps.bus.start()
    relay = OutboxRelay(index=deps.index, bus=deps.bus)
    relay.start()
    registrars = _registrars()
    dimse = start_dimse(deps, on_stored=relay.wake, registrars=registrars)
    http, http_thread = _serve_http(deps, stop)
    log.info("VNA running", extra={"ae_title": settings.ae_title, "dimse_port":
                                   settings.dimse_port, "http_port": settings.http_port,
                                   "data_dir": str(settings.data_dir)})
    print(f"VNA ready: DIMSE {settings.ae_title}@{settings.bind}:{settings.dimse_port}, "
          f"HTTP http://{settings.bind}:{settings.http_port}/dicomweb", flush=True)
    stop.wait()
    print("VNA stopping", flush=True)
    dimse.shutdown()
    http.should_exit = True
    http_thread.join(timeout=10)
    relay.stop()
    deps.close()
    return 0


def _registrars() -> list[Any]:
    """Optional DIMSE services that plug into the archive's AE (Q/R, worklist)."""
    found = []
    try:
        from services.ingest.qr import register_query_retrieve

        found.append(register_query_retrieve)
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
    from services.ingest.scp import start_dimse
    from vna.usecases.relay import OutboxRelay

    deps = build(settings)
    stop = _wait_for_signal()
    deps.bus.start()
    relay = OutboxRelay(index=deps.index, bus=deps.bus)
    relay.start()
    dimse = start_dimse(deps, on_stored=relay.wake, registrars=_registrars())
    print(f"VNA ingest ready on {settings.bind}:{settings.dimse_port}", flush=True)
    stop.wait()
    dimse.shutdown()
    relay.stop()
    deps.close()
    return 0


def cmd_index(settings: Settings) -> int:
    """The indexer alone: consumes instance.stored from the bus."""
    from vna.usecases.relay import OutboxRelay

    deps = build(settings)
    stop = _wait_for_signal()
    subscribe_indexer(deps)
    deps.bus.start()
    relay = OutboxRelay(index=deps.index, bus=deps.bus)  # instance.indexed events
    relay.start()
    print("VNA index ready", flush=True)
    stop.wait()
    relay.stop()
    deps.close()
    return 0


def cmd_dicomweb(settings: Settings) -> int:
    deps = build(settings)
    stop = _wait_for_signal()
    http, thread = _serve_http(deps, stop)
    print(f"VNA dicomweb ready on http://{settings.bind}:{settings.http_port}", flush=True)
    stop.wait()
    http.should_exit = True
    thread.join(timeout=10)
    deps.close()
    return 0


def cmd_reindex(settings: Settings) -> int:
    from vna.usecases.reindex import reindex

    deps = build(settings)
    report = reindex(blobs=deps.blobs, index=deps.index)
    print(f"reindexed {report.indexed} instances from {report.blobs} blobs "
          f"({report.failed} unreadable)", flush=True)
    deps.close()
    return 0 if report.failed == 0 else 1


COMMANDS = {
    "run": cmd_run,
    "ingest": cmd_ingest,
    "index": cmd_index,
    "dicomweb": cmd_dicomweb,
    "reindex": cmd_reindex,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vna", description="VNA: vendor neutral archive")
    parser.add_argument("command", choices=sorted(COMMANDS))
    args = parser.parse_args(argv)
    settings = Settings()
    configure(settings.log_level, settings.log_format)
    return COMMANDS[args.command](settings)


if __name__ == "__main__":
    sys.exit(main())
