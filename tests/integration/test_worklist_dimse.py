"""The worklist service standalone, over the network: HL7 over MLLP from a "RIS",
MWL C-FIND with pynetdicom and with dcmtk ``findscu -W``, MPPS with pynetdicom."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
)

from services.worklist.scp import worklist_store
from services.worklist.service import WorklistService, start_worklist_service
from tests.support.processes import free_port
from vna.bootstrap import build
from vna.config import Settings
from vna.dicom import status
from vna.testing.hl7msgs import ack_code, ack_field, adt_message, order_message
from vna.worklist import mpps
from vna.worklist.hl7 import send_hl7
from vna.worklist.model import OrderStatus

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[WorklistService]:
    settings = Settings(data_dir=tmp_path, dimse_port=free_port(), hl7_port=free_port(),
                        ae_title="VNAWL", storage_url="", index_url="", bus_url="local://",
                        redis_url="", log_format="text")
    deps = build(settings)
    svc = start_worklist_service(deps)
    try:
        yield svc
    finally:
        svc.stop()
        deps.close()


def hl7(service: WorklistService, message: str) -> str:
    return send_hl7(HOST, service.hl7_port, message)


def mwl_query(**step: str) -> Dataset:
    ds = Dataset()
    ds.PatientName = ""
    ds.PatientID = ""
    ds.AccessionNumber = ""
    ds.StudyInstanceUID = ""
    ds.RequestedProcedureID = ""
    ds.RequestedProcedureDescription = ""
    sps = Dataset()
    sps.ScheduledStationAETitle = step.get("ScheduledStationAETitle", "")
    sps.Modality = step.get("Modality", "")
    sps.ScheduledProcedureStepStartDate = step.get("ScheduledProcedureStepStartDate", "")
    sps.ScheduledProcedureStepStartTime = ""
    sps.ScheduledProcedureStepID = ""
    ds.ScheduledProcedureStepSequence = Sequence([sps])
    return ds


def c_find(service: WorklistService, query: Dataset, calling: str = "CT1") -> list[Dataset]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate(HOST, service.dimse_port, ae_title="VNAWL")
    assert assoc.is_established
    out: list[Dataset] = []
    try:
        for st, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
            assert st is not None and "Status" in st
            if st.Status == status.PENDING:
                assert identifier is not None
                out.append(identifier)
            else:
                assert st.Status == status.SUCCESS, hex(st.Status)
    finally:
        assoc.release()
    return out


def test_orders_over_mllp_appear_on_the_worklist(service: WorklistService) -> None:
    acks = [hl7(service, order_message(accession=f"ACC{i}", patient_id=f"P{i}",
                                       modality="CT" if i % 2 else "MR", omi=bool(i % 2),
                                       station_ae="CT1" if i % 2 else "",
                                       control_id=f"C{i}"))
            for i in range(1, 5)]
    assert [ack_code(a) for a in acks] == ["AA"] * 4
    # The same message again: acknowledged, applied once.
    again = hl7(service, order_message(accession="ACC1", patient_id="P1", modality="CT",
                                       omi=True, station_ae="CT1", control_id="C1"))
    assert ack_code(again) == "AA" and "duplicate" in ack_field(again, "MSA", 3)
    found = c_find(service, mwl_query(Modality="CT", ScheduledStationAETitle="CT1"))
    assert sorted(str(d.AccessionNumber) for d in found) == ["ACC1", "ACC3"]
    item = found[0]
    assert item.StudyInstanceUID and item.ScheduledProcedureStepSequence[0].Modality == "CT"
    # Cancelled orders leave the worklist.
    assert ack_code(hl7(service, order_message(control="CA", accession="ACC3",
                                               patient_id="P3", omi=True))) == "AA"
    assert [str(d.AccessionNumber) for d in c_find(service, mwl_query(Modality="CT"))] == [
        "ACC1"]
    # Garbage is refused with a reason, and the connection keeps working.
    nak = hl7(service, "MSH|^~\\&|RIS|H|VNA|H|2024||ZZZ^Z01|X|P|2.5\r")
    assert ack_code(nak) == "AR" and ack_field(nak, "MSA", 3)


def test_findscu_worklist_query(service: WorklistService, tmp_path: Path) -> None:
    if shutil.which("findscu") is None:
        pytest.fail("dcmtk findscu missing: apt-get install -y dcmtk")
    hl7(service, adt_message("A04", patient_id="PW1", name="WORK^LIST"))
    hl7(service, order_message(accession="W1", patient_id="PW1", patient_name="WORK^LIST",
                               modality="US", start="202401051130"))
    hl7(service, order_message(accession="W2", patient_id="PW2", modality="CT",
                               start="202401051130"))
    out = tmp_path / "rsp"
    out.mkdir()
    run = subprocess.run(
        ["findscu", "-W", "-aet", "US1", "-aec", "VNAWL", "-X", "-od", str(out),
         "-k", "PatientName=WORK*", "-k", "PatientID", "-k", "AccessionNumber",
         "-k", "StudyInstanceUID", "-k", "RequestedProcedureID",
         "-k", "ScheduledProcedureStepSequence[0].Modality=US",
         "-k", "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20240105",
         "-k", "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime=1100-1200",
         "-k", "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
         HOST, str(service.dimse_port)],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    responses = [dcmread(p) for p in sorted(out.iterdir())]
    assert [str(r.AccessionNumber) for r in responses] == ["W1"]
    assert str(responses[0].PatientName) == "WORK^LIST"
    assert responses[0].ScheduledProcedureStepSequence[0].Modality == "US"


def _n_create(assoc: Any, attrs: Dataset, uid: str) -> Any:
    st, _ = assoc.send_n_create(attrs, ModalityPerformedProcedureStep, uid)
    return st


def test_mpps_over_the_network(service: WorklistService) -> None:
    hl7(service, order_message(accession="M1", patient_id="PM1", modality="CT"))
    [item] = c_find(service, mwl_query(Modality="CT"))
    sps = item.ScheduledProcedureStepSequence[0]
    attrs = Dataset()
    attrs.PerformedProcedureStepStatus = "IN PROGRESS"
    attrs.PerformedProcedureStepID = "PPS-M1"
    attrs.PerformedStationAETitle = "CT1"
    attrs.PerformedProcedureStepStartDate = "20240102"
    attrs.PerformedProcedureStepStartTime = "1000"
    attrs.Modality = "CT"
    attrs.PatientID = "PM1"
    attrs.PatientName = ""
    step = Dataset()
    step.StudyInstanceUID = item.StudyInstanceUID
    step.AccessionNumber = item.AccessionNumber
    step.RequestedProcedureID = item.RequestedProcedureID
    step.ScheduledProcedureStepID = sps.ScheduledProcedureStepID
    attrs.ScheduledStepAttributesSequence = Sequence([step])
    uid = generate_uid()
    ae = AE(ae_title="CT1")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate(HOST, service.dimse_port, ae_title="VNAWL")
    assert assoc.is_established
    try:
        assert _n_create(assoc, attrs, uid).Status == status.SUCCESS
        assert _n_create(assoc, attrs, uid).Status == mpps.DUPLICATE_SOP_INSTANCE
        final = Dataset()
        final.PerformedProcedureStepStatus = "COMPLETED"
        final.PerformedProcedureStepEndDate = "20240102"
        final.PerformedProcedureStepEndTime = "1020"
        final.PerformedSeriesSequence = Sequence()
        unknown, _ = assoc.send_n_set(final, ModalityPerformedProcedureStep, generate_uid())
        assert unknown.Status == mpps.NO_SUCH_OBJECT_INSTANCE
        done, _ = assoc.send_n_set(final, ModalityPerformedProcedureStep, uid)
        assert done.Status == status.SUCCESS
        late = Dataset()
        late.PerformedProcedureStepStatus = "DISCONTINUED"
        after, _ = assoc.send_n_set(late, ModalityPerformedProcedureStep, uid)
        assert after.Status == mpps.PROCESSING_FAILURE
    finally:
        assoc.release()
    with worklist_store(service.deps).transaction() as tx:
        [order] = tx.find_orders(accession_number="M1")
        assert order.status is OrderStatus.COMPLETED
    assert c_find(service, mwl_query(Modality="CT")) == []
