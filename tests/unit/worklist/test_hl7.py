"""HL7 order intake on the in-memory store: ACK/NAK, mapping, atomicity, exactly-once."""

from __future__ import annotations

import pytest

from vna.testing.hl7msgs import ack_code, ack_field, adt_message, order_message, segment
from vna.worklist.hl7 import Hl7Context, decode, frame, handle_hl7, read_frames
from vna.worklist.memory import MemoryWorklistStore
from vna.worklist.model import Order, OrderStatus
from vna.worklist.orders import undo_merge


@pytest.fixture
def store() -> MemoryWorklistStore:
    return MemoryWorklistStore()


def send(store: MemoryWorklistStore, message: str) -> str:
    return handle_hl7(message, ctx=Hl7Context(store=store))


def orders(store: MemoryWorklistStore) -> list[Order]:
    with store.transaction() as tx:
        return tx.find_orders()


def test_orm_new_order_maps_ihe_fields(store: MemoryWorklistStore) -> None:
    ack = send(store, order_message(accession="A1", requested_procedure_id="RP7",
                                    step_id="S9", modality="MR", start="202401021030",
                                    study_uid="1.2.826.0.1.3680043.2.1"))
    assert ack_code(ack) == "AA"
    [o] = orders(store)
    assert (o.accession_number, o.requested_procedure_id, o.scheduled_procedure_step_id) == (
        "A1", "RP7", "S9")
    assert o.modality == "MR"
    assert (o.scheduled_procedure_step_start_date, o.scheduled_procedure_step_start_time) == (
        "20240102", "1030")
    assert o.study_instance_uid == "1.2.826.0.1.3680043.2.1"
    assert o.requested_procedure_code is not None
    assert o.requested_procedure_code.code_value == "CTCHEST"
    assert o.referring_physician_name == "WHO^DR"
    with store.transaction() as tx:
        patient = tx.get_patient("PAT001", "HOSP")
    assert patient is not None and patient.patient_name == "DOE^JANE"


def test_omi_uses_ipc_and_tq1(store: MemoryWorklistStore) -> None:
    ack = send(store, order_message(omi=True, accession="A2", station_ae="CT_ROOM1",
                                    start="20240103081500", study_uid="1.2.3.4.5"))
    assert ack_code(ack) == "AA"
    [o] = orders(store)
    assert o.scheduled_station_ae_title == "CT_ROOM1"
    assert o.scheduled_procedure_step_start_time == "081500"
    assert o.study_instance_uid == "1.2.3.4.5"


def test_study_uid_generated_up_front_when_ris_sends_none(store: MemoryWorklistStore) -> None:
    send(store, order_message(accession="A3"))
    [o] = orders(store)
    assert o.study_instance_uid.startswith("2.25.")


def test_same_control_id_is_applied_once(store: MemoryWorklistStore) -> None:
    message = order_message(accession="A4", control_id="DUP1")
    assert ack_code(send(store, message)) == "AA"
    second = send(store, message)
    assert ack_code(second) == "AA"
    assert "duplicate" in ack_field(second, "MSA", 3)
    assert len(orders(store)) == 1


def test_duplicate_order_under_new_control_id_is_an_error(store: MemoryWorklistStore) -> None:
    send(store, order_message(accession="A5"))
    nak = send(store, order_message(accession="A5"))
    assert ack_code(nak) == "AE"
    assert "205" in ack_field(nak, "ERR", 1)  # v2.3.1: ERR-1 carries the code


def test_change_and_cancel(store: MemoryWorklistStore) -> None:
    send(store, order_message(accession="A6", modality="CT"))
    uid = orders(store)[0].study_instance_uid
    assert ack_code(send(store, order_message(control="XO", accession="A6",
                                              modality="MR"))) == "AA"
    [o] = orders(store)
    assert o.modality == "MR" and o.study_instance_uid == uid
    assert ack_code(send(store, order_message(control="CA", accession="A6"))) == "AA"
    assert orders(store)[0].status is OrderStatus.CANCELLED
    # A cancelled order can no longer change.
    assert ack_code(send(store, order_message(control="XO", accession="A6"))) == "AE"


def test_change_of_unknown_order_is_refused(store: MemoryWorklistStore) -> None:
    nak = send(store, order_message(control="XO", accession="NOPE", omi=True))
    assert ack_code(nak) == "AE"
    assert ack_field(nak, "ERR", 3).startswith("204^")


def test_malformed_message_is_refused_and_nothing_applied(store: MemoryWorklistStore) -> None:
    good = order_message(accession="A7")
    # Second ORC/OBR group lacks its accession: the whole message must be refused.
    bad_group = "\r".join([
        segment("ORC", {1: "NW", 2: "PL2"}),
        segment("OBR", {1: "2", 2: "PL2", 4: "X^Y", 19: "RP2", 20: "S2", 24: "CT"}),
    ]) + "\r"
    nak = send(store, good + bad_group)
    assert ack_code(nak) == "AE"
    assert "OBR^2^18" in ack_field(nak, "ERR", 1)
    assert orders(store) == []
    with store.transaction() as tx:
        assert tx.get_patient("PAT001", "HOSP") is None
        assert any(r.action == "hl7.refused" for r in tx.audit_trail())


