"""Images bound to orders, the reconciliation queue through the API, study completeness.

The archive core runs on its embedded adapters (``core`` fixture); the worklist
lives in the index's database, as under ``vna run``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from services.worklist.api import install
from tests.unit.conftest import Core
from vna.adapters.cache.memory import MemoryCache
from vna.adapters.index.worklist import SqlWorklistStore
from vna.bootstrap import Deps
from vna.config import Settings
from vna.events import Event, StudyComplete
from vna.testing.hl7msgs import order_message
from vna.testing.synthetic import ct_instance
from vna.usecases.store import Received, store_instance
from vna.worklist import mpps
from vna.worklist.binding import bind_instance
from vna.worklist.hl7 import Hl7Context, handle_hl7
from vna.worklist.model import Order


class World:
    def __init__(self, core: Core, tmp: Path) -> None:
        self.core = core
        self.tmp = tmp
        self.store = SqlWorklistStore.beside(core.index)
        self.completed: list[Event] = []
        core.bus.subscribe("vna.worklist", ["instance.indexed"],
                           partial(bind_instance, store=self.store, index=core.index))
        core.bus.subscribe("test.complete", ["study.complete"], self.completed.append)
        deps = Deps(settings=Settings(data_dir=tmp), blobs=core.blobs, index=core.index,
                    bus=core.bus, cache=MemoryCache(), extras={"worklist": self.store})
        app = FastAPI()
        install(app, deps)
        self.api = TestClient(app)

    def order(self, accession: str, patient_id: str) -> Order:
        handle_hl7(order_message(accession=accession, patient_id=patient_id),
                   ctx=Hl7Context(store=self.store))
        with self.store.transaction() as tx:
            return tx.find_orders(accession_number=accession)[0]

    def send(self, count: int, **kw: object) -> list[Dataset]:
        sent = []
        series = generate_uid()
        kw.setdefault("study_uid", generate_uid())  # one study, one series a call
        for i in range(count):
            ds = ct_instance(series_uid=series, instance_number=i + 1, rows=8, columns=8,
                             **kw)  # type: ignore[arg-type]
            path = self.tmp / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            store_instance(Received(path=path), blobs=self.core.blobs, index=self.core.index,
                           staging_dir=self.core.staging)
            sent.append(ds)
        self.core.drain()
        return sent


@pytest.fixture
def world(core: Core, tmp_path: Path) -> Iterator[World]:
    yield World(core, tmp_path)


def test_matching_images_are_bound(world: World) -> None:
    order = world.order("B1", "PB1")
    world.send(3, study_uid=order.study_instance_uid, accession="B1", patient_id="PB1")
    with world.store.transaction() as tx:
        [binding] = tx.bindings(study_instance_uid=order.study_instance_uid)
        assert binding.order_id == order.order_id and binding.how == "matched"
        assert tx.reconciliations() == []
    body = world.api.get(f"/worklist/orders/{order.order_id}").json()
    assert body["bindings"][0]["study_instance_uid"] == order.study_instance_uid


def test_a_study_already_decided_takes_no_write_transaction(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every instance after a study's first finds it bound (or queued) already: the
    # binder decides that by reading, without the write lock claims wait for.
    order = world.order("B5", "PB5")
    orphan = world.send(1, accession="NOORDER5", patient_id="PB5")
    [first] = world.send(1, study_uid=order.study_instance_uid, accession="B5",
                         patient_id="PB5")
    writes: list[int] = []
    transaction = world.store.transaction

    def counted() -> object:
        writes.append(1)
        return transaction()

    monkeypatch.setattr(world.store, "transaction", counted)
    world.send(2, study_uid=order.study_instance_uid, accession="B5", patient_id="PB5")
    world.send(2, study_uid=orphan[0].StudyInstanceUID, accession="NOORDER5",
               patient_id="PB5")
    assert writes == []
    # A new decision still writes: another accession in the bound study is a mismatch.
    world.send(1, study_uid=order.study_instance_uid, accession="OTHER", patient_id="PB5")
    assert writes == [1]
    monkeypatch.undo()
    with world.store.transaction() as tx:
        assert [b.order_id for b in tx.bindings(study_instance_uid=first.StudyInstanceUID)
                ] == [order.order_id]
        queued = {i.study_instance_uid for i in tx.reconciliations()}
    assert queued == {orphan[0].StudyInstanceUID, order.study_instance_uid}


def test_mismatches_go_to_reconciliation_and_are_resolved(world: World) -> None:
    order = world.order("B2", "PB2")
    # Right accession, wrong patient; and a study no order knows.
    wrong = world.send(2, accession="B2", patient_id="SOMEONE-ELSE")
    orphan = world.send(1, accession="NOORDER", patient_id="PB9")
    items = world.api.get("/worklist/reconciliation", params={"status": "OPEN"}).json()
    by_study = {i["study_instance_uid"]: i for i in items}
    assert set(by_study) == {wrong[0].StudyInstanceUID, orphan[0].StudyInstanceUID}
    assert "Patient ID" in by_study[wrong[0].StudyInstanceUID]["reason"]
    # The images stay stored all the same.
    assert len(world.core.index.instances(study_instance_uid=wrong[0].StudyInstanceUID)) == 2
    item = by_study[wrong[0].StudyInstanceUID]
    shown = world.api.get(f"/worklist/reconciliation/{item['item_id']}").json()
    assert [o["order_id"] for o in shown["candidate_orders"]] == [order.order_id]
    linked = world.api.post(f"/worklist/reconciliation/{item['item_id']}/link",
                            json={"order_id": order.order_id},
                            headers={"X-VNA-User": "alice"})
    assert linked.status_code == 200 and linked.json()["status"] == "LINKED"
    assert world.api.post(f"/worklist/reconciliation/{item['item_id']}/link",
                          json={"order_id": order.order_id}).status_code == 409
    other = by_study[orphan[0].StudyInstanceUID]
    rejected = world.api.post(f"/worklist/reconciliation/{other['item_id']}/reject",
                              json={"note": "test object"})
    assert rejected.json()["status"] == "REJECTED"
    with world.store.transaction() as tx:
        [binding] = tx.bindings(study_instance_uid=wrong[0].StudyInstanceUID)
        assert binding.how == "reconciled" and binding.order_id == order.order_id
        actions = [r.action for r in tx.audit_trail()]
    assert {"reconciliation.opened", "reconciliation.linked",
            "reconciliation.rejected"} <= set(actions)
    assert world.core.index.verify_audit()
    # More images of the linked study later: no new reconciliation item.
    world.send(1, study_uid=wrong[0].StudyInstanceUID, accession="B2",
               patient_id="SOMEONE-ELSE")
    assert world.api.get("/worklist/reconciliation", params={"status": "OPEN"}).json() == []


def test_study_complete_is_published_once(world: World) -> None:
    order = world.order("B3", "PB3")
    attrs = Dataset()
    attrs.PerformedProcedureStepStatus = "IN PROGRESS"
    attrs.PerformedProcedureStepID = "P"
    attrs.PerformedStationAETitle = "CT1"
    attrs.PerformedProcedureStepStartDate = "20240102"
    attrs.PerformedProcedureStepStartTime = "1000"
    attrs.Modality = "CT"
    step = Dataset()
    step.StudyInstanceUID = order.study_instance_uid
    step.AccessionNumber = "B3"
    attrs.ScheduledStepAttributesSequence = Sequence([step])
    uid = generate_uid()
    assert mpps.create_mpps(attrs, sop_instance_uid=uid, store=world.store).status == 0
    # Two of three images arrive before the MPPS completes, the last one after.
    sent = [ct_instance(study_uid=order.study_instance_uid, accession="B3", patient_id="PB3",
                        instance_number=i, rows=8, columns=8) for i in range(3)]
    final = Dataset()
    final.PerformedProcedureStepStatus = "COMPLETED"
    final.PerformedProcedureStepEndDate = "20240102"
    final.PerformedProcedureStepEndTime = "1010"
    series = Dataset()
    series.SeriesInstanceUID = sent[0].SeriesInstanceUID
    refs = []
    for ds in sent:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        refs.append(ref)
    series.ReferencedImageSequence = Sequence(refs)
    final.PerformedSeriesSequence = Sequence([series])

    def send(ds: Dataset) -> None:
        path = world.tmp / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        store_instance(Received(path=path), blobs=world.core.blobs, index=world.core.index,
                       staging_dir=world.core.staging)
        world.core.drain()

    send(sent[0])
    send(sent[1])
    assert mpps.set_mpps(final, sop_instance_uid=uid, store=world.store,
                         index=world.core.index).status == 0
    world.core.drain()
    assert world.completed == []  # one instance still missing
    send(sent[2])
    send(sent[2])  # sent twice: still one event
    world.core.drain()
    assert [type(e) for e in world.completed] == [StudyComplete]
    assert world.completed[0].study_instance_uid == order.study_instance_uid  # type: ignore[attr-defined]


def test_orders_api(world: World) -> None:
    body = {"patient": {"patient_id": "PA1", "patient_name": "API^PAT"},
            "accession_number": "API1", "requested_procedure_id": "RP1",
            "scheduled_procedure_step_id": "S1", "modality": "CT"}
    created = world.api.post("/worklist/orders", json=body)
    assert created.status_code == 201
    order_id = created.json()["order_id"]
    assert world.api.post("/worklist/orders", json=body).status_code == 409
    assert world.api.post("/worklist/orders", json={**body, "accession_number": ""}
                          ).status_code == 422
    changed = world.api.put(f"/worklist/orders/{order_id}", json={**body, "modality": "MR"})
    assert changed.json()["modality"] == "MR"
    cancelled = world.api.post(f"/worklist/orders/{order_id}/cancel", json={})
    assert cancelled.json()["status"] == "CANCELLED"
    assert world.api.get("/worklist/orders", params={"status": "SCHEDULED"}).json() == []
    merged = world.api.post("/worklist/patients/merge", json={
        "prior": {"patient_id": "PA1"}, "patient": {"patient_id": "PA2"}})
    assert merged.status_code == 201
    assert world.api.get("/worklist/orders", params={"patient_id": "PA2"}).json()[0][
        "order_id"] == order_id
    undone = world.api.post(f"/worklist/merges/{merged.json()['merge_id']}/undo")
    assert undone.status_code == 200
    assert world.api.get("/worklist/orders", params={"patient_id": "PA1"}).json()[0][
        "order_id"] == order_id
