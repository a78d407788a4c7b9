"""HL7 v2 order intake: MLLP framing, message parsing, IHE Scheduled Workflow mapping, ACKs.

ORM^O01 and OMI^O23 (ORC-1 NW new, XO change, CA cancel, DC discontinue),
ADT^A01/A04/A08 (register, update) and ADT^A40 (merge). Field mapping follows
IHE RAD Scheduled Workflow for HL7 v2.3.1 (OBR) and v2.5.1 (IPC, TQ1):

======================  ==========================  ==================
DICOM                   v2.3.1 ORM                  v2.5.1 OMI
======================  ==========================  ==================
AccessionNumber         OBR-18                      IPC-1
RequestedProcedureID    OBR-19                      IPC-2
StudyInstanceUID        ZDS-1 (else generated)      IPC-3 (else ZDS-1)
SPS ID                  OBR-20                      IPC-4
Modality                OBR-24                      IPC-5
Station AE / name       (none)                      IPC-9 / IPC-8
SPS start               OBR-27.4                    TQ1-7 (else OBR-27.4)
======================  ==========================  ==================

A message is applied in one worklist transaction; a message whose sender and
control id (MSH-3, MSH-4, MSH-10) were already applied is acknowledged again
without being applied twice.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import hl7
from pydantic import ValidationError

from vna.ports import Unavailable
from vna.worklist.model import CodedEntry, OrderStatus
from vna.worklist.orders import (
    OrderError,
    OrderErrorKind,
    OrderRequest,
    PatientDemographics,
    UidFactory,
    cancel_orders,
    change_order,
    merge_patients,
    new_study_uid,
    place_order,
    register_patient,
)
from vna.worklist.ports import IndexCorrections, WorklistStore, WorklistTx

log = logging.getLogger("vna.worklist.hl7")

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
MAX_MESSAGE = 4 << 20
"""Bytes one HL7 message may take; a sender exceeding it is disconnected."""

# HL7 table 0357: message error condition codes.
SEGMENT_SEQUENCE_ERROR = "100"
REQUIRED_FIELD_MISSING = "101"
DATA_TYPE_ERROR = "102"
TABLE_VALUE_NOT_FOUND = "103"
UNSUPPORTED_MESSAGE_TYPE = "200"
UNSUPPORTED_EVENT_CODE = "201"
UNSUPPORTED_VERSION_ID = "203"
UNKNOWN_KEY_IDENTIFIER = "204"
DUPLICATE_KEY_IDENTIFIER = "205"
APPLICATION_INTERNAL_ERROR = "207"

_ERROR_TEXT = {
    SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    REQUIRED_FIELD_MISSING: "Required field missing",
    DATA_TYPE_ERROR: "Data type error",
    TABLE_VALUE_NOT_FOUND: "Table value not found",
    UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    UNSUPPORTED_VERSION_ID: "Unsupported version id",
    UNKNOWN_KEY_IDENTIFIER: "Unknown key identifier",
    DUPLICATE_KEY_IDENTIFIER: "Duplicate key identifier",
    APPLICATION_INTERNAL_ERROR: "Application internal error",
}

SUPPORTED = {
    ("ORM", "O01"), ("OMI", "O23"),
    ("ADT", "A01"), ("ADT", "A04"), ("ADT", "A08"), ("ADT", "A40"),
}


class Hl7Refused(Exception):
    """The message is not applied; ``ack_code`` AE (content) or AR (cannot be processed)."""

    def __init__(self, ack_code: str, error_code: str, reason: str, location: str = "") -> None:
        super().__init__(reason)
        self.ack_code = ack_code
        self.error_code = error_code
        self.reason = reason
        self.location = location


# ------------------------------------------------------------------ MLLP framing
def frame(message: str) -> bytes:
    """One message in MLLP framing: <VT> message <FS><CR>."""
    return VT + message.encode("utf-8") + FS + CR


def read_frames(buffer: bytearray) -> list[bytes]:
    """Take every complete MLLP frame out of ``buffer`` (what remains is incomplete)."""
    out: list[bytes] = []
    while True:
        end = buffer.find(FS + CR)
        if end < 0:
            return out
        start = buffer.find(VT, 0, end)
        payload = bytes(buffer[start + 1 : end]) if start >= 0 else bytes(buffer[:end])
        del buffer[: end + 2]
        out.append(payload)


# HL7 table 0211 (MSH-18, character set) -> Python codec.
_CHARSETS = {
    "ASCII": "ascii", "8859/1": "latin-1", "8859/2": "iso8859-2", "8859/3": "iso8859-3",
    "8859/4": "iso8859-4", "8859/5": "iso8859-5", "8859/6": "iso8859-6",
    "8859/7": "iso8859-7", "8859/8": "iso8859-8", "8859/9": "iso8859-9",
    "8859/15": "iso8859-15", "ISO IR87": "iso2022_jp", "ISO IR159": "iso2022_jp_2",
    "GB 18030-2000": "gb18030", "KS X 1001": "euc_kr", "BIG-5": "big5",
}


def message_charset(payload: bytes) -> str | None:
    """The codec MSH-18 names (its first repetition), None when absent or unknown.

    MSH itself is ASCII in every character set HL7 v2 allows, so it is read as bytes.
    """
    msh = payload.lstrip(b"\r\n").split(b"\r", 1)[0].split(b"\n", 1)[0]
    if not msh.startswith(b"MSH") or len(msh) < 8:
        return None
    fields = msh.decode("ascii", "replace").split(msh[3:4].decode("ascii", "replace"))
    # fields[0] is "MSH", fields[1] the encoding characters (MSH-2): MSH-n is fields[n-1].
    if len(fields) < 18:
        return None
    repetition = fields[1][1:2] or "~"
    name = fields[17].split(repetition)[0].strip().upper()
    return _CHARSETS.get(name)


def decode(payload: bytes) -> str:
    """HL7 text from wire bytes: in the character set MSH-18 names; without one, UTF-8
    when it is, ISO 8859-1 (the v2 default) otherwise."""
    codec = message_charset(payload)
    text: str | None = None
    if codec is not None:
        try:
            text = payload.decode(codec)
        except UnicodeDecodeError:
            text = None  # mislabelled: fall back to the guess below
    if text is None:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            text = payload.decode("latin-1")
    # Segments end with CR; tolerate senders that use LF or CRLF.
    return text.replace("\r\n", "\r").replace("\n", "\r").strip("\r") + "\r"


# ------------------------------------------------------------------ reading fields
@dataclass
class Segment:
    name: str
    fields: list[str]
    """Raw (escaped) fields, index = HL7 field number (MSH-1 is the field separator)."""
    index: int
    """1-based position among segments with the same name (for error locations)."""


@dataclass
class Message:
    """A parsed message: its segments and the separators to split its fields with."""

    parsed: Any
    segments: list[Segment]
    component: str = "^"
    repetition: str = "~"
    subcomponent: str = "&"

    def first(self, name: str) -> Segment | None:
        return next((s for s in self.segments if s.name == name), None)

    def value(self, seg: Segment | None, number: int, component: int = 1,
              repetition: int = 1, subcomponent: int = 1) -> str:
        """One (unescaped) value; '' when absent. Numbers are 1-based, as HL7 counts."""
        if seg is None or number >= len(seg.fields):
            return ""
        reps = seg.fields[number].split(self.repetition)
        if repetition > len(reps):
            return ""
        comps = reps[repetition - 1].split(self.component)
        if component > len(comps):
            return ""
        subs = comps[component - 1].split(self.subcomponent)
        if subcomponent > len(subs):
            return ""
        raw = subs[subcomponent - 1]
        return str(self.parsed.unescape(raw)).strip() if raw else ""

    def components(self, seg: Segment | None, number: int, repetition: int = 1) -> list[str]:
        if seg is None or number >= len(seg.fields):
            return []
        reps = seg.fields[number].split(self.repetition)
        if repetition > len(reps):
            return []
        return [
            str(self.parsed.unescape(c.split(self.subcomponent)[0])).strip()
            for c in reps[repetition - 1].split(self.component)
        ]


def parse(text: str) -> Message:
    """Split ``text`` into segments; refuse what is not an HL7 v2 message."""
    if not text.startswith("MSH") or len(text) < 8:
        raise Hl7Refused("AR", SEGMENT_SEQUENCE_ERROR, "message does not start with MSH",
                         "MSH^1")
    try:
        parsed = hl7.parse(text)
    except Exception as exc:
        raise Hl7Refused("AR", SEGMENT_SEQUENCE_ERROR, f"not an HL7 v2 message: {exc}") from exc
    field_sep = text[3]
    encoding = text[4:8].split(field_sep)[0]
    message = Message(parsed=parsed, segments=[])
    if len(encoding) >= 3:
        message.component, message.repetition = encoding[0], encoding[1]
        message.subcomponent = encoding[3] if len(encoding) > 3 else "&"
    counts: dict[str, int] = {}
    for raw in text.split("\r"):
        if not raw.strip():
            continue
        name = raw[:3]
        if len(raw) > 3 and raw[3] != field_sep:
            raise Hl7Refused("AE", SEGMENT_SEQUENCE_ERROR, f"malformed segment {raw[:8]!r}")
        parts = raw.split(field_sep)
        # MSH-1 is the separator itself: shift so that field numbers are HL7's.
        fields = [name, field_sep, *parts[1:]] if name == "MSH" else parts
        counts[name] = counts.get(name, 0) + 1
        message.segments.append(Segment(name, fields, counts[name]))
    return message


# ------------------------------------------------------------------ conversions
def person_name(parts: list[str]) -> str:
    """HL7 XPN (family^given^middle^suffix^prefix) -> DICOM PN (family^given^middle^prefix^suffix).
    """
    parts = (parts + [""] * 5)[:5]
    family, given, middle, suffix, prefix = parts
    return "^".join([family, given, middle, prefix, suffix]).rstrip("^")


def _ts(value: str, location: str) -> tuple[str, str]:
    """HL7 TS/DTM -> (DA, TM); time zones are dropped (the worklist runs on local time)."""
    value = value.split("+")[0].split("-")[0]
    digits = value.split(".")[0]
    if not value:
        return "", ""
    if len(digits) < 8 or not digits.isdigit():
        raise Hl7Refused("AE", DATA_TYPE_ERROR, f"{value!r} is not a date/time", location)
    return digits[:8], value[8:]


def _required(value: str, location: str, what: str) -> str:
    if not value:
        raise Hl7Refused("AE", REQUIRED_FIELD_MISSING, f"{what} is missing", location)
    return value


def _patient(msg: Message, seg: Segment | None, location: str = "PID") -> PatientDemographics:
    if seg is None:
        raise Hl7Refused("AE", SEGMENT_SEQUENCE_ERROR, f"{location} segment is missing", location)
    patient_id = _required(msg.value(seg, 3), f"{seg.name}^{seg.index}^3", "patient identifier")
    birth, _ = _ts(msg.value(seg, 7), f"{seg.name}^{seg.index}^7")
    sex = msg.value(seg, 8)
    try:
        return PatientDemographics(
            patient_id=patient_id,
            issuer_of_patient_id=msg.value(seg, 3, 4),
            patient_name=person_name(msg.components(seg, 5)),
            patient_birth_date=birth,
            # HL7 table 0001 has more sexes than DICOM's M/F/O.
            patient_sex=sex if sex in ("M", "F", "O") else ("O" if sex else ""),
        )
    except ValidationError as exc:
        raise Hl7Refused("AE", DATA_TYPE_ERROR, _first_error(exc), f"{seg.name}^{seg.index}") \
            from exc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}"


_LOCATION = {
    "accession_number": ("OBR", 18, "IPC", 1),
    "requested_procedure_id": ("OBR", 19, "IPC", 2),
    "scheduled_procedure_step_id": ("OBR", 20, "IPC", 4),
    "modality": ("OBR", 24, "IPC", 5),
    "scheduled_station_ae_title": ("IPC", 9, "IPC", 9),
    "scheduled_procedure_step_start_date": ("OBR", 27, "TQ1", 7),
    "scheduled_procedure_step_start_time": ("OBR", 27, "TQ1", 7),
}


@dataclass
class _OrderGroup:
    orc: Segment
    obr: Segment | None = None
    tq1: Segment | None = None
    ipcs: list[Segment] = field(default_factory=list)
    zds: Segment | None = None


def _order_groups(msg: Message) -> list[_OrderGroup]:
    groups: list[_OrderGroup] = []
    for seg in msg.segments:
        if seg.name == "ORC":
            groups.append(_OrderGroup(orc=seg))
        elif seg.name in ("OBR", "TQ1", "IPC", "ZDS"):
            if not groups:
                raise Hl7Refused("AE", SEGMENT_SEQUENCE_ERROR, f"{seg.name} before any ORC",
                                 f"{seg.name}^{seg.index}")
            group = groups[-1]
            if seg.name == "OBR":
                group.obr = seg
            elif seg.name == "TQ1":
                group.tq1 = group.tq1 or seg
            elif seg.name == "IPC":
                group.ipcs.append(seg)
            else:
                group.zds = seg
    if not groups:
        raise Hl7Refused("AE", SEGMENT_SEQUENCE_ERROR, "no ORC segment", "ORC")
    return groups


def _order_requests(msg: Message, group: _OrderGroup, patient: PatientDemographics
                    ) -> list[OrderRequest]:
    obr, orc, pv1 = group.obr, group.orc, msg.first("PV1")
    if obr is None:
        raise Hl7Refused("AE", SEGMENT_SEQUENCE_ERROR, "ORC without OBR", f"ORC^{orc.index}")
    if group.tq1 is not None:
        start = msg.value(group.tq1, 7)
        date, time = _ts(start, f"TQ1^{group.tq1.index}^7")
    else:
        date, time = _ts(msg.value(obr, 27, 4), f"OBR^{obr.index}^27")
    service = msg.components(obr, 4)
    code = _procedure_code(msg, obr, service)
    common: dict[str, Any] = {
        "patient": patient,
        "placer_order_number": msg.value(orc, 2) or msg.value(obr, 2),
        "filler_order_number": msg.value(orc, 3) or msg.value(obr, 3),
        "requested_procedure_description": (code.code_meaning if code else "")[:64],
        "requested_procedure_code": code,
        "scheduled_procedure_step_description": (service[1] if len(service) > 1 else "")[:64],
        "scheduled_procedure_step_start_date": date,
        "scheduled_procedure_step_start_time": time,
        "study_instance_uid": msg.value(group.zds, 1),
        "referring_physician_name": person_name(msg.components(pv1, 8)[1:]),
        "requesting_physician": person_name(
            (msg.components(orc, 12) or msg.components(obr, 16))[1:]),
        "reason_for_the_requested_procedure": msg.value(obr, 31, 2) or msg.value(obr, 31),
        "admission_id": msg.value(pv1, 19),
        "current_patient_location": "^".join(c for c in msg.components(pv1, 3) if c)[:64],
    }
    rows: list[tuple[dict[str, Any], Segment | None]] = []
    if group.ipcs:
        for ipc in group.ipcs:
            rows.append(({
                "accession_number": msg.value(ipc, 1) or msg.value(obr, 18),
                "requested_procedure_id": msg.value(ipc, 2) or msg.value(obr, 19),
                "study_instance_uid": msg.value(ipc, 3) or common["study_instance_uid"],
                "scheduled_procedure_step_id": msg.value(ipc, 4) or msg.value(obr, 20),
                "modality": msg.value(ipc, 5) or msg.value(obr, 24),
                "scheduled_station_name": msg.value(ipc, 8),
                "scheduled_station_ae_title": msg.value(ipc, 9),
            }, ipc))
    else:
        rows.append(({
            "accession_number": msg.value(obr, 18),
            "requested_procedure_id": msg.value(obr, 19),
            "scheduled_procedure_step_id": msg.value(obr, 20),
            "modality": msg.value(obr, 24),
        }, None))
    out = []
    for values, source in rows:
        data = {**common, **{k: v for k, v in values.items() if k != "study_instance_uid"},
                "study_instance_uid": values.get("study_instance_uid",
                                                 common["study_instance_uid"])}
        try:
            out.append(OrderRequest(**data))
        except ValidationError as exc:
            err = exc.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else ""
            seg_name, number, ipc_name, ipc_number = _LOCATION.get(name, ("OBR", 0, "IPC", 0))
            if source is not None and ipc_name == "IPC":
                location = f"IPC^{source.index}^{ipc_number}"
            else:
                location = f"{seg_name}^{obr.index}^{number}" if number else f"OBR^{obr.index}"
            missing = err["type"] in ("string_too_short", "missing")
            raise Hl7Refused("AE", REQUIRED_FIELD_MISSING if missing else DATA_TYPE_ERROR,
                             _first_error(exc), location) from exc
    return out


def _procedure_code(msg: Message, obr: Segment, service: list[str]) -> CodedEntry | None:
    # OBR-44 (v2.5 procedure code) when sent; else the alternate identifier of OBR-4
    # (components 4-6), which IHE maps to the requested procedure; else components 1-3.
    for parts in (msg.components(obr, 44), service[3:6], service[:3]):
        if parts and parts[0]:
            parts = ([*parts, "", "", ""])[:3]
            return CodedEntry(code_value=parts[0][:16], code_meaning=parts[1][:64],
                              coding_scheme_designator=parts[2][:16])
    return None


# ------------------------------------------------------------------ applying
@dataclass
class Hl7Context:
    """Dependencies of ``handle_hl7``."""

    store: WorklistStore
    corrections: IndexCorrections | None = None
    new_uid: UidFactory = new_study_uid
    application: str = "VNA"
    facility: str = ""


def _merge_parties(msg: Message) -> tuple[PatientDemographics, PatientDemographics]:
    """(prior, surviving) patient of an ADT^A40."""
    patient = _patient(msg, msg.first("PID"))
    mrg = msg.first("MRG")
    if mrg is None:
        raise Hl7Refused("AE", SEGMENT_SEQUENCE_ERROR, "MRG segment is missing", "MRG")
    prior = PatientDemographics(
        patient_id=_required(msg.value(mrg, 1), "MRG^1^1", "prior patient identifier"),
        issuer_of_patient_id=msg.value(mrg, 1, 4),
    )
    return prior, patient


def _apply(msg: Message, kind: tuple[str, str], tx: WorklistTx, ctx: Hl7Context,
           actor: str, index_merge_ref: str = "") -> str:
    message_type, trigger = kind
    pid = msg.first("PID")
    if message_type == "ADT":
        if trigger == "A40":
            prior, survivor = _merge_parties(msg)
            merge = merge_patients(prior, survivor, tx=tx, index_merge_ref=index_merge_ref,
                                   actor=actor)
            return f"merged ({len(merge.moved_order_ids)} orders moved)"
        register_patient(_patient(msg, pid), tx=tx, actor=actor)
        return "patient registered"
    patient = _patient(msg, pid)
    applied = 0
    for group in _order_groups(msg):
        control = msg.value(group.orc, 1)
        if control in ("NW", "XO"):
            for request in _order_requests(msg, group, patient):
                if control == "NW":
                    place_order(request, tx=tx, actor=actor, new_uid=ctx.new_uid)
                else:
                    change_order(request, tx=tx, actor=actor)
                applied += 1
        elif control in ("CA", "DC"):
            obr = group.obr
            ipc = group.ipcs[0] if group.ipcs else None
            cancelled = cancel_orders(
                tx=tx,
                accession_number=msg.value(ipc, 1) or msg.value(obr, 18),
                placer_order_number=msg.value(group.orc, 2) or msg.value(obr, 2),
                requested_procedure_id=msg.value(ipc, 2) or msg.value(obr, 19),
                scheduled_procedure_step_id=msg.value(ipc, 4) or msg.value(obr, 20),
                status=OrderStatus.CANCELLED if control == "CA" else OrderStatus.DISCONTINUED,
                actor=actor,
            )
            applied += len(cancelled)
        elif not control:
            raise Hl7Refused("AE", REQUIRED_FIELD_MISSING, "order control is missing",
                             f"ORC^{group.orc.index}^1")
        else:
            raise Hl7Refused("AE", TABLE_VALUE_NOT_FOUND,
                             f"order control {control!r} is not supported",
                             f"ORC^{group.orc.index}^1")
    return f"{applied} order step(s) applied"


def handle_hl7(text: str, *, ctx: Hl7Context, peer: str = "") -> str:
    """Apply one HL7 message; returns the ACK (AA) or NAK (AE/AR) to send back."""
    msg: Message | None = None
    try:
        msg = parse(text)
        msh = msg.segments[0]
        kind = (msg.value(msh, 9, 1), msg.value(msh, 9, 2))
        control_id = _required(msg.value(msh, 10), "MSH^1^10", "message control id")
        version = msg.value(msh, 12)
        if not version.startswith("2."):
            raise Hl7Refused("AR", UNSUPPORTED_VERSION_ID, f"version {version!r} not supported",
                             "MSH^1^12")
        if kind[0] not in {t for t, _ in SUPPORTED}:
            raise Hl7Refused("AR", UNSUPPORTED_MESSAGE_TYPE,
                             f"message type {kind[0]!r} not supported", "MSH^1^9")
        if kind not in SUPPORTED:
            raise Hl7Refused("AR", UNSUPPORTED_EVENT_CODE,
                             f"event {kind[0]}^{kind[1]} not supported", "MSH^1^9")
        sender = f"{msg.value(msh, 3)}|{msg.value(msh, 4)}"
        key = f"{sender}|{control_id}"
        actor = f"hl7:{msg.value(msh, 3) or peer}"
        with ctx.store.transaction() as tx:
            seen = tx.message_ack(key) is not None
        if seen:
            log.info("HL7 duplicate acknowledged",
                     extra={"control_id": control_id, "message_type": "^".join(kind)})
            return build_ack(msg, "AA", "duplicate message, already applied", ctx=ctx)
        index_ref = _merge_in_index(msg, ctx, actor) if kind == ("ADT", "A40") else ""
        try:
            with ctx.store.transaction() as tx:
                if tx.message_ack(key) is not None:
                    # A concurrent delivery of the same message won the race.
                    raise _AlreadyApplied
                try:
                    text_out = _apply(msg, kind, tx, ctx, actor, index_ref)
                except OrderError as exc:
                    code = {OrderErrorKind.UNKNOWN: UNKNOWN_KEY_IDENTIFIER,
                            OrderErrorKind.CONFLICT: DUPLICATE_KEY_IDENTIFIER,
                            OrderErrorKind.INVALID: DATA_TYPE_ERROR}[exc.kind]
                    raise Hl7Refused("AE", code, exc.reason, exc.location) from exc
                tx.record_message(key, "^".join(kind), "AA")
        except _AlreadyApplied:
            if index_ref and ctx.corrections is not None:
                ctx.corrections.unmerge_patients(index_ref, actor=actor)
            return build_ack(msg, "AA", "duplicate message, already applied", ctx=ctx)
        except BaseException:
            # Never half-applied: the index's side of a merge is undone with the rest.
            if index_ref and ctx.corrections is not None:
                ctx.corrections.unmerge_patients(index_ref, actor=actor)
            raise
        log.info("HL7 applied", extra={"control_id": control_id,
                                       "message_type": "^".join(kind)})
        return build_ack(msg, "AA", text_out, ctx=ctx)
    except Hl7Refused as exc:
        _audit_refusal(ctx, exc, msg, peer)
        # The reason may quote values from the message: it goes to the ACK and the audit
        # trail, not to the log.
        log.warning("HL7 refused: %s %s at %s", exc.ack_code, exc.error_code,
                    exc.location or "-")
        return build_ack(msg, exc.ack_code, exc.reason, ctx=ctx, error_code=exc.error_code,
                         location=exc.location)
    except Unavailable as exc:
        log.warning("HL7 not applied, store unavailable: %s", exc)
        return build_ack(msg, "AR", "worklist store unavailable, send again later", ctx=ctx,
                         error_code=APPLICATION_INTERNAL_ERROR)


class _AlreadyApplied(Exception):
    pass


def _merge_in_index(msg: Message, ctx: Hl7Context, actor: str) -> str:
    """The index's side of ADT^A40, done first so that a refusal there refuses the message."""
    if ctx.corrections is None:
        return ""
    prior, survivor = _merge_parties(msg)
    try:
        return ctx.corrections.merge_patients(
            prior.patient_id, prior.issuer_of_patient_id, survivor.patient_id,
            survivor.issuer_of_patient_id, actor=actor)
    except Unavailable:
        raise
    except Exception as exc:
        raise Hl7Refused("AE", APPLICATION_INTERNAL_ERROR,
                         f"index refused the merge: {exc}") from exc


