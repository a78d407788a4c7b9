"""A day of a department, replayed end to end on the archive as ``vna run`` wires it.

50 orders arrive from the RIS over MLLP; five modalities query the worklist on
the archive's own AE and port, report MPPS, and send their images there. Three
studies are made wrong on purpose (a patient ID typed at the console, an
accession typo, an unscheduled exam); they land in reconciliation and are
resolved through the API. Nothing is lost; nothing is bound to the wrong patient.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
)

from services.worklist.api import install
from services.worklist.scp import worklist_store
from services.worklist.service import start_hl7, subscribe_binder
from tests.support.archive import Archive
from tests.support.processes import free_port, wait_for
from vna.dicom import status
from vna.dicom.matching import Level, build_query
from vna.events import Event, StudyComplete
from vna.testing.hl7msgs import ack_code, order_message
from vna.testing.synthetic import ct_instance
from vna.worklist.hl7 import send_hl7
from vna.worklist.model import ReconciliationStatus

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
STATIONS = {"CT": "CT1", "MR": "MR1", "CR": "CR1", "US": "US1", "MG": "MG1"}
IMAGES_PER_STUDY = 2
WRONG = {7: "patient", 19: "accession", 33: "unscheduled"}


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[tuple[Archive, int, list[Event]]]:
    with Archive(tmp_path / "vna", ae_title="VNA") as arch:
        assert arch.deps is not None
        completed: list[Event] = []
        arch.deps.bus.subscribe("test.complete", ["study.complete"], completed.append)
        subscribe_binder(arch.deps)
        hl7 = start_hl7(arch.deps, free_port())
        assert hl7 is not None
        try:
            yield arch, hl7.port, completed
        finally:
            hl7.stop()


def _associate(arch: Archive, calling: str, *contexts: str) -> Any:
    ae = AE(ae_title=calling)
    for cx in contexts:
        ae.add_requested_context(cx)
    assoc = ae.associate(HOST, arch.port, ae_title=arch.ae_title)
    assert assoc.is_established
    return assoc


def _worklist(arch: Archive, station: str, modality: str) -> list[Dataset]:
    query = Dataset()
    for key in ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID",
                "RequestedProcedureID"):
        setattr(query, key, "")
    sps = Dataset()
    sps.ScheduledStationAETitle = station
    sps.Modality = modality
    sps.ScheduledProcedureStepStartDate = "20240102"
    sps.ScheduledProcedureStepID = ""
    query.ScheduledProcedureStepSequence = Sequence([sps])
    assoc = _associate(arch, station, ModalityWorklistInformationFind)
    items = []
    try:
        for st, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
            if st.Status == status.PENDING:
                items.append(identifier)
    finally:
        assoc.release()
    return items


def _mpps_create(item: Dataset, station: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepID = "PPS" + str(item.AccessionNumber)
    ds.PerformedStationAETitle = station
    ds.PerformedProcedureStepStartDate = "20240102"
    ds.PerformedProcedureStepStartTime = "0900"
    ds.Modality = modality
    ds.PatientID = item.PatientID
    ds.PatientName = item.PatientName
    step = Dataset()
    step.StudyInstanceUID = item.StudyInstanceUID
    step.AccessionNumber = item.AccessionNumber
    step.RequestedProcedureID = item.RequestedProcedureID
    step.ScheduledProcedureStepID = item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID
    ds.ScheduledStepAttributesSequence = Sequence([step])
    return ds


def _mpps_completed(images: list[Dataset]) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedProcedureStepEndDate = "20240102"
    ds.PerformedProcedureStepEndTime = "0915"
    series = Dataset()
    series.SeriesInstanceUID = images[0].SeriesInstanceUID
    refs = []
    for image in images:
        ref = Dataset()
        ref.ReferencedSOPClassUID = image.SOPClassUID
        ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
        refs.append(ref)
    series.ReferencedImageSequence = Sequence(refs)
    ds.PerformedSeriesSequence = Sequence([series])
    return ds


def test_a_day_of_a_department(archive: tuple[Archive, int, list[Event]]) -> None:
    arch, hl7_port, completed = archive
    assert arch.deps is not None
    modalities = list(STATIONS)
    # ---- 08:00: the RIS sends the day's 50 orders (v2.3.1 ORM and v2.5.1 OMI mixed)
    for n in range(50):
        modality = modalities[n % len(modalities)]
        ack = send_hl7(HOST, hl7_port, order_message(
            omi=n % 2 == 0, accession=f"D{n:03d}", patient_id=f"PD{n:03d}",
            patient_name=f"PATIENT^NUMBER{n:03d}", modality=modality,
            station_ae=STATIONS[modality], start=f"20240102{8 + n // 6:02d}{n % 6 * 10:02d}"))
        assert ack_code(ack) == "AA"
    # ---- each modality works its worklist
    sent_by_accession: dict[str, list[Dataset]] = {}
    intended: dict[str, str] = {}  # study uid of a wrong study -> accession it belongs to
    for modality, station in STATIONS.items():
        items = _worklist(arch, station, modality)
        assert len(items) == 10
        for item in items:
            accession = str(item.AccessionNumber)
            n = int(accession[1:])
            wrong = WRONG.get(n)
            study_uid = str(item.StudyInstanceUID)
            patient_id, acc = str(item.PatientID), accession
            if wrong == "patient":
                patient_id = "TYPO" + patient_id  # keyed in at the console
            elif wrong == "accession":
                study_uid, acc = generate_uid(), accession + "X"
            elif wrong == "unscheduled":
                study_uid, acc = generate_uid(), ""
            series = generate_uid()
            images = [ct_instance(study_uid=study_uid, series_uid=series, accession=acc,
                                  patient_id=patient_id, patient_name=str(item.PatientName),
                                  modality=modality, instance_number=i + 1, rows=8,
                                  columns=8)
                      for i in range(IMAGES_PER_STUDY)]
            if wrong:
                intended[study_uid] = accession
            assoc = _associate(arch, station, ModalityPerformedProcedureStep, CTImageStorage)
            try:
                uid = generate_uid()
                if not wrong:
                    st, _ = assoc.send_n_create(_mpps_create(item, station, modality),
                                                ModalityPerformedProcedureStep, uid)
                    assert st.Status == status.SUCCESS
                for image in images:
                    assert assoc.send_c_store(image).Status == status.SUCCESS
                if not wrong:
                    st, _ = assoc.send_n_set(_mpps_completed(images),
                                             ModalityPerformedProcedureStep, uid)
                    assert st.Status == status.SUCCESS
            finally:
                assoc.release()
            sent_by_accession[accession] = images
    total = 50 * IMAGES_PER_STUDY
    arch.wait_indexed(total)
    store = worklist_store(arch.deps)

    def settled() -> bool:
        with store.transaction() as tx:
            bound = {b.study_instance_uid for o in tx.find_orders()
                     for b in tx.bindings(order_id=o.order_id)}
            open_items = tx.reconciliations(ReconciliationStatus.OPEN)
        return len(bound) == 47 and len(open_items) == 3 and len(completed) == 47

    wait_for(settled, 60, 0.1, "47 bound and complete studies, 3 in reconciliation")
    assert all(isinstance(e, StudyComplete) for e in completed)
    # ---- a person resolves the three through the API
    app = FastAPI()
    install(app, arch.deps)
    api = TestClient(app)
    items = api.get("/worklist/reconciliation", params={"status": "OPEN"}).json()
    assert sorted(i["study_instance_uid"] for i in items) == sorted(intended)
    for item in items:
        accession = intended[item["study_instance_uid"]]
        [order] = api.get("/worklist/orders", params={"accession_number": accession}).json()
        linked = api.post(f"/worklist/reconciliation/{item['item_id']}/link",
                          json={"order_id": order["order_id"]}, headers={"X-VNA-User": "ra"})
        assert linked.status_code == 200, linked.text
    assert api.get("/worklist/reconciliation", params={"status": "OPEN"}).json() == []
    # ---- nothing lost, nothing bound to the wrong patient
    assert arch.deps.index.counts()["instances"] == total
    with store.transaction() as tx:
        orders = tx.find_orders()
        assert len(orders) == 50
        for order in orders:
            [binding] = tx.bindings(order_id=order.order_id)
            images = sent_by_accession[order.accession_number]
            assert binding.study_instance_uid == images[0].StudyInstanceUID
            assert binding.patient_id == order.patient_id
            if binding.how == "matched":
                assert all(str(i.PatientID) == order.patient_id for i in images)
            else:
                assert binding.study_instance_uid in intended
                # Linked: the index shows the order's patient and accession (issue #4).
                [row] = arch.deps.index.search(build_query(
                    Level.STUDY, {"StudyInstanceUID": binding.study_instance_uid},
                    return_keys=["PatientID", "AccessionNumber"]))
                assert (row["PatientID"], row["AccessionNumber"]) == (
                    order.patient_id, order.accession_number)
                assert arch.deps.index.metadata_version(binding.study_instance_uid) == 1
            stored = arch.deps.index.instances(study_instance_uid=binding.study_instance_uid)
            assert len(stored) == IMAGES_PER_STUDY
    assert arch.deps.index.verify_audit()
