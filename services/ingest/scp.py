"""The DIMSE front door: C-ECHO and C-STORE on one AE (Q/R and MWL/MPPS plug in).

Handlers are plain functions with the event first; dependencies are bound
keyword-only with ``functools.partial``.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import pydicom.config
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationServer, ThreadedAssociationServer

from services.ingest.storage import StorageReceiver, store_received
from vna.bootstrap import Deps
from vna.dicom import status
from vna.dispatch import receive_connections, report_ended
from vna.usecases.store import Received

log = logging.getLogger("vna.ingest")

# When a requester offers several transfer syntaxes in one presentation context,
# the acceptor's order decides. Explicit VR Little Endian first: it keeps the VRs
# (of private elements) that Implicit VR loses, and it is what most stored objects
# are in, so a C-GET can send them unchanged over the requester's own contexts.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    *(ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian),
]

# Receive data sets straight to disk (large objects never sit whole in memory)
# and send stored files without decoding them.
_config.STORE_RECV_CHUNKED_DATASET = True
_config.STORE_SEND_CHUNKED_DATASET = True
# pydicom checks each value it reads or writes against its VR's pattern; on the
# store path VNA checks what matters itself (UIDs, truncation) and keeps the bytes
# as received, so those checks only cost time (a tenth of a receiver's CPU).
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
# pynetdicom logs identifiers at INFO/DEBUG: keep patient data out of our logs.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

class IngestServer(ThreadedAssociationServer):
    """Sets TCP_NODELAY on every association socket, and gives the associations that
    only store to the lean Storage SCP (``storage``) when there is one."""

    storage: StorageReceiver | None = None
    on_lean_end: Callable[[], None] | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stalls
        return sock, addr

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.storage is None:
            super().process_request(request, client_address)
            return
        threading.Thread(target=self.storage.route, daemon=True, name="dimse-association",
                         args=(request, client_address, self.process_request_thread,
                               self.on_lean_end)).start()


def _association_ended(event: evt.Event, *, channel: socket.socket) -> None:
    if event.assoc.is_acceptor:  # not a C-MOVE's own association to a peer
        report_ended(channel)


def _lean_storage(server: AssociationServer, deps: Deps, on_stored: Callable[[], None] | None,
                  on_end: Callable[[], None] | None = None) -> None:
    """Give ``server``'s storage-only associations to the lean Storage SCP."""
    if not deps.settings.lean_storage or not isinstance(server, IngestServer):
        return
    settings = deps.settings
    # Its own AE: Verification and the Storage SOP Classes only, as build_ae has them
    # before the registrars add Q/R and worklist (which stay with pynetdicom).
    server.storage = StorageReceiver(
        build_ae(deps), partial(store_received, deps=deps, on_stored=on_stored),
        staging_dir=deps.staging_dir(), network_timeout=settings.network_timeout,
        max_pdu=settings.max_pdu)
    server.on_lean_end = on_end


def stop_dimse(server: AssociationServer) -> None:
    """Stop serving (a receiver of handed-over connections: abort what is open)."""
    if isinstance(server, IngestServer) and server.storage is not None:
        server.storage.close()
    if server.socket is not None and server.socket.fileno() >= 0:
        server.shutdown()
        return
    for assoc in list(server.active_associations):
        assoc.abort()
    server.server_close()


def handle_echo(event: evt.Event) -> int:
    return status.SUCCESS


def handle_store(event: evt.Event, *, deps: Deps, on_stored: Callable[[], None] | None = None
                 ) -> Dataset | int:
    """C-STORE through pynetdicom (associations that also query, retrieve or commit)."""
    req = cast(C_STORE, event.request)
    code, comment = store_received(Received(
        path=Path(event.dataset_path),
        sop_class_uid=str(req.AffectedSOPClassUID or "") or None,
        sop_instance_uid=str(req.AffectedSOPInstanceUID or "") or None,
        source_ae=str(event.assoc.requestor.ae_title),
    ), deps=deps, on_stored=on_stored)
    if comment is None:
        return code
    rsp = Dataset()
    rsp.Status = code
    rsp.ErrorComment = comment
    return rsp


def build_ae(deps: Deps) -> AE:
    settings = deps.settings
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.maximum_associations = 64
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cast(str, cx.abstract_syntax), ACCEPTED_TRANSFER_SYNTAXES)
    return ae


Registrar = Callable[[AE, list[tuple[Any, Callable[..., Any]]], Deps], None]


def start_dimse(deps: Deps, *, on_stored: Callable[[], None] | None = None,
                registrars: list[Registrar] | None = None,
                channel: socket.socket | None = None) -> AssociationServer:
    """Start the AE on ``VNA_BIND:VNA_DIMSE_PORT`` in background threads; or, given
    the ``channel`` of ``vna run``'s dispatcher, serve the connections it passes."""
    ae = build_ae(deps)
    handlers: list[tuple[Any, Callable[..., Any]]] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, partial(handle_store, deps=deps, on_stored=on_stored)),
    ]
    for register in registrars or []:
        register(ae, handlers, deps)
    if channel is not None:
        # A receiver of `vna run`: the archive accepts and hands connections over.
        handlers.append((evt.EVT_CONN_CLOSE, partial(_association_ended, channel=channel)))
        server = ae.make_server((deps.settings.bind, 0), evt_handlers=cast(Any, handlers),
                                server_class=IngestServer)
        _lean_storage(server, deps, on_stored, on_end=partial(report_ended, channel))
        if server.socket is not None:
            server.socket.close()  # it never listens itself
        receive_connections(channel, server.process_request)
        ae._servers.append(server)
        return server
    server = ae.make_server(
        (deps.settings.bind, deps.settings.dimse_port),
        evt_handlers=cast(Any, handlers),
        server_class=IngestServer,
    )
    _lean_storage(server, deps, on_stored)
    thread = threading.Thread(target=server.serve_forever, name="dimse-acceptor", daemon=True)
    thread.start()
    ae._servers.append(server)
    log.info("DIMSE listening", extra={"ae_title": deps.settings.ae_title,
                                       "port": deps.settings.dimse_port})
    return server