def _audit_refusal(ctx: Hl7Context, exc: Hl7Refused, msg: Message | None, peer: str) -> None:
    control_id = msg.value(msg.segments[0], 10) if msg and msg.segments else ""
    try:
        with ctx.store.transaction() as tx:
            tx.audit("hl7.refused", exc.ack_code, actor=f"hl7:{peer}",
                     subject=f"hl7:{control_id}", detail=f"{exc.error_code} {exc.reason}")
    except Unavailable:
        log.warning("audit of an HL7 refusal could not be recorded")


def build_ack(msg: Message | None, code: str, text: str, *, ctx: Hl7Context,
              error_code: str = "", location: str = "") -> str:
    """ACK with MSA (code, control id, text) and, for AE/AR, an ERR segment."""
    msh = msg.segments[0] if msg and msg.segments else None

    def value(number: int, component: int = 1) -> str:
        return msg.value(msh, number, component) if msg is not None else ""

    version = value(12) or "2.5.1"
    trigger = value(9, 2)
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    clean = _escape(text)[:80]
    segments = [
        "|".join(["MSH", "^~\\&", ctx.application, ctx.facility, value(3), value(4), stamp, "",
                  f"ACK^{trigger}^ACK" if trigger else "ACK", uuid.uuid4().hex[:20],
                  value(11) or "P", version]),
        "|".join(["MSA", code, value(10), clean]),
    ]
    if code != "AA":
        err = error_code or APPLICATION_INTERNAL_ERROR
        described = [err, _ERROR_TEXT.get(err, ""), "HL70357"]
        if version.startswith(("2.1", "2.2", "2.3", "2.4")):
            # Before v2.5, ERR-1 (ELD) is segment^sequence^field^code&text&table.
            where = ([*location.split("^"), "", "", ""])[:3]
            segments.append("ERR|" + "^".join([*where, "&".join(described)]))
        else:
            segments.append(f"ERR||{location}|{'^'.join(described)}|E||||{clean}")
    return "\r".join(segments) + "\r"


