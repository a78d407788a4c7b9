"""A modality's side of Storage Commitment (pynetdicom): it asks, and it listens."""

from __future__ import annotations

import queue
from types import TracebackType

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from services.ingest.commitment import WELL_KNOWN_INSTANCE
from tests.support.processes import free_port
from vna.dicom import status

HOST = "127.0.0.1"


class CommitmentListener:
    """The modality's SCP, where the archive's N-EVENT-REPORT arrives on a new
    association in which the archive, requesting it, keeps the SCP role."""

    def __init__(self, ae_title: str) -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.reports: queue.Queue[tuple[int, Dataset]] = queue.Queue()
        """(Event Type ID, Event Information) of each report received."""
        self._server: ThreadedAssociationServer | None = None

    @property
    def peer(self) -> str:
        """Its entry in VNA_PEERS."""
        return f"{self.ae_title}@{HOST}:{self.port}"

    def _on_report(self, event: evt.Event) -> tuple[int, None]:
        self.reports.put((int(event.event_type or 0), event.event_information))
        return status.SUCCESS, None

    def start(self) -> CommitmentListener:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self._server = ae.start_server((HOST, self.port), block=False,
                                       evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> CommitmentListener:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def commitment_request(transaction_uid: str, items: list[tuple[str, str]]) -> Dataset:
    """N-ACTION Action Information: a Transaction UID and (SOP Class, Instance) pairs."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = []
    for sop_class, sop_instance in items:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        ds.ReferencedSOPSequence.append(item)
    return ds


def request_commitment(port: int, info: Dataset, *, ae_title: str, called: str = "VNA",
                       action_type: int = 1, instance: str = WELL_KNOWN_INSTANCE
                       ) -> Dataset:
    """Send the N-ACTION to the archive on ``port``; its response."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(HOST, port, ae_title=called)
    assert assoc.is_established
    try:
        rsp, _ = assoc.send_n_action(info, action_type, StorageCommitmentPushModel, instance)
        return rsp
    finally:
        assoc.release()


def commit_on_own_association(port: int, info: Dataset, *, ae_title: str,
                              called: str = "VNA", timeout: float = 30.0
                              ) -> tuple[Dataset, tuple[int, Dataset]]:
    """Send the N-ACTION and wait on the same association for the N-EVENT-REPORT, as
    modalities that keep it open do; the response and (Event Type ID, information)."""
    reports: queue.Queue[tuple[int, Dataset]] = queue.Queue()

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.put((int(event.event_type or 0), event.event_information))
        return status.SUCCESS, None

    ae = AE(ae_title=ae_title)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(HOST, port, ae_title=called,
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert assoc.is_established
    try:
        rsp, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
        return rsp, reports.get(timeout=timeout)
    finally:
        assoc.release()


def referenced(seq: list[Dataset]) -> dict[str, str]:
    """{SOP Instance UID: SOP Class UID} of a report's Referenced SOP Sequence."""
    return {str(item.ReferencedSOPInstanceUID): str(item.ReferencedSOPClassUID)
            for item in seq}
