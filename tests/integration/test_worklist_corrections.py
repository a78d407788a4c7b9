"""Issue #4, the index side, through the real worklist path on a real archive.

Orders arrive over MLLP; a modality sends one study under a Patient ID keyed in
at the console (it lands in reconciliation) and another correctly. A person
links the wrong one to its order through the JSON API; then the RIS merges the
second patient into the first with ADT^A40 over MLLP, and the merge is undone
through the API. At each step findscu (dcmtk), QIDO-RS, WADO-RS metadata and
getscu show what the index says, and the stored bytes never change.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from services.dicomweb.app import create_app
from services.worklist.scp import worklist_store
from services.worklist.service import start_hl7, subscribe_binder
from tests.support.archive import Archive
from tests.support.processes import free_port, wait_for
from vna.journal import committed_chain, decode, is_journal
from vna.model import BlobKey
from vna.testing.hl7msgs import ack_code, adt_message, order_message
from vna.testing.synthetic import ct_instance
from vna.worklist.hl7 import send_hl7
from vna.worklist.model import ReconciliationStatus

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
PATIENT_ID, PATIENT_NAME = "PC001", "RIGHT^ANNA"
OTHER_ID, OTHER_NAME = "PC002", "RIGHT^ANNA^MARIA"
TYPO_ID, TYPO_NAME = "TYPO1", "WRONG^NAME"


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[tuple[Archive, int]]:
    missing = [t for t in ("storescu", "findscu", "getscu") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"dcmtk tools missing ({', '.join(missing)}): apt-get install -y dcmtk")
    with Archive(tmp_path / "vna", ae_title="VNA") as arch:
        assert arch.deps is not None
        subscribe_binder(arch.deps)
        hl7 = start_hl7(arch.deps, free_port())
        assert hl7 is not None
        try:
            yield arch, hl7.port
        finally:
            hl7.stop()


def _send_study(arch: Archive, directory: Path, *, patient_id: str, patient_name: str,
                accession: str) -> list[Dataset]:
    directory.mkdir()
    study, series = generate_uid(), generate_uid()
    images = [ct_instance(study_uid=study, series_uid=series, patient_id=patient_id,
                          patient_name=patient_name, accession=accession,
                          instance_number=n + 1, rows=8, columns=8) for n in range(2)]
    for image in images:
        image.save_as(directory / f"{image.SOPInstanceUID}.dcm", enforce_file_format=True)
    subprocess.run(["storescu", "-aec", arch.ae_title, "+sd", HOST, str(arch.port),
                    str(directory)], check=True, capture_output=True, timeout=60)
    return images


def _findscu(arch: Archive, tmp: Path, keys: dict[str, str]) -> list[Dataset]:
    out = tmp / f"find-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    args = ["findscu", "-S", "-aec", arch.ae_title, "-X", "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY"]
    for key in ("StudyInstanceUID", "PatientID", "PatientName", "IssuerOfPatientID",
                "AccessionNumber"):
        args += ["-k", f"{key}={keys.get(key, '')}"]
    subprocess.run([*args, HOST, str(arch.port)], check=True, capture_output=True,
                   timeout=60)
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _getscu(arch: Archive, tmp: Path, study: str) -> list[Dataset]:
    out = tmp / f"get-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    subprocess.run(["getscu", "-S", "-aec", arch.ae_title, "-od", str(out),
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                    HOST, str(arch.port)], check=True, capture_output=True, timeout=60)
    return [dcmread(p) for p in sorted(out.iterdir()) if p.is_file()]


def _value(obj: dict[str, Any], tag: str) -> str:
    values = obj.get(tag, {}).get("Value") or [""]
    first = values[0]
    return str(first.get("Alphabetic", "")) if isinstance(first, dict) else str(first)


def _multipart_bodies(content_type: str, content: bytes) -> list[bytes]:
    msg = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + content)
    bodies = []
    for part in msg.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        bodies.append(payload)
    return bodies


def _stored(arch: Archive, journal: bool = False) -> dict[str, bytes]:
    """Every stored DICOM blob (or, with ``journal``, every correction journal entry),
    checked against its content address."""
    assert arch.deps is not None
    found = {}
    for key in arch.deps.blobs.keys():
        with arch.deps.blobs.open(key) as fp:
            data = fp.read()
        assert hashlib.sha256(data).hexdigest() == key
        if is_journal(data) == journal:
            found[key] = data
    return found


def test_link_corrects_and_merge_is_undone(archive: tuple[Archive, int], tmp_path: Path
                                           ) -> None:
    arch, hl7_port = archive
    deps = arch.deps
    assert deps is not None
    for patient_id, name, accession, rp in ((PATIENT_ID, PATIENT_NAME, "C001", "RP1"),
                                            (OTHER_ID, OTHER_NAME, "C002", "RP2")):
        ack = send_hl7(HOST, hl7_port, order_message(
            patient_id=patient_id, patient_name=name, accession=accession,
            requested_procedure_id=rp, station_ae="CT1"))
        assert ack_code(ack) == "AA"
    wrong = _send_study(arch, tmp_path / "wrong", patient_id=TYPO_ID, patient_name=TYPO_NAME,
                        accession="C001")
    right = _send_study(arch, tmp_path / "right", patient_id=OTHER_ID,
                        patient_name=OTHER_NAME, accession="C002")
    wrong_uid, right_uid = str(wrong[0].StudyInstanceUID), str(right[0].StudyInstanceUID)
    arch.wait_indexed(4)
    store = worklist_store(deps)

    def queued() -> list[Any]:
        with store.transaction() as tx:
            bound = tx.bindings(study_instance_uid=right_uid)
            items = tx.reconciliations(ReconciliationStatus.OPEN)
        return items if bound and len(items) == 1 else []

    [item] = wait_for(queued, 60, 0.05, "one study bound, one in reconciliation")
    assert item.study_instance_uid == wrong_uid
    stored = _stored(arch)
    assert len(stored) == 4
    api = TestClient(create_app(deps))
    before = api.get(f"/dicomweb/studies/{wrong_uid}/metadata")
    assert before.status_code == 200
    assert {_value(d, "00100020") for d in before.json()} == {TYPO_ID}

    # ---- a person links the study to its order: a new metadata version
    [order] = api.get("/worklist/orders", params={"accession_number": "C001"}).json()
    linked = api.post(f"/worklist/reconciliation/{item.item_id}/link",
                      json={"order_id": order["order_id"]}, headers={"X-VNA-User": "ra"})
    assert linked.status_code == 200, linked.text
    assert linked.json()["note"] == f"index version {wrong_uid}@1"

    [found] = _findscu(arch, tmp_path, {"PatientID": PATIENT_ID})
    assert (found.StudyInstanceUID, found.PatientID, str(found.PatientName),
            found.IssuerOfPatientID, found.AccessionNumber) == (
        wrong_uid, PATIENT_ID, PATIENT_NAME, "HOSP", "C001")
    assert _findscu(arch, tmp_path, {"PatientID": TYPO_ID}) == []
    [qido] = api.get("/dicomweb/studies", params={"PatientID": PATIENT_ID}).json()
    assert (_value(qido, "0020000D"), _value(qido, "00100010")) == (wrong_uid, PATIENT_NAME)
    after = api.get(f"/dicomweb/studies/{wrong_uid}/metadata")
    assert after.headers["ETag"] != before.headers["ETag"]
    assert {_value(d, "00100020") for d in after.json()} == {PATIENT_ID}
    assert {_value(d, "00100010") for d in after.json()} == {PATIENT_NAME}
    [version] = api.get(f"/worklist/studies/{wrong_uid}/versions").json()
    assert version["actor"] == "api:ra" and version["previous"]["PatientID"] == TYPO_ID
    as_received = api.get(f"/worklist/studies/{wrong_uid}/versions/0/metadata").json()
    assert as_received == before.json()
    # Retrieval hands out the corrected attributes; the pixels are the ones received.
    got = _getscu(arch, tmp_path, wrong_uid)
    assert {(g.PatientID, str(g.PatientName)) for g in got} == {(PATIENT_ID, PATIENT_NAME)}
    sent = {str(i.SOPInstanceUID): i.PixelData for i in wrong}
    assert {str(g.SOPInstanceUID): g.PixelData for g in got} == sent
    wado = api.get(f"/dicomweb/studies/{wrong_uid}",
                   headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert wado.status_code == 200
    parts = [dcmread(BytesIO(body)) for body in _multipart_bodies(wado.headers["content-type"],
                                                                  wado.content)]
    assert {(p.PatientID, p.AccessionNumber) for p in parts} == {(PATIENT_ID, "C001")}
    assert {str(p.SOPInstanceUID): p.PixelData for p in parts} == sent
    for image in wrong:
        pristine = api.get(f"/worklist/studies/{wrong_uid}/instances/"
                           f"{image.SOPInstanceUID}/pristine")
        assert hashlib.sha256(pristine.content).hexdigest() in stored
        assert dcmread(BytesIO(pristine.content)).PatientID == TYPO_ID
    assert _stored(arch) == stored

    # ---- the RIS merges the second patient into the first (ADT^A40 over MLLP)
    ack = send_hl7(HOST, hl7_port, adt_message("A40", patient_id=PATIENT_ID, name=PATIENT_NAME,
                                               prior_patient_id=OTHER_ID))
    assert ack_code(ack) == "AA", ack
    # The prior ID now names the surviving patient: all of that patient's studies.
    by_old = _findscu(arch, tmp_path, {"PatientID": OTHER_ID})
    assert {(f.StudyInstanceUID, f.PatientID, str(f.PatientName)) for f in by_old} == {
        (right_uid, PATIENT_ID, PATIENT_NAME), (wrong_uid, PATIENT_ID, PATIENT_NAME)}
    assert {f.StudyInstanceUID for f in _findscu(arch, tmp_path, {"PatientID": PATIENT_ID})
            } == {wrong_uid, right_uid}
    qido = api.get("/dicomweb/studies", params={"PatientID": OTHER_ID}).json()
    assert {(_value(q, "0020000D"), _value(q, "00100020")) for q in qido} == {
        (right_uid, PATIENT_ID), (wrong_uid, PATIENT_ID)}
    merged = api.get(f"/dicomweb/studies/{right_uid}/metadata").json()
    assert {_value(d, "00100020") for d in merged} == {PATIENT_ID}
    [moved] = deps.index.audit_records("studies.merged")
    assert moved["detail"].startswith(f"into={PATIENT_ID}^HOSP") and "studies=1" in moved["detail"]

    # ---- and the merge is undone through the API
    with store.transaction() as tx:
        [record] = [r for r in tx.audit_trail() if r.action == "patient.merged"]
    merge_id = record.detail.split("merge=")[1].split()[0]
    undone = api.post(f"/worklist/merges/{merge_id}/undo", headers={"X-VNA-User": "ra"})
    assert undone.status_code == 200, undone.text
    [back] = _findscu(arch, tmp_path, {"PatientID": OTHER_ID})
    assert (back.StudyInstanceUID, back.PatientID, str(back.PatientName)) == (
        right_uid, OTHER_ID, OTHER_NAME)
    assert [f.StudyInstanceUID for f in _findscu(arch, tmp_path, {"PatientID": PATIENT_ID})
            ] == [wrong_uid]
    restored = api.get(f"/dicomweb/studies/{right_uid}/metadata").json()
    assert restored == api.get(f"/worklist/studies/{right_uid}/versions/0/metadata").json()
    assert [v["kind"] for v in api.get(f"/worklist/studies/{right_uid}/versions").json()] == [
        "merge", "unmerge"]
    got = _getscu(arch, tmp_path, right_uid)
    assert {g.PatientID for g in got} == {OTHER_ID}
    # Nothing stored was rewritten; every step is in the tamper-evident trail, and in
    # the correction journal next to the images (what vna reindex replays).
    assert _stored(arch) == stored
    entries = [decode(BlobKey(k), d) for k, d in _stored(arch, journal=True).items()]
    assert [e.kind for e in committed_chain(entries)[0]] == ["correction", "merge", "unmerge"]
    assert {a["action"] for a in deps.index.audit_records()} >= {
        "study.corrected", "studies.merged", "studies.unmerged", "patient.merged",
        "patient.unmerged", "reconciliation.linked"}
    assert deps.index.verify_audit()
