"""Prometheus metrics (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
INDEX_LAG = Gauge("vna_index_lag", "Stored instances not yet in the index")
QUEUE_DEPTH = Gauge("vna_queue_depth", "Events waiting: outbox plus bus queues")
TRANSCODES = Counter("vna_transcodes_total",
                     "Instances or frames sent in another transfer syntax than stored",
                     ["kind", "outcome"])
EXTENDED_BACKFILL_PENDING = Gauge(
    "vna_extended_backfill_pending",
    "1 while the values of an extended query attribute are being backfilled",
    ["attribute"],
)
EXTENDED_BACKFILLED = Counter("vna_extended_backfilled_instances_total",
                              "Instances read by the extended-attribute backfill")
DIMSE_ASSOCIATIONS = Counter("vna_dimse_associations_total",
                             "DIMSE associations received, by the SCP that served them: "
                             "'lean' (storage only) or 'pynetdicom' (everything else)",
                             ["scp"])
