"""Storage Commitment Push Model, SCP (PS3.4 Annex J): a modality asks whether the
archive has safely stored a list of instances before it deletes its own copies.

The N-ACTION is answered at once; the commitment result follows in an N-EVENT-REPORT
(PS3.4 J.3.3 allows either association). To a requester named by its AE title in
``VNA_PEERS``, on a new association, as Orthanc sends it: whoever configured it there
said where it listens. Such a request is kept in the index (``PendingCommitment``)
before the N-ACTION is answered, until its report is delivered: one the requester
did not take (not listening, or not acknowledging) is tried again after each of
``VNA_COMMITMENT_RETRY_SECONDS``, as dcm4chee retries its own, and one still owed
when the archive stops is delivered by the next process to start (each process
serving commitment takes over, at start, what nobody holds). To any other
requester, on its own association, which it keeps open for the report (as
dcm4chee sends it while the association lasts); one that left gets no report
(logged), and asks again or is added to ``VNA_PEERS``.

An instance is committed when the index holds its claim, with the same SOP Class,
and the blob store holds its blob: the store path records a claim only after the
blob is durable (invariant 1), so both are on disk, or in S3, when this answers.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import N_ACTION_RSP
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from vna import metrics
from vna.bootstrap import Deps
from vna.dicom import status
from vna.dicom.uids import is_valid_uid
from vna.model import PendingCommitment
from vna.ports import Unavailable

log = logging.getLogger("vna.ingest.commitment")

Handlers = list[tuple[Any, Any]]

WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
"""The Storage Commitment Push Model SOP Instance (PS3.4 J.3.5)."""
REQUEST_STORAGE_COMMITMENT = 1
"""Action Type ID of a commitment request (PS3.4 J.3.2.1)."""
ALL_COMMITTED, SOME_FAILED = 1, 2
"""Event Type IDs of the report (PS3.4 J.3.3.1)."""


def register_commitment(ae: AE, handlers: Handlers, deps: Deps) -> None:
    """Accept Storage Commitment requests on ``ae``; reports go out from ``ae`` too,
    and the reports owed (retries, a stopped process's) from a thread of its own."""
    ae.add_supported_context(StorageCommitmentPushModel)
    ae.add_requested_context(StorageCommitmentPushModel)
    handlers.append((evt.EVT_N_ACTION, lambda event: handle_commitment(
        event, deps=deps, ae=ae)))
    reporter = _Reporter(ae, deps)
    reporter.start()
    deps.on_close(reporter.stop)


def handle_commitment(event: evt.Event, *, deps: Deps, ae: AE) -> tuple[Dataset | int, None]:
    """N-ACTION: check the request, answer it, and report on the instances after."""
    action = cast(N_ACTION, event.request)
    if str(action.RequestedSOPInstanceUID) != WELL_KNOWN_INSTANCE:
        return status.response(status.NO_SUCH_OBJECT_INSTANCE,
                        f"Requested SOP Instance UID must be {WELL_KNOWN_INSTANCE}"), None
    if action.ActionTypeID != REQUEST_STORAGE_COMMITMENT:
        return status.response(status.NO_SUCH_ACTION,
                        f"Action Type ID {action.ActionTypeID}: only 1 is defined"), None
    requester = str(event.assoc.requestor.ae_title).strip()
    try:
        info = event.action_information
        transaction_uid, items = _request_items(info)
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        return status.response(status.INVALID_ATTRIBUTE_VALUE, str(exc)), None
    peer = deps.settings.peer_table().get(requester)
    pending: PendingCommitment | None = None
    if peer is not None:
        # Recorded before the answer: a report owed is never only in memory.
        pending = PendingCommitment(request_id=str(uuid.uuid4()), requester=requester,
                                    transaction_uid=transaction_uid, items=items)
        try:
            deps.index.owe_commitment(pending, hold_seconds=_hold_seconds(deps))
        except Unavailable as exc:
            log.error("storage commitment request not recorded: %s", exc,
                      extra={"source_ae": requester})
            return status.response(status.PROCESSING_FAILURE,
                                   "the request could not be recorded; ask again"), None
    request = _Request(event.assoc, requester, transaction_uid, items)
    threading.Thread(target=_report, name="storage-commitment", daemon=True,
                     args=(ae, request, deps, pending)).start()
    log.info("storage commitment requested",
             extra={"source_ae": requester, "instances": len(items)})
    return status.SUCCESS, None


def _request_items(info: Dataset | None) -> tuple[str, list[tuple[str, str]]]:
    """The Transaction UID and the (SOP Class, SOP Instance) pairs of a request."""
    if info is None:
        raise ValueError("the N-ACTION carries no Action Information")
    transaction_uid = str(info.get("TransactionUID", "") or "")
    if not is_valid_uid(transaction_uid):
        raise ValueError("Transaction UID is missing or not a valid UID")
    sequence = info.get("ReferencedSOPSequence")
    if not sequence:
        raise ValueError("Referenced SOP Sequence is missing or empty")
    items = [(str(item.get("ReferencedSOPClassUID", "") or ""),
              str(item.get("ReferencedSOPInstanceUID", "") or "")) for item in sequence]
    return transaction_uid, items


def commitment_result(items: list[tuple[str, str]], deps: Deps
                      ) -> tuple[list[tuple[str, str]], list[tuple[str, str, int]]]:
    """Which of ``items`` the archive holds (committed), and why each other is not
    (a Failure Reason, PS3.4 J.3.3.1.1)."""
    committed: list[tuple[str, str]] = []
    failed: list[tuple[str, str, int]] = []
    for sop_class, sop_instance in items:
        try:
            claim = deps.index.find_claim(sop_instance) if is_valid_uid(sop_instance) else None
            if claim is None:
                failed.append((sop_class, sop_instance, status.NO_SUCH_OBJECT_INSTANCE))
            elif claim.sop_class_uid != sop_class:
                failed.append((sop_class, sop_instance, status.CLASS_INSTANCE_CONFLICT))
            elif not deps.blobs.exists(claim.blob_key):
                log.error("storage commitment: a claimed instance has no blob",
                          extra={"blob_key": claim.blob_key})
                failed.append((sop_class, sop_instance, status.PROCESSING_FAILURE))
            else:
                committed.append((sop_class, sop_instance))
        except Unavailable:  # not known now: not committed (the requester may ask again)
            failed.append((sop_class, sop_instance, status.PROCESSING_FAILURE))
    return committed, failed


def report_dataset(transaction_uid: str, retrieve_ae: str, committed: list[tuple[str, str]],
                   failed: list[tuple[str, str, int]]) -> tuple[int, Dataset]:
    """The N-EVENT-REPORT's Event Type ID and Event Information (PS3.4 J.3.3.1)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    if committed:
        ds.RetrieveAETitle = retrieve_ae
    ds.ReferencedSOPSequence = [_item(c, i) for c, i in committed]
    if failed:
        ds.FailedSOPSequence = [_item(c, i, reason) for c, i, reason in failed]
    return (SOME_FAILED if failed else ALL_COMMITTED), ds


class _Request:
    """An accepted commitment request, and when its N-ACTION-RSP has left.

    The report must not overtake the response on the requester's association:
    pynetdicom announces the response (EVT_DIMSE_SENT) before it queues its PDUs, and
    the first P-DATA sent after that announcement is the response (a command set
    alone, one PDU), which EVT_PDU_SENT reports once it is on the wire."""

    def __init__(self, assoc: Association, requester: str,
                 transaction_uid: str, items: list[tuple[str, str]]) -> None:
        self.assoc = assoc
        self.requester = requester
        self.transaction_uid = transaction_uid
        self.items = items
        self._announced = False
        self._answered = threading.Event()
        assoc.bind(evt.EVT_DIMSE_SENT, self._dimse_sent)
        assoc.bind(evt.EVT_PDU_SENT, self._pdu_sent)

    def _dimse_sent(self, event: evt.Event) -> None:
        if isinstance(event.message, N_ACTION_RSP):
            self._announced = True

    def _pdu_sent(self, event: evt.Event) -> None:
        if self._announced and isinstance(event.pdu, P_DATA_TF):
            self._answered.set()

    def answered(self, timeout: float) -> bool:
        """Whether the N-ACTION-RSP left within ``timeout`` seconds."""
        try:
            return self._answered.wait(timeout)
        finally:
            self.assoc.unbind(evt.EVT_DIMSE_SENT, self._dimse_sent)
            self.assoc.unbind(evt.EVT_PDU_SENT, self._pdu_sent)


# One report at a time on an association: pynetdicom matches a response to whoever
# waits for one, not to the request it answers.
_reporting_on = threading.Lock()


def _report(ae: AE, request: _Request, deps: Deps, pending: PendingCommitment | None
            ) -> None:
    try:
        _deliver(ae, request, deps, pending)
    except Exception:  # not a thread dead without a word: say so
        log.exception("storage commitment report failed",
                      extra={"destination": request.requester})


def _deliver(ae: AE, request: _Request, deps: Deps, pending: PendingCommitment | None
             ) -> None:
    answered = request.answered(deps.settings.dimse_timeout)
    if pending is not None:  # to VNA_PEERS, on a new association, once answered
        _attempt(ae, deps, pending)
        return
    event_type, info, extra = _report_of(request.transaction_uid, request.items,
                                         request.requester, deps, count=True)
    if not (answered and request.assoc.is_established):
        log.warning("storage commitment report not delivered: the requester left "
                    "and is not in VNA_PEERS", extra=extra)
        metrics.STORAGE_COMMITMENT_REPORTS.labels("undelivered").inc()
        return
    with _reporting_on:
        sent = _send(request.assoc, event_type, info, extra)
    metrics.STORAGE_COMMITMENT_REPORTS.labels(
        "same_association" if sent else "undelivered").inc()


def _report_of(transaction_uid: str, items: list[tuple[str, str]], requester: str,
               deps: Deps, *, count: bool) -> tuple[int, Dataset, dict[str, Any]]:
    """The report on ``items`` as they stand now: Event Type ID, Event Information,
    and what the log says of it; with ``count``, its instances counted in /metrics
    (once a request, not at each retry)."""
    committed, failed = commitment_result(items, deps)
    if count:
        metrics.STORAGE_COMMITMENT.labels("committed").inc(len(committed))
        metrics.STORAGE_COMMITMENT.labels("failed").inc(len(failed))
    event_type, info = report_dataset(transaction_uid, deps.settings.ae_title,
                                      committed, failed)
    return event_type, info, {"destination": requester, "committed": len(committed),
                              "failed": len(failed)}


def _attempt(ae: AE, deps: Deps, pending: PendingCommitment) -> None:
    """Report ``pending`` on a new association, as its instances stand now; then
    forget it, or make it due again after the next of VNA_COMMITMENT_RETRY_SECONDS,
    or, those spent (or the requester gone from VNA_PEERS), give it up."""
    event_type, info, extra = _report_of(pending.transaction_uid, pending.items,
                                         pending.requester, deps,
                                         count=pending.attempts == 0)
    peer = deps.settings.peer_table().get(pending.requester)
    if peer is not None and _report_to_peer(ae, peer, pending.requester, event_type, info,
                                            extra):
        metrics.STORAGE_COMMITMENT_REPORTS.labels("new_association").inc()
        deps.index.settle_commitment(pending.request_id)
        return
    delays = deps.settings.commitment_retry_delays()
    attempts = pending.attempts + 1
    if peer is None or attempts > len(delays):
        log.error("storage commitment report not delivered, given up",
                  extra={**extra, "attempts": attempts})
        metrics.STORAGE_COMMITMENT_REPORTS.labels("undelivered").inc()
        deps.index.settle_commitment(pending.request_id)
        return
    metrics.STORAGE_COMMITMENT_RETRIES.inc()
    log.warning("storage commitment report not delivered; trying again",
                extra={**extra, "attempt": attempts, "retry_in_seconds": delays[attempts - 1]})
    deps.index.retry_commitment(pending.request_id, attempts=attempts,
                                after_seconds=delays[attempts - 1])


def _hold_seconds(deps: Deps) -> float:
    """How long a process holds a report it is delivering: past any one attempt
    (an association, then the report and its answer), so that no other process
    takes it meanwhile; if the process dies, another takes it when this passes."""
    return 2 * (deps.settings.network_timeout + deps.settings.dimse_timeout)


class _Reporter:
    """Delivers the reports owed when they fall due (the retries), and, first, every
    one owed that nobody holds: what a process that stopped left undelivered."""

    def __init__(self, ae: AE, deps: Deps) -> None:
        self.ae = ae
        self.deps = deps
        delays = deps.settings.commitment_retry_delays()
        # Polled at the shortest retry's pace (5 s at most): a read, while none is due.
        self.poll = max(0.05, min([5.0, *delays]))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="storage-commitment-reports",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        all_pending = True
        while not self._stop.is_set():
            try:
                for pending in self.deps.index.take_due_commitments(
                        hold_seconds=_hold_seconds(self.deps), all_pending=all_pending):
                    if self._stop.is_set():
                        break  # held a while, then another process's (or ours next start)
                    _attempt(self.ae, self.deps, pending)
                all_pending = False
            except Unavailable as exc:
                log.warning("storage commitment reports wait for the index: %s", exc)
            except Exception:
                log.exception("storage commitment reports failed")
            self._stop.wait(self.poll)


def _report_to_peer(ae: AE, peer: tuple[str, int], requester: str, event_type: int,
                    info: Dataset, extra: dict[str, Any]) -> bool:
    """One attempt on a new association to the requester; True once it acknowledged."""
    try:
        # The SCP requests this association but keeps its role: SCP/SCU Role Selection.
        assoc = ae.associate(peer[0], peer[1], ae_title=requester,
                             contexts=[build_context(StorageCommitmentPushModel)],
                             ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
    except (OSError, RuntimeError, ValueError) as exc:
        log.warning("storage commitment report: no association (%s)", exc, extra=extra)
        return False
    if not assoc.is_established:
        log.warning("storage commitment report: no association", extra=extra)
        return False
    try:
        return _send(assoc, event_type, info, extra)
    finally:
        assoc.release()


def _send(assoc: Association, event_type: int, info: Dataset, extra: dict[str, Any]) -> bool:
    """Send the report on ``assoc``; True once the requester acknowledged it."""
    try:
        rsp, _ = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel,
                                           WELL_KNOWN_INSTANCE)
    except (RuntimeError, ValueError, OSError):  # released meanwhile, or no such context
        return False
    code = getattr(rsp, "Status", None)
    if code == status.SUCCESS:
        log.info("storage commitment reported", extra=extra)
        return True
    log.warning("storage commitment report not acknowledged",
                extra={**extra, "status": code})
    return False


def _item(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item
