"""Prometheus metrics.

One registry per process; when ``vna run`` or ``vna dicomweb`` runs several
processes (HTTP workers, DIMSE receivers) they share one directory
(``PROMETHEUS_MULTIPROC_DIR``, set by the archive before any of them imports
prometheus_client) and ``/metrics`` in any of them reports the sum over all.
Gauges then keep the value the latest process set.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)

INSTANCES_STORED = Counter("vna_instances_stored_total", "Instances newly stored")
INSTANCES_DUPLICATE = Counter("vna_instances_duplicate_total", "Identical instances sent again")
BYTES_STORED = Counter("vna_bytes_stored_total", "Bytes of newly stored instances")
STORE_FAILURES = Counter("vna_store_failures_total", "Refused or failed stores", ["reason"])
STORE_SECONDS = Histogram(
    "vna_store_seconds",
    "Time from a complete data set received to the answer",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
INSTANCES_INDEXED = Counter("vna_instances_indexed_total", "Instances added to the index")
INDEX_REFUSED = Counter("vna_index_refused_total",
                        "Stored instances the index could not hold (a value its columns "
                        "refuse): logged and audited; the blob is kept")
INDEX_LAG = Gauge("vna_index_lag", "Stored instances not yet in the index",
                  multiprocess_mode="mostrecent")
QUEUE_DEPTH = Gauge("vna_queue_depth", "Events waiting: outbox plus bus queues",
                    multiprocess_mode="mostrecent")
TRANSCODES = Counter("vna_transcodes_total",
                     "Instances or frames sent in another transfer syntax than stored",
                     ["kind", "outcome"])
EXTENDED_BACKFILL_PENDING = Gauge(
    "vna_extended_backfill_pending",
    "1 while the values of an extended query attribute are being backfilled",
    ["attribute"],
    multiprocess_mode="mostrecent",
)
EXTENDED_BACKFILLED = Counter("vna_extended_backfilled_instances_total",
                              "Instances read by the extended-attribute backfill")
STORAGE_COMMITMENT = Counter("vna_storage_commitment_instances_total",
                             "Instances Storage Commitment requests asked about, by "
                             "result: 'committed' or 'failed'", ["result"])
STORAGE_COMMITMENT_REPORTS = Counter("vna_storage_commitment_reports_total",
                                     "Storage Commitment reports, by delivery: "
                                     "'same_association', 'new_association' or "
                                     "'undelivered'", ["delivery"])
STORAGE_COMMITMENT_RETRIES = Counter("vna_storage_commitment_retries_total",
                                     "Storage Commitment reports not delivered on a new "
                                     "association at one attempt, to be tried again")
DIMSE_ASSOCIATIONS = Counter("vna_dimse_associations_total",
                             "DIMSE associations received, by the SCP that served them: "
                             "'lean' (storage only) or 'pynetdicom' (everything else)",
                             ["scp"])


def serve(bind: str, port: int) -> None:
    """``/metrics`` on a port of its own, for the processes without HTTP (``vna ingest``,
    ``vna index``): what ``exposition`` gives. A port in use is logged, not fatal: the
    process serves DICOM all the same."""
    try:
        start_http_server(port, addr=bind, registry=_registry())
    except OSError as exc:
        logging.getLogger("vna.metrics").error("metrics port %s: %s", port, exc)


def exposition() -> bytes:
    """The text format of every metric: this process's, or all processes' of the archive."""
    return generate_latest(_registry())


def _registry() -> CollectorRegistry:
    # prometheus_client's own variable: it decided at import how values are kept.
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry
