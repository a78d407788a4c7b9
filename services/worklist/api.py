"""A small JSON API for orders, patients and the reconciliation queue.

For systems that do not speak HL7 the same operations as ORM/OMI/ADT, and for
people the reconciliation queue. Mount with ``install(app, deps)`` (under
``/worklist``), or include ``router`` yourself and set ``app.state.deps``:
``get_worklist`` reads the worklist's dependencies from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request, Response
from pydantic import BaseModel

from services.worklist.scp import index_corrections, worklist_store
from vna.bootstrap import Deps
from vna.dicom.corrections import CorrectionError, UnknownStudy
from vna.ports import Unavailable
from vna.worklist.binding import link_study, reject_study
from vna.worklist.model import (
    Order,
    OrderStatus,
    PatientMerge,
    ReconciliationItem,
    ReconciliationStatus,
    RisPatient,
)
from vna.worklist.mpps import mpps_summary
from vna.worklist.orders import (
    OrderError,
    OrderErrorKind,
    OrderRequest,
    PatientDemographics,
    cancel_orders,
    change_order,
    merge_patients,
    place_order,
    register_patient,
    undo_merge,
)
from vna.worklist.ports import IndexCorrections, WorklistStore

PREFIX = "/worklist"

router = APIRouter()


@dataclass
class WorklistDeps:
    store: WorklistStore
    corrections: IndexCorrections | None


def get_worklist(request: Request) -> WorklistDeps:
    """FastAPI dependency: the worklist of the app's ``Deps`` (``app.state.deps``)."""
    deps: Deps = request.app.state.deps
    return WorklistDeps(worklist_store(deps), index_corrections(deps))


Worklist = Annotated[WorklistDeps, Depends(get_worklist)]
Actor = Annotated[str, Header(alias="X-VNA-User", description="Who acts (audited)")]

_HTTP = {OrderErrorKind.INVALID: 422, OrderErrorKind.UNKNOWN: 404,
         OrderErrorKind.CONFLICT: 409}


def _refuse(exc: OrderError) -> HTTPException:
    return HTTPException(_HTTP[exc.kind], detail=exc.reason)


def _unavailable() -> HTTPException:
    return HTTPException(503, detail="worklist store unavailable",
                         headers={"Retry-After": "5"})


class CancelRequest(BaseModel):
    discontinue: bool = False
    """DC (discontinue) instead of CA (cancel)."""


class MergeRequest(BaseModel):
    prior: PatientDemographics
    patient: PatientDemographics


class LinkRequest(BaseModel):
    order_id: str


class RejectRequest(BaseModel):
    note: str = ""


# ------------------------------------------------------------------ orders
@router.get("/orders")
def list_orders(wl: Worklist, status: OrderStatus | None = None,
                accession_number: str | None = None, patient_id: str | None = None
                ) -> list[Order]:
    with wl.store.transaction() as tx:
        return tx.find_orders(accession_number=accession_number, patient_id=patient_id,
                              statuses=[status] if status else None)


@router.get("/orders/{order_id}")
def get_order(order_id: str, wl: Worklist) -> dict[str, Any]:
    with wl.store.transaction() as tx:
        order = tx.get_order(order_id)
        if order is None:
            raise HTTPException(404, detail="no such order")
        bindings = tx.bindings(order_id=order_id)
    return {"order": order.model_dump(mode="json"),
            "bindings": [b.model_dump(mode="json") for b in bindings]}


@router.post("/orders", status_code=201)
def create_order(request: OrderRequest, wl: Worklist, actor: Actor = "api") -> Order:
    try:
        with wl.store.transaction() as tx:
            return place_order(request, tx=tx, actor=f"api:{actor}")
    except OrderError as exc:
        raise _refuse(exc) from exc
    except Unavailable as exc:
        raise _unavailable() from exc


