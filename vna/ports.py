"""Ports: what the core needs from the outside world, as Protocols.

Every port has an in-memory adapter shipped with the core and a contract
suite in ``tests/contract`` that runs over every adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, runtime_checkable

from vna.dicom.extended import ExtraValue
from vna.dicom.matching import Level, Query
from vna.events import Event, InstanceStored
from vna.model import BlobKey, InstanceClaim, PendingCommitment, StoredInstance
from vna.model import IndexRecord as IndexRecord  # re-exported: adapters import it from here

if TYPE_CHECKING:
    from vna.journal import JournalEntry


class Unavailable(Exception):
    """A backend cannot be reached; the caller answers 'retry later'."""


class RecordRefused(Exception):
    """The index cannot hold a record it was given (a value its columns refuse).
    Not transient, unlike ``Unavailable``: the same write fails the same way."""


# --------------------------------------------------------------------------- blobs
@runtime_checkable
class BlobStore(Protocol):
    """Write-once, content-addressed bytes (key = SHA-256 of the bytes)."""

    def put_file(self, key: BlobKey, path: Path) -> bool:
        """Make the file durable at ``key``; True if written, False if it already was.

        The adapter may move ``path`` instead of copying it; the caller must not
        use it afterwards. Raises ``Unavailable`` when the store cannot be reached.
        """
        ...

    def exists(self, key: BlobKey) -> bool: ...

    def open(self, key: BlobKey) -> BinaryIO:
        """A sequential reader over the blob (do not seek). KeyError if absent."""
        ...

    def read_range(self, key: BlobKey, start: int, length: int | None = None) -> bytes:
        """Bytes ``[start, start+length)`` (to the end when length is None)."""
        ...

    def size(self, key: BlobKey) -> int: ...

    def local_path(self, key: BlobKey) -> Path | None:
        """A path on this machine holding the blob, when the store has one."""
        ...

    def local_file(self, key: BlobKey) -> tuple[str, int] | None:
        """The path (a plain string) and size of the file holding the blob, in one
        look-up, when the store keeps it on this machine; None otherwise or if absent.
        For retrievals that hand many blobs' files to the socket (WADO-RS sendfile)."""
        ...

    def keys(self) -> Iterator[BlobKey]:
        """Every key in the store (for reindex and scrub)."""
        ...

    def check(self) -> None:
        """Raise ``Unavailable`` when the store cannot be used (readiness)."""
        ...


