"""Running the worklist: the binder on the bus, the HL7 listener, and a DIMSE AE of its own.

``vna run`` puts MWL/MPPS on the archive's AE (``register_worklist``) and calls
``subscribe_binder`` and ``start_hl7``; ``python -m services.worklist`` runs
``start_worklist_service``: everything here in a process of its own.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from services.worklist.scp import Handlers, index_corrections, register_worklist, worklist_store
from vna.bootstrap import Deps
from vna.dicom import status
from vna.ports import BatchHandler
from vna.usecases.relay import OutboxRelay
from vna.worklist.binding import bind_instances
from vna.worklist.hl7 import Hl7Context, MllpServer, start_hl7_listener

log = logging.getLogger("vna.worklist")

WORKLIST_QUEUE = "vna.worklist"


def subscribe_binder(deps: Deps) -> None:
    """Bind every indexed instance to its order (or queue it for reconciliation)."""
    deps.bus.subscribe(WORKLIST_QUEUE, ["instance.indexed"], BatchHandler(
        partial(bind_instances, store=worklist_store(deps), index=deps.index)))


def start_hl7(deps: Deps, port: int | None = None) -> MllpServer | None:
    """The HL7 MLLP listener on ``VNA_BIND:VNA_HL7_PORT`` (None when the port is 0)."""
    port = deps.settings.hl7_port if port is None else port
    if port == 0:
        return None
    ctx = Hl7Context(store=worklist_store(deps), corrections=index_corrections(deps),
                     application=deps.settings.ae_title)
    return start_hl7_listener(ctx, deps.settings.bind, port)


@dataclass
class WorklistService:
    deps: Deps
    dimse: ThreadedAssociationServer
    hl7: MllpServer | None
    relay: OutboxRelay | None
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def dimse_port(self) -> int:
        return int(self.dimse.server_address[1])

    @property
    def hl7_port(self) -> int:
        return self.hl7.port if self.hl7 else 0

    def stop(self) -> None:
        self.dimse.shutdown()
        self.dimse.server_close()
        if self.hl7:
            self.hl7.stop()
        if self.relay:
            self.relay.stop()


def start_worklist_service(deps: Deps, *, dimse_port: int | None = None,
                           hl7_port: int | None = None, relay: bool = True) -> WorklistService:
    """MWL + MPPS on an AE of the worklist's own, the HL7 listener, the binder, and a
    relay for the events the worklist records (``mpps.completed``, ``study.complete``).

    Ports default to the settings; an HL7 port of 0 turns the listener off.
    """
    settings = deps.settings
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    handlers: Handlers = [(evt.EVT_C_ECHO, _echo)]
    register_worklist(ae, handlers, deps)
    port = settings.dimse_port if dimse_port is None else dimse_port
    server: Any = ae.start_server((settings.bind, port), block=False,
                                  evt_handlers=cast(Any, handlers))
    hl7 = start_hl7(deps, settings.hl7_port if hl7_port is None else hl7_port)
    subscribe_binder(deps)
    outbox: OutboxRelay | None = None
    if relay:
        outbox = OutboxRelay(index=deps.index, bus=deps.bus)
        outbox.start()
    deps.bus.start()
    log.info("worklist service listening", extra={"dimse_port": server.server_address[1],
                                                   "hl7_port": hl7.port if hl7 else 0})
    return WorklistService(deps=deps, dimse=server, hl7=hl7, relay=outbox)


def _echo(event: evt.Event) -> int:
    return status.SUCCESS