@pytest.mark.parametrize("text,code", [
    ("hello", "AR"),
    ("MSH|^~\\&|RIS|H|VNA|H|2024||ORU^R01|X1|P|2.5\rPID|||1\r", "AR"),
    ("MSH|^~\\&|RIS|H|VNA|H|2024||ADT^A99|X2|P|2.5\rPID|||1\r", "AR"),
    ("MSH|^~\\&|RIS|H|VNA|H|2024||ADT^A08|X3|P|3.0\rPID|||1\r", "AR"),
    ("MSH|^~\\&|RIS|H|VNA|H|2024||ADT^A08|X4|P|2.5\r", "AE"),
    ("MSH|^~\\&|RIS|H|VNA|H|2024||ORM^O01|X5|P|2.3\rPID|||1\rORC|ZZ|1\rOBR|1\r", "AE"),
    ("MSH|^~\\&|RIS|H|VNA|H|2024||ADT^A01||P|2.5\rPID|||1\r", "AE"),
])
def test_refusals(store: MemoryWorklistStore, text: str, code: str) -> None:
    ack = send(store, text)
    assert ack_code(ack) == code
    assert ack_field(ack, "MSA", 3)  # a reason is always given


def test_adt_updates_patient_and_merge_can_be_undone(store: MemoryWorklistStore) -> None:
    send(store, adt_message("A01", patient_id="OLD", name="ROE^RICHARD"))
    send(store, order_message(patient_id="OLD", accession="A8"))
    assert ack_code(send(store, adt_message("A08", patient_id="OLD",
                                            name="ROE^RICK"))) == "AA"
    with store.transaction() as tx:
        p = tx.get_patient("OLD", "HOSP")
        assert p is not None and p.patient_name == "ROE^RICK"
    ack = send(store, adt_message("A40", patient_id="NEW", prior_patient_id="OLD"))
    assert ack_code(ack) == "AA"
    assert orders(store)[0].patient_id == "NEW"
    with store.transaction() as tx:
        merge_id = next(r.detail for r in tx.audit_trail() if r.action == "patient.merged")
        merge_id = merge_id.split("merge=")[1].split()[0]
        undo_merge(merge_id, tx=tx, actor="test")
    assert orders(store)[0].patient_id == "OLD"
    # An order for the merged-away patient is refused while the merge stands.
    send(store, adt_message("A40", patient_id="NEW", prior_patient_id="OLD"))
    nak = send(store, order_message(patient_id="OLD", accession="A9"))
    assert ack_code(nak) == "AE"


def test_mllp_framing_round_trip() -> None:
    buffer = bytearray(frame("MSH|a\rPID|b\r") + frame("MSH|c\r")[:5])
    [one] = read_frames(buffer)
    assert decode(one) == "MSH|a\rPID|b\r"
    assert bytes(buffer) == frame("MSH|c\r")[:5]


def _with_charset(message: str, charset: str) -> str:
    """``message`` with MSH-18 (character set) set."""
    msh, rest = message.split("\r", 1)
    fields = msh.split("|")
    fields += [""] * (18 - len(fields))
    fields[17] = charset  # MSH-n is fields[n - 1]: MSH-1 is the separator itself
    return "|".join(fields) + "\r" + rest


@pytest.mark.parametrize(("charset", "codec", "name"), [
    ("8859/1", "latin-1", "MÜLLER^JÖRG"),
    ("8859/2", "iso8859-2", "DVOŘÁK^ANTONÍN"),
    ("8859/5", "iso8859-5", "ИВАНОВ^ИВАН"),
    ("UNICODE UTF-8", "utf-8", "ŁUKASZ^ŻÓŁW"),
    ("ISO IR87", "iso2022_jp", "山田^太郎"),
])
def test_msh18_names_the_character_set(store: MemoryWorklistStore, charset: str, codec: str,
                                       name: str) -> None:
    message = _with_charset(order_message(accession="CS1", patient_name=name), charset)
    payload = read_frames(bytearray(b"\x0b" + message.encode(codec) + b"\x1c\r"))[0]
    text = decode(payload)
    assert name in text
    assert ack_code(send(store, text)) == "AA"
    [o] = orders(store)
    with store.transaction() as tx:
        patient = tx.get_patient(o.patient_id, o.issuer_of_patient_id)
    assert patient is not None and patient.patient_name == name


def test_without_msh18_utf8_or_latin1_is_recognised() -> None:
    message = order_message(accession="CS2", patient_name="MÜLLER^JÖRG")
    for codec in ("utf-8", "latin-1"):
        assert "MÜLLER^JÖRG" in decode(message.encode(codec))
    # A wrong label does not garble what is valid UTF-8.
    mislabelled = _with_charset(message, "ISO IR87").encode("utf-8")
    assert "MÜLLER^JÖRG" in decode(mislabelled)