# --------------------------------------------------------------------------- index
class ClaimOutcome(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"  # identical data set already held: nothing to do


class ConflictKind(Enum):
    SOP_INSTANCE = "sop-instance"
    PATIENT = "patient"
    SERIES = "series"


class ConflictError(Exception):
    """The instance contradicts what the archive holds (design invariant 5)."""

    def __init__(self, kind: ConflictKind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class StoredHeader:
    """An indexed instance's stored DICOM JSON with the pks of the rows that own it."""

    instance_pk: int
    owners: dict[Level, int]
    metadata_json: str


@dataclass(frozen=True)
class BackfillState:
    """How far the backfill of one extended attribute (``level:key``) has come."""

    progress_key: str
    last_instance_pk: int
    completed: bool


class Index(Protocol):
    """The queryable index, the claims that guard it, and the event outbox."""

    # ---- store path (synchronous, before the sender is answered)
    def claim(self, claim: InstanceClaim, event: InstanceStored) -> ClaimOutcome:
        """Record ``claim`` and its event in one transaction (transactional outbox).

        DUPLICATE when the same data set is already claimed; raises
        ``ConflictError`` when the SOP Instance UID is claimed with other content
        or the study belongs to another patient. Unique constraints decide races.
        """
        ...

    def check_claim(self, claim: InstanceClaim) -> ClaimOutcome:
        """What ``claim`` would do now, without recording it (raises ConflictError)."""
        ...

    def find_claim(self, sop_instance_uid: str) -> InstanceClaim | None: ...

    def patient_of_study(self, study_instance_uid: str) -> tuple[str, str] | None:
        """(Patient ID, Issuer) the study is bound to, or None for a new study."""
        ...

    def claims(self) -> Iterator[InstanceClaim]: ...

    # ---- audit trail (design invariant 8)
    def record_audit(self, action: str, outcome: str, *, actor: str = "", subject: str = "",
                     detail: str = "") -> str:
        """Append a record chained to the previous one by SHA-256; returns its hash."""
        ...

    def verify_audit(self) -> bool: ...

    def audit_records(self, action: str | None = None) -> list[dict[str, Any]]: ...

    # ---- Storage Commitment reports owed to requesters in VNA_PEERS
    def owe_commitment(self, pending: PendingCommitment, *, hold_seconds: float) -> None:
        """Keep ``pending`` durably until ``settle_commitment``. It is due at once, and
        held by the caller for ``hold_seconds``: no one else takes it meanwhile."""
        ...

    def take_due_commitments(self, *, hold_seconds: float, all_pending: bool = False,
                             limit: int = 20) -> list[PendingCommitment]:
        """Up to ``limit`` commitments held by nobody and due (with ``all_pending``,
        due or not: a process starting takes over what a stopped one owed), now held
        by the caller for ``hold_seconds``."""
        ...

    def retry_commitment(self, request_id: str, *, attempts: int, after_seconds: float
                         ) -> None:
        """Not delivered: due again in ``after_seconds``, no longer held."""
        ...

    def settle_commitment(self, request_id: str) -> None:
        """Delivered, or given up: forgotten."""
        ...

    # ---- outbox relay
    def relay_outbox(
        self, publish: Callable[[list[tuple[str, bytes]]], None], limit: int = 200
    ) -> int:
        """Hand pending events to ``publish``; remove them only once it returned.

        Returns how many were handed over. ``publish`` raising leaves them pending.
        """
        ...

    def outbox_depth(self) -> int: ...

    # ---- indexer
    def upsert_instance(self, record: IndexRecord, event: Event | None = None) -> bool:
        """Index one instance; True if added, False if it was already there.

        ``event`` (e.g. ``instance.indexed``) is put in the outbox in the same
        transaction when the instance is added.
        """
        ...

    def upsert_instances(self, items: Sequence[tuple[IndexRecord, Event | None]]
                         ) -> list[bool]:
        """``upsert_instance`` for a batch, in one transaction; one flag per item."""
        ...

    # ---- extended query attributes (backfill of values for what is already indexed)
    def extended_progress(self) -> dict[str, BackfillState]:
        """Backfill progress by ``ExtendedAttribute.progress_key``."""
        ...

    def extended_forget(self, keep: set[str]) -> list[str]:
        """Forget the progress (not the values) of attributes not in ``keep``."""
        ...

    def extended_scan(self, after_pk: int, limit: int) -> list[StoredHeader]:
        """Up to ``limit`` indexed instances after ``after_pk``, in pk order."""
        ...

    def extended_write(self, values: Sequence[tuple[int, ExtraValue]],
                       last_pk: dict[str, int], completed: set[str]) -> None:
        """Write ``(owner_pk, value)`` rows and the progress in one transaction."""
        ...

    # ---- readers
    def search(self, query: Query) -> list[dict[str, Any]]:
        """Rows matching ``query`` at its level: keyword -> value (see matching)."""
        ...

    def instances(
        self,
        study_instance_uid: str | None = None,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
        patient_id: str | None = None,
    ) -> list[StoredInstance]: ...

    def metadata(
        self,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
        *,
        version: int | None = None,
    ) -> list[str]:
        """DICOM JSON of the matching instances, in instance order.

        The stored (pristine) JSON with the study's current metadata version laid
        over it; ``version=N`` shows it as of version N (0: as received).
        """
        ...

    # ---- corrections (issue #4): metadata versions and patient merges
    def correct_study(
        self, study_instance_uid: str, changes: Mapping[str, str], *, reason: str, actor: str
    ) -> str:
        """Set attributes (DICOM keyword -> value) on the study as a new metadata
        version; returns ``"<study uid>@<version>"``. The stored bytes are not touched."""
        ...

    def merge_patients(
        self,
        prior_patient_id: str,
        prior_issuer_of_patient_id: str,
        patient_id: str,
        issuer_of_patient_id: str,
        *,
        actor: str,
    ) -> str:
        """Move the prior patient's studies under the surviving one; returns a merge ref."""
        ...

    def unmerge_patients(self, merge_ref: str, *, actor: str) -> None:
        """Undo a merge exactly (a no-op when it was already undone)."""
        ...

    def journal_keys(self) -> set[str]:
        """Keys of the correction journal entries (``vna.journal``) this index holds."""
        ...

    def replay_journal(self, entry: JournalEntry) -> str:
        """Apply a journal entry as it was applied first (its time, merge reference,
        studies); records its key. Returns '' or what came out differently."""
        ...

    def study_versions(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """The study's metadata versions, oldest first (empty: never corrected)."""
        ...

    def metadata_revision(self, study_instance_uid: str,
                          series_instance_uid: str | None = None,
                          sop_instance_uid: str | None = None) -> str | None:
        """The study's revision, or None when the study (the series in it, the instance
        in that) is not indexed. It changes, in the same transaction, whenever what
        ``metadata`` returns for the study could change: an instance indexed, a
        correction, a merge or unmerge; a value it had is never given again. ETags and
        metadata caches in any process are keyed by it."""
        ...

    def metadata_version(self, study_instance_uid: str) -> int:
        """The study's current metadata version (0: as received)."""
        ...

    def counts(self) -> dict[str, int]:
        """Rows per level and claims not yet indexed ('unindexed')."""
        ...

    def check(self) -> None: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- bus
EventHandler = Callable[[Event], None]


class BatchHandler:
    """A handler of several events at once (e.g. in one transaction), given to
    ``Bus.subscribe``; called with one event it handles a batch of one."""

    def __init__(self, handle: Callable[[list[Event]], None], max_batch: int = 200) -> None:
        self.handle = handle
        self.max_batch = max_batch

    def __call__(self, event: Event) -> None:
        self.handle([event])


class Bus(Protocol):
    """Publishes events durably and delivers them at least once."""

    def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish ``(routing_key, encoded event)`` pairs and wait until the
        broker has them all (publisher confirms, mandatory routing).

        Raises ``Unavailable`` when they cannot be confirmed; nothing is lost,
        the outbox keeps them.
        """
        ...

    def declare(self, queue: str, routing_keys: Sequence[str]) -> None:
        """Make ``queue`` exist and receive ``routing_keys`` before anyone consumes it.

        Publishers declare their consumers' queues, so that an event published
        before its consumer first started is kept, not unroutable.
        """
        ...

    def subscribe(self, queue: str, routing_keys: Sequence[str], handler: EventHandler) -> None:
        """Deliver matching events to ``handler`` (ack after it returns).

        A ``BatchHandler`` gets what is waiting together, up to its ``max_batch``;
        the whole batch is acknowledged after it returns, or none of it.
        """
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def queue_depth(self) -> int: ...

    def check(self) -> None: ...


# --------------------------------------------------------------------------- cache
class Cache(Protocol):
    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...

    def delete(self, key: str) -> None: ...

    def lock(self, name: str, timeout: float = 30.0) -> Any:
        """A context manager holding a named lock across processes."""
        ...

    def check(self) -> None: ...
