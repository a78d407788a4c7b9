"""The Index port, over every adapter: SQLite (embedded) and PostgreSQL (distributed)."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydicom.uid import generate_uid

from tests.contract.wal_syncs import pooled_synchronous_settings, record_wal_syncs
from vna.adapters.blob.memory import MemoryBlobStore
from vna.adapters.index.sqlalchemy import SqlIndex
from vna.dicom.header import extract_record
from vna.dicom.matching import Level, build_query
from vna.events import InstanceIndexed, InstanceStored, decode_event
from vna.model import BlobKey, InstanceClaim, PendingCommitment
from vna.ports import ClaimOutcome, ConflictError, ConflictKind, IndexRecord, Unavailable
from vna.testing.synthetic import ct_instance
from vna.usecases.index import index_isolating


def _claim(sop: str | None = None, study: str | None = None, patient: str = "P1",
           content: str = "a", series: str | None = None
           ) -> tuple[InstanceClaim, InstanceStored]:
    claim = InstanceClaim(
        sop_instance_uid=sop or generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=study or generate_uid(),
        series_instance_uid=series or generate_uid(),
        patient_id=patient, transfer_syntax_uid="1.2.840.10008.1.2.1",
        blob_key=BlobKey(content * 64), dataset_sha256=content * 64, size=10)
    event = InstanceStored(
        sop_instance_uid=claim.sop_instance_uid, sop_class_uid=claim.sop_class_uid,
        study_instance_uid=claim.study_instance_uid,
        series_instance_uid=claim.series_instance_uid,
        transfer_syntax_uid=claim.transfer_syntax_uid, blob_key=claim.blob_key, size=10)
    return claim, event


def _record(**kwargs: object) -> IndexRecord:
    ds = ct_instance(**kwargs)  # type: ignore[arg-type]
    return extract_record(ds, blob_key="b" * 64, size=100,
                          transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))


def test_claim_records_the_event_in_the_same_transaction(index: SqlIndex) -> None:
    claim, event = _claim()
    assert index.claim(claim, event) is ClaimOutcome.NEW
    assert index.find_claim(claim.sop_instance_uid) == claim
    relayed: list[tuple[str, bytes]] = []
    assert index.relay_outbox(relayed.extend) == 1
    assert decode_event(relayed[0][1]) == event
    assert index.outbox_depth() == 0


def test_same_content_again_is_a_duplicate_and_adds_no_event(index: SqlIndex) -> None:
    claim, event = _claim()
    index.claim(claim, event)
    assert index.claim(claim, event) is ClaimOutcome.DUPLICATE
    assert index.check_claim(claim) is ClaimOutcome.DUPLICATE
    assert index.outbox_depth() == 1


def test_conflicts_are_refused(index: SqlIndex) -> None:
    claim, event = _claim()
    index.claim(claim, event)
    other, other_event = _claim(sop=claim.sop_instance_uid, content="c")
    with pytest.raises(ConflictError) as err:
        index.claim(other, other_event)
    assert err.value.kind is ConflictKind.SOP_INSTANCE
    intruder, intruder_event = _claim(study=claim.study_instance_uid, patient="P2")
    with pytest.raises(ConflictError) as err:
        index.claim(intruder, intruder_event)
    assert err.value.kind is ConflictKind.PATIENT
    assert index.outbox_depth() == 1
    assert index.find_claim(intruder.sop_instance_uid) is None


def test_the_blob_key_tells_a_resend_from_a_conflict(index: SqlIndex) -> None:
    # Claims carry no data set hash now: the framing is deterministic, so another
    # blob key under the same SOP Instance UID is other content.
    claim, event = _claim()
    claim = claim.model_copy(update={"dataset_sha256": ""})
    assert index.claim(claim, event) is ClaimOutcome.NEW
    assert index.check_claim(claim) is ClaimOutcome.DUPLICATE
    other = claim.model_copy(update={"blob_key": BlobKey("c" * 64)})
    with pytest.raises(ConflictError) as err:
        index.check_claim(other)
    assert err.value.kind is ConflictKind.SOP_INSTANCE
    with pytest.raises(ConflictError):
        index.claim(other, event)
    assert index.outbox_depth() == 1


def test_a_claim_with_a_data_set_hash_matches_on_it(index: SqlIndex) -> None:
    # Claims recorded by earlier versions hold the data set's hash: the same data set framed
    # otherwise is still the same instance.
    claim, event = _claim()
    index.claim(claim, event)
    reframed = claim.model_copy(update={"blob_key": BlobKey("d" * 64)})
    assert index.claim(reframed, event) is ClaimOutcome.DUPLICATE
    assert index.find_claim(claim.sop_instance_uid) == claim


def test_a_driver_error_in_a_claim_is_retry_later_and_the_next_claim_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SQLite's claims run on the driver's connection: the claim's look-up fails once,
    # as a disk I/O error or a lock timeout would. That claim answers Unavailable
    # ("retry"), nothing of it is recorded, and the next goes through on a fresh
    # connection (the failed one is not reused).
    index = SqlIndex.from_url(f"sqlite:///{tmp_path / 'index.sqlite'}")
    claim, event = _claim()
    prepared = type(index._claim_context)
    first_raw = prepared.first_raw
    failures = [sqlite3.OperationalError("disk I/O error")]

    def failing_once(self: Any, cursor: Any, **values: Any) -> Any:
        if failures:
            raise failures.pop()
        return first_raw(self, cursor, **values)

    monkeypatch.setattr(prepared, "first_raw", failing_once)
    try:
        with pytest.raises(Unavailable):
            index.claim(claim, event)
        assert index.find_claim(claim.sop_instance_uid) is None
        assert index.outbox_depth() == 0
        assert index.claim(claim, event) is ClaimOutcome.NEW
        assert index.find_claim(claim.sop_instance_uid) == claim
    finally:
        index.close()


def test_a_sqlite_claim_is_answered_after_its_wal_is_synced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Claims commit with synchronous=NORMAL and sync the WAL themselves, after the
    # write lock: "NEW" must still mean durable (invariant 1).
    database = tmp_path / "index.sqlite"
    index = SqlIndex.from_url(f"sqlite:///{database}")
    synced: list[str] = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        claim, event = _claim()
        assert index.claim(claim, event) is ClaimOutcome.NEW
        assert synced == [f"{database}-wal"]
        # "Already stored" is acknowledged too: it waits for the same sync, as the
        # claim it saw may be another sender's, committed but not yet synced.
        synced.clear()
        assert index.check_claim(claim) is ClaimOutcome.DUPLICATE
        assert synced == [f"{database}-wal"]
        # and the WAL holds the claim: another connection sees it committed
        other = SqlIndex.from_url(f"sqlite:///{database}")
        try:
            assert other.find_claim(claim.sop_instance_uid) == claim
        finally:
            other.close()
    finally:
        index.close()


def test_a_sqlite_write_returns_durable_and_syncs_after_the_write_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The relay's and the indexer's writes commit under the write lock and sync the
    # WAL once it is released: every receiver's claim need not wait for that sync.
    database = tmp_path / "index.sqlite"
    index = SqlIndex.from_url(f"sqlite:///{database}")
    try:
        claim, event = _claim()
        index.claim(claim, event)
        synced = record_wal_syncs(monkeypatch, database)
        relayed: list[tuple[str, bytes]] = []
        assert index.relay_outbox(relayed.extend) == 1
        assert synced == [(f"{database}-wal", True)]
        assert index.outbox_depth() == 0
        # A write that fails commits nothing and waits for no sync.
        synced.clear()
        with pytest.raises(RuntimeError), index.write_transaction() as conn:
            conn.exec_driver_sql("DELETE FROM claims")
            raise RuntimeError("abandoned")
        assert synced == []
        assert index.find_claim(claim.sop_instance_uid) == claim
        # Every pooled connection is handed out as make_engine set it: FULL (2).
        assert pooled_synchronous_settings(index.engine) == {2}
    finally:
        index.close()


def test_a_claim_whose_wal_cannot_be_synced_is_retry_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = SqlIndex.from_url(f"sqlite:///{tmp_path / 'index.sqlite'}")

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    try:
        claim, event = _claim()
        monkeypatch.setattr(os, "fdatasync", failing)
        with pytest.raises(Unavailable):
            index.claim(claim, event)
        monkeypatch.undo()
        # Committed but not known durable: the sender's retry finds it recorded.
        assert index.claim(claim, event) is ClaimOutcome.DUPLICATE
    finally:
        index.close()


def test_a_series_belongs_to_one_study(index: SqlIndex) -> None:
    claim, event = _claim()
    index.claim(claim, event)
    # Same series, another study (of the same patient even): filed under the
    # series' study it would join a study it does not belong to.
    stray, stray_event = _claim(series=claim.series_instance_uid)
    assert index.check_claim(_claim(series=claim.series_instance_uid,
                                    study=claim.study_instance_uid)[0]) is ClaimOutcome.NEW
    with pytest.raises(ConflictError) as err:
        index.check_claim(stray)
    assert err.value.kind is ConflictKind.SERIES
    with pytest.raises(ConflictError) as err:
        index.claim(stray, stray_event)
    assert err.value.kind is ConflictKind.SERIES
    assert index.find_claim(stray.sop_instance_uid) is None
    assert index.outbox_depth() == 1
    sibling, sibling_event = _claim(series=claim.series_instance_uid,
                                    study=claim.study_instance_uid)
    assert index.claim(sibling, sibling_event) is ClaimOutcome.NEW


def test_concurrent_claims_of_one_instance_make_one_event(index: SqlIndex) -> None:
    claim, event = _claim()
    outcomes: list[object] = []

    def go() -> None:
        try:
            outcomes.append(index.claim(claim, event))
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            outcomes.append(exc)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count(ClaimOutcome.NEW) == 1
    assert index.outbox_depth() == 1


def test_concurrent_first_instances_of_a_new_study_are_all_claimed(index: SqlIndex) -> None:
    # Several associations (or STOW clients) sending one new study at once: each
    # races to record the study's patient; none may be told to retry for that.
    study, series = generate_uid(), generate_uid()
    claims = [_claim(study=study, series=series) for _ in range(8)]
    start = threading.Barrier(len(claims))
    outcomes: list[object] = []

    def go(claim: InstanceClaim, event: InstanceStored) -> None:
        start.wait()
        try:
            outcomes.append(index.claim(claim, event))
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            outcomes.append(exc)

    threads = [threading.Thread(target=go, args=c) for c in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == [ClaimOutcome.NEW] * len(claims)
    assert index.outbox_depth() == len(claims)
    assert index.patient_of_study(study) == ("P1", "")


def test_concurrent_claims_with_a_conflict_among_them(index: SqlIndex) -> None:
    # Claims committed together (SQLite's group commit) still get one answer each:
    # a conflicting one is refused alone, the others are recorded.
    first, first_event = _claim()
    index.claim(first, first_event)
    conflicting = _claim(sop=first.sop_instance_uid, content="c")
    others = [_claim() for _ in range(7)]
    start = threading.Barrier(len(others) + 1)
    outcomes: dict[str, object] = {}

    def go(claim: InstanceClaim, event: InstanceStored, name: str) -> None:
        start.wait()
        try:
            outcomes[name] = index.claim(claim, event)
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            outcomes[name] = exc

    threads = [threading.Thread(target=go, args=(*conflicting, "conflict"))] + [
        threading.Thread(target=go, args=(*c, f"other{i}")) for i, c in enumerate(others)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = outcomes.pop("conflict")
    assert isinstance(refused, ConflictError) and refused.kind is ConflictKind.SOP_INSTANCE
    assert set(outcomes.values()) == {ClaimOutcome.NEW}
    assert index.outbox_depth() == 1 + len(others)
    assert all(index.find_claim(c.sop_instance_uid) == c for c, _ in others)


def test_a_failed_publish_leaves_events_in_the_outbox(index: SqlIndex) -> None:
    index.claim(*_claim())

    def broken(_messages: list[tuple[str, bytes]]) -> None:
        raise RuntimeError("broker away")

    with pytest.raises(RuntimeError):
        index.relay_outbox(broken)
    assert index.outbox_depth() == 1


def test_upsert_is_idempotent_and_emits_once(index: SqlIndex) -> None:
    record = _record()
    indexed = InstanceIndexed(
        sop_instance_uid=record.instance["SOPInstanceUID"],
        study_instance_uid=record.study["StudyInstanceUID"],
        series_instance_uid=record.series["SeriesInstanceUID"], blob_key=BlobKey("b" * 64),
        stored_event_id="x", stored_at=datetime.now(UTC))
    assert index.upsert_instance(record, indexed) is True
    assert index.upsert_instance(record, indexed) is False
    assert index.counts()["instances"] == 1
    assert index.outbox_depth() == 1


def test_search_matching_and_computed_attributes(index: SqlIndex) -> None:
    study = generate_uid()
    for i, modality in enumerate(["CT", "CT", "MR"]):
        index.upsert_instance(_record(study_uid=study, patient_name="Müller^Anna",
                                      modality=modality, instance_number=i,
                                      study_date="20240315", study_time="101500",
                                      series_uid=None if modality == "MR" else
                                      study.replace(study[-3:], "999")))
    index.upsert_instance(_record(patient_id="OTHER", patient_name="SMITH^JO",
                                  study_date="20230101"))
    q = build_query(Level.STUDY, {"PatientName": "mull*", "StudyDate": "20240301-20240331",
                                  "StudyTime": "10-11", "ModalitiesInStudy": "MR"},
                    return_keys=["NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries",
                                 "ModalitiesInStudy"])
    rows = index.search(q)
    assert [r["StudyInstanceUID"] for r in rows] == [study]
    assert rows[0]["NumberOfStudyRelatedInstances"] == 3
    assert rows[0]["NumberOfStudyRelatedSeries"] == 2
    assert rows[0]["ModalitiesInStudy"] == ["CT", "MR"]
    assert index.search(build_query(Level.STUDY, {"PatientName": "mull?r*"})) != []
    assert index.search(build_query(Level.STUDY, {"AccessionNumber": "acc001"})) == []
    assert len(index.search(build_query(Level.STUDY, {}, limit=1, offset=1))) == 1
    series = index.search(build_query(Level.SERIES, {"StudyInstanceUID": study}))
    assert len(series) == 2


def test_audit_chain(index: SqlIndex) -> None:
    index.record_audit("store", "sop-conflict", actor="CT1", subject="1.2.3")
    index.record_audit("store", "patient-conflict", actor="CT1", subject="1.2.4")
    assert [r["outcome"] for r in index.audit_records("store")] == [
        "sop-conflict", "patient-conflict"]
    assert index.verify_audit()


def test_searches_of_one_form_run_with_their_own_values(index: SqlIndex) -> None:
    """A search statement is built once per form of query and run with each request's
    values: queries of the same form with other values, and of forms differing only
    in an open range end or in the number of values, each get their own answer."""
    made = {}
    for pid, name, date, modality in [("F1", "ALPHA^ANN", "20230105", "CT"),
                                      ("F2", "BETA^BOB", "20240210", "MR"),
                                      ("F3", "GAMMA^CY", "20250315", "US")]:
        record = _record(patient_id=pid, patient_name=name, study_date=date,
                         modality=modality)
        index.upsert_instance(record)
        made[pid] = record.study["StudyInstanceUID"]

    def pids(**keys: str) -> list[str]:
        return [r["PatientID"] for r in index.search(build_query(
            Level.STUDY, keys, return_keys=["ModalitiesInStudy"]))]

    for _ in range(2):  # the second time from the statements kept
        assert pids(PatientID="F1") == ["F1"]
        assert pids(PatientID="F2") == ["F2"]
        assert pids(PatientID="F1\\F3") == ["F1", "F3"]
        assert pids(PatientID="F1\\F2\\F3") == ["F1", "F2", "F3"]
        assert pids(StudyDate="20240101-") == ["F2", "F3"]
        assert pids(StudyDate="-20240101") == ["F1"]
        assert pids(StudyDate="20240101-20241231") == ["F2"]
        assert pids(StudyDate="20250101-20251231") == ["F3"]
        assert pids(PatientName="B*") == ["F2"]
        assert pids(PatientName="g?mma*") == ["F3"]
        assert pids(ModalitiesInStudy="MR") == ["F2"]
        assert pids(ModalitiesInStudy="CT\\US") == ["F1", "F3"]
        assert pids(ModalitiesInStudy="U*") == ["F3"]
        assert pids(StudyInstanceUID=made["F3"], PatientID="F3") == ["F3"]
        assert pids(StudyInstanceUID=made["F3"], PatientID="F1") == []
    fuzzy = build_query(Level.STUDY, {"PatientName": "bob beta"}, fuzzy=True)
    assert [r["PatientID"] for r in index.search(fuzzy)] == ["F2"]
    fuzzy = build_query(Level.STUDY, {"PatientName": "ann"}, fuzzy=True)
    assert [r["PatientID"] for r in index.search(fuzzy)] == ["F1"]
    rows = index.search(build_query(Level.STUDY, {}, return_keys=["ModalitiesInStudy"]))
    assert [r["ModalitiesInStudy"] for r in rows] == [["CT"], ["MR"], ["US"]]
    assert [r["PatientID"] for r in index.search(
        build_query(Level.STUDY, {}, limit=1, offset=2))] == ["F3"]


def _owed(requester: str = "CT_SCANNER") -> PendingCommitment:
    return PendingCommitment(request_id=str(uuid.uuid4()), requester=requester,
                             transaction_uid=generate_uid(),
                             items=[("1.2.840.10008.5.1.4.1.1.2", generate_uid())])


def test_a_commitment_owed_is_held_by_its_owner_then_due_to_whoever_takes_it(
        index: SqlIndex) -> None:
    owed = _owed()
    index.owe_commitment(owed, hold_seconds=60)
    # Held by the process that answered the request: nobody else takes it.
    assert index.take_due_commitments(hold_seconds=60) == []
    assert index.take_due_commitments(hold_seconds=60, all_pending=True) == []
    index.retry_commitment(owed.request_id, attempts=1, after_seconds=0)
    taken = index.take_due_commitments(hold_seconds=60)
    assert taken == [owed.model_copy(update={"attempts": 1})]
    # Taken: held by the taker now.
    assert index.take_due_commitments(hold_seconds=60) == []
    index.settle_commitment(owed.request_id)
    index.retry_commitment(owed.request_id, attempts=2, after_seconds=0)  # gone: no effect
    assert index.take_due_commitments(hold_seconds=60, all_pending=True) == []


def test_a_commitment_not_yet_due_is_taken_by_a_process_starting(index: SqlIndex) -> None:
    later, now = _owed("LATER"), _owed("NOW")
    for owed in (later, now):
        index.owe_commitment(owed, hold_seconds=60)
    index.retry_commitment(later.request_id, attempts=1, after_seconds=3600)
    index.retry_commitment(now.request_id, attempts=1, after_seconds=0)
    assert [p.requester for p in index.take_due_commitments(hold_seconds=0)] == ["NOW"]
    # A hold of 0 s has passed: a starting process takes everything nobody holds.
    assert {p.requester for p in index.take_due_commitments(
        hold_seconds=60, all_pending=True)} == {"LATER", "NOW"}


def test_a_hold_lapses_when_its_holder_is_gone(index: SqlIndex) -> None:
    owed = _owed()
    index.owe_commitment(owed, hold_seconds=0)  # its holder died at once
    assert [p.request_id for p in index.take_due_commitments(hold_seconds=60)] \
        == [owed.request_id]


def test_an_instance_number_out_of_range_is_indexed_without_it(index: SqlIndex) -> None:
    # IS is -2^31 to 2^31-1 (PS3.5 6.2); a modality's 3000000000 must not stop
    # the indexing of the instance, nor of the others in its batch.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid IS
        out_of_range = _record(instance_number=3_000_000_000)
    fine = _record(instance_number=7)
    assert index.upsert_instances([(out_of_range, None), (fine, None)]) == [True, True]
    assert out_of_range.instance["InstanceNumber"] is None
    assert json.loads(out_of_range.metadata_json)["00200013"]["Value"] == [3000000000]
    found = index.search(build_query(Level.IMAGE, {"InstanceNumber": "7"}))
    assert [row["SOPInstanceUID"] for row in found] == [fine.instance["SOPInstanceUID"]]


@pytest.mark.parametrize(("description", "column"), [
    # An LO allows 64 characters; modalities send more. The index's columns hold 256.
    (" ".join(["Thorax"] * 60), " ".join(["Thorax"] * 60)[:256]),
    # A damaged value with NUL inside: a PostgreSQL text column refuses NUL.
    ("Thorax\0CT", "ThoraxCT"),
], ids=["overlong", "nul"])
def test_text_a_column_cannot_hold_is_indexed_cut_and_kept_whole_in_the_metadata(
        index: SqlIndex, description: str, column: str) -> None:
    # Cut, not the instance's indexing stopped (and every instance of its batch).
    ds = ct_instance()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid LO
        ds.StudyDescription = description
    record = extract_record(ds, blob_key="b" * 64, size=100,
                            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))
    assert index.upsert_instances([(record, None)]) == [True]
    assert record.study["StudyDescription"] == column
    assert json.loads(record.metadata_json)["00081030"]["Value"] == [description]
    found = index.search(build_query(Level.STUDY, {"StudyDescription": "Thorax*"}))
    assert [row["StudyInstanceUID"] for row in found] == [record.study["StudyInstanceUID"]]


def _stored(record: IndexRecord) -> InstanceStored:
    return InstanceStored(
        sop_instance_uid=record.instance["SOPInstanceUID"],
        sop_class_uid=record.instance["SOPClassUID"],
        study_instance_uid=record.study["StudyInstanceUID"],
        series_instance_uid=record.series["SeriesInstanceUID"],
        transfer_syntax_uid=record.transfer_syntax_uid, blob_key=record.blob_key,
        size=record.size, record=record)


def test_a_record_the_index_refuses_does_not_hold_up_the_others(index: SqlIndex) -> None:
    good, refused, other = (_record(instance_number=n) for n in (1, 2, 3))
    refused.instance["InstanceNumber"] = 2**63  # fits neither SQLite's nor PostgreSQL's
    counted = REGISTRY.get_sample_value("vna_index_refused_total") or 0.0
    index_isolating([_stored(r) for r in (good, refused, other)],
                    blobs=MemoryBlobStore(), index=index)
    indexed = {row["SOPInstanceUID"] for row in index.search(build_query(Level.IMAGE, {}))}
    assert indexed == {good.instance["SOPInstanceUID"], other.instance["SOPInstanceUID"]}
    assert REGISTRY.get_sample_value("vna_index_refused_total") == counted + 1
    [audit] = index.audit_records("index")
    assert (audit["outcome"], audit["subject"]) == ("refused", refused.instance["SOPInstanceUID"])
