"""Query/Retrieve over DIMSE with dcmtk (findscu, movescu, getscu) and a pynetdicom SCU.

One archive runs in-process on embedded defaults with three studies of two
patients; a dcmtk ``storescp`` is the C-MOVE destination named in VNA_PEERS.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.support.archive import Archive
from tests.support.processes import free_port, wait_for
from vna.dicom import status
from vna.testing.synthetic import ct_instance

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
PEER_AE = "STORESCP"
STORAGE_ONLY_AE = "STOREONLY"


def _need_dcmtk() -> None:
    missing = [t for t in ("storescu", "findscu", "movescu", "getscu", "storescp")
               if shutil.which(t) is None]
    if missing:
        pytest.fail(f"dcmtk tools missing ({', '.join(missing)}): apt-get install -y dcmtk")


# ------------------------------------------------------------------ test data
@dataclass
class Study:
    patient_id: str
    patient_name: str
    uid: str
    date: str
    time: str
    accession: str
    series: dict[str, tuple[str, list[Path]]] = field(default_factory=dict)
    """SeriesInstanceUID -> (modality, files)."""

    @property
    def files(self) -> list[Path]:
        return [p for _, paths in self.series.values() for p in paths]


def _write_study(root: Path, *, patient_id: str, patient_name: str, date: str, time: str,
                 accession: str, series: list[tuple[str, int]], charset: str | None = None
                 ) -> Study:
    study = Study(patient_id, patient_name, generate_uid(), date, time, accession)
    for number, (modality, count) in enumerate(series, start=1):
        series_uid = generate_uid()
        paths = []
        for i in range(count):
            ds = ct_instance(patient_id=patient_id, patient_name=patient_name,
                             study_uid=study.uid, series_uid=series_uid, instance_number=i + 1,
                             rows=16, columns=16, study_date=date, study_time=time,
                             accession=accession, modality=modality, series_number=number)
            if charset:
                ds.SpecificCharacterSet = charset
            path = root / study.uid / series_uid / f"{i + 1:03d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        study.series[series_uid] = (modality, paths)
    return study


@dataclass
class World:
    archive: Archive
    tmp: Path
    a1: Study
    a2: Study
    b1: Study
    peer_dir: Path

    @property
    def studies(self) -> list[Study]:
        return [self.a1, self.a2, self.b1]

    def originals(self) -> dict[str, Path]:
        return {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
                for s in self.studies for p in s.files}


def store(archive: Archive, directory: Path) -> None:
    subprocess.run(["storescu", "-aec", archive.ae_title, "+sd", "+r", HOST,
                    str(archive.port), str(directory)], check=True, capture_output=True,
                   timeout=120)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    _need_dcmtk()
    tmp = tmp_path_factory.mktemp("qr")
    src = tmp / "src"
    a1 = _write_study(src, patient_id="PAT001", patient_name="DOE^JANE", date="20240102",
                      time="101500", accession="ACC001", series=[("CT", 5), ("PT", 5)])
    a2 = _write_study(src, patient_id="PAT001", patient_name="DOE^JANE", date="20230601",
                      time="083000", accession="ACC002", series=[("MR", 2)])
    b1 = _write_study(src, patient_id="PAT002", patient_name="MÜLLER^HANS", date="20240315",
                      time="141500", accession="ACC003", series=[("MR", 3)],
                      charset="ISO_IR 192")
    peer_port = free_port()
    peer_dir = tmp / "peer"
    peer_dir.mkdir()
    # +B: the destination writes the data set exactly as it arrived.
    peer = subprocess.Popen(["storescp", "+B", "-aet", PEER_AE, "-od", str(peer_dir),
                             str(peer_port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # A destination that accepts storage and nothing else (no Verification).
    storage_only = AE(ae_title=STORAGE_ONLY_AE)
    storage_only.supported_contexts = StoragePresentationContexts
    storage_only_port = free_port()
    storage_only_server = storage_only.start_server((HOST, storage_only_port), block=False)
    try:
        with Archive(tmp / "data", peers=f"{PEER_AE}@{HOST}:{peer_port},"
                     f"OFFLINE@{HOST}:{free_port()},"
                     f"{STORAGE_ONLY_AE}@{HOST}:{storage_only_port}") as archive:
            store(archive, src)
            archive.wait_indexed(15)
            yield World(archive, tmp, a1, a2, b1, peer_dir)
    finally:
        storage_only_server.shutdown()
        peer.terminate()
        peer.wait(timeout=10)


# ------------------------------------------------------------------ helpers
def findscu(world: World, model: str, keys: dict[str, str]) -> list[Dataset]:
    """Run dcmtk findscu and read back every response identifier (-X)."""
    out = world.tmp / f"find-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    args = ["findscu", model, "-aec", world.archive.ae_title, "-X", "-od", str(out)]
    for key, value in keys.items():
        args += ["-k", f"{key}={value}"]
    args += [HOST, str(world.archive.port)]
    subprocess.run(args, check=True, capture_output=True, timeout=60)
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def data_set_bytes(path: Path) -> bytes:
    """The encoded data set of a Part-10 file (everything after the file meta)."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def stored_bytes(world: World, sop_uid: str) -> bytes:
    """The data set bytes the archive holds for ``sop_uid`` (what it received)."""
    deps = world.archive.deps
    assert deps is not None
    (inst,) = deps.index.instances(sop_instance_uid=sop_uid)
    path = deps.blobs.local_path(inst.blob_key)
    assert path is not None
    return data_set_bytes(path)


