"""Synthetic HL7 v2 messages for tests and demos (no real patient data)."""

from __future__ import annotations

import itertools

_counter = itertools.count(1)


def segment(name: str, fields: dict[int, str]) -> str:
    """A segment with ``fields`` at their HL7 field numbers (MSH-1 is the separator)."""
    last = max(fields, default=0)
    if name == "MSH":
        values = [fields.get(i, "") for i in range(3, last + 1)]
        return "MSH|^~\\&|" + "|".join(values)
    return "|".join([name, *(fields.get(i, "") for i in range(1, last + 1))])


def msh(message_type: str, control_id: str | None = None, version: str = "2.5.1",
        sender: str = "RIS") -> str:
    return segment("MSH", {3: sender, 4: "HOSP", 5: "VNA", 6: "HOSP", 7: "20240102080000",
                           9: message_type, 10: control_id or f"MSG{next(_counter):06d}",
                           11: "P", 12: version})


def pid(patient_id: str = "PAT001", name: str = "DOE^JANE", birth: str = "19700101",
        sex: str = "F", issuer: str = "HOSP") -> str:
    return segment("PID", {1: "1", 3: f"{patient_id}^^^{issuer}", 5: name, 7: birth, 8: sex})


def order_message(
    *,
    control: str = "NW",
    patient_id: str = "PAT001",
    patient_name: str = "DOE^JANE",
    accession: str = "ACC001",
    requested_procedure_id: str = "RP001",
    step_id: str = "SPS001",
    modality: str = "CT",
    start: str = "202401021000",
    station_ae: str = "",
    study_uid: str = "",
    placer: str = "",
    control_id: str | None = None,
    omi: bool = False,
    procedure: str = "CTCHEST^CT Chest^LOCAL",
    issuer: str = "HOSP",
) -> str:
    """ORM^O01 (v2.3.1) or OMI^O23 (v2.5.1, with TQ1 and IPC) for one step."""
    placer = placer or f"PL{accession}"
    segs = [
        msh("OMI^O23^OMI_O23" if omi else "ORM^O01", control_id,
            version="2.5.1" if omi else "2.3.1"),
        pid(patient_id, patient_name, issuer=issuer),
        segment("PV1", {2: "O", 3: "RAD^1^2", 8: "1234^WHO^DR", 19: "V" + accession}),
        segment("ORC", {1: control, 2: placer, 3: "F" + accession, 12: "99^ORDER^DOC"}),
        segment("OBR", {1: "1", 2: placer, 3: "F" + accession, 4: procedure,
                        18: "" if omi else accession, 19: "" if omi else requested_procedure_id,
                        20: "" if omi else step_id, 24: "" if omi else modality,
                        27: "" if omi else f"^^^{start}"}),
    ]
    if omi:
        segs.append(segment("TQ1", {1: "1", 7: start}))
        segs.append(segment("IPC", {1: accession, 2: requested_procedure_id, 3: study_uid,
                                    4: step_id, 5: modality, 9: station_ae}))
    elif study_uid:
        segs.append(segment("ZDS", {1: f"{study_uid}^VNA^Application^DICOM"}))
    return "\r".join(segs) + "\r"


def adt_message(trigger: str = "A08", *, patient_id: str = "PAT001", name: str = "DOE^JANE",
                birth: str = "19700101", sex: str = "F", prior_patient_id: str = "",
                control_id: str | None = None, issuer: str = "HOSP") -> str:
    segs = [msh(f"ADT^{trigger}", control_id), pid(patient_id, name, birth, sex, issuer)]
    if trigger == "A40":
        segs.append(segment("MRG", {1: f"{prior_patient_id}^^^{issuer}"}))
    return "\r".join(segs) + "\r"


def ack_code(ack: str) -> str:
    """MSA-1 of an acknowledgment."""
    for seg in ack.split("\r"):
        if seg.startswith("MSA|"):
            return seg.split("|")[1]
    raise ValueError("no MSA segment")


def ack_field(ack: str, segment_name: str, number: int) -> str:
    for seg in ack.split("\r"):
        if seg.startswith(segment_name + "|"):
            parts = seg.split("|")
            return parts[number] if number < len(parts) else ""
    return ""
