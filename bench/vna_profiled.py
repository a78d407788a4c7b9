"""Run ``vna run`` with cProfile on every thread; write merged stats on exit.

Usage: ``python -m bench.vna_profiled OUT.prof`` (settings from the ``VNA_*`` environment).

cProfile only sees the thread that enabled it, and in ``vna run`` the main thread
just waits for a signal: the work happens in pynetdicom's association threads, the
relay and the bus. So each thread gets its own profiler, and all are merged at the end.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
from typing import Any

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _install() -> None:
    # Patch _bootstrap_inner, not run(): pynetdicom's Association overrides run().
    original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def bootstrap_inner(self: threading.Thread) -> None:
        profile = cProfile.Profile()
        with _lock:
            _profiles.append(profile)
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()

    threading.Thread._bootstrap_inner = bootstrap_inner  # type: ignore[attr-defined]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.vna_profiled OUT.prof", file=sys.stderr)
        return 2
    out = argv[0]
    _install()
    from vna.cli import main as vna_main

    main_profile = cProfile.Profile()
    main_profile.enable()
    code = 1
    try:
        code = vna_main(["run"])
    finally:
        main_profile.disable()
        stats: Any = pstats.Stats(main_profile)
        with _lock:
            profiles = list(_profiles)
        for profile in profiles:
            try:
                stats.add(profile)
            except (TypeError, ValueError):  # a profile with no data: a thread that never ran
                continue
        stats.dump_stats(out)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