def scu(archive: Archive, *contexts: str, **kwargs: Any) -> Any:
    ae = AE(ae_title="TESTSCU")
    for cx in contexts:
        ae.add_requested_context(cx)
    assoc = ae.associate(HOST, archive.port, ae_title=archive.ae_title, **kwargs)
    assert assoc.is_established
    return assoc


def identifier(**keys: Any) -> Dataset:
    ds = Dataset()
    for key, value in keys.items():
        setattr(ds, key, value)
    return ds


def keywords(ds: Dataset) -> set[str]:
    return {e.keyword for e in ds}


# ------------------------------------------------------------------ C-FIND
def test_patient_level_patient_root_fills_computed_keys(world: World) -> None:
    found = findscu(world, "-P", {
        "QueryRetrieveLevel": "PATIENT", "PatientID": "", "PatientName": "",
        "PatientBirthDate": "", "NumberOfPatientRelatedStudies": "",
        "NumberOfPatientRelatedSeries": "", "NumberOfPatientRelatedInstances": "",
    })
    by_id = {ds.PatientID: ds for ds in found}
    assert sorted(by_id) == ["PAT001", "PAT002"]
    assert keywords(by_id["PAT001"]) == {
        "QueryRetrieveLevel", "PatientID", "PatientName", "PatientBirthDate",
        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances"}
    assert by_id["PAT001"].NumberOfPatientRelatedStudies == 2
    assert by_id["PAT001"].NumberOfPatientRelatedSeries == 3
    assert by_id["PAT001"].NumberOfPatientRelatedInstances == 12
    assert by_id["PAT002"].NumberOfPatientRelatedStudies == 1
    assert by_id["PAT002"].NumberOfPatientRelatedInstances == 3
    assert by_id["PAT001"].PatientBirthDate == "19700101"
    # A non-ASCII name comes back in a character set that can carry it.
    assert by_id["PAT002"].SpecificCharacterSet == "ISO_IR 192"
    assert str(by_id["PAT002"].PatientName) == "MÜLLER^HANS"


def test_patient_level_wildcards(world: World) -> None:
    star = findscu(world, "-P", {"QueryRetrieveLevel": "PATIENT", "PatientName": "DOE*",
                                 "PatientID": ""})
    assert [ds.PatientID for ds in star] == ["PAT001"]
    question = findscu(world, "-P", {"QueryRetrieveLevel": "PATIENT", "PatientID": "PAT00?"})
    assert sorted(ds.PatientID for ds in question) == ["PAT001", "PAT002"]
    none = findscu(world, "-P", {"QueryRetrieveLevel": "PATIENT", "PatientID": "PAT0?"})
    assert none == []


def test_study_level_universal_matching_returns_computed_attributes(world: World) -> None:
    found = findscu(world, "-S", {
        "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "PatientID": "",
        "StudyDate": "", "AccessionNumber": "", "ModalitiesInStudy": "",
        "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "",
        "StudyDescription": "", "Manufacturer": "",
    })
    by_uid = {ds.StudyInstanceUID: ds for ds in found}
    assert set(by_uid) == {world.a1.uid, world.a2.uid, world.b1.uid}
    a1 = by_uid[world.a1.uid]
    assert list(a1.ModalitiesInStudy) == ["CT", "PT"]
    assert a1.NumberOfStudyRelatedSeries == 2
    assert a1.NumberOfStudyRelatedInstances == 10
    assert a1.AccessionNumber == "ACC001"
    assert a1.StudyDate == "20240102"
    assert a1.StudyDescription == "CT CHEST"
    # Not an index column: filled from the stored metadata.
    assert a1.Manufacturer == "VNA-SYNTHETIC"
    assert by_uid[world.b1.uid].ModalitiesInStudy == "MR"
    assert by_uid[world.a2.uid].NumberOfStudyRelatedInstances == 2


@pytest.mark.parametrize(("keys", "expected"), [
    ({"StudyDate": "20240101-20241231"}, {"a1", "b1"}),
    ({"StudyDate": "-20231231"}, {"a2"}),
    ({"StudyDate": "20240315-"}, {"b1"}),
    ({"StudyDate": "20240102"}, {"a1"}),
    ({"StudyTime": "0800-0900"}, {"a2"}),
    ({"AccessionNumber": "ACC00?"}, {"a1", "a2", "b1"}),
    ({"AccessionNumber": "ACC003"}, {"b1"}),
    ({"PatientName": "*JANE"}, {"a1", "a2"}),
    ({"ModalitiesInStudy": "PT"}, {"a1"}),
    ({"ModalitiesInStudy": "MR"}, {"a2", "b1"}),
])
def test_study_level_matching(world: World, keys: dict[str, str], expected: set[str]) -> None:
    found = findscu(world, "-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "",
                                  **keys})
    names = {"a1": world.a1.uid, "a2": world.a2.uid, "b1": world.b1.uid}
    assert {ds.StudyInstanceUID for ds in found} == {names[n] for n in expected}
    for ds in found:
        assert keywords(ds) == {"QueryRetrieveLevel", "StudyInstanceUID", *keys}


