"""Storage Commitment Push Model over real associations: a pynetdicom modality stores,
asks the archive to commit, and receives the N-EVENT-REPORT on its own SCP."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from services.ingest.commitment import WELL_KNOWN_INSTANCE
from tests.support.archive import Archive
from tests.support.commitment import (
    HOST,
    CommitmentListener,
    commit_on_own_association,
    commitment_request,
    referenced,
    request_commitment,
)
from tests.support.processes import wait_for
from vna.dicom import status
from vna.testing.synthetic import ct_instance

pytestmark = pytest.mark.integration

MODALITY_AE = "CT_SCANNER"


@dataclass
class Site:
    archive: Archive
    modality: CommitmentListener
    stored: list[Dataset]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("commitment")
    with CommitmentListener(MODALITY_AE) as modality, \
            Archive(tmp / "data", peers=modality.peer) as archive:
        yield Site(archive, modality, _store(archive, MODALITY_AE, 3))


def _store(archive: Archive, ae_title: str, count: int) -> list[Dataset]:
    """``count`` CT instances, stored by the modality ``ae_title``."""
    sent = [ct_instance(rows=16, columns=16) for _ in range(count)]
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, archive.port, ae_title=archive.ae_title)
    try:
        assert [assoc.send_c_store(ds).Status for ds in sent] == [status.SUCCESS] * count
    finally:
        assoc.release()
    return sent


def _counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_stored_instances_are_committed(site: Site) -> None:
    transaction = generate_uid()
    items = [(ds.SOPClassUID, ds.SOPInstanceUID) for ds in site.stored]
    committed = _counted("vna_storage_commitment_instances_total", result="committed")
    delivered = _counted("vna_storage_commitment_reports_total", delivery="new_association")
    rsp = request_commitment(site.archive.port, commitment_request(transaction, items),
                             ae_title=MODALITY_AE)
    assert rsp.Status == status.SUCCESS
    event_type, info = site.modality.reports.get(timeout=30)
    # Counted before the report is sent; its delivery once the modality acknowledged it.
    assert _counted("vna_storage_commitment_instances_total", result="committed") \
        == committed + 3
    wait_for(lambda: _counted("vna_storage_commitment_reports_total",
                              delivery="new_association") == delivered + 1,
             10, 0.05, "the delivery counted")
    assert event_type == 1  # all committed
    assert info.TransactionUID == transaction
    assert referenced(info.ReferencedSOPSequence) == {i: c for c, i in items}
    assert "FailedSOPSequence" not in info
    assert info.RetrieveAETitle == site.archive.ae_title


def test_unknown_and_mismatched_instances_fail_with_their_reasons(site: Site) -> None:
    transaction = generate_uid()
    stored, other = site.stored[0], site.stored[1]
    unknown = generate_uid()
    request = commitment_request(transaction, [
        (stored.SOPClassUID, stored.SOPInstanceUID),
        (CTImageStorage, unknown),  # never sent
        (MRImageStorage, other.SOPInstanceUID),  # sent as CT
    ])
    assert request_commitment(site.archive.port, request,
                              ae_title=MODALITY_AE).Status == status.SUCCESS
    event_type, info = site.modality.reports.get(timeout=30)
    assert event_type == 2  # some failed
    assert info.TransactionUID == transaction
    assert referenced(info.ReferencedSOPSequence) == {stored.SOPInstanceUID: stored.SOPClassUID}
    failed = {str(item.ReferencedSOPInstanceUID): int(item.FailureReason)
              for item in info.FailedSOPSequence}
    assert failed == {unknown: status.NO_SUCH_OBJECT_INSTANCE,
                      other.SOPInstanceUID: status.CLASS_INSTANCE_CONFLICT}


def test_a_requester_that_waits_gets_the_report_on_its_own_association(site: Site) -> None:
    # Not in VNA_PEERS: the archive could not open an association to it, and need not.
    transaction = generate_uid()
    stored = site.stored[2]
    rsp, (event_type, info) = commit_on_own_association(
        site.archive.port, commitment_request(transaction, [
            (stored.SOPClassUID, stored.SOPInstanceUID)]), ae_title="STRANGER")
    assert rsp.Status == status.SUCCESS
    assert (event_type, info.TransactionUID) == (1, transaction)
    assert referenced(info.ReferencedSOPSequence) == {stored.SOPInstanceUID: stored.SOPClassUID}
    assert site.modality.reports.empty()  # not sent twice


@pytest.mark.parametrize(("info", "action_type", "instance", "code"), [
    (commitment_request("", [(CTImageStorage, "1.2.3")]), 1, WELL_KNOWN_INSTANCE,
     status.INVALID_ATTRIBUTE_VALUE),
    (commitment_request("1.2.3", []), 1, WELL_KNOWN_INSTANCE, status.INVALID_ATTRIBUTE_VALUE),
    (commitment_request("1.2.3", [(CTImageStorage, "1.2.3")]), 2, WELL_KNOWN_INSTANCE,
     status.NO_SUCH_ACTION),
    (commitment_request("1.2.3", [(CTImageStorage, "1.2.3")]), 1, "1.2.3",
     status.NO_SUCH_OBJECT_INSTANCE),
], ids=["no-transaction-uid", "no-items", "other-action", "other-instance"])
def test_malformed_requests_are_refused_and_nothing_is_reported(
        site: Site, info: Dataset, action_type: int, instance: str, code: int) -> None:
    rsp = request_commitment(site.archive.port, info, ae_title=MODALITY_AE,
                             action_type=action_type, instance=instance)
    assert rsp.Status == code
    assert rsp.ErrorComment
    assert site.modality.reports.empty()


def _ask_missed(archive: Archive, modality: CommitmentListener) -> tuple[Dataset, str]:
    """Store one instance, ask for its commitment as ``modality`` (not listening), and
    wait until the first delivery missed; the instance and the Transaction UID."""
    stored = _store(archive, modality.ae_title, 1)[0]
    retries = _counted("vna_storage_commitment_retries_total")
    transaction = generate_uid()
    assert request_commitment(archive.port, commitment_request(transaction, [
        (stored.SOPClassUID, stored.SOPInstanceUID)]),
        ae_title=modality.ae_title).Status == status.SUCCESS
    wait_for(lambda: _counted("vna_storage_commitment_retries_total") > retries,
             30, 0.05, "the first delivery missed")
    return stored, transaction


def _assert_reported(modality: CommitmentListener, stored: Dataset, transaction: str) -> None:
    event_type, info = modality.reports.get(timeout=30)
    assert (event_type, info.TransactionUID) == (1, transaction)
    assert referenced(info.ReferencedSOPSequence) == {stored.SOPInstanceUID: stored.SOPClassUID}


def test_a_report_the_requester_missed_is_tried_again(tmp_path: Path) -> None:
    modality = CommitmentListener("MR_SCANNER")  # not listening yet: its port refuses
    # Forty tries a quarter of a second apart: time enough to start listening after
    # the first was missed.
    with Archive(tmp_path / "data", peers=modality.peer,
                 commitment_retry_seconds=",".join(["0.25"] * 40)) as archive:
        delivered = _counted("vna_storage_commitment_reports_total", delivery="new_association")
        stored, transaction = _ask_missed(archive, modality)
        with modality:
            _assert_reported(modality, stored, transaction)
        wait_for(lambda: _counted("vna_storage_commitment_reports_total",
                                  delivery="new_association") == delivered + 1,
                 10, 0.05, "the delivery counted")


def test_a_report_never_taken_is_given_up_after_its_retries(tmp_path: Path) -> None:
    modality = CommitmentListener("US_SCANNER")  # never listens
    with Archive(tmp_path / "data", peers=modality.peer,
                 commitment_retry_seconds="0,0") as archive:
        retries = _counted("vna_storage_commitment_retries_total")
        undelivered = _counted("vna_storage_commitment_reports_total", delivery="undelivered")
        _ask_missed(archive, modality)
        wait_for(lambda: _counted("vna_storage_commitment_reports_total",
                                  delivery="undelivered") == undelivered + 1,
                 30, 0.05, "the report given up")
        # The first attempt and one retry for each of the two delays.
        assert _counted("vna_storage_commitment_retries_total") == retries + 2


def test_a_report_owed_when_the_archive_stops_is_delivered_after_it_starts(
        tmp_path: Path) -> None:
    modality = CommitmentListener("XA_SCANNER")  # not listening while the archive runs
    data = tmp_path / "data"
    retry = "3600"  # its next try would be an hour away
    with Archive(data, peers=modality.peer, commitment_retry_seconds=retry) as archive:
        stored, transaction = _ask_missed(archive, modality)
    # Started again on the same data, it delivers what was owed at once.
    with modality, Archive(data, peers=modality.peer, commitment_retry_seconds=retry):
        _assert_reported(modality, stored, transaction)