@router.put("/orders/{order_id}")
def update_order(order_id: str, request: OrderRequest, wl: Worklist,
                 actor: Actor = "api") -> Order:
    try:
        with wl.store.transaction() as tx:
            changed = change_order(request, tx=tx, actor=f"api:{actor}")
            if changed.order_id != order_id:
                raise OrderError(OrderErrorKind.CONFLICT,
                                 "the body names another order's step")
            return changed
    except OrderError as exc:
        raise _refuse(exc) from exc
    except Unavailable as exc:
        raise _unavailable() from exc


@router.post("/orders/{order_id}/cancel")
def cancel_order(order_id: str, body: CancelRequest, wl: Worklist,
                 actor: Actor = "api") -> Order:
    try:
        with wl.store.transaction() as tx:
            order = tx.get_order(order_id)
            if order is None:
                raise OrderError(OrderErrorKind.UNKNOWN, "no such order")
            [done] = cancel_orders(
                tx=tx, accession_number=order.accession_number,
                requested_procedure_id=order.requested_procedure_id,
                scheduled_procedure_step_id=order.scheduled_procedure_step_id,
                status=OrderStatus.DISCONTINUED if body.discontinue else OrderStatus.CANCELLED,
                actor=f"api:{actor}")
            return done
    except OrderError as exc:
        raise _refuse(exc) from exc
    except Unavailable as exc:
        raise _unavailable() from exc


# ------------------------------------------------------------------ patients
@router.put("/patients")
def put_patient(patient: PatientDemographics, wl: Worklist, actor: Actor = "api"
                ) -> RisPatient:
    try:
        with wl.store.transaction() as tx:
            return register_patient(patient, tx=tx, actor=f"api:{actor}")
    except OrderError as exc:
        raise _refuse(exc) from exc
    except Unavailable as exc:
        raise _unavailable() from exc


@router.post("/patients/merge", status_code=201)
def merge(body: MergeRequest, wl: Worklist, actor: Actor = "api") -> PatientMerge:
    who = f"api:{actor}"
    ref = ""
    try:
        if wl.corrections is not None:
            ref = wl.corrections.merge_patients(
                body.prior.patient_id, body.prior.issuer_of_patient_id,
                body.patient.patient_id, body.patient.issuer_of_patient_id, actor=who)
        with wl.store.transaction() as tx:
            return merge_patients(body.prior, body.patient, tx=tx, index_merge_ref=ref,
                                  actor=who)
    except BaseException as exc:
        if ref and wl.corrections is not None:
            wl.corrections.unmerge_patients(ref, actor=who)
        if isinstance(exc, OrderError):
            raise _refuse(exc) from exc
        if isinstance(exc, CorrectionError):
            raise HTTPException(409, detail=f"index refused the merge: {exc}") from exc
        if isinstance(exc, Unavailable):
            raise _unavailable() from exc
        raise


@router.post("/merges/{merge_id}/undo")
def undo(merge_id: str, wl: Worklist, actor: Actor = "api") -> PatientMerge:
    who = f"api:{actor}"
    try:
        with wl.store.transaction() as tx:
            undone = undo_merge(merge_id, tx=tx, actor=who)
    except OrderError as exc:
        raise _refuse(exc) from exc
    except Unavailable as exc:
        raise _unavailable() from exc
    if wl.corrections is not None and undone.index_merge_ref:
        try:
            wl.corrections.unmerge_patients(undone.index_merge_ref, actor=who)
        except CorrectionError as exc:
            raise HTTPException(409, detail=f"index refused the unmerge: {exc}") from exc
    return undone


# ------------------------------------------------------------------ reconciliation
@router.get("/reconciliation")
def list_reconciliation(wl: Worklist, status: ReconciliationStatus | None = None
                        ) -> list[ReconciliationItem]:
    with wl.store.transaction() as tx:
        return tx.reconciliations(status)