def test_study_level_uid_list_and_patient_root(world: World) -> None:
    listed = findscu(world, "-S", {"QueryRetrieveLevel": "STUDY",
                                   "StudyInstanceUID": f"{world.a2.uid}\\{world.b1.uid}"})
    assert {ds.StudyInstanceUID for ds in listed} == {world.a2.uid, world.b1.uid}
    patient_root = findscu(world, "-P", {"QueryRetrieveLevel": "STUDY", "PatientID": "PAT001",
                                         "StudyInstanceUID": "", "StudyDate": ""})
    assert {ds.StudyInstanceUID for ds in patient_root} == {world.a1.uid, world.a2.uid}
    assert all(ds.PatientID == "PAT001" for ds in patient_root)


def test_series_level(world: World) -> None:
    found = findscu(world, "-S", {
        "QueryRetrieveLevel": "SERIES", "StudyInstanceUID": world.a1.uid,
        "SeriesInstanceUID": "", "Modality": "", "SeriesNumber": "",
        "NumberOfSeriesRelatedInstances": "",
    })
    assert {ds.SeriesInstanceUID: ds.Modality for ds in found} == {
        uid: modality for uid, (modality, _) in world.a1.series.items()}
    assert [ds.NumberOfSeriesRelatedInstances for ds in found] == [5, 5]
    assert sorted(ds.SeriesNumber for ds in found) == [1, 2]
    pt = findscu(world, "-P", {"QueryRetrieveLevel": "SERIES", "PatientID": "PAT001",
                               "StudyInstanceUID": world.a1.uid, "Modality": "PT",
                               "SeriesInstanceUID": ""})
    assert [ds.Modality for ds in pt] == ["PT"]
    mr = findscu(world, "-S", {"QueryRetrieveLevel": "SERIES", "Modality": "MR",
                               "SeriesInstanceUID": ""})
    assert len(mr) == 2