def _escape(text: str) -> str:
    return (text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
            .replace("&", "\\T\\").replace("~", "\\R\\").replace("\r", " ").replace("\n", " "))


# ------------------------------------------------------------------ the listener
Handler = Callable[[str, str], str]


class _MllpHandler(socketserver.BaseRequestHandler):
    server: MllpServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(self.server.idle_timeout)
        peer = f"{self.client_address[0]}"
        buffer = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, OSError):
                return
            if not chunk:
                return
            buffer.extend(chunk)
            if len(buffer) > MAX_MESSAGE:
                log.warning("HL7 sender exceeded %d bytes without a frame end", MAX_MESSAGE)
                return
            for payload in read_frames(buffer):
                ack = self.server.on_message(decode(payload), peer)
                try:
                    sock.sendall(frame(ack))
                except OSError:
                    return


class MllpServer(socketserver.ThreadingTCPServer):
    """HL7 over MLLP: one ACK per message, messages on one connection in order."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], on_message: Handler,
                 idle_timeout: float = 300.0) -> None:
        self.on_message = on_message
        self.idle_timeout = idle_timeout
        super().__init__(address, _MllpHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="hl7-mllp", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def start_hl7_listener(ctx: Hl7Context, host: str, port: int) -> MllpServer:
    """Listen for HL7 on ``host:port`` (0 picks a free port) in background threads."""
    server = MllpServer((host, port), lambda text, peer: handle_hl7(text, ctx=ctx, peer=peer))
    server.start()
    log.info("HL7 MLLP listening", extra={"port": server.port})
    return server


def send_hl7(host: str, port: int, message: str, timeout: float = 30.0) -> str:
    """Send one message over MLLP and return the acknowledgment (for tests and tools)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(frame(message))
        buffer = bytearray()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before the acknowledgment")
            buffer.extend(chunk)
            frames = read_frames(buffer)
            if frames:
                return decode(frames[0])
