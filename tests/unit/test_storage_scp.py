"""The lean Storage SCP: what pynetdicom SCUs and raw peers see, over real sockets.

The archive's own end-to-end tests (storescu, malformed C-STOREs) run through it
too; these pin down the protocol edges: routing, fragmentation, aborts, limits."""

from __future__ import annotations

import io
import logging
import random
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pydicom
import pytest
from prometheus_client import REGISTRY
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    Verification,
)

from services.ingest.scp import build_ae
from services.ingest.storage import StorageReceiver, refusal
from tests.unit.conftest import Core
from vna.config import Settings
from vna.dicom import status
from vna.dicom.part10 import read_header
from vna.ports import ClaimOutcome
from vna.testing.synthetic import ct_instance
from vna.usecases.store import Received, StoreError, store_instance


class Scp:
    """A ``StorageReceiver`` on a loopback port; other associations are recorded."""

    def __init__(self, core: Core, *, max_associations: int = 64, max_pdu: int = 0,
                 network_timeout: float = 10) -> None:
        self.core = core
        self.outcomes: list[ClaimOutcome] = []
        self.elsewhere: list[bytes] = []
        deps = cast(Any, SimpleNamespace(settings=Settings(data_dir=core.tmp)))
        self.receiver = StorageReceiver(build_ae(deps), self.store, staging_dir=core.staging,
                                        network_timeout=network_timeout, max_pdu=max_pdu,
                                        max_associations=max_associations)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.ended = threading.Semaphore(0)
        threading.Thread(target=self._accept, daemon=True).start()

    def store(self, received: Received) -> tuple[int, str | None]:
        try:
            result = store_instance(received, blobs=self.core.blobs, index=self.core.index,
                                    staging_dir=self.core.staging)
        except StoreError as exc:
            return refusal(exc)
        self.outcomes.append(result.outcome)
        return status.SUCCESS, None

    def _elsewhere(self, conn: socket.socket, _address: Any) -> None:
        self.elsewhere.append(conn.recv(65536))
        conn.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, address = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.receiver.route, daemon=True,
                             args=(conn, address, self._elsewhere, self.ended.release)).start()

    def close(self) -> None:
        self.receiver.close()
        self.listener.close()


@pytest.fixture
def scp(core: Core) -> Iterator[Scp]:
    s = Scp(core)
    yield s
    s.close()


def _scu(*contexts: tuple[str, str]) -> AE:
    ae = AE(ae_title="MODALITY")
    for abstract, transfer in contexts:
        ae.add_requested_context(abstract, transfer)
    return ae


def _lean_count() -> float:
    return REGISTRY.get_sample_value("vna_dimse_associations_total", {"scp": "lean"}) or 0.0


