"""Instances refused while a concurrent store won stay refused through ``vna reindex``,
over SQLite and PostgreSQL, with the blobs on the filesystem.

Two senders storing contradicting instances at the same moment both pass the store
path's early check and both write their blob; the index's claim refuses the second.
Before refusal notes, reindex indexed whichever blob it met first: the refused bytes
in place of the accepted ones, or a refused instance filed in another patient's
study. Here the race is forced (both stores meet inside ``put_file``, past the early
check), not hoped for.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from vna.adapters.blob.filesystem import FilesystemBlobStore
from vna.adapters.index.sqlalchemy import SqlIndex
from vna.events import InstanceStored
from vna.journal import BlobJournal, is_refusal, read_refusal
from vna.model import BlobKey, InstanceClaim
from vna.ports import ClaimOutcome, Unavailable
from vna.testing.synthetic import ct_instance
from vna.usecases.reindex import ReindexReport, reindex
from vna.usecases.store import Received, StoreError, StoreFailure, store_instance


class MeetingBlobStore(FilesystemBlobStore):
    """The first ``parties`` calls of ``put_file`` return only once all of them have
    been made; later ones (a refusal note) go straight through."""

    def __init__(self, root: Path, parties: int = 2) -> None:
        super().__init__(root)
        self.meeting = threading.Barrier(parties, timeout=30)
        self.arrivals = iter(range(parties))

    def put_file(self, key: BlobKey, path: Path) -> bool:
        if next(self.arrivals, None) is not None:
            self.meeting.wait()
        return super().put_file(key, path)


@pytest.fixture(params=["sqlite", "postgresql"])
def new_url(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], str]:
    """Fresh, empty index databases of one backend."""
    if request.param == "sqlite":
        made = iter(range(100))
        return lambda: f"sqlite:///{tmp_path / f'index-{next(made)}.sqlite'}"
    factory: Callable[[], str] = request.getfixturevalue("new_postgres_database")
    return factory


@pytest.fixture
def live(new_url: Callable[[], str]) -> Iterator[SqlIndex]:
    index = SqlIndex.from_url(new_url())
    yield index
    index.close()


def _file(ds: Dataset, directory: Path, name: str) -> Path:
    path = directory / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _race(blobs: FilesystemBlobStore, index: SqlIndex, files: list[Path]
          ) -> list[StoreFailure | None]:
    """Store ``files`` at once, one thread each: None for stored, else the failure."""
    outcomes: list[StoreFailure | None] = [None] * len(files)

    def store(i: int) -> None:
        try:
            store_instance(Received(path=files[i], source_ae=f"MOD{i}"), blobs=blobs,
                           index=index, staging_dir=blobs.staging_dir())
        except StoreError as exc:
            outcomes[i] = exc.failure

    threads = [threading.Thread(target=store, args=(i,)) for i in range(len(files))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def _blobs(blobs: FilesystemBlobStore) -> tuple[list[BlobKey], list[BlobKey]]:
    """(the instances' blobs, the blobs the refusal notes name)."""
    instances, named = [], []
    for key in blobs.keys():
        with blobs.open(key) as fp:
            data = fp.read()
        if is_refusal(data):
            named.append(read_refusal(key, data).blob_key)
        else:
            instances.append(key)
    return instances, named


def _accepted(index: SqlIndex) -> dict[str, tuple[BlobKey, str]]:
    """SOP Instance UID -> (blob key, Patient ID) of every instance the index took."""
    return {c.sop_instance_uid: (c.blob_key, c.patient_id) for c in index.claims()}


def _indexed(index: SqlIndex) -> dict[str, tuple[BlobKey, str]]:
    """The same, of the instances queries find (what reindex indexed)."""
    out = {}
    for instance in index.instances():
        patient = index.patient_of_study(instance.ref.study_instance_uid)
        out[instance.ref.sop_instance_uid] = (instance.blob_key, patient[0] if patient else "")
    return out


def _holds(blobs: FilesystemBlobStore, key: BlobKey, text: bytes) -> bool:
    with blobs.open(key) as fp:
        return text in fp.read()


def _reindexed(blobs: FilesystemBlobStore, url: str
               ) -> tuple[ReindexReport, dict[str, tuple[BlobKey, str]]]:
    rebuilt = SqlIndex.from_url(url)
    try:
        report = reindex(blobs=blobs, index=rebuilt)
        assert _indexed(rebuilt) == _accepted(rebuilt)
        return report, _accepted(rebuilt)
    finally:
        rebuilt.close()


def test_one_sop_instance_twice_at_once_reindexes_as_it_was_accepted(
        tmp_path: Path, live: SqlIndex, new_url: Callable[[], str]) -> None:
    blobs = MeetingBlobStore(tmp_path / "blobs")
    sop, study, series = generate_uid(), generate_uid(), generate_uid()
    files = [_file(ct_instance(study_uid=study, series_uid=series, sop_uid=sop,
                               attributes={"ImageComments": f"variant {v}"}), tmp_path, f"v{v}")
             for v in (0, 1)]

    outcomes = _race(blobs, live, files)

    assert sorted(outcomes, key=str) == [None, StoreFailure.SOP_CONFLICT]
    refused = outcomes.index(StoreFailure.SOP_CONFLICT)
    accepted = _accepted(live)
    instances, named = _blobs(blobs)
    # Both sets of bytes are in the (write-once) store; the note names the refused one.
    assert len(instances) == 2 and len(named) == 1
    assert named[0] != accepted[sop][0]
    assert _holds(blobs, named[0], f"variant {refused}".encode())

    report, rebuilt = _reindexed(blobs, new_url())

    assert (report.indexed, report.refused, report.conflicts) == (1, 1, [])
    assert rebuilt == accepted


def test_a_new_study_under_two_patients_at_once_reindexes_as_it_was_accepted(
        tmp_path: Path, live: SqlIndex, new_url: Callable[[], str]) -> None:
    blobs = MeetingBlobStore(tmp_path / "blobs")
    study, series = generate_uid(), generate_uid()
    files = [_file(ct_instance(patient_id=f"PAT{v}", study_uid=study, series_uid=series,
                               instance_number=v + 1), tmp_path, f"p{v}") for v in (0, 1)]

    outcomes = _race(blobs, live, files)

    assert sorted(outcomes, key=str) == [None, StoreFailure.PATIENT_CONFLICT]
    accepted = _accepted(live)
    assert len(accepted) == 1
    winner = f"PAT{outcomes.index(None)}"
    assert [patient for _, patient in accepted.values()] == [winner]

    report, rebuilt = _reindexed(blobs, new_url())

    # Before refusal notes, the refused instance was indexed too, in the study the
    # other patient's instance made: one patient's image under another's name.
    assert (report.indexed, report.refused) == (1, 1)
    assert rebuilt == accepted


def test_a_refusal_note_never_drops_an_instance_nothing_contradicts(
        tmp_path: Path, new_url: Callable[[], str]) -> None:
    # A note only puts its blob last: should the archive have accepted those bytes
    # after all (the conflict gone by the time the same bytes came again), the
    # instance is still indexed.
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    path = _file(ct_instance(), tmp_path, "alone")
    with path.open("rb") as fp:
        data = fp.read()
    key = BlobKey(hashlib.sha256(data).hexdigest())
    blobs.put_file(key, path)
    BlobJournal(blobs).refuse(key, sop_instance_uid="1.2.3", failure="sop_conflict",
                              reason="a test")

    report, rebuilt = _reindexed(blobs, new_url())

    assert (report.indexed, report.refused, report.failed) == (1, 0, 0)
    assert [blob for blob, _ in rebuilt.values()] == [key]


def test_contradicting_blobs_without_a_note_are_reported(
        tmp_path: Path, new_url: Callable[[], str]) -> None:
    # As after a crash between the refused blob's write and its note: reindex keeps
    # the first it finds and says which it could not settle.
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    sop = generate_uid()
    for v in (0, 1):
        path = _file(ct_instance(sop_uid=sop, attributes={"ImageComments": f"v{v}"}),
                     tmp_path, f"n{v}")
        blobs.put_file(BlobKey(hashlib.sha256(path.read_bytes()).hexdigest()), path)

    report, rebuilt = _reindexed(blobs, new_url())

    assert report.indexed == 1 and len(report.conflicts) == 1
    assert list(rebuilt) == [sop]


def test_a_refusal_before_the_blob_is_written_leaves_no_note(
        tmp_path: Path, live: SqlIndex) -> None:
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    sop = generate_uid()
    first, second = (_file(ct_instance(sop_uid=sop, attributes={"ImageComments": f"v{v}"}),
                           tmp_path, f"s{v}") for v in (0, 1))
    store_instance(Received(path=first), blobs=blobs, index=live,
                   staging_dir=blobs.staging_dir())
    with pytest.raises(StoreError) as refused:
        store_instance(Received(path=second), blobs=blobs, index=live,
                       staging_dir=blobs.staging_dir())

    assert refused.value.failure is StoreFailure.SOP_CONFLICT
    assert _blobs(blobs) == ([next(iter(_accepted(live).values()))[0]], [])


def test_vna_reindex_says_what_it_left_out_and_what_it_could_not_settle(
        tmp_path: Path) -> None:
    blobs = MeetingBlobStore(tmp_path / "blobs")
    live = SqlIndex.from_url(f"sqlite:///{tmp_path / 'live.sqlite'}")
    sop = generate_uid()
    raced = [_file(ct_instance(sop_uid=sop, attributes={"ImageComments": f"r{v}"}),
                   tmp_path, f"r{v}") for v in (0, 1)]
    assert sorted(_race(blobs, live, raced), key=str) == [None, StoreFailure.SOP_CONFLICT]
    live.close()
    env = {**os.environ, "VNA_DATA_DIR": str(tmp_path / "data"),
           "VNA_STORAGE_URL": blobs.root.resolve().as_uri(),
           "VNA_INDEX_URL": f"sqlite:///{tmp_path / 'cli.sqlite'}"}

    def vna_reindex() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vna", "reindex"], env=env,
                              capture_output=True, text=True, timeout=120)

    settled = vna_reindex()
    assert settled.returncode == 0, settled.stderr
    assert "left out 1 blobs not accepted when they were stored" in settled.stdout
    assert "conflict" not in settled.stdout

    # Bytes contradicting the accepted instance, with no note: reported, exit 1.
    path = _file(ct_instance(sop_uid=sop, attributes={"ImageComments": "unnoted"}),
                 tmp_path, "unnoted")
    unnoted = BlobKey(hashlib.sha256(path.read_bytes()).hexdigest())
    blobs.put_file(unnoted, path)
    unsettled = vna_reindex()
    assert unsettled.returncode == 1
    # Which of the two is indexed depends on the order the store lists them in.
    assert unsettled.stdout.count("conflict, not indexed") == 1


