"""The correction journal's format and which of its entries count as committed."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from vna.adapters.blob.memory import MemoryBlobStore
from vna.journal import MAGIC, BlobJournal, JournalEntry, JournalError, committed_chain, decode
from vna.journal import encode as encode_entry
from vna.model import BlobKey


def _entry(name: str, prev: str, at: str, seq: int = 1) -> JournalEntry:
    doc: dict[str, Any] = {"kind": "correction", "seq": seq, "prev": prev, "at": at}
    return JournalEntry(key=BlobKey(name), seq=seq, prev=prev, kind="correction", at=at,
                        doc=doc)


def test_an_entry_round_trips_through_the_blob_store_at_its_content_address() -> None:
    blobs = MemoryBlobStore()
    journal = BlobJournal(blobs)
    doc = {"kind": "merge", "seq": 1, "prev": "", "at": "2026-12-01T10:00:00+00:00",
           "merge_ref": "m", "studies": {"1.2.3": [1, ""]}}
    key = journal.write(doc)
    data = blobs.open(key).read()
    assert data.startswith(MAGIC) and data[128:132] != b"DICM"
    assert key == hashlib.sha256(data).hexdigest()
    assert key == hashlib.sha256(encode_entry(doc)).hexdigest()
    assert journal.read(key).doc == doc
    assert journal.write(doc) == key  # write-once: the same change, the same blob
    assert list(blobs.keys()) == [key]


@pytest.mark.parametrize("data", [b"DICM", MAGIC + b"{not json", MAGIC + b'{"kind": "x"}',
                                  MAGIC + b'{"kind": "merge"}'])
def test_what_is_not_a_valid_entry_is_refused(data: bytes) -> None:
    with pytest.raises(JournalError):
        decode(BlobKey("k"), data)


def test_the_chain_follows_prev_in_order_whatever_the_listing_order() -> None:
    a, b, c = _entry("a", "", "1"), _entry("b", "a", "2", 2), _entry("c", "b", "3", 3)
    assert committed_chain([c, a, b]) == ([a, b, c], [])


def test_an_entry_whose_transaction_did_not_commit_is_a_dead_end_left_out() -> None:
    a = _entry("a", "", "1")
    orphan = _entry("o", "a", "2", 2)  # written, then the commit failed
    b, c = _entry("b", "a", "3", 2), _entry("c", "b", "4", 3)
    chain, left_out = committed_chain([orphan, c, b, a])
    assert chain == [a, b, c] and left_out == [orphan]


def test_between_two_last_siblings_the_one_written_later_committed() -> None:
    # Writers hold the head lock until they commit: a sibling written later saw the
    # same head, so the earlier one did not commit.
    a = _entry("a", "", "1")
    failed, retried = _entry("z", "a", "2", 2), _entry("b", "a", "3", 2)
    assert committed_chain([a, failed, retried]) == ([a, retried], [failed])
    assert committed_chain([]) == ([], [])


def test_a_first_entry_that_did_not_commit_is_left_out_too() -> None:
    failed, a, b = _entry("x", "", "1"), _entry("a", "", "2"), _entry("b", "a", "3", 2)
    assert committed_chain([failed, a, b]) == ([a, b], [failed])
