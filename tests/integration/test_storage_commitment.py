"""Storage Commitment Push Model over real associations: a pynetdicom modality stores,
asks the archive to commit, and receives the N-EVENT-REPORT on its own SCP."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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
        sent = [ct_instance(rows=16, columns=16) for _ in range(3)]
        ae = AE(ae_title=MODALITY_AE)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(HOST, archive.port, ae_title=archive.ae_title)
        try:
            assert [assoc.send_c_store(ds).Status for ds in sent] == [status.SUCCESS] * 3
        finally:
            assoc.release()
        yield Site(archive, modality, sent)


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