def test_image_level(world: World) -> None:
    series_uid, (_, paths) = next(iter(world.a1.series.items()))
    found = findscu(world, "-S", {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": world.a1.uid,
        "SeriesInstanceUID": series_uid, "SOPInstanceUID": "", "InstanceNumber": "",
        "SOPClassUID": "", "Rows": "",
    })
    assert sorted(ds.InstanceNumber for ds in found) == [1, 2, 3, 4, 5]
    assert {ds.SOPClassUID for ds in found} == {CTImageStorage}
    assert {ds.Rows for ds in found} == {16}
    sops = [dcmread(p).SOPInstanceUID for p in paths[:2]]
    listed = findscu(world, "-P", {"QueryRetrieveLevel": "IMAGE", "PatientID": "PAT001",
                                   "StudyInstanceUID": world.a1.uid,
                                   "SeriesInstanceUID": series_uid,
                                   "SOPInstanceUID": "\\".join(sops)})
    assert sorted(ds.SOPInstanceUID for ds in listed) == sorted(sops)


def test_malformed_find_fails_and_association_stays_usable(world: World) -> None:
    assoc = scu(world.archive, StudyRootQueryRetrieveInformationModelFind,
                PatientRootQueryRetrieveInformationModelFind)
    try:
        bad = list(assoc.send_c_find(
            identifier(QueryRetrieveLevel="STUDY", StudyDate="2024XX01-20241231",
                       StudyInstanceUID=""),
            StudyRootQueryRetrieveInformationModelFind))
        assert len(bad) == 1
        rsp, ident = bad[0]
        assert rsp.Status == status.UNABLE_TO_PROCESS
        assert "StudyDate" in rsp.ErrorComment
        assert ident is None

        bad_uid = list(assoc.send_c_find(
            identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2.abc"),
            StudyRootQueryRetrieveInformationModelFind))
        assert bad_uid[-1][0].Status == status.UNABLE_TO_PROCESS

        wrong_level = list(assoc.send_c_find(
            identifier(QueryRetrieveLevel="PATIENT", PatientID=""),
            StudyRootQueryRetrieveInformationModelFind))
        assert wrong_level[-1][0].Status == status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
        no_level = list(assoc.send_c_find(
            identifier(PatientID=""), PatientRootQueryRetrieveInformationModelFind))
        assert no_level[-1][0].Status == status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS

        good = list(assoc.send_c_find(
            identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientID="PAT002"),
            StudyRootQueryRetrieveInformationModelFind))
        assert [r.Status for r, _ in good] == [status.PENDING, status.SUCCESS]
        assert good[0][1].StudyInstanceUID == world.b1.uid
    finally:
        assoc.release()


# ------------------------------------------------------------------ C-MOVE
def test_movescu_sends_every_instance_byte_identical(world: World) -> None:
    study = world.a1
    subprocess.run(["movescu", "-S", "-aec", world.archive.ae_title, "-aem", PEER_AE,
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.uid}",
                    HOST, str(world.archive.port)], check=True, capture_output=True,
                   timeout=120)
    originals = world.originals()
    wanted = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study.files}

    def received() -> dict[str, Path]:
        files = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
                 for p in world.peer_dir.iterdir() if p.is_file()}
        return files if wanted <= set(files) else {}

    files = wait_for(received, 30, 0.05, "the C-MOVE destination to hold the study")
    for sop in wanted:
        got = data_set_bytes(files[sop])
        assert got == stored_bytes(world, sop)
        assert got == data_set_bytes(originals[sop])


def test_move_pending_responses_carry_counts(world: World) -> None:
    assoc = scu(world.archive, StudyRootQueryRetrieveInformationModelMove)
    try:
        responses = list(assoc.send_c_move(
            identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID=world.b1.uid,
                       SeriesInstanceUID=next(iter(world.b1.series))),
            PEER_AE, StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    statuses = [r.Status for r, _ in responses]
    assert statuses == [status.PENDING] * 3 + [status.SUCCESS]
    assert [r.NumberOfRemainingSuboperations for r, _ in responses[:3]] == [2, 1, 0]
    assert [r.NumberOfCompletedSuboperations for r, _ in responses[:3]] == [1, 2, 3]
    final = responses[-1][0]
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 0)