def _index_away_once(monkeypatch: pytest.MonkeyPatch, index: SqlIndex) -> None:
    """The next claim fails as when the index database cannot be reached; later
    ones reach it."""
    real = index.claim
    calls = iter(range(1))

    def claim(claim: InstanceClaim, event: InstanceStored) -> ClaimOutcome:
        if next(calls, None) is not None:
            raise Unavailable("index database: connection refused")
        return real(claim, event)

    monkeypatch.setattr(index, "claim", claim)


def test_bytes_the_index_could_not_record_are_indexed_once_a_retry_is_accepted(
        tmp_path: Path, live: SqlIndex, new_url: Callable[[], str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    path = _file(ct_instance(), tmp_path, "retried")
    _index_away_once(monkeypatch, live)
    with pytest.raises(StoreError) as away:
        store_instance(Received(path=path), blobs=blobs, index=live,
                       staging_dir=blobs.staging_dir())
    assert away.value.failure is StoreFailure.UNAVAILABLE
    instances, named = _blobs(blobs)
    assert named == instances  # its blob is in, and noted

    store_instance(Received(path=path), blobs=blobs, index=live,
                   staging_dir=blobs.staging_dir())  # the modality's retry
    report, rebuilt = _reindexed(blobs, new_url())

    assert (report.indexed, report.refused, report.conflicts) == (1, 0, [])
    assert rebuilt == _accepted(live)


def test_bytes_the_index_could_not_record_give_way_to_what_it_accepted_instead(
        tmp_path: Path, live: SqlIndex, new_url: Callable[[], str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Never retried, and another sender's different bytes for the same SOP Instance
    # UID accepted since: without the note, reindex could not tell the two apart.
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    sop = generate_uid()
    lost, kept = (_file(ct_instance(sop_uid=sop, attributes={"ImageComments": v}),
                        tmp_path, v) for v in ("lost", "kept"))
    _index_away_once(monkeypatch, live)
    with pytest.raises(StoreError):
        store_instance(Received(path=lost), blobs=blobs, index=live,
                       staging_dir=blobs.staging_dir())
    store_instance(Received(path=kept), blobs=blobs, index=live,
                   staging_dir=blobs.staging_dir())

    report, rebuilt = _reindexed(blobs, new_url())

    assert (report.indexed, report.refused, report.conflicts) == (1, 1, [])
    assert rebuilt == _accepted(live)


def test_a_blob_refused_for_good_gives_way_to_one_the_index_was_away_for(
        tmp_path: Path, new_url: Callable[[], str]) -> None:
    # The index was away for the first bytes, which a retry then got accepted; a
    # racing sender's different bytes were refused. Both blobs carry a note: the
    # refused one is indexed last, so it is the one left out.
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    journal = BlobJournal(blobs)
    sop = generate_uid()
    keys = {}
    for variant, failure in (("accepted", "unavailable"), ("refused", "sop-conflict")):
        path = _file(ct_instance(sop_uid=sop, attributes={"ImageComments": variant}),
                     tmp_path, variant)
        keys[variant] = BlobKey(hashlib.sha256(path.read_bytes()).hexdigest())
        blobs.put_file(keys[variant], path)
        journal.refuse(keys[variant], sop_instance_uid=sop, failure=failure, reason="a test")

    report, rebuilt = _reindexed(blobs, new_url())

    assert (report.indexed, report.refused, report.conflicts) == (1, 1, [])
    assert rebuilt[sop][0] == keys["accepted"]


class JournalingMeanwhile(FilesystemBlobStore):
    """Before the second listing of its keys, a blob that is not an instance is
    written (a refusal note here): as when reindex, between its two passes, indexes
    an instance that follows a merge and so writes a journal entry."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.listings = 0

    def keys(self) -> Iterator[BlobKey]:
        self.listings += 1
        if self.listings == 2:
            BlobJournal(self).refuse(BlobKey("0" * 64), sop_instance_uid="1.2.3",
                                     failure="sop-conflict", reason="a test")
        return super().keys()


def test_a_blob_written_while_reindex_runs_is_not_taken_for_an_instance(
        tmp_path: Path, new_url: Callable[[], str]) -> None:
    blobs = JournalingMeanwhile(tmp_path / "blobs")
    path = _file(ct_instance(), tmp_path, "one")
    blobs.put_file(BlobKey(hashlib.sha256(path.read_bytes()).hexdigest()), path)

    report, rebuilt = _reindexed(blobs, new_url())

    assert blobs.listings >= 2
    assert (report.indexed, report.failed) == (1, 0)
    assert len(rebuilt) == 1