def _data_set(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    return raw[read_header(io.BytesIO(raw)).dataset_offset:]


def test_stores_and_echoes_byte_for_byte(scp: Scp, core: Core) -> None:
    before = _lean_count()
    ds = ct_instance(rows=256, columns=256)
    assoc = _scu((CTImageStorage, ExplicitVRLittleEndian),
                 (Verification, ImplicitVRLittleEndian)).associate("127.0.0.1", scp.port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == status.SUCCESS
    rsp = assoc.send_c_store(ds)
    assert rsp.Status == status.SUCCESS
    assert assoc.send_c_store(ds).Status == status.SUCCESS  # the same again: a duplicate
    assoc.release()
    assert _lean_count() == before + 1
    assert scp.outcomes == [ClaimOutcome.NEW, ClaimOutcome.DUPLICATE]
    (key,) = list(core.blobs.keys())
    stored = core.blobs.open(key).read()
    assert stored[read_header(io.BytesIO(stored)).dataset_offset:] == _data_set(ds)
    assert not list(core.staging.iterdir())  # nothing left behind


def test_same_blob_key_as_the_general_store_path(scp: Scp, core: Core, tmp_path: Path) -> None:
    """One store path: a file stored from disk (STOW, pynetdicom) after the same
    data set came in over the lean SCP is a duplicate, not a second blob."""
    ds = ct_instance()
    assoc = _scu((CTImageStorage, ExplicitVRLittleEndian)).associate("127.0.0.1", scp.port)
    assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    path = tmp_path / "again.dcm"
    ds.save_as(path, enforce_file_format=True)
    again = store_instance(Received(path=path), blobs=core.blobs, index=core.index,
                           staging_dir=core.staging)
    assert again.outcome is ClaimOutcome.DUPLICATE
    assert len(list(core.blobs.keys())) == 1


def test_a_data_set_in_one_pdu_larger_than_128_mib_is_stored(scp: Scp, core: Core) -> None:
    """VNA sets no maximum PDU length, so a pynetdicom SCU sends a whole data set in
    one PDU: a 140 MiB multi-frame instance was aborted (a PDU over 128 MiB),
    and a smaller one held whole in memory. The PDU is now read as it comes."""
    ds = ct_instance(rows=512, columns=512)
    ds.NumberOfFrames = 280
    ds.PixelData = bytes(512 * 512 * 2 * 280)
    assoc = _scu((CTImageStorage, ExplicitVRLittleEndian)).associate("127.0.0.1", scp.port)
    assert assoc.acceptor.maximum_length == 0  # no maximum: one PDU, one PDV
    assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    (key,) = list(core.blobs.keys())
    with core.blobs.open(key) as fp:
        head = fp.read(1 << 16)
        fp.seek(0, io.SEEK_END)
        size = fp.tell()
    sent = _data_set(ds)
    assert size == read_header(io.BytesIO(head)).dataset_offset + len(sent)
    del ds, sent


def test_small_pdus_fragment_data_set_and_command(core: Core) -> None:
    """A 16 kB maximum PDU: the data set arrives in many fragments, and our responses
    fit the requester's own small maximum."""
    scp = Scp(core, max_pdu=16384)
    try:
        ds = ct_instance(rows=256, columns=256)  # 128 kB of pixels
        ae = _scu((CTImageStorage, ExplicitVRLittleEndian))
        ae.maximum_pdu_size = 4096
        assoc = ae.associate("127.0.0.1", scp.port)
        assert assoc.acceptor.maximum_length == 16384
        assert assoc.send_c_store(ds).Status == status.SUCCESS
        assoc.release()
        (key,) = list(core.blobs.keys())
        stored = core.blobs.open(key).read()
        assert stored.endswith(_data_set(ds))
    finally:
        scp.close()


def test_refusals_keep_the_association(scp: Scp, core: Core,
                                       caplog: pytest.LogCaptureFixture) -> None:
    ds = ct_instance()
    bad = ct_instance()
    bad.SOPInstanceUID = "1.2.abc"
    assoc = _scu((CTImageStorage, ExplicitVRLittleEndian)).associate("127.0.0.1", scp.port)
    rsp = assoc.send_c_store(bad)
    assert rsp.Status == status.INVALID_UID
    assert "SOP Instance UID" in rsp.ErrorComment
    changed = ct_instance(sop_uid=ds.SOPInstanceUID)
    changed.PatientName = "OTHER^NAME"
    assert assoc.send_c_store(ds).Status == status.SUCCESS
    rsp = assoc.send_c_store(changed)
    assert rsp.Status == status.DUPLICATE_SOP_INSTANCE_CONFLICT
    assert rsp.ErrorComment
    assert assoc.is_established
    with caplog.at_level(logging.INFO, logger="vna.ingest.storage"):
        assoc.release()
        assert scp.ended.acquire(timeout=10)
    assert len(list(core.blobs.keys())) == 1
    # One line per association for the operator: who sent, how many stored, refused.
    ended = [r for r in caplog.records if r.getMessage() == "storage association ended"]
    assert [(r.source_ae, r.stored, r.failed) for r in ended] == [("MODALITY", 1, 2)]


def test_other_services_go_to_pynetdicom(scp: Scp) -> None:
    before = _lean_count()
    ae = _scu((CTImageStorage, ExplicitVRLittleEndian),
              (PatientRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian))
    ae.acse_timeout = 2
    assoc = ae.associate("127.0.0.1", scp.port)
    assert not assoc.is_established
    assert scp.elsewhere and scp.elsewhere[0][0] == 0x01  # the request, left unread
    assert _lean_count() == before


# Raw peers: what a broken or hostile requester can do.

def _request(*contexts: tuple[int, str, str], max_pdu: int = 16384) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "RAW"
    primitive.called_ae_title = "VNA"
    primitive.presentation_context_definition_list = [
        build_context(abstract, [transfer]) for _, abstract, transfer in contexts]
    for (cid, _, _), cx in zip(contexts, primitive.presentation_context_definition_list,
                               strict=True):
        cx.context_id = cid
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    primitive.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _command(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _p_data(context_id: int, header: int, data: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, context_id, header) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def _store_rq(sop_uid: str) -> bytes:
    def ui(v: str) -> bytes:
        raw = v.encode()
        return raw + b"\x00" if len(raw) % 2 else raw
    return _command([(0x0002, ui(str(CTImageStorage))), (0x0100, struct.pack("<H", 1)),
                     (0x0110, struct.pack("<H", 7)), (0x0700, struct.pack("<H", 0)),
                     (0x0800, struct.pack("<H", 0)), (0x1000, ui(sop_uid))])


def _read_pdu(conn: socket.socket) -> tuple[int, bytes]:
    head = conn.recv(6, socket.MSG_WAITALL)
    if len(head) < 6:
        return 0, b""
    body = conn.recv(int.from_bytes(head[2:6], "big"), socket.MSG_WAITALL)
    return head[0], body


def _associated(scp: Scp) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", scp.port), timeout=10)
    conn.sendall(_request((1, str(CTImageStorage), ExplicitVRLittleEndian)))
    kind, _ = _read_pdu(conn)
    assert kind == 0x02  # A-ASSOCIATE-AC
    return conn


def _still_serving(scp: Scp) -> None:
    assoc = _scu((Verification, ImplicitVRLittleEndian)).associate("127.0.0.1", scp.port)
    assert assoc.send_c_echo().Status == status.SUCCESS
    assoc.release()


def test_c_store_rsp_as_ps3_7_has_it(scp: Scp, core: Core) -> None:
    ds = ct_instance()
    conn = _associated(scp)
    conn.sendall(_p_data(1, 0x03, _store_rq(ds.SOPInstanceUID)))
    data = _data_set(ds)
    conn.sendall(_p_data(1, 0x00, data[:500]) + _p_data(1, 0x02, data[500:]))
    kind, body = _read_pdu(conn)
    assert kind == 0x04
    assert body[4:6] == bytes((1, 0x03))  # context 1, command, last fragment
    command = pydicom.dataset.Dataset()
    rsp = pydicom.dcmread(io.BytesIO(body[6:]), force=True)
    command.update(rsp)
    assert command.CommandField == 0x8001
    assert command.MessageIDBeingRespondedTo == 7
    assert command.CommandDataSetType == 0x0101
    assert command.Status == status.SUCCESS
    assert command.AffectedSOPClassUID == CTImageStorage
    assert command.AffectedSOPInstanceUID == ds.SOPInstanceUID
    assert command.CommandGroupLength == len(body) - 6 - 12
    conn.close()
    assert len(list(core.blobs.keys())) == 1


def test_a_silent_peer_is_let_go_after_the_network_timeout(core: Core) -> None:
    scp = Scp(core, network_timeout=0.3)
    try:
        ds = ct_instance()
        conn = _associated(scp)
        conn.sendall(_p_data(1, 0x03, _store_rq(ds.SOPInstanceUID)))
        conn.sendall(_p_data(1, 0x00, _data_set(ds)[:1000]))  # then nothing more
        assert conn.recv(64) == b""  # the archive closed the association
        assert scp.ended.acquire(timeout=10)
        assert not list(core.blobs.keys())
        assert not list(core.staging.iterdir())
        _still_serving(scp)
    finally:
        scp.close()


def test_abort_inside_a_data_set_stores_nothing(scp: Scp, core: Core) -> None:
    ds = ct_instance()
    conn = _associated(scp)
    conn.sendall(_p_data(1, 0x03, _store_rq(ds.SOPInstanceUID)))
    conn.sendall(_p_data(1, 0x00, _data_set(ds)[:1000]))  # first fragment only
    conn.sendall(bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0)))  # A-ABORT
    conn.close()
    assert scp.ended.acquire(timeout=10)
    assert not list(core.blobs.keys())
    assert not list(core.staging.iterdir())
    _still_serving(scp)


def test_connection_lost_inside_a_data_set_stores_nothing(scp: Scp, core: Core) -> None:
    ds = ct_instance()
    conn = _associated(scp)
    conn.sendall(_p_data(1, 0x03, _store_rq(ds.SOPInstanceUID)))
    conn.sendall(_p_data(1, 0x00, _data_set(ds)[:1000])[:-10])  # inside the PDU
    conn.close()
    assert scp.ended.acquire(timeout=10)
    assert not list(core.blobs.keys())
    assert not list(core.staging.iterdir())


@pytest.mark.parametrize("pdu", [
    _p_data(5, 0x03, b"\x00" * 12),  # a context that was never accepted
    _p_data(1, 0x00, b"data without a command"),
    _p_data(1, 0x03, b"\x01\x02\x03"),  # not a command set
    bytes((0x04, 0, 0, 0, 0, 6)) + struct.pack(">I", 40) + b"\x01\x03",  # PDV beyond its PDU
    bytes((0x09, 0, 0, 0, 0, 0)),  # no such PDU type
    _p_data(1, 0x03, _command([(0x0110, struct.pack("<H", 7))])),  # no Command Field
    _p_data(1, 0x03, _command([(0x0100, b"\x01")])),  # a Command Field one byte long
], ids=["unaccepted-context", "data-first", "garbage-command", "pdv-overrun", "unknown-pdu",
        "no-command-field", "short-command-field"])
def test_protocol_errors_abort_and_the_scp_keeps_serving(scp: Scp, pdu: bytes) -> None:
    conn = _associated(scp)
    conn.sendall(pdu)
    kind, body = _read_pdu(conn)
    assert kind == 0x07  # A-ABORT from the service provider
    assert body[2] == 2
    conn.close()
    _still_serving(scp)


def test_release_and_cancel(scp: Scp) -> None:
    conn = _associated(scp)
    conn.sendall(_p_data(1, 0x03, _command([(0x0100, struct.pack("<H", 0x0FFF)),
                                            (0x0120, struct.pack("<H", 7)),
                                            (0x0800, struct.pack("<H", 0x0101))])))
    conn.sendall(bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0)))  # A-RELEASE-RQ
    kind, _ = _read_pdu(conn)
    assert kind == 0x06  # A-RELEASE-RP, and nothing for the C-CANCEL before it
    conn.close()