def test_move_patient_level_patient_root(world: World) -> None:
    assoc = scu(world.archive, PatientRootQueryRetrieveInformationModelMove)
    try:
        responses = list(assoc.send_c_move(
            identifier(QueryRetrieveLevel="PATIENT", PatientID="PAT001"),
            PEER_AE, PatientRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.Status == status.SUCCESS
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (12, 0)
    assert len(responses) == 13  # a pending response per sub-operation, then the final one


def test_move_to_unknown_destination_is_refused(world: World) -> None:
    assoc = scu(world.archive, StudyRootQueryRetrieveInformationModelMove)
    try:
        responses = list(assoc.send_c_move(
            identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=world.a1.uid),
            "NOWHERE", StudyRootQueryRetrieveInformationModelMove))
        assert [r.Status for r, _ in responses] == [status.MOVE_DESTINATION_UNKNOWN]
        # A known peer that does not answer is as unreachable as an unknown one.
        offline = list(assoc.send_c_move(
            identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=world.a1.uid),
            "OFFLINE", StudyRootQueryRetrieveInformationModelMove))
        assert [r.Status for r, _ in offline] == [status.MOVE_DESTINATION_UNKNOWN]
        assert assoc.is_established
    finally:
        assoc.release()


def test_movescu_unknown_destination_reports_a801(world: World) -> None:
    done = subprocess.run(["movescu", "-v", "-S", "-aec", world.archive.ae_title, "-aem",
                           "NOWHERE", "-k", "QueryRetrieveLevel=STUDY",
                           "-k", f"StudyInstanceUID={world.a2.uid}",
                           HOST, str(world.archive.port)], capture_output=True, timeout=60)
    output = (done.stdout + done.stderr).decode(errors="replace")
    # dcmtk names status 0xA801 rather than printing it.
    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in output


def test_move_without_unique_key_fails(world: World) -> None:
    assoc = scu(world.archive, StudyRootQueryRetrieveInformationModelMove)
    try:
        responses = list(assoc.send_c_move(
            identifier(QueryRetrieveLevel="SERIES", SeriesInstanceUID=""),
            PEER_AE, StudyRootQueryRetrieveInformationModelMove))
        assert responses[-1][0].Status == status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
        invalid = list(assoc.send_c_move(
            identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="../etc"),
            PEER_AE, StudyRootQueryRetrieveInformationModelMove))
        assert invalid[-1][0].Status == status.UNABLE_TO_PROCESS
        assert "not a valid UID" in invalid[-1][0].ErrorComment
        # To a destination that accepts storage only: still the reason, not 0xA801.
        refused = list(assoc.send_c_move(
            identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="../etc"),
            STORAGE_ONLY_AE, StudyRootQueryRetrieveInformationModelMove))
        assert refused[-1][0].Status == status.UNABLE_TO_PROCESS
        assert "not a valid UID" in refused[-1][0].ErrorComment
    finally:
        assoc.release()


# ------------------------------------------------------------------ C-GET
def test_getscu_retrieves_every_instance_of_a_study(world: World) -> None:
    out = world.tmp / "get"
    out.mkdir()
    subprocess.run(["getscu", "-S", "-aec", world.archive.ae_title, "-od", str(out),
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={world.a1.uid}",
                    HOST, str(world.archive.port)], check=True, capture_output=True,
                   timeout=120)
    originals = world.originals()
    got = {dcmread(p).SOPInstanceUID: p for p in out.iterdir() if p.is_file()}
    wanted = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in world.a1.files}
    assert set(got) == wanted
    for sop, path in got.items():
        # getscu offers several syntaxes per context; the archive picks the stored one.
        assert data_set_bytes(path) == stored_bytes(world, sop)
        assert data_set_bytes(path) == data_set_bytes(originals[sop])
        assert dcmread(path) == dcmread(originals[sop])


