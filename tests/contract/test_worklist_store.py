"""Contract of ``WorklistStore``: the same behaviour in memory, on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.contract.wal_syncs import pooled_synchronous_settings, record_wal_syncs
from vna.adapters.index.sqlalchemy import SqlIndex, ensure_database
from vna.adapters.index.worklist import SqlWorklistStore
from vna.events import InstanceIndexed
from vna.model import BlobKey
from vna.worklist.memory import MemoryWorklistStore
from vna.worklist.model import (
    Binding,
    MppsInstance,
    MppsStatus,
    Order,
    OrderStatus,
    PerformedInstance,
    ReconciliationItem,
    ReconciliationStatus,
    RisPatient,
)
from vna.worklist.ports import WorklistStore, verify_chain

POSTGRES = os.environ.get("VNA_TEST_POSTGRES_URL", "postgresql://postgres@localhost:5432")


def _postgres_url() -> str:
    name = f"vna_test_{uuid.uuid4().hex[:12]}"
    url = f"{POSTGRES.rstrip('/')}/{name}"
    try:
        ensure_database(url)
    except Exception as exc:  # noqa: BLE001 - turned into a clear failure below
        pytest.fail(f"PostgreSQL not reachable at {POSTGRES} ({exc}); start one "
                    "(e.g. `pg_ctlcluster 15 main start`) or set VNA_TEST_POSTGRES_URL")
    return url


def _drop(url: str) -> None:
    admin_url, _, name = url.rpartition("/")
    engine = create_engine(admin_url.replace("postgresql://", "postgresql+psycopg://")
                           + "/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WorklistStore]:
    if request.param == "memory":
        yield MemoryWorklistStore()
        return
    url = f"sqlite:///{tmp_path / 'index.sqlite'}" if request.param == "sqlite" \
        else _postgres_url()
    index = SqlIndex.from_url(url)
    wl = SqlWorklistStore.beside(index)
    wl.index = index  # type: ignore[attr-defined]
    try:
        yield wl
    finally:
        index.close()
        if request.param == "postgresql":
            _drop(url)


def order(**kw: object) -> Order:
    base: dict[str, object] = dict(
        order_id=uuid.uuid4().hex, accession_number="ACC1", requested_procedure_id="RP1",
        scheduled_procedure_step_id="SPS1", study_instance_uid="1.2.3", patient_id="P1",
        modality="CT")
    base.update(kw)
    return Order.model_validate(base)


def test_orders_round_trip_and_find(store: WorklistStore) -> None:
    o = order(placer_order_number="PL1")
    with store.transaction() as tx:
        tx.put_order(o)
        tx.put_order(order(accession_number="ACC2", study_instance_uid="1.2.4",
                           status=OrderStatus.CANCELLED))
    with store.transaction() as tx:
        assert tx.get_order(o.order_id) == o
        assert [x.order_id for x in tx.find_orders(placer_order_number="PL1")] == [o.order_id]
        assert len(tx.find_orders(statuses=[OrderStatus.SCHEDULED])) == 1
        assert len(tx.find_orders(patient_id="P1")) == 2
        assert tx.find_orders(study_instance_uid="9.9") == []


def test_step_is_unique(store: WorklistStore) -> None:
    with store.transaction() as tx:
        tx.put_order(order())
    with pytest.raises(ValueError), store.transaction() as tx:
        tx.put_order(order())
    with store.transaction() as tx:
        assert len(tx.find_orders(accession_number="ACC1")) == 1


def test_a_failed_transaction_leaves_nothing(store: WorklistStore) -> None:
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.put_patient(RisPatient(patient_id="P1", patient_name="DOE^J"))
        tx.put_order(order())
        tx.record_message("RIS|H|1", "ORM^O01", "AA")
        tx.audit("order.placed", "success", subject="x")
        raise RuntimeError("boom")
    with store.transaction() as tx:
        assert tx.get_patient("P1") is None
        assert tx.find_orders() == []
        assert tx.message_ack("RIS|H|1") is None
        assert [r for r in tx.audit_trail() if r.subject == "x"] == []


def test_a_sqlite_worklist_write_is_durable_on_return_and_synced_after_the_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Beside the index (vna run), binding, MPPS and HL7 writes take the write lock
    # every receiver's claim takes: they commit under it and sync the WAL once it is
    # released, as the index's own writes do.
    database = tmp_path / "index.sqlite"
    index = SqlIndex.from_url(f"sqlite:///{database}")
    wl = SqlWorklistStore.beside(index)
    synced = record_wal_syncs(monkeypatch, database)
    try:
        placed = order()
        with wl.transaction() as tx:
            tx.put_order(placed)
        assert synced == [(f"{database}-wal", True)]
        # A transaction that fails commits nothing and waits for no sync.
        synced.clear()
        with pytest.raises(RuntimeError), wl.transaction() as tx:
            tx.put_order(order(scheduled_procedure_step_id="SPS2"))
            raise RuntimeError("abandoned")
        assert synced == []
        # Another process's view (its own connection) has the committed order only.
        other = SqlWorklistStore.from_url(f"sqlite:///{database}", run_migrations=False)
        try:
            with other.reading() as tx:
                assert [o.order_id for o in tx.find_orders()] == [placed.order_id]
        finally:
            other.close()
        # Every pooled connection is handed out as make_engine set it: FULL (2).
        assert pooled_synchronous_settings(index.engine) == {2}
    finally:
        index.close()


def test_reading_sees_what_was_committed(store: WorklistStore) -> None:
    with store.reading() as tx:
        assert tx.find_orders(accession_number="ACC1") == []
    with store.transaction() as tx:
        tx.put_order(order())
    with store.reading() as tx:
        [found] = tx.find_orders(accession_number="ACC1")
        assert found.accession_number == "ACC1"
        assert tx.bindings(study_instance_uid=found.study_instance_uid) == []


def test_messages_patients_merges(store: WorklistStore) -> None:
    with store.transaction() as tx:
        tx.record_message("RIS|H|1", "ORM^O01", "AA")
        tx.put_patient(RisPatient(patient_id="P1", issuer_of_patient_id="H",
                                  patient_name="DOE^J"))
        tx.put_patient(RisPatient(patient_id="P1", issuer_of_patient_id="H",
                                  patient_name="DOE^JANE", merged_into="P2"))
    with store.transaction() as tx:
        assert tx.message_ack("RIS|H|1") == "AA"
        p = tx.get_patient("P1", "H")
        assert p is not None and p.patient_name == "DOE^JANE" and p.merged_into == "P2"
        assert tx.get_patient("P1") is None


def test_mpps_bindings_completion(store: WorklistStore) -> None:
    m = MppsInstance(sop_instance_uid="1.2.9", status=MppsStatus.IN_PROGRESS,
                     attributes_json="{}", study_instance_uid="1.2.3", order_ids=("a",),
                     performed=(PerformedInstance(series_instance_uid="1.2.3.1",
                                                  sop_instance_uid="1.2.3.1.1"),))
    b = Binding(study_instance_uid="1.2.3", order_id="a", accession_number="ACC1",
                patient_id="P1")
    with store.transaction() as tx:
        tx.put_mpps(m)
        tx.put_mpps(m.model_copy(update={"status": MppsStatus.COMPLETED}))
        assert tx.put_binding(b) is True
        assert tx.put_binding(b) is False
        assert tx.mark_study_complete("1.2.3") is True
        assert tx.mark_study_complete("1.2.3") is False
    with store.transaction() as tx:
        got = tx.get_mpps("1.2.9")
        assert got is not None and got.status is MppsStatus.COMPLETED
        assert got.performed == m.performed and got.order_ids == ("a",)
        assert [x.sop_instance_uid for x in tx.mpps_for_study("1.2.3")] == ["1.2.9"]
        assert [x.order_id for x in tx.bindings(study_instance_uid="1.2.3")] == ["a"]
        assert tx.bindings(order_id="zzz") == []


def test_reconciliation_queue(store: WorklistStore) -> None:
    item = ReconciliationItem(item_id="i1", study_instance_uid="1.2.3", reason="no order")
    with store.transaction() as tx:
        tx.put_reconciliation(item)
    with store.transaction() as tx:
        assert tx.open_reconciliation("1.2.3") == item
        tx.put_reconciliation(item.model_copy(update={"status": ReconciliationStatus.LINKED}))
    with store.transaction() as tx:
        assert tx.open_reconciliation("1.2.3") is None
        assert [i.item_id for i in tx.reconciliations(ReconciliationStatus.LINKED)] == ["i1"]
        assert tx.reconciliations(ReconciliationStatus.OPEN) == []


def test_which_studies_of_a_batch_are_held_or_have_an_mpps_done(store: WorklistStore) -> None:
    # The binder asks once per batch: "1.1" waits in the queue, "1.2" was linked by
    # a person, "1.3" is bound as ordered, "1.4" left the queue rejected; only
    # "1.5"'s MPPS is COMPLETED ("1.3"'s is in progress).
    def mpps(uid: str, study: str, status: MppsStatus) -> MppsInstance:
        return MppsInstance(sop_instance_uid=uid, status=status, attributes_json="{}",
                            study_instance_uid=study)

    with store.transaction() as tx:
        tx.put_reconciliation(ReconciliationItem(item_id="i1", study_instance_uid="1.1",
                                                 reason="no order"))
        tx.put_reconciliation(ReconciliationItem(
            item_id="i4", study_instance_uid="1.4", reason="no order",
            status=ReconciliationStatus.REJECTED))
        tx.put_binding(Binding(study_instance_uid="1.2", order_id="a", accession_number="A",
                               patient_id="P1", how="reconciled"))
        tx.put_binding(Binding(study_instance_uid="1.3", order_id="b", accession_number="B",
                               patient_id="P1"))
        tx.put_mpps(mpps("9.1", "1.3", MppsStatus.IN_PROGRESS))
        tx.put_mpps(mpps("9.2", "1.5", MppsStatus.COMPLETED))
        tx.put_mpps(mpps("9.3", "1.5", MppsStatus.COMPLETED))
    batch = ["1.1", "1.2", "1.3", "1.4", "1.5", "1.6"]
    with store.reading() as tx:
        assert tx.held_for_reconciliation(batch) == {"1.1", "1.2"}
        assert tx.held_for_reconciliation(["1.3", "1.6"]) == set()
        assert tx.studies_with_completed_mpps(batch) == {"1.5"}
        assert tx.studies_with_completed_mpps(["1.3"]) == set()


def test_audit_chain_and_events(store: WorklistStore) -> None:
    event = InstanceIndexed(sop_instance_uid="1.2.3.1.1", study_instance_uid="1.2.3",
                            series_instance_uid="1.2.3.1", blob_key=BlobKey("0" * 64),
                            stored_event_id="e", stored_at=datetime.now(UTC))
    with store.transaction() as tx:
        tx.audit("a", "success", subject="s1")
        tx.audit("b", "success", subject="s2", detail="d")
        tx.emit(event)
    with store.transaction() as tx:
        trail = tx.audit_trail()
        assert [r.action for r in trail][-2:] == ["a", "b"]
        assert verify_chain(trail)
        assert [r.action for r in tx.audit_trail(subject="s2")] == ["b"]
    if isinstance(store, MemoryWorklistStore):
        assert store.events == [event]
    else:
        index: SqlIndex = store.index  # type: ignore[attr-defined]
        assert index.verify_audit()
        sent: list[tuple[str, bytes]] = []
        index.relay_outbox(sent.extend)
        assert [k for k, _ in sent] == ["instance.indexed"]