def test_association_limit_rejects_transiently(core: Core) -> None:
    scp = Scp(core, max_associations=1)
    try:
        first = _associated(scp)
        second = socket.create_connection(("127.0.0.1", scp.port), timeout=10)
        second.sendall(_request((1, str(CTImageStorage), ExplicitVRLittleEndian)))
        kind, body = _read_pdu(second)
        assert kind == 0x03  # A-ASSOCIATE-RJ
        assert tuple(body[1:4]) == (2, 3, 2)  # transient, presentation, local limit
        second.close()
        first.close()
    finally:
        scp.close()


def test_unknown_transfer_syntax_is_refused_per_context(scp: Scp) -> None:
    conn = socket.create_connection(("127.0.0.1", scp.port), timeout=10)
    conn.sendall(_request((1, str(CTImageStorage), "1.2.3.4.5"),
                          (3, str(CTImageStorage), ExplicitVRLittleEndian)))
    kind, body = _read_pdu(conn)
    assert kind == 0x02
    # The A-ASSOCIATE-AC carries a result per context (PS3.8 9.3.3.2): 4 is
    # "transfer syntaxes not supported"; items start after the 68-byte fixed part.
    results = {}
    offset = 68
    while offset < len(body):
        item, length = body[offset], int.from_bytes(body[offset + 2:offset + 4], "big")
        if item == 0x21:
            results[body[offset + 4]] = body[offset + 6]
        offset += 4 + length
    assert results == {1: 4, 3: 0}
    conn.close()


