"""Benchmark ablations of ``vna run``: what two of the store path's guarantees cost.

Never part of the product. ``python -m bench.ingest --ablate VARIANT`` starts
extra VNA targets with this directory first on ``PYTHONPATH`` and
``VNA_BENCH_ABLATE`` set, so that Python imports this file at start-up in the
archive's process and in every receiver process it spawns:

- ``orthanc-sync``: only a stored file's own fsync is kept, as Orthanc 1.10 does
  by default (``SyncStorageArea``: one fdatasync of the file). The fsyncs of the
  directories that name a blob and the fdatasync of the index's WAL (the claim and
  its event, durable before the answer) are skipped: after a power cut such an
  archive may have lost instances it acknowledged.
- ``no-hash``: the staging file is not hashed; each instance gets a random key.
  Identical bytes are no longer recognised as a duplicate.

Each measures the archive doing less than its invariants require (DESIGN.md §3),
to say what the difference to Orthanc is made of, not to be run.
"""

from __future__ import annotations

import os
import stat
import uuid
from typing import Any

_VARIANTS = set(filter(None, os.environ.get("VNA_BENCH_ABLATE", "").split(",")))


def _file_data_only() -> None:
    fsync = os.fsync

    def fsync_files(fd: Any) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # a blob or staging file: kept
            fsync(fd)

    def skipped(fd: Any) -> None:
        pass

    os.fsync = fsync_files  # directories: skipped
    os.fdatasync = skipped  # the index's WAL (vna.durable, data_only): skipped


class _RandomKey:
    """Stands in for hashlib.sha256 on the staging file: hashes nothing."""

    def __init__(self, data: Any = b"") -> None:
        self._key = uuid.uuid4().hex + uuid.uuid4().hex

    def update(self, data: Any) -> None:
        pass

    def hexdigest(self) -> str:
        return self._key


def _no_hash() -> None:
    import types

    import vna.usecases.store as store

    # The store module's own name for hashlib, so every other hash stays real.
    setattr(store, "hashlib", types.SimpleNamespace(sha256=_RandomKey))  # noqa: B010


if "orthanc-sync" in _VARIANTS:
    _file_data_only()
if "no-hash" in _VARIANTS:
    _no_hash()
