"""The correction journal: study corrections and patient merges, kept in the blob store.

Corrections, merges and unmerges (issue #4) change the index only; the blobs
stay pristine. So that ``vna reindex`` (design invariant 7) can rebuild them,
each change is also written as a small JSON document to the blob store,
content-addressed and write-once like every blob, *before* the index
transaction that makes the change commits (the index writes it from inside
that transaction, see ``vna.adapters.index.corrections``).

Format
    ``VNA-JOURNAL 1\\n`` (never the start of a DICOM file: Part-10 files start
    with a 128-byte preamble and ``DICM``; reindex tells the two apart by this
    first line) followed by one JSON object: ``kind`` (correction, merge, join,
    unmerge), ``seq`` (1, 2, ...), ``prev`` (the key of the entry before it,
    '' for the first), ``at`` (ISO time) and what the change needs to be
    replayed and checked.

Which entries committed
    Writers are serialised by the index (a lock held to commit), and each entry
    names as ``prev`` the last entry the index had committed: the journal is a
    hash chain. An entry whose transaction did not commit (a crash or an error
    between the blob write and the commit) is a dead end: the next committed
    entry names the same ``prev``. ``committed_chain`` therefore follows, from
    the start, the child with the longest chain after it, and among children
    with equally long chains the one written last (a sibling written later
    proves the earlier one's transaction did not commit: it saw the same head).
    The only case this cannot settle is the very last entry, written durably
    but perhaps not committed; it is replayed, because an acknowledged change
    must never be lost, while a change whose caller got an error is at worst
    re-applied — and reindex reports it so that a person can check.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vna.model import BlobKey, is_blob_key
from vna.ports import BlobStore

MAGIC = b"VNA-JOURNAL 1\n"
KINDS = ("correction", "merge", "join", "unmerge")

REFUSAL = b"VNA-REFUSED 1\n"
"""A refusal note: the blob it names holds an instance the archive refused.

