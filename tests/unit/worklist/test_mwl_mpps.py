"""MWL matching and return keys; the MPPS state machine (PS3.4 F.7) — in memory."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from vna.dicom import status
from vna.dicom.matching import QueryError
from vna.events import MppsCompleted
from vna.testing.hl7msgs import order_message
from vna.worklist import mpps
from vna.worklist.hl7 import Hl7Context, handle_hl7
from vna.worklist.memory import MemoryWorklistStore
from vna.worklist.model import Order, OrderStatus
from vna.worklist.mwl import find_worklist_items


@pytest.fixture
def store() -> MemoryWorklistStore:
    s = MemoryWorklistStore()
    ctx = Hl7Context(store=s)
    for acc, pid, name, mod, ae, start in [
        ("A1", "P1", "MÜLLER^HANS", "CT", "CT1", "202401020800"),
        ("A2", "P2", "DOE^JANE", "MR", "MR1", "202401021400"),
        ("A3", "P3", "DOE^JOHN", "CT", "", "202401031000"),
    ]:
        handle_hl7(order_message(omi=True, accession=acc, patient_id=pid, patient_name=name,
                                 modality=mod, station_ae=ae, start=start), ctx=ctx)
    return s


def query(**top: object) -> Dataset:
    step_keys = {k: top.pop(k) for k in list(top) if k.startswith("Scheduled") or k == "Modality"}
    ds = Dataset()
    for key in ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID",
                "RequestedProcedureID"):
        setattr(ds, key, top.get(key, ""))
    step = Dataset()
    for key in ("ScheduledStationAETitle", "Modality", "ScheduledProcedureStepStartDate",
                "ScheduledProcedureStepStartTime", "ScheduledProcedureStepID"):
        setattr(step, key, step_keys.get(key, ""))
    ds.ScheduledProcedureStepSequence = Sequence([step])
    return ds


def accessions(store: MemoryWorklistStore, ds: Dataset) -> list[str]:
    return sorted(str(r.AccessionNumber) for r in find_worklist_items(ds, store=store))


def test_universal_query_returns_every_scheduled_step(store: MemoryWorklistStore) -> None:
    assert accessions(store, query()) == ["A1", "A2", "A3"]


@pytest.mark.parametrize("keys,expected", [
    ({"Modality": "CT"}, ["A1", "A3"]),
    ({"ScheduledStationAETitle": "MR1"}, ["A2", "A3"]),  # A3 has no station: any may do it
    ({"ScheduledProcedureStepStartDate": "20240102"}, ["A1", "A2"]),
    ({"ScheduledProcedureStepStartDate": "20240103-"}, ["A3"]),
    ({"ScheduledProcedureStepStartDate": "20240102",
      "ScheduledProcedureStepStartTime": "0700-0900"}, ["A1"]),
    ({"ScheduledProcedureStepStartDate": "20240102-20240103",
      "ScheduledProcedureStepStartTime": "1200-1030"}, ["A2", "A3"]),  # one datetime range
    ({"PatientName": "DOE*"}, ["A2", "A3"]),
    ({"PatientName": "muller*"}, ["A1"]),  # case- and accent-insensitive like QIDO
    ({"PatientID": "P2"}, ["A2"]),
    ({"AccessionNumber": "A?"}, ["A1", "A2", "A3"]),
    ({"AccessionNumber": "A3"}, ["A3"]),
    ({"RequestedProcedureID": "NOPE"}, []),
])
def test_matching_keys(store: MemoryWorklistStore, keys: dict[str, str],
                       expected: list[str]) -> None:
    assert accessions(store, query(**keys)) == expected


def test_return_keys_are_those_asked_for(store: MemoryWorklistStore) -> None:
    ds = query(AccessionNumber="A1")
    ds.RequestedProcedureCodeSequence = Sequence()
    ds.PatientBirthDate = ""
    [item] = find_worklist_items(ds, store=store)
    assert item.PatientName == "MÜLLER^HANS"
    assert item.StudyInstanceUID and item.PatientBirthDate == "19700101"
    assert item.RequestedProcedureCodeSequence[0].CodeValue == "CTCHEST"
    step = item.ScheduledProcedureStepSequence[0]
    assert step.ScheduledStationAETitle == "CT1" and step.Modality == "CT"
    assert "ScheduledProcedureStepDescription" not in step  # not asked for
    assert "ReferencedStudySequence" not in item


def test_bad_query_value_is_an_error(store: MemoryWorklistStore) -> None:
    with pytest.raises(QueryError):
        list(find_worklist_items(query(ScheduledProcedureStepStartDate="2024-13-45"),
                                 store=store))


def order_of(store: MemoryWorklistStore, accession: str) -> Order:
    with store.transaction() as tx:
        return tx.find_orders(accession_number=accession)[0]


def create_attrs(order: Order, state: str = "IN PROGRESS") -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = state
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "CT1"
    ds.PerformedProcedureStepStartDate = "20240102"
    ds.PerformedProcedureStepStartTime = "0805"
    ds.Modality = "CT"
    ds.PatientID = order.patient_id
    item = Dataset()
    item.StudyInstanceUID = order.study_instance_uid
    item.AccessionNumber = order.accession_number
    item.RequestedProcedureID = order.requested_procedure_id
    item.ScheduledProcedureStepID = order.scheduled_procedure_step_id
    ds.ScheduledStepAttributesSequence = Sequence([item])
    return ds


def final_attrs(state: str, sops: list[str] | None = None) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = state
    ds.PerformedProcedureStepEndDate = "20240102"
    ds.PerformedProcedureStepEndTime = "0830"
    series = Dataset()
    series.SeriesInstanceUID = "1.2.3.9"
    refs = []
    for sop in sops or []:
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ref.ReferencedSOPInstanceUID = sop
        refs.append(ref)
    series.ReferencedImageSequence = Sequence(refs)
    ds.PerformedSeriesSequence = Sequence([series])
    return ds


def test_mpps_in_progress_then_completed(store: MemoryWorklistStore) -> None:
    order = order_of(store, "A1")
    created = mpps.create_mpps(create_attrs(order), sop_instance_uid="1.2.3.100", store=store)
    assert created.status == status.SUCCESS
    assert order_of(store, "A1").status is OrderStatus.IN_PROGRESS
    assert accessions(store, query(AccessionNumber="A1")) == ["A1"]  # still on the worklist
    done = mpps.set_mpps(final_attrs("COMPLETED", ["1.2.3.9.1", "1.2.3.9.2"]),
                         sop_instance_uid="1.2.3.100", store=store)
    assert done.status == status.SUCCESS
    assert order_of(store, "A1").status is OrderStatus.COMPLETED
    assert accessions(store, query(AccessionNumber="A1")) == []  # completed: gone
    [event] = [e for e in store.events if isinstance(e, MppsCompleted)]
    assert event.study_instance_uid == order.study_instance_uid
    assert [p.sop_instance_uid for p in event.performed] == ["1.2.3.9.1", "1.2.3.9.2"]
    # Final: no further change.
    again = mpps.set_mpps(final_attrs("DISCONTINUED"), sop_instance_uid="1.2.3.100",
                          store=store)
    assert again.status == mpps.PROCESSING_FAILURE
    assert order_of(store, "A1").status is OrderStatus.COMPLETED


def test_mpps_failures(store: MemoryWorklistStore) -> None:
    order = order_of(store, "A2")
    assert mpps.create_mpps(create_attrs(order, "COMPLETED"), sop_instance_uid="1.2.5",
                            store=store).status == mpps.INVALID_ATTRIBUTE_VALUE
    missing = create_attrs(order)
    del missing.PerformedStationAETitle
    assert mpps.create_mpps(missing, sop_instance_uid="1.2.5",
                            store=store).status == mpps.MISSING_ATTRIBUTE
    damaged = create_attrs(order)
    damaged.ScheduledStepAttributesSequence[0].AccessionNumber = "A2\0X"
    refused = mpps.create_mpps(damaged, sop_instance_uid="1.2.5", store=store)
    # Not "try again": the worklist database (PostgreSQL) refuses a NUL for ever.
    assert refused.status == mpps.INVALID_ATTRIBUTE_VALUE
    assert "AccessionNumber holds a NUL" in (refused.comment or "")
    assert mpps.create_mpps(create_attrs(order), sop_instance_uid="1.2.5",
                            store=store).status == status.SUCCESS
    assert mpps.create_mpps(create_attrs(order), sop_instance_uid="1.2.5",
                            store=store).status == mpps.DUPLICATE_SOP_INSTANCE
    comment = Dataset()
    comment.PerformedProcedureStepDescription = "CT\0"
    assert mpps.set_mpps(comment, sop_instance_uid="1.2.5",
                         store=store).status == mpps.INVALID_ATTRIBUTE_VALUE
    assert mpps.set_mpps(final_attrs("COMPLETED"), sop_instance_uid="9.9.9",
                         store=store).status == mpps.NO_SUCH_OBJECT_INSTANCE
    bad = Dataset()
    bad.PerformedProcedureStepStatus = "FINISHED"
    assert mpps.set_mpps(bad, sop_instance_uid="1.2.5",
                         store=store).status == mpps.INVALID_ATTRIBUTE_VALUE
    no_end = Dataset()
    no_end.PerformedProcedureStepStatus = "COMPLETED"
    assert mpps.set_mpps(no_end, sop_instance_uid="1.2.5",
                         store=store).status == mpps.MISSING_ATTRIBUTE
    assert order_of(store, "A2").status is OrderStatus.IN_PROGRESS  # nothing half-applied


def test_discontinued_wrong_entry_goes_back_on_the_worklist(store: MemoryWorklistStore) -> None:
    order = order_of(store, "A3")
    mpps.create_mpps(create_attrs(order), sop_instance_uid="1.2.6", store=store)
    stop = final_attrs("DISCONTINUED")
    reason = Dataset()
    reason.CodeValue = "110514"
    reason.CodingSchemeDesignator = "DCM"
    reason.CodeMeaning = "Incorrect worklist entry selected"
    stop.PerformedProcedureStepDiscontinuationReasonCodeSequence = Sequence([reason])
    assert mpps.set_mpps(stop, sop_instance_uid="1.2.6", store=store).status == status.SUCCESS
    assert order_of(store, "A3").status is OrderStatus.SCHEDULED
    assert accessions(store, query(AccessionNumber="A3")) == ["A3"]