def test_staging_failure_is_out_of_resources_and_the_association_goes_on(
        scp: Scp, core: Core) -> None:
    assoc = _scu((CTImageStorage, ExplicitVRLittleEndian)).associate("127.0.0.1", scp.port)
    core.staging.rmdir()  # where data sets are written is gone (a full or lost disk)
    rsp = assoc.send_c_store(ct_instance())
    assert rsp.Status == status.OUT_OF_RESOURCES
    assert "retry" in rsp.ErrorComment
    core.staging.mkdir()
    assert assoc.send_c_store(ct_instance()).Status == status.SUCCESS
    assoc.release()
    assert len(list(core.blobs.keys())) == 1


def _mutated(rnd: random.Random, stream: bytes) -> bytes:
    """``stream`` with a few random edits: flipped bits, bytes cut, inserted or set to
    edge values, a 32-bit length overwritten, or the rest cut off."""
    out = bytearray(stream)
    for _ in range(rnd.choice((1, 1, 2, 3, 8))):
        if not out:
            break
        at = rnd.randrange(len(out))
        edit = rnd.randrange(6)
        if edit == 0:
            out[at] ^= 1 << rnd.randrange(8)
        elif edit == 1:
            out[at] = rnd.choice((0x00, 0xFF, 0x7F, 0x80, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07))
        elif edit == 2:
            del out[at:at + rnd.randrange(1, 16)]
        elif edit == 3:
            out[at:at] = rnd.randbytes(rnd.randrange(1, 16))
        elif edit == 4:
            del out[at:]
        elif len(out) >= 4:
            struct.pack_into(">I", out, min(at, len(out) - 4), rnd.choice(
                (0, 1, 2, 6, 0xFFFFFFFF, 0x7FFFFFFF, 1 << 20, rnd.randrange(1 << 16))))
    return bytes(out)


