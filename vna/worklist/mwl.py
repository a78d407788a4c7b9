"""Modality Worklist Information Model — FIND (PS3.4 K.6): matching and return keys.

Matching keys are read with the archive's one matching module
(``vna.dicom.matching.build_match``: the same normalisation of PN, DA, TM,
wildcards and lists as C-FIND and QIDO-RS); steps are then compared in Python,
because a day's worklist is small and its keys live in a sequence.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from vna.dicom.matching import (
    Match,
    MatchKind,
    QueryError,
    build_match,
    normalize_person_name,
    stored_time,
)
from vna.worklist.model import ON_WORKLIST, Order, OrderStatus, RisPatient
from vna.worklist.ports import WorklistStore

# Keys at the top level and inside the Scheduled Procedure Step Sequence item that
# a step is matched on (PS3.4 Table K.6-1 matching keys, plus IHE SWF additions).
TOP_LEVEL_KEYS = {
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "RequestedProcedureID", "StudyInstanceUID", "AdmissionID",
    "ReferringPhysicianName",
}
STEP_KEYS = {
    "ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime", "Modality", "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepID", "ScheduledStationName", "ScheduledProcedureStepStatus",
}

SPS_STATUS = {OrderStatus.SCHEDULED: "SCHEDULED", OrderStatus.IN_PROGRESS: "STARTED"}
"""Order status -> Scheduled Procedure Step Status (0040,0020) defined terms."""


@dataclass(frozen=True)
class WorklistQuery:
    matches: tuple[Match, ...] = ()
    date: Match | None = None
    time: Match | None = None


def _text(elem: DataElement) -> str:
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def build_worklist_query(identifier: Dataset) -> WorklistQuery:
    """Read the matching keys of an MWL C-FIND identifier (QueryError when malformed)."""
    raw: dict[str, str] = {}
    for elem in identifier:
        if elem.keyword in TOP_LEVEL_KEYS:
            raw[elem.keyword] = _text(elem)
    steps = identifier.get("ScheduledProcedureStepSequence")
    if steps:
        if len(steps) > 1:
            raise QueryError("ScheduledProcedureStepSequence: at most one item may be sent")
        for elem in steps[0]:
            if elem.keyword in STEP_KEYS:
                raw[elem.keyword] = _text(elem)
    matches: list[Match] = []
    date = time = None
    for keyword, value in raw.items():
        match = build_match(keyword, value)
        if match is None:
            continue
        if keyword == "ScheduledProcedureStepStartDate":
            date = match
        elif keyword == "ScheduledProcedureStepStartTime":
            time = match
        else:
            matches.append(match)
    return WorklistQuery(tuple(matches), date, time)


def _wildcard(pattern: str, value: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def value_matches(match: Match, value: str) -> bool:
    """Whether a stored ``value`` satisfies ``match`` (PS3.4 C.2.2.2)."""
    if dictionary_VR(match.keyword) == "PN":
        value = normalize_person_name(value)
    if match.kind is MatchKind.SINGLE:
        return value == match.values[0]
    if match.kind is MatchKind.LIST:
        return value in match.values
    if match.kind is MatchKind.WILDCARD:
        return _wildcard(match.values[0], value)
    lo, hi = match.values
    return bool(value) and (not lo or value >= lo) and (not hi or value <= hi)


def _bounds(match: Match | None) -> tuple[str, str]:
    if match is None:
        return "", ""
    if match.kind is MatchKind.RANGE:
        return match.values[0], match.values[1]
    return match.values[0], match.values[0]


def _when_matches(query: WorklistQuery, date: str, time: str) -> bool:
    """Start date/time matching; a date range with a time range is one date-time range
    (PS3.4 C.2.2.2.5.1: 'combined datetime matching')."""
    if query.date is None and query.time is None:
        return True
    t = stored_time(time)
    if query.date is not None and query.time is not None:
        if not date or not t:
            return False
        dlo, dhi = _bounds(query.date)
        tlo, thi = _bounds(query.time)
        lower = (dlo or "00000000") + (tlo or "000000.000000")
        upper = (dhi or "99999999") + (thi or "235959.999999")
        return lower <= date + t <= upper
    if query.date is not None:
        return value_matches(query.date, date)
    assert query.time is not None
    return value_matches(query.time, t)


def step_values(order: Order, patient: RisPatient | None) -> dict[str, str]:
    """The matchable values of one step, by keyword."""
    return {
        "PatientName": patient.patient_name if patient else "",
        "PatientID": order.patient_id,
        "IssuerOfPatientID": order.issuer_of_patient_id,
        "PatientBirthDate": patient.patient_birth_date if patient else "",
        "PatientSex": patient.patient_sex if patient else "",
        "AccessionNumber": order.accession_number,
        "RequestedProcedureID": order.requested_procedure_id,
        "StudyInstanceUID": order.study_instance_uid,
        "AdmissionID": order.admission_id,
        "ReferringPhysicianName": order.referring_physician_name,
        "ScheduledStationAETitle": order.scheduled_station_ae_title,
        "Modality": order.modality,
        "ScheduledPerformingPhysicianName": order.scheduled_performing_physician_name,
        "ScheduledProcedureStepID": order.scheduled_procedure_step_id,
        "ScheduledStationName": order.scheduled_station_name,
        "ScheduledProcedureStepStatus": SPS_STATUS.get(order.status, ""),
    }


def step_matches(query: WorklistQuery, order: Order, patient: RisPatient | None) -> bool:
    if order.status not in ON_WORKLIST:
        return False
    values = step_values(order, patient)
    for match in query.matches:
        value = values.get(match.keyword, "")
        if match.keyword == "ScheduledStationAETitle" and not value:
            # A step the RIS did not assign to a station may be done on any of them.
            continue
        if not value_matches(match, value):
            return False
    return _when_matches(query, order.scheduled_procedure_step_start_date,
                         order.scheduled_procedure_step_start_time)


def worklist_item(order: Order, patient: RisPatient | None) -> Dataset:
    """Every attribute VNA holds for a step, as an MWL response (PS3.4 Table K.6-1)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = patient.patient_name if patient else ""
    ds.PatientID = order.patient_id
    ds.IssuerOfPatientID = order.issuer_of_patient_id
    ds.PatientBirthDate = patient.patient_birth_date if patient else ""
    ds.PatientSex = patient.patient_sex if patient else ""
    ds.AdmissionID = order.admission_id
    ds.CurrentPatientLocation = order.current_patient_location
    ds.ReferencedPatientSequence = Sequence()
    ds.AccessionNumber = order.accession_number
    ds.ReferringPhysicianName = order.referring_physician_name
    ds.RequestingPhysician = order.requesting_physician
    ds.RequestedProcedureID = order.requested_procedure_id
    ds.RequestedProcedureDescription = order.requested_procedure_description
    ds.RequestedProcedureCodeSequence = Sequence(_code(order))
    ds.ReasonForTheRequestedProcedure = order.reason_for_the_requested_procedure[:64]
    ds.StudyInstanceUID = order.study_instance_uid
    ds.ReferencedStudySequence = Sequence()
    step = Dataset()
    step.ScheduledStationAETitle = order.scheduled_station_ae_title
    step.ScheduledProcedureStepStartDate = order.scheduled_procedure_step_start_date
    step.ScheduledProcedureStepStartTime = order.scheduled_procedure_step_start_time
    step.Modality = order.modality
    step.ScheduledPerformingPhysicianName = order.scheduled_performing_physician_name
    step.ScheduledProcedureStepDescription = order.scheduled_procedure_step_description
    step.ScheduledProtocolCodeSequence = Sequence(_code(order))
    step.ScheduledStationName = order.scheduled_station_name
    step.ScheduledProcedureStepLocation = ""
    step.ScheduledProcedureStepID = order.scheduled_procedure_step_id
    step.ScheduledProcedureStepStatus = SPS_STATUS.get(order.status, "")
    ds.ScheduledProcedureStepSequence = Sequence([step])
    return ds