def c_get_raw(archive: Archive, ident: Dataset, transfer_syntax: str = ExplicitVRLittleEndian
              ) -> tuple[list[Dataset], dict[str, bytes]]:
    """C-GET with a pynetdicom SCU that keeps each received data set's exact bytes.

    The SCU accepts CT Image Storage in ``transfer_syntax`` only.
    """
    received: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        sop = str(request.AffectedSOPInstanceUID)
        try:
            # This process runs the archive too, which receives data sets chunked
            # to files (STORE_RECV_CHUNKED_DATASET): so does this SCU.
            received[sop] = data_set_bytes(Path(event.dataset_path))
        except AttributeError:
            received[sop] = cast(BytesIO, request.DataSet).getvalue()
        return status.SUCCESS

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, transfer_syntax)
    assoc = ae.associate(HOST, archive.port, ae_title=archive.ae_title,
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        responses = [r for r, _ in assoc.send_c_get(
            ident, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    assert all(received.values()), "a received data set was empty"
    return responses, received


def test_get_sends_stored_bytes_over_the_same_association(world: World) -> None:
    responses, received = c_get_raw(
        world.archive, identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=world.b1.uid))
    assert [r.Status for r in responses] == [status.PENDING] * 3 + [status.SUCCESS]
    assert responses[-1].NumberOfCompletedSuboperations == 3
    assert len(received) == 3
    for sop, data in received.items():
        assert data == stored_bytes(world, sop)


def test_get_converts_only_when_the_stored_syntax_is_refused(world: World) -> None:
    """A requester accepting Implicit VR only gets the same data set, re-encoded."""
    responses, received = c_get_raw(
        world.archive, identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=world.a2.uid),
        ImplicitVRLittleEndian)
    assert responses[-1].Status == status.SUCCESS
    originals = world.originals()
    assert len(received) == 2
    for sop, data in received.items():
        ds = read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)
        original = dcmread(originals[sop])
        assert data != stored_bytes(world, sop)
        assert ds.SOPInstanceUID == sop
        assert ds.PixelData == original.PixelData


def test_get_image_level_uid_list(world: World) -> None:
    originals = sorted(world.originals())
    pick = originals[:3]
    responses, received = c_get_raw(
        world.archive, identifier(QueryRetrieveLevel="IMAGE", SOPInstanceUID=pick))
    assert responses[-1].Status == status.SUCCESS
    assert sorted(received) == pick


def test_get_counts_unreadable_objects_as_failed(tmp_path: Path) -> None:
    _need_dcmtk()
    study = _write_study(tmp_path / "src", patient_id="PAT009", patient_name="TEST^GONE",
                         date="20240101", time="090000", accession="ACC9",
                         series=[("CT", 3)])
    with Archive(tmp_path / "data") as archive:
        store(archive, tmp_path / "src")
        archive.wait_indexed(3)
        assert archive.deps is not None
        lost = archive.deps.index.instances(study_instance_uid=study.uid)[1]
        path = archive.deps.blobs.local_path(lost.blob_key)
        assert path is not None
        path.unlink()
        responses, received = c_get_raw(
            archive, identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study.uid))
    final = responses[-1]
    assert final.Status == status.SUBOPERATIONS_COMPLETE_WITH_FAILURES
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 1)
    assert lost.ref.sop_instance_uid not in received
    assert len(received) == 2


def test_get_from_a_store_without_local_files(tmp_path: Path) -> None:
    """Blobs without a local path (as on S3) go out through a temporary copy, removed after."""
    _need_dcmtk()
    study = _write_study(tmp_path / "src", patient_id="PAT010", patient_name="TEST^MEM",
                         date="20240101", time="090000", accession="ACC10",
                         series=[("CT", 2)])
    with Archive(tmp_path / "data", storage_url="memory://") as archive:
        store(archive, tmp_path / "src")
        archive.wait_indexed(2)
        responses, received = c_get_raw(
            archive, identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study.uid))
        assert archive.deps is not None
        deps = archive.deps
        for sop, data in received.items():
            (inst,) = deps.index.instances(sop_instance_uid=sop)
            with deps.blobs.open(inst.blob_key) as fp:
                blob = fp.read()
            assert blob.endswith(data)
        leftovers = list((tmp_path / "data").rglob("vna-retrieve-*"))
    assert responses[-1].Status == status.SUCCESS
    assert len(received) == 2
    assert leftovers == []