@router.get("/reconciliation/{item_id}")
def show_reconciliation(item_id: str, wl: Worklist) -> dict[str, Any]:
    with wl.store.transaction() as tx:
        item = tx.get_reconciliation(item_id)
        if item is None:
            raise HTTPException(404, detail="no such reconciliation item")
        trail = tx.audit_trail(subject=f"study:{item.study_instance_uid}")
        candidates = tx.find_orders(accession_number=item.accession_number) \
            if item.accession_number else []
        candidates += [o for o in tx.find_orders(patient_id=item.patient_id)
                       if o not in candidates] if item.patient_id else []
    return {
        "item": item.model_dump(mode="json"),
        "candidate_orders": [o.model_dump(mode="json") for o in candidates],
        "audit": [r.model_dump(mode="json") for r in trail],
    }


@router.post("/reconciliation/{item_id}/link")
def link(item_id: str, body: LinkRequest, wl: Worklist, actor: Actor = "api"
         ) -> ReconciliationItem:
    try:
        return link_study(item_id, body.order_id, store=wl.store, corrections=wl.corrections,
                          actor=f"api:{actor}")
    except OrderError as exc:
        raise _refuse(exc) from exc
    except CorrectionError as exc:
        raise HTTPException(422, detail=f"index refused the correction: {exc}") from exc
    except UnknownStudy as exc:
        raise HTTPException(409, detail=f"study not indexed yet: {exc}") from exc
    except Unavailable as exc:
        raise _unavailable() from exc


@router.post("/reconciliation/{item_id}/reject")
def reject(item_id: str, body: RejectRequest, wl: Worklist, actor: Actor = "api"
           ) -> ReconciliationItem:
    try:
        return reject_study(item_id, store=wl.store, actor=f"api:{actor}", note=body.note)
    except OrderError as exc:
        raise _refuse(exc) from exc
    except Unavailable as exc:
        raise _unavailable() from exc


# ------------------------------------------------------------------ MPPS
@router.get("/mpps/{sop_instance_uid}")
def get_mpps(sop_instance_uid: str, wl: Worklist) -> dict[str, object]:
    with wl.store.transaction() as tx:
        found = tx.get_mpps(sop_instance_uid)
    if found is None:
        raise HTTPException(404, detail="no such MPPS instance")
    return mpps_summary(found)


# ------------------------------------------------------------------ metadata versions
@router.get("/studies/{study}/versions")
def study_versions(study: str, request: Request) -> list[dict[str, Any]]:
    """The study's metadata versions (corrections, merges, unmerges), oldest first."""
    deps: Deps = request.app.state.deps
    return deps.index.study_versions(study)


@router.get("/studies/{study}/versions/{version}/metadata")
def study_metadata_as_of(study: str, version: int, request: Request) -> Response:
    """The study's DICOM JSON as of ``version`` (0: as received)."""
    deps: Deps = request.app.state.deps
    try:
        docs = deps.index.metadata(study, version=version)
    except LookupError as exc:
        raise HTTPException(404, detail=str(exc)) from exc
    if not docs:
        raise HTTPException(404, detail="no such study")
    return Response("[" + ",".join(docs) + "]", media_type="application/dicom+json")


@router.get("/studies/{study}/instances/{sop}/pristine")
def pristine_instance(study: str, sop: str, request: Request) -> Response:
    """The instance's bytes exactly as received (retrieval elsewhere sends corrections)."""
    deps: Deps = request.app.state.deps
    found = deps.index.instances(study_instance_uid=study, sop_instance_uid=sop)
    if not found:
        raise HTTPException(404, detail="no such instance")
    with deps.blobs.open(found[0].blob_key) as fp:
        data = fp.read()
    return Response(data, media_type="application/dicom",
                    headers={"ETag": f'"{found[0].blob_key}"'})


def install(app: FastAPI, deps: Deps) -> None:
    """Mount the API under ``/worklist`` on ``app`` (which serves ``deps``)."""
    app.state.deps = deps
    app.include_router(router, prefix=PREFIX, tags=["Worklist"])