def _code(order: Order) -> list[Dataset]:
    code = order.requested_procedure_code
    if code is None:
        return []
    item = Dataset()
    item.CodeValue = code.code_value
    item.CodingSchemeDesignator = code.coding_scheme_designator
    item.CodeMeaning = code.code_meaning
    return [item]


def project(full: Dataset, request: Dataset, *, top: bool = True) -> Dataset:
    """The response to ``request``: exactly its keys, valued from ``full`` (zero length
    when VNA holds no value); a sequence asked for with an item is projected on it."""
    out = Dataset()
    for elem in request:
        if elem.keyword == "SpecificCharacterSet" or elem.tag.group == 0x0000:
            continue
        if elem.tag in full:
            held = full[elem.tag]
            if held.VR == "SQ" and elem.VR == "SQ" and elem.value:
                items = [project(item, elem.value[0], top=False) for item in held.value]
                out.add(DataElement(elem.tag, "SQ", Sequence(items)))
            else:
                out.add(held)
        else:
            out.add(DataElement(elem.tag, elem.VR, Sequence() if elem.VR == "SQ" else None))
    if top:
        out.SpecificCharacterSet = full.get("SpecificCharacterSet", "ISO_IR 192")
    return out


def find_worklist_items(identifier: Dataset, *, store: WorklistStore) -> Iterator[Dataset]:
    """The worklist items matching ``identifier``, each with the keys it asked for."""
    query = build_worklist_query(identifier)
    with store.transaction() as tx:
        orders = tx.find_orders(statuses=ON_WORKLIST)
        patients: dict[tuple[str, str], RisPatient | None] = {}
        for order in orders:
            key = (order.patient_id, order.issuer_of_patient_id)
            if key not in patients:
                patients[key] = tx.get_patient(*key)
    for order in orders:
        patient = patients[(order.patient_id, order.issuer_of_patient_id)]
        if step_matches(query, order, patient):
            yield project(worklist_item(order, patient), identifier)
