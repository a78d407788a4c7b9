"""``python -m services.worklist``: the worklist as a process of its own (``make up``)."""

from __future__ import annotations

import argparse
import signal

from services.worklist.service import start_worklist_service
from vna.bootstrap import build
from vna.cli import StopSignal
from vna.config import Settings
from vna.logging import configure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.worklist")
    parser.add_argument("--dimse-port", type=int, default=None,
                        help="MWL/MPPS port (default VNA_DIMSE_PORT)")
    parser.add_argument("--hl7-port", type=int, default=None,
                        help="HL7 MLLP port (default VNA_HL7_PORT)")
    args = parser.parse_args(argv)
    settings = Settings()
    configure(settings.log_level, settings.log_format)
    deps = build(settings)
    service = start_worklist_service(deps, dimse_port=args.dimse_port, hl7_port=args.hl7_port)
    stop = StopSignal()
    signal.signal(signal.SIGINT, stop.handle)
    signal.signal(signal.SIGTERM, stop.handle)
    stop.wait()
    service.stop()
    deps.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
