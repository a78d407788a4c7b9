"""The worklist's DIMSE services: Modality Worklist C-FIND and MPPS N-CREATE/N-SET.

``register_worklist`` puts them on any pynetdicom AE (the archive's own under
``vna run``, the worklist's own under ``make up``). Handlers are plain functions,
the event first, dependencies keyword-only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
)

from services.ingest.qr import bind_for_sop_classes
from vna.bootstrap import Deps
from vna.dicom import status
from vna.dicom.matching import QueryError
from vna.ports import Index, Unavailable
from vna.worklist.memory import MemoryWorklistStore
from vna.worklist.mpps import MppsResult, create_mpps, set_mpps
from vna.worklist.mwl import find_worklist_items
from vna.worklist.ports import IndexCorrections, WorklistStore

log = logging.getLogger("vna.worklist")

Handlers = list[tuple[Any, Callable[..., Any]]]

SOP_CLASS_NOT_SUPPORTED = 0x0122


def worklist_store(deps: Deps) -> WorklistStore:
    """The worklist store of ``deps``: in the index's database when the index is SQL."""
    store = deps.extras.get("worklist")
    if store is None:
        from vna.adapters.index.sqlalchemy import SqlIndex

        if isinstance(deps.index, SqlIndex):
            from vna.adapters.index.worklist import SqlWorklistStore

            store = SqlWorklistStore.beside(deps.index)
        else:
            store = MemoryWorklistStore()
        deps.extras["worklist"] = store
    return cast(WorklistStore, store)


def index_corrections(deps: Deps) -> IndexCorrections | None:
    """The index's correction methods, once the index offers them (else None)."""
    index = deps.index
    needed = ("correct_study", "merge_patients", "unmerge_patients")
    if all(callable(getattr(index, name, None)) for name in needed):
        return cast(IndexCorrections, index)
    return None


# ------------------------------------------------------------------ handlers
def handle_mwl_find(event: evt.Event, *, store: WorklistStore
                    ) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """C-FIND on the Modality Worklist Information Model."""
    try:
        identifier = event.identifier
    except Exception as exc:  # noqa: BLE001 - pynetdicom raises what the decoder raised
        yield status.response(status.UNABLE_TO_PROCESS,
                              f"identifier could not be decoded: {exc}"), None
        return
    try:
        for item in find_worklist_items(identifier, store=store):
            if event.is_cancelled:
                yield status.CANCEL, None
                return
            yield status.PENDING, item
    except QueryError as exc:
        yield status.response(status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)), None
        return
    except Unavailable:
        yield status.response(status.FIND_OUT_OF_RESOURCES, "worklist unavailable, try again"), None
        return
    yield status.SUCCESS, None


def handle_mpps_create(event: evt.Event, *, store: WorklistStore
                       ) -> tuple[int | Dataset, Dataset | None]:
    """N-CREATE of a Modality Performed Procedure Step."""
    req: Any = event.request
    if str(req.AffectedSOPClassUID) != ModalityPerformedProcedureStep:
        return status.response(SOP_CLASS_NOT_SUPPORTED, "SOP class not supported"), None
    uid = req.AffectedSOPInstanceUID
    result = create_mpps(event.attribute_list, sop_instance_uid=str(uid) if uid else None,
                         store=store, calling_ae=_calling_ae(event))
    return _answer(result, created_without_uid=uid is None)


def handle_mpps_set(event: evt.Event, *, store: WorklistStore, index: Index | None
                    ) -> tuple[int | Dataset, Dataset | None]:
    """N-SET of a Modality Performed Procedure Step."""
    req: Any = event.request
    if str(req.RequestedSOPClassUID) != ModalityPerformedProcedureStep:
        return status.response(SOP_CLASS_NOT_SUPPORTED, "SOP class not supported"), None
    result = set_mpps(event.modification_list,
                      sop_instance_uid=str(req.RequestedSOPInstanceUID),
                      store=store, index=index, calling_ae=_calling_ae(event))
    return _answer(result)


def _calling_ae(event: evt.Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def _answer(result: MppsResult, created_without_uid: bool = False
            ) -> tuple[int | Dataset, Dataset | None]:
    if result.status != status.SUCCESS:
        if result.comment:
            log.info("MPPS request refused: 0x%04X %s", result.status, result.comment)
        return status.response(result.status, result.comment), None
    attributes = result.attributes
    if created_without_uid and attributes is not None:
        # pynetdicom reads the UID it generated for the response from here.
        attributes = Dataset(attributes)
        attributes.AffectedSOPInstanceUID = result.sop_instance_uid
    return status.SUCCESS, attributes


# ------------------------------------------------------------------ wiring
def register_worklist(ae: AE, handlers: Handlers, deps: Deps) -> None:
    """Add MWL C-FIND and MPPS N-CREATE/N-SET to ``ae`` and their handlers to ``handlers``."""
    store = worklist_store(deps)
    ae.add_supported_context(ModalityWorklistInformationFind, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(ModalityPerformedProcedureStep, ALL_TRANSFER_SYNTAXES)
    bind_for_sop_classes(handlers, evt.EVT_C_FIND, (str(ModalityWorklistInformationFind),),
                         partial(handle_mwl_find, store=store))
    handlers.append((evt.EVT_N_CREATE, partial(handle_mpps_create, store=store)))
    handlers.append((evt.EVT_N_SET, partial(handle_mpps_set, store=store, index=deps.index)))