Two senders can store the same SOP Instance UID with different bytes, or the
first instances of a new study under two Patient IDs, at the same moment: both
pass the early check, both write their blob, and the index's claim refuses the
one that commits second. Its blob stays (a write-once store keeps what it got),
and from the blobs alone ``vna reindex`` could not tell which of the two the
archive accepted: it indexed whichever it met first, so after a rebuild the
index could serve the refused bytes, or file a refused instance in another
patient's study. The store path therefore writes this note, durably, before it
answers the refusal; reindex indexes the blobs named in notes last, and leaves
them out when they contradict what it indexed before them. So does a store
whose claim the index could not record after its blob was written (``failure``
``unavailable``): such a blob goes after the unnoted ones and before the refused
ones. Format: this magic line, then one JSON object: ``blob_key``,
``sop_instance_uid``, ``failure``, ``reason``, ``at``.
"""


class JournalError(ValueError):
    """A blob that starts like a journal entry but is not a valid one."""


@dataclass(frozen=True)
class JournalEntry:
    """One decoded journal entry (``doc`` holds the whole document)."""

    key: BlobKey
    seq: int
    prev: str
    kind: str
    at: str
    doc: dict[str, Any]


def encode(doc: Mapping[str, Any]) -> bytes:
    """The bytes of a journal entry: the magic line and canonical JSON."""
    return MAGIC + json.dumps(dict(doc), sort_keys=True, separators=(",", ":")).encode() + b"\n"


def is_journal(head: bytes) -> bool:
    """Whether a blob starting with ``head`` is a journal entry."""
    return head.startswith(MAGIC)


def decode(key: BlobKey, data: bytes) -> JournalEntry:
    """Parse a journal blob; ``JournalError`` when it is not a valid entry."""
    if not is_journal(data):
        raise JournalError(f"blob {key} is not a journal entry")
    try:
        doc = json.loads(data[len(MAGIC):])
    except ValueError as exc:
        raise JournalError(f"journal entry {key} is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("kind") not in KINDS:
        raise JournalError(f"journal entry {key} has no known kind")
    try:
        return JournalEntry(key=key, seq=int(doc["seq"]), prev=str(doc["prev"]),
                            kind=str(doc["kind"]), at=str(doc["at"]), doc=doc)
    except (KeyError, TypeError, ValueError) as exc:
        raise JournalError(f"journal entry {key} lacks {exc}") from exc


def is_refusal(head: bytes) -> bool:
    """Whether a blob starting with ``head`` is a refusal note."""
    return head.startswith(REFUSAL)


UNSETTLED = "unavailable"
"""The failure a note gives when the index could not be reached to claim the
instance: its sender was told to retry, and a retry of the same bytes may have
been accepted since. Every other failure is a refusal that stands."""


@dataclass(frozen=True)
class RefusalNote:
    """What a refusal note says: which blob, and why it was not accepted."""

    blob_key: BlobKey
    failure: str

    @property
    def settled(self) -> bool:
        """Refused for good (a conflict), not merely unrecorded when it came."""
        return self.failure != UNSETTLED


def read_refusal(key: BlobKey, data: bytes) -> RefusalNote:
    """The note in blob ``key``; ``JournalError`` when it is not a valid note."""
    try:
        doc = json.loads(data[len(REFUSAL):]) if is_refusal(data) else None
    except ValueError:
        doc = None
    refused = doc.get("blob_key") if isinstance(doc, dict) else None
    if not isinstance(refused, str) or not is_blob_key(refused):
        raise JournalError(f"blob {key} is not a valid refusal note")
    assert isinstance(doc, dict)
    return RefusalNote(BlobKey(refused), str(doc.get("failure", "")))


class BlobJournal:
    """Writes journal entries and refusal notes to a blob store (durable when
    ``put_file`` returns)."""

    def __init__(self, blobs: BlobStore, staging_dir: Path | None = None) -> None:
        self.blobs = blobs
        staging = getattr(blobs, "staging_dir", None)
        self.staging_dir = staging_dir or (staging() if callable(staging) else None)

    def write(self, doc: Mapping[str, Any]) -> BlobKey:
        """Store ``doc`` as an entry; its key. Raises ``Unavailable`` like ``put_file``."""
        return self._put(encode(doc))

    def refuse(self, blob_key: BlobKey, *, sop_instance_uid: str, failure: str,
               reason: str) -> BlobKey:
        """Note that the instance in ``blob_key`` was refused; the note's key."""
        doc = {"blob_key": blob_key, "sop_instance_uid": sop_instance_uid,
               "failure": failure, "reason": reason,
               "at": datetime.now(UTC).isoformat()}
        return self._put(REFUSAL + json.dumps(doc, sort_keys=True,
                                              separators=(",", ":")).encode() + b"\n")

    def _put(self, data: bytes) -> BlobKey:
        key = BlobKey(hashlib.sha256(data).hexdigest())
        fd, name = tempfile.mkstemp(prefix="journal-", dir=self.staging_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            self.blobs.put_file(key, Path(name))
        finally:
            if os.path.exists(name):
                os.unlink(name)
        return key

    def read(self, key: BlobKey) -> JournalEntry:
        with self.blobs.open(key) as fp:
            return decode(key, fp.read())


def committed_chain(entries: Iterable[JournalEntry]
                    ) -> tuple[list[JournalEntry], list[JournalEntry]]:
    """(the committed entries in their original order, the dead ends left out).

    See the module docstring for why the longest chain is the committed one.
    """
    children: dict[str, list[JournalEntry]] = {}
    everything: list[JournalEntry] = []
    for entry in entries:
        children.setdefault(entry.prev, []).append(entry)
        everything.append(entry)
    depth: dict[str, int] = {}

    def chain_length(key: str) -> int:
        # Iterative post-order (chains can be long): length of the longest chain below.
        stack: list[tuple[str, bool]] = [(key, False)]
        while stack:
            node, done = stack.pop()
            if node in depth:
                continue
            kids = children.get(node, [])
            if done or not kids:
                depth[node] = 1 + max((depth[k.key] for k in kids), default=0)
                continue
            stack.append((node, True))
            stack.extend((k.key, False) for k in kids if k.key not in depth)
        return depth[key]

    chain: list[JournalEntry] = []
    node, seen = "", {""}
    while kids := [k for k in children.get(node, []) if k.key not in seen]:
        best = max(kids, key=lambda k: (chain_length(k.key), k.at, k.key))
        chain.append(best)
        seen.add(best.key)
        node = best.key
    kept = {e.key for e in chain}
    return chain, [e for e in everything if e.key not in kept]
