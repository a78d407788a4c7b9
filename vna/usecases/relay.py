"""The outbox relay: moves durably recorded events onto the bus."""

from __future__ import annotations

import logging
import threading

from vna.ports import Bus, Index, Unavailable

log = logging.getLogger("vna.relay")


class OutboxRelay:
    """A thread that drains the outbox to the bus; backs off while the bus is away."""

    def __init__(self, *, index: Index, bus: Bus, batch: int = 200,
                 idle_poll: float = 0.5, linger: float = 0.05, max_backoff: float = 5.0) -> None:
        self.index = index
        self.bus = bus
        self.batch = batch
        self.idle_poll = idle_poll
        # After a batch smaller than ``batch``, wait this long for more to gather
        # before the next: under a steady stream of instances (several receivers
        # committing claims) it otherwise relays one or two events at a time, and
        # each batch costs the same transactions and bus round trips as a full one.
        # Receivers leave instances unreported that this drain-again picks up
        # (vna.dispatch.StoredReports): keep it above their report interval.
        self.linger = linger
        self.max_backoff = max_backoff
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0

    def wake(self) -> None:
        self._wake.set()

    def drain_once(self) -> int:
        """Relay one batch; returns how many events went out."""
        return self.index.relay_outbox(self.bus.publish, self.batch)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                moved = self.drain_once()
                backoff = 0.1
                if moved:
                    if moved < self.batch and self.linger:
                        self._stop.wait(self.linger)
                    continue
                self._wake.wait(self.idle_poll)
                self._wake.clear()
            except Unavailable as exc:
                self.failures += 1
                log.warning("relay waiting for the bus: %s", exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
            except Exception:
                self.failures += 1
                log.exception("relay failed; retrying")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)
