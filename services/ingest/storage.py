"""A lean Storage SCP for the associations that only store (and echo).

Under pynetdicom a receiver spent about 9 ms of CPU per instance around the store
path, three times what storing itself costs: its state machine and reactor
threads, pydicom encoding every C-STORE-RSP, and a temporary Part-10 file that the
store path then copied again. Modalities and PACS sending images propose nothing
but Storage SOP Classes (and Verification), so those associations are served
here, on the same AE configuration:

- the A-ASSOCIATE-RQ is decoded and answered with pynetdicom's own PDU classes,
  and its presentation contexts negotiated by pynetdicom's ``negotiate_as_acceptor``
  against the AE's supported contexts, so both paths accept exactly the same;
- the P-DATA fragments of a data set go straight into the store path's staging
  file (``Staging``: VNA's File Meta, then the data set, hashed as it arrives), and
  ``store_instance`` takes it from there, as for every other instance;
- the two fixed responses (C-STORE-RSP, C-ECHO-RSP) are encoded directly.

Every other association (query/retrieve, storage commitment, worklist, MPPS, or a
request with SCP/SCU role selection or user identity) goes to pynetdicom as
before: ``route`` peeks at the A-ASSOCIATE-RQ, without consuming it, to decide.
``VNA_LEAN_STORAGE=false`` sends everything to pynetdicom.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from vna import metrics
from vna.bootstrap import Deps
from vna.dicom import status
from vna.usecases.store import Received, Staging, StoreError, StoreFailure, store_instance

log = logging.getLogger("vna.ingest.storage")

# PDU types (PS3.8 9.3)
A_ASSOCIATE_RQ_PDU = 0x01
A_ASSOCIATE_RJ_PDU = 0x03
P_DATA_TF_PDU = 0x04
A_RELEASE_RQ_PDU = 0x05
A_RELEASE_RP_PDU = 0x06
A_ABORT_PDU = 0x07

# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF
NO_DATA_SET = 0x0101

# Command elements (group 0000, implicit VR little endian), by element number
AFFECTED_SOP_CLASS_UID = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE_UID = 0x1000

MAX_REQUEST_LENGTH = 1 << 20
"""A larger A-ASSOCIATE-RQ is left to pynetdicom (a real one is a few kB)."""
RECEIVE_BUFFER = 1 << 18
"""Bytes an association reads off the socket at a time (256 kB), whatever its PDUs."""
MAX_COMMAND_LENGTH = 1 << 16
"""A longer command set is a protocol error (a C-STORE-RQ's is a few hundred bytes)."""
PROCESSING_FAILURE = 0x0110

STORE_STATUS = {
    StoreFailure.UNREADABLE: status.CANNOT_UNDERSTAND,
    StoreFailure.INVALID: status.INVALID_UID,
    StoreFailure.MISMATCH: status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    StoreFailure.SOP_CONFLICT: status.DUPLICATE_SOP_INSTANCE_CONFLICT,
    StoreFailure.PATIENT_CONFLICT: status.PATIENT_CONFLICT,
    StoreFailure.SERIES_CONFLICT: status.SERIES_CONFLICT,
    StoreFailure.UNAVAILABLE: status.OUT_OF_RESOURCES,
}

StoreReceived = Callable[[Received], tuple[int, str | None]]
"""Stores one received instance; returns the DIMSE status and an Error Comment."""


def refusal(exc: StoreError) -> tuple[int, str]:
    """The C-STORE status and Error Comment for an instance the store path refused."""
    return STORE_STATUS[exc.failure], status.error_comment(exc.reason)


def store_received(received: Received, *, deps: Deps,
                   on_stored: Callable[[], None] | None = None) -> tuple[int, str | None]:
    """C-STORE, on either path: the received bytes, as received, to ``store_instance``."""
    try:
        store_instance(received, blobs=deps.blobs, index=deps.index,
                       staging_dir=deps.staging_dir())
    except StoreError as exc:
        return refusal(exc)
    if on_stored is not None:
        on_stored()
    return status.SUCCESS, None


class ProtocolError(Exception):
    """The peer broke the upper layer protocol: the association is aborted."""


class StorageReceiver:
    """Serves storage-only associations, each in its own thread, for one AE."""

    def __init__(self, ae: AE, store: StoreReceived, *, staging_dir: Path,
                 network_timeout: float, max_pdu: int, max_associations: int = 64) -> None:
        self._contexts: list[PresentationContext] = list(ae.supported_contexts)
        # Verification and the Storage SOP Classes: the AE is build_ae's, before the
        # registrars add Q/R and worklist.
        self._lean_uids = {str(cx.abstract_syntax) for cx in self._contexts}
        self._store = store
        self._staging_dir = staging_dir
        self._timeout = network_timeout
        self._max_pdu = max_pdu
        self._max_associations = max_associations
        self._implementation = (str(ae.implementation_class_uid),
                                ae.implementation_version_name or "")
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def lean(self, request: A_ASSOCIATE) -> bool:
        """True when every proposed context is one this receiver serves itself."""
        contexts = request.presentation_context_definition_list
        if not contexts:
            return False
        if any(isinstance(item, (SCP_SCU_RoleSelectionNegotiation, UserIdentityNegotiation))
               for item in request.user_information):
            return False
        return all(str(cx.abstract_syntax) in self._lean_uids for cx in contexts)

    def route(self, conn: socket.socket, address: Any,
              otherwise: Callable[[socket.socket, Any], None],
              on_end: Callable[[], None] | None = None) -> None:
        """Serve ``conn`` here if it asks only for storage, else hand it to ``otherwise``
        (pynetdicom). Blocks for the association's life: run it in its own thread."""
        conn.settimeout(self._timeout)
        request = _peek_request(conn)
        if request is None or not self.lean(request[0]):
            metrics.DIMSE_ASSOCIATIONS.labels("pynetdicom").inc()
            conn.settimeout(None)  # as accepted: pynetdicom polls and times out itself
            otherwise(conn, address)  # and reads the request itself
            return
        metrics.DIMSE_ASSOCIATIONS.labels("lean").inc()
        try:
            conn.recv(request[1], socket.MSG_WAITALL)  # consume what was peeked
            self.serve(conn, request[0])
        finally:
            if on_end is not None:
                on_end()

    def serve(self, conn: socket.socket, request: A_ASSOCIATE) -> None:
        with self._lock:
            admitted = len(self._open) < self._max_associations
            if admitted:
                self._open.add(conn)
        try:
            if not admitted:
                # rejected-transient, service-provider (presentation), local-limit-exceeded
                conn.sendall(bytes((A_ASSOCIATE_RJ_PDU, 0, 0, 0, 0, 4, 0, 2, 3, 2)))
                return
            _Association(self, conn, request).run()
        except (OSError, ProtocolError) as exc:
            log.warning("storage association ended abnormally: %s", exc)
        finally:
            with self._lock:
                self._open.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        """End every open association (the process is stopping)."""
        with self._lock:
            for conn in list(self._open):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


def _peek_request(conn: socket.socket) -> tuple[A_ASSOCIATE, int] | None:
    """The A-ASSOCIATE-RQ waiting on ``conn`` and its length, left unread; None when
    what waits is anything else (pynetdicom then answers it as it should)."""
    try:
        head = conn.recv(6, socket.MSG_PEEK | socket.MSG_WAITALL)
        if len(head) < 6 or head[0] != A_ASSOCIATE_RQ_PDU:
            return None
        length = 6 + int.from_bytes(head[2:6], "big")
        if length > MAX_REQUEST_LENGTH:
            return None
        data = conn.recv(length, socket.MSG_PEEK | socket.MSG_WAITALL)
        if len(data) < length:
            return None
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(data)
        return pdu.to_primitive(), length
    except Exception:  # noqa: BLE001 - unreadable: pynetdicom rejects or aborts it properly
        return None


class _Association:
    """One storage association, from the A-ASSOCIATE-AC to its release or abort."""

    def __init__(self, receiver: StorageReceiver, conn: socket.socket,
                 request: A_ASSOCIATE) -> None:
        self.receiver = receiver
        self.conn = conn
        self.request = request
        self.calling_ae = str(request.calling_ae_title).strip()
        self.peer_max = next((int(item.maximum_length_received or 0)
                              for item in request.user_information
                              if isinstance(item, MaximumLengthNotification)), 0)
        self.accepted: dict[int, PresentationContext] = {}
        self.command = bytearray()
        self.pending: _PendingStore | None = None
        # One buffer for the association, filled straight from the socket: each piece
        # is consumed (hashed, written) before the next is read. A buffered reader
        # in between copied every byte once more, and a fresh object per PDU cost the
        # allocator fresh pages each time. Larger than the PDUs dcmtk sends (128 kB).
        self.buffer = memoryview(bytearray(RECEIVE_BUFFER))
        self.stored = self.failed = 0

    def run(self) -> None:
        started = time.monotonic()
        try:
            self._run()
        finally:
            log.info("storage association ended", extra={
                "source_ae": self.calling_ae, "stored": self.stored, "failed": self.failed,
                "seconds": round(time.monotonic() - started, 3)})

    def _run(self) -> None:
        self._accept()
        _blocking_with_timeout(self.conn, self.receiver._timeout)
        head = memoryview(bytearray(6))
        try:
            while True:
                if _recv_into(self.conn, head) < 6:
                    return  # the peer closed the connection
                kind, length = head[0], int.from_bytes(head[2:6], "big")
                if kind == P_DATA_TF_PDU:
                    self._p_data(length)
                elif kind == A_RELEASE_RQ_PDU and length == 4:
                    self._read(length)
                    self.conn.sendall(bytes((A_RELEASE_RP_PDU, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
                    return
                elif kind == A_ABORT_PDU:
                    return
                else:
                    self._abort(reason=0x02)  # unexpected PDU
                    raise ProtocolError(f"unexpected PDU type {kind:#04x}")
        finally:
            if self.pending is not None:
                self.pending.discard()

    def _read(self, count: int) -> memoryview:
        """The next ``count`` bytes (at most the buffer's size) off the socket."""
        view = self.buffer[:count]
        if _recv_into(self.conn, view) < count:
            raise ProtocolError("connection closed inside a PDU")
        return view

    def _accept(self) -> None:
        result, _ = negotiate_as_acceptor(self.request.presentation_context_definition_list,
                                          self.receiver._contexts, {})
        self.accepted = {int(cx.context_id): cx for cx in result
                         if cx.result == 0x00 and cx.context_id is not None}
        rsp = A_ASSOCIATE()
        rsp.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        rsp.calling_ae_title = self.request.calling_ae_title
        rsp.called_ae_title = self.request.called_ae_title
        rsp.result = 0x00
        rsp.result_source = 0x01
        rsp.presentation_context_definition_results_list = result
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.receiver._max_pdu
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = UID(self.receiver._implementation[0])
        items: list[Any] = [max_length, class_uid]
        if self.receiver._implementation[1]:
            version = ImplementationVersionNameNotification()
            version.implementation_version_name = self.receiver._implementation[1]
            items.append(version)
        rsp.user_information = items
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(rsp)
        self.conn.sendall(pdu.encode())
        log.debug("storage association accepted", extra={"source_ae": self.calling_ae})

    def _abort(self, reason: int) -> None:
        # A-ABORT, source: service provider (2)
        with contextlib.suppress(OSError):
            self.conn.sendall(bytes((A_ABORT_PDU, 0, 0, 0, 0, 4, 0, 0, 2, reason)))

    def _p_data(self, length: int) -> None:
        """A P-DATA-TF PDU of ``length`` bytes, read as it comes: PDV by PDV, a data
        set fragment in buffer-sized pieces straight into its staging file. Whatever
        length the peer chose (VNA sets no maximum: a pynetdicom SCU then sends a
        whole data set in one PDU), an association holds one buffer, not the PDU."""
        remaining = length
        while remaining:
            if remaining < 6:
                self._abort(reason=0x06)
                raise ProtocolError("truncated PDV item")
            item = self._read(6)
            item_length, context_id, header = int.from_bytes(item[:4], "big"), item[4], item[5]
            if item_length < 2 or 4 + item_length > remaining:
                self._abort(reason=0x06)
                raise ProtocolError("PDV item length out of bounds")
            remaining -= 4 + item_length
            if context_id not in self.accepted:
                self._abort(reason=0x06)
                raise ProtocolError(f"PDV on presentation context {context_id}, not accepted")
            if header & 0x01:
                self._command_fragment(context_id, item_length - 2, last=bool(header & 0x02))
            else:
                self._data_fragment(context_id, item_length - 2, last=bool(header & 0x02))

    def _command_fragment(self, context_id: int, size: int, *, last: bool) -> None:
        if self.pending is not None:
            self._abort(reason=0x02)
            raise ProtocolError("command fragment while a data set was arriving")
        if len(self.command) + size > MAX_COMMAND_LENGTH:
            self._abort(reason=0x06)
            raise ProtocolError("command set longer than a command set can be")
        while size:
            piece = min(size, len(self.buffer))
            self.command += self._read(piece)
            size -= piece
        if not last:
            return
        try:
            command = _decode_command(bytes(self.command))
        except (ValueError, struct.error) as exc:
            self._abort(reason=0x06)
            raise ProtocolError("undecodable command set") from exc
        finally:
            self.command.clear()
        field = _us(command.get(COMMAND_FIELD))
        if field == C_ECHO_RQ:
            self._respond(context_id, _response(C_ECHO_RSP, command, status.SUCCESS))
        elif field == C_STORE_RQ:
            if _us(command.get(COMMAND_DATA_SET_TYPE)) == NO_DATA_SET:
                self._respond(context_id, _response(
                    C_STORE_RSP, command, status.CANNOT_UNDERSTAND,
                    "C-STORE request without a data set"))
                return
            self.pending = _PendingStore(self, context_id, command)
        elif field == C_CANCEL_RQ:
            return  # nothing to cancel: each C-STORE is answered when its data set is in
        else:
            self._abort(reason=0x02)
            raise ProtocolError("command set without a Command Field" if field is None
                                else f"DIMSE command {field:#06x} on a storage association")

    def _data_fragment(self, context_id: int, size: int, *, last: bool) -> None:
        pending = self.pending
        if pending is None or pending.context_id != context_id:
            self._abort(reason=0x02)
            raise ProtocolError("data set fragment without its command")
        while size:
            piece = min(size, len(self.buffer))
            pending.write(self._read(piece))
            size -= piece
        if last:
            self.pending = None
            try:
                code, comment = pending.store()
            except Exception:
                log.exception("C-STORE failed")
                code, comment = PROCESSING_FAILURE, "internal error, see the archive's log"
            if code == status.SUCCESS:
                self.stored += 1
            else:
                self.failed += 1
            self._respond(context_id, _response(C_STORE_RSP, pending.command, code, comment))

    def _respond(self, context_id: int, command: bytes) -> None:
        """Send a command set in P-DATA-TF PDUs no longer than the peer accepts."""
        room = len(command) if self.peer_max <= 6 else self.peer_max - 6
        pdus = []
        for start in range(0, len(command), room):
            fragment = command[start:start + room]
            last = 0x02 if start + room >= len(command) else 0x00
            pdv = struct.pack(">IBB", len(fragment) + 2, context_id, 0x01 | last) + fragment
            pdus.append(struct.pack(">BBI", P_DATA_TF_PDU, 0, len(pdv)) + pdv)
        self.conn.sendall(b"".join(pdus))


class _PendingStore:
    """A C-STORE whose data set is arriving: written to staging, then stored."""

    def __init__(self, association: _Association, context_id: int,
                 command: dict[int, bytes]) -> None:
        self.association = association
        self.context_id = context_id
        self.command = command
        self.sop_class_uid = _ui(command.get(AFFECTED_SOP_CLASS_UID))
        self.sop_instance_uid = _ui(command.get(AFFECTED_SOP_INSTANCE_UID))
        receiver = association.receiver
        transfer_syntax = str(association.accepted[context_id].transfer_syntax[0])
        self.refused: StoreError | None = None
        self.staging: Staging | None = None
        try:
            self.staging = Staging(receiver._staging_dir, transfer_syntax,
                                   self.sop_class_uid, self.sop_instance_uid)
        except StoreError as exc:
            self.refused = exc  # the data set is still read off the wire, then refused
        except OSError:
            self._unavailable()

    def write(self, fragment: memoryview) -> None:
        if self.staging is not None:
            try:
                self.staging.write(fragment)
            except OSError:  # disk full, staging gone: refuse this one, keep serving
                self.discard()
                self._unavailable()

    def _unavailable(self) -> None:
        log.exception("staging file could not be written")
        self.refused = StoreError(StoreFailure.UNAVAILABLE, "archive storage unavailable, retry")

    def store(self) -> tuple[int, str | None]:
        if self.refused is not None:
            return refusal(self.refused)
        assert self.staging is not None
        staging, self.staging = self.staging, None
        try:
            framed = staging.finish()
        except StoreError as exc:
            return refusal(exc)
        except OSError:
            self._unavailable()
            assert self.refused is not None
            return refusal(self.refused)
        return self.association.receiver._store(Received(
            path=staging.path, framed=framed, sop_class_uid=self.sop_class_uid,
            sop_instance_uid=self.sop_instance_uid, source_ae=self.association.calling_ae))

    def discard(self) -> None:
        if self.staging is not None:
            self.staging.discard()
            self.staging = None


def _blocking_with_timeout(conn: socket.socket, seconds: float) -> None:
    """Blocking I/O, timed out by the kernel (SO_RCVTIMEO, SO_SNDTIMEO).

    With a Python-level timeout every recv is preceded by a poll(); blocking, a
    MSG_WAITALL recv fills a whole PDU in one call. A peer silent for ``seconds``
    still ends the association: the recv then fails with EAGAIN."""
    conn.settimeout(None)
    whole = int(seconds)
    timeval = struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _recv_into(conn: socket.socket, view: memoryview) -> int:
    """Fill ``view`` from the socket; fewer bytes only when the peer closed it."""
    filled = 0
    while filled < len(view):
        count = conn.recv_into(view[filled:], 0, socket.MSG_WAITALL)
        if not count:
            break
        filled += count
    return filled


def _decode_command(raw: bytes) -> dict[int, bytes]:
    """Group 0000 elements, implicit VR little endian (PS3.7 6.3.1), by element."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset < len(raw):
        group, element, length = struct.unpack_from("<HHI", raw, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(raw):
            raise ValueError("not a command set")
        elements[element] = raw[offset:offset + length]
        offset += length
    return elements


def _us(value: bytes | None) -> int | None:
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def _ui(value: bytes | None) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace") if value else ""


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _response(field: int, request: dict[int, bytes], code: int,
              comment: str | None = None) -> bytes:
    """A C-STORE-RSP or C-ECHO-RSP to ``request`` (PS3.7 9.3.1.2, 9.3.5.2)."""
    elements: list[tuple[int, bytes]] = [
        (AFFECTED_SOP_CLASS_UID, _even(request.get(AFFECTED_SOP_CLASS_UID, b"")
                                       .rstrip(b"\x00 "), b"\x00")),
        (COMMAND_FIELD, struct.pack("<H", field)),
        (MESSAGE_ID_BEING_RESPONDED_TO, request.get(MESSAGE_ID, b"\x00\x00")),
        (COMMAND_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        (STATUS, struct.pack("<H", code)),
    ]
    if comment:
        elements.append((ERROR_COMMENT, _even(comment.encode("ascii", "replace"), b" ")))
    if field == C_STORE_RSP:
        elements.append((AFFECTED_SOP_INSTANCE_UID,
                         _even(request.get(AFFECTED_SOP_INSTANCE_UID, b"")
                               .rstrip(b"\x00 "), b"\x00")))
    body = b"".join(struct.pack("<HHI", 0, element, len(value)) + value
                    for element, value in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body

