"""Q/R handlers without sockets: identifiers, cancellation, character sets, routing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from services.ingest.qr import (
    bind_for_sop_classes,
    find_response,
    handle_find,
    handle_get,
    identifier_keys,
    move_contexts,
)
from tests.unit.conftest import Core
from vna.adapters.bus.local import LocalBus
from vna.adapters.cache.memory import MemoryCache
from vna.bootstrap import Deps
from vna.config import Settings
from vna.dicom import status
from vna.dicom.matching import Level
from vna.model import BlobKey, InstanceRef, StoredInstance
from vna.testing.synthetic import ct_instance
from vna.usecases.store import Received, store_instance


@pytest.fixture
def deps(core: Core, tmp_path: Path) -> Iterator[Deps]:
    study = generate_uid()
    for i in range(3):
        path = tmp_path / f"{i}.dcm"
        ct_instance(study_uid=study, instance_number=i + 1, rows=8, columns=8).save_as(
            path, enforce_file_format=True)
        store_instance(Received(path=path), blobs=core.blobs, index=core.index,
                       staging_dir=core.staging)
    core.drain()
    yield Deps(settings=Settings(data_dir=tmp_path / "data"), blobs=core.blobs,
               index=core.index, bus=LocalBus(), cache=MemoryCache())


class FakeEvent(SimpleNamespace):
    """What the handlers read of a pynetdicom event."""

    def __init__(self, sop_class: str, ident: Dataset, cancel_after: int | None = None
                 ) -> None:
        super().__init__(request=SimpleNamespace(AffectedSOPClassUID=sop_class),
                         identifier=ident)
        self.polls = 0
        self.cancel_after = cancel_after

    @property
    def is_cancelled(self) -> bool:
        self.polls += 1
        return self.cancel_after is not None and self.polls > self.cancel_after


def _ident(**keys: Any) -> Dataset:
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def _status(value: Any) -> int:
    return int(value.Status) if isinstance(value, Dataset) else int(value)


def test_identifier_keys_join_multiple_values_and_skip_scp_keys() -> None:
    ds = _ident(QueryRetrieveLevel="STUDY", SpecificCharacterSet="ISO_IR 192",
                StudyInstanceUID=["1.2.3", "1.2.4"], PatientName="DOE^J*",
                ModalitiesInStudy=["CT", "MR"], StudyDate="", RetrieveAETitle="",
                ReferencedStudySequence=[])
    assert identifier_keys(ds) == {
        "StudyInstanceUID": "1.2.3\\1.2.4", "PatientName": "DOE^J*",
        "ModalitiesInStudy": "CT\\MR", "StudyDate": "", "ReferencedStudySequence": ""}


def test_identifier_keys_match_on_the_item_of_a_kept_sequence() -> None:
    item = Dataset()
    item.ScheduledProcedureStepID = "SPS1"
    item.RequestedProcedureID = ""
    item.RequestedProcedureDescription = "CT CHEST"
    ds = _ident(QueryRetrieveLevel="SERIES", RequestAttributesSequence=[item],
                TimezoneOffsetFromUTC="")
    assert identifier_keys(ds) == {
        "RequestAttributesSequence": "",
        "RequestAttributesSequence.ScheduledProcedureStepID": "SPS1",
        "RequestAttributesSequence.RequestedProcedureID": "",
        "TimezoneOffsetFromUTC": ""}


def test_find_stops_with_cancel_between_matches(deps: Deps) -> None:
    event = FakeEvent(StudyRootQueryRetrieveInformationModelFind,
                      _ident(QueryRetrieveLevel="IMAGE", SOPInstanceUID=""), cancel_after=1)
    results = list(handle_find(event, deps=deps))  # type: ignore[arg-type]
    assert [_status(s) for s, _ in results] == [status.PENDING, status.CANCEL]


def test_find_without_cancel_answers_every_match(deps: Deps) -> None:
    event = FakeEvent(PatientRootQueryRetrieveInformationModelFind,
                      _ident(QueryRetrieveLevel="IMAGE", SOPInstanceUID="", InstanceNumber=""))
    results = list(handle_find(event, deps=deps))  # type: ignore[arg-type]
    assert [_status(s) for s, _ in results] == [status.PENDING] * 3 + [status.SUCCESS]
    assert sorted(ds.InstanceNumber for _, ds in results[:3] if ds) == [1, 2, 3]


def test_get_stops_with_cancel(deps: Deps) -> None:
    (study,) = {i.ref.study_instance_uid for i in deps.index.instances()}
    event = FakeEvent(StudyRootQueryRetrieveInformationModelGet,
                      _ident(QueryRetrieveLevel="STUDY", StudyInstanceUID=study),
                      cancel_after=2)
    results = list(handle_get(event, deps=deps))  # type: ignore[arg-type]
    assert results[0] == 3
    assert [_status(s) for s, _ in results[1:]] == [status.PENDING, status.PENDING,
                                                    status.CANCEL]


def test_response_charset_follows_the_values() -> None:
    ident = _ident(PatientName="", PatientID="")
    found = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "MÜLLER^HANS"}]},
             "00100020": {"vr": "LO", "Value": ["P1"]}}
    elems = list(ident)
    latin1 = find_response(found, Level.PATIENT, elems, "ISO_IR 100", ae_title="VNA")
    assert latin1.SpecificCharacterSet == "ISO_IR 100"  # the requester's set can carry it
    greek = find_response(found, Level.PATIENT, elems, "ISO_IR 126", ae_title="VNA")
    assert greek.SpecificCharacterSet == "ISO_IR 192"  # it cannot: UTF-8
    none = find_response(found, Level.PATIENT, elems, None, ae_title="VNA")
    assert none.SpecificCharacterSet == "ISO_IR 192"
    ascii_only = find_response({"00100020": {"vr": "LO", "Value": ["P1"]}}, Level.PATIENT,
                               elems, None, ae_title="VNA")
    assert "SpecificCharacterSet" not in ascii_only
    assert ascii_only["PatientName"].is_empty  # universal matching: asked for, returned empty


def test_bind_keeps_another_services_c_find() -> None:
    calls: list[str] = []

    def worklist(event: Any) -> str:
        calls.append("mwl")
        return "mwl"

    def query(event: Any) -> str:
        calls.append("qr")
        return "qr"

    handlers: list[tuple[Any, Any]] = [(evt.EVT_C_FIND, worklist)]
    bind_for_sop_classes(handlers, evt.EVT_C_FIND,
                         (StudyRootQueryRetrieveInformationModelFind,), query)
    assert len(handlers) == 1
    route = handlers[0][1]
    route(SimpleNamespace(request=SimpleNamespace(
        AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind)))
    route(SimpleNamespace(request=SimpleNamespace(
        AffectedSOPClassUID=ModalityWorklistInformationFind)))
    assert calls == ["qr", "mwl"]


def test_move_contexts_offer_stored_syntax_and_uncompressed_fallback() -> None:
    def inst(ts: str) -> StoredInstance:
        ref = InstanceRef(study_instance_uid="1.2", series_instance_uid="1.2.3",
                          sop_instance_uid=generate_uid())
        return StoredInstance(ref=ref, sop_class_uid=CTImageStorage, transfer_syntax_uid=ts,
                              blob_key=BlobKey("0" * 64), size=1)

    contexts = move_contexts([inst(ExplicitVRLittleEndian), inst(ExplicitVRLittleEndian),
                              inst(JPEG2000Lossless)])
    offered = [(cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in contexts]
    assert offered == [
        (CTImageStorage, (ExplicitVRLittleEndian,)),
        (CTImageStorage, (JPEG2000Lossless,)),
        (CTImageStorage, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
    ]