def test_mutated_associations_end_cleanly_and_the_scp_keeps_serving(
        scp: Scp, core: Core, caplog: pytest.LogCaptureFixture) -> None:
    """A seeded fuzz: 1,000 associations, each a valid C-STORE, C-ECHO and release with
    random edits in the PDUs or in the data set alone. Each must end (answered, refused
    or aborted) without killing its thread (an uncaught exception fails the test, see
    pyproject.toml) or reaching 'internal error', and leave no staging file behind."""
    ds = ct_instance(rows=16, columns=16)
    data = _data_set(ds)
    echo = _command([(0x0002, b"1.2.840.10008.1.1\x00"), (0x0100, struct.pack("<H", 0x0030)),
                     (0x0110, struct.pack("<H", 9)), (0x0800, struct.pack("<H", 0x0101))])
    request = _request((1, str(CTImageStorage), ExplicitVRLittleEndian),
                       (3, str(Verification), ImplicitVRLittleEndian))
    store_rq = _p_data(1, 0x03, _store_rq(ds.SOPInstanceUID))
    end = _p_data(3, 0x03, echo) + bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0))
    rnd = random.Random(20261203)
    caplog.set_level(logging.ERROR, logger="vna")
    for _ in range(1000):
        if rnd.random() < 0.5:  # well framed, the data set damaged
            damaged = _mutated(rnd, data)
            cut = sorted(rnd.randrange(len(damaged) + 1) for _ in range(2))
            stream = request + store_rq + b"".join(
                _p_data(1, 0x02 if last else 0x00, damaged[a:b]) for a, b, last in
                ((0, cut[0], False), (cut[0], cut[1], False), (cut[1], len(damaged), True))) + end
        elif rnd.random() < 0.2:  # the association request too
            stream = _mutated(rnd, request + store_rq + _p_data(1, 0x02, data) + end)
        else:
            stream = request + _mutated(rnd, store_rq + _p_data(1, 0x00, data[:200])
                                        + _p_data(1, 0x02, data[200:]) + end)
        with socket.create_connection(("127.0.0.1", scp.port), timeout=30) as conn:
            # Until the SCP closes: each association ends. A reset is an end too (the
            # SCP aborted and closed with some of the stream unread); a timeout is not.
            try:
                conn.sendall(stream)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):
                    pass
            except TimeoutError:
                raise
            except OSError:
                pass
    _still_serving(scp)
    assert not [r for r in caplog.records if r.name.startswith("vna")]
    assert list(core.staging.iterdir()) == []
    # Only the instance itself could be stored: a damaged copy under its SOP Instance
    # UID is a conflict, refused.
    assert len(list(core.blobs.keys())) <= 1
