"""Corrections, merges and unmerges survive ``vna reindex`` (the correction journal),
over SQLite and PostgreSQL, with the blobs on the filesystem."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from vna.adapters.blob.filesystem import FilesystemBlobStore
from vna.adapters.index.schema import patient_merges
from vna.adapters.index.sqlalchemy import SqlIndex
from vna.dicom.matching import Level, build_query
from vna.journal import MAGIC, BlobJournal, decode
from vna.model import BlobKey
from vna.ports import Unavailable
from vna.testing.synthetic import ct_instance
from vna.usecases.reindex import reindex
from vna.usecases.search import search

RETURN = ["PatientID", "IssuerOfPatientID", "PatientName", "AccessionNumber",
          "NumberOfStudyRelatedInstances"]


class Archive:
    """A blob store on disk and an index over it, journaling corrections there."""

    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        self.blobs = FilesystemBlobStore(root / "blobs")
        self.index = SqlIndex.from_url(url, journal=BlobJournal(self.blobs))
        self.count = 0

    def receive(self, *datasets: Dataset) -> None:
        """Put the instances in the blob store and index them (what reindex does for
        each DICOM blob: claim, then upsert, with the indexer's merge hook)."""
        for ds in datasets:
            self.count += 1
            path = self.root / f"in-{self.count}.dcm"
            ds.save_as(path, enforce_file_format=True)
            key = BlobKey(hashlib.sha256(path.read_bytes()).hexdigest())
            self.blobs.put_file(key, path)
        report = reindex(blobs=self.blobs, index=self.index)
        assert report.failed == 0 and not report.mismatched


def _study(patient_id: str, name: str, accession: str, instances: int = 2) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    return [ct_instance(patient_id=patient_id, patient_name=name, study_uid=study,
                        series_uid=series, instance_number=n + 1, accession=accession)
            for n in range(instances)]


def _uid(datasets: list[Dataset]) -> str:
    return str(datasets[0].StudyInstanceUID)


def _merges(index: SqlIndex) -> list[dict[str, Any]]:
    with index.engine.connect() as conn:
        rows = conn.execute(select(patient_merges).order_by(patient_merges.c.merged_at))
        return [{**r._mapping, "studies": json.loads(r.studies),
                 "prior_patient": json.loads(r.prior_patient)} for r in rows]


def snapshot(index: SqlIndex, patient_ids: list[str]) -> dict[str, Any]:
    """What C-FIND / QIDO-RS / WADO-RS metadata and the worklist's screens show."""
    studies = sorted(search(build_query(Level.STUDY, {}, return_keys=RETURN), index=index),
                     key=lambda r: r["0020000D"]["Value"][0])
    out: dict[str, Any] = {
        "studies": studies,
        "patients": sorted(search(build_query(Level.PATIENT, {}, return_keys=[
            "PatientName", "NumberOfPatientRelatedStudies"]), index=index), key=json.dumps),
        "by_patient": {pid: sorted(json.dumps(r, sort_keys=True) for r in search(
            build_query(Level.STUDY, {"PatientID": pid}, return_keys=RETURN), index=index))
            for pid in patient_ids},
        "instances_by_patient": {pid: sorted(i.ref.sop_instance_uid for i in index.instances(
            patient_id=pid)) for pid in patient_ids},
        "merges": _merges(index),
        "versions": {}, "metadata": {},
    }
    for row in studies:
        uid = row["0020000D"]["Value"][0]
        versions = index.study_versions(uid)
        out["versions"][uid] = versions
        out["metadata"][uid] = {n: index.metadata(uid, version=n)
                                for n in range(len(versions) + 1)}
        assert index.metadata(uid) == out["metadata"][uid][len(versions)]
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, ...]]:
    """Three empty index databases of one backend: the original and two rebuilds."""
    if request.param == "sqlite":
        yield tuple(f"sqlite:///{tmp_path / name}.sqlite"
                    for name in ("index", "rebuilt", "third"))
    else:
        create = request.getfixturevalue("new_postgres_database")
        yield create(), create(), create()


def _day(archive: Archive) -> tuple[dict[str, list[Dataset]], dict[str, str]]:
    """Correct, merge (a study joins the merge as it arrives), merge again, unmerge,
    correct again; a study arrives after the unmerge and must stay untouched."""
    index = archive.index
    s = {"a": _study("P1", "DOE^JANE", "ACC-A"), "b": _study("P2", "ROE^RICHARD", "ACC-B"),
         "c": _study("P3", "POE^EDGAR", "ACC-C", 1)}
    archive.receive(*s["a"], *s["b"], *s["c"])
    index.correct_study(_uid(s["a"]), {"PatientName": "DOE^JANET", "AccessionNumber": "A1"},
                        reason="linked to order A1", actor="alice")
    refs = {"m1": index.merge_patients("P1", "", "P2", "", actor="adt")}
    s["d"] = _study("P1", "DOE^JANE", "ACC-D")
    archive.receive(*s["d"])  # under a merged-away patient: follows the merge
    refs["m2"] = index.merge_patients("P3", "", "P2", "", actor="adt")
    index.unmerge_patients(refs["m1"], actor="bob")
    index.correct_study(_uid(s["a"]), {"AccessionNumber": "A2"}, reason="wrong order",
                        actor="carol")
    index.correct_study(_uid(s["c"]), {"StudyDescription": "CT HEAD"}, reason="typo",
                        actor="carol")
    s["e"] = _study("P1", "DOE^JANE", "ACC-E", 1)
    archive.receive(*s["e"])  # after the unmerge: nobody's merge
    return s, refs


def test_reindex_replays_corrections_merges_and_unmerges(
        urls: tuple[str, ...], tmp_path: Path) -> None:
    archive = Archive(tmp_path, urls[0])
    s, refs = _day(archive)
    patient_ids = ["P1", "P2", "P3"]
    before = snapshot(archive.index, patient_ids)
    # The day did what it says (so that equal snapshots mean something).
    assert [v["kind"] for v in before["versions"][_uid(s["a"])]] == [
        "correction", "merge", "unmerge", "correction"]
    assert [v["kind"] for v in before["versions"][_uid(s["d"])]] == ["merge", "unmerge"]
    assert [v["kind"] for v in before["versions"][_uid(s["c"])]] == ["merge", "correction"]
    assert before["versions"][_uid(s["e"])] == []
    assert {json.loads(r)["0020000D"]["Value"][0] for r in before["by_patient"]["P3"]} == {
        _uid(s["b"]), _uid(s["c"])}  # P3 is merged into P2: its query finds P2's studies

    rebuilt = SqlIndex.from_url(urls[1], journal=BlobJournal(archive.blobs))
    report = reindex(blobs=archive.blobs, index=rebuilt)
    instances = sum(len(v) for v in s.values())
    assert (report.indexed, report.failed, report.orphaned, report.mismatched) == (
        instances, 0, 0, [])
    assert report.journal == report.replayed == 7  # 3 corrections, 2 merges, 1 join, 1 unmerge
    after = snapshot(rebuilt, patient_ids)
    for part in before:
        assert after[part] == before[part], part
    audit = rebuilt.audit_records("index.reindexed")
    assert len(audit) == 1 and "journal=7 replayed=7" in audit[0]["detail"]
    assert rebuilt.verify_audit()

    # Reindexing again changes nothing; the rebuilt index continues the journal:
    # undo the second merge there, and a second rebuild still agrees.
    again = reindex(blobs=archive.blobs, index=rebuilt)
    assert (again.indexed, again.replayed, again.mismatched) == (0, 0, [])
    assert snapshot(rebuilt, patient_ids) == before
    rebuilt.unmerge_patients(refs["m2"], actor="dave")
    assert {r["00100020"]["Value"][0] for r in search(build_query(
        Level.STUDY, {"StudyInstanceUID": _uid(s["c"])}, return_keys=RETURN),
        index=rebuilt)} == {"P3"}
    undone = snapshot(rebuilt, patient_ids)
    archive.index.close()
    rebuilt.close()
    third = SqlIndex.from_url(urls[2])
    report = reindex(blobs=archive.blobs, index=third)
    assert (report.journal, report.replayed, report.orphaned, report.mismatched) == (
        8, 8, 0, [])
    assert snapshot(third, patient_ids) == undone
    third.close()


def test_a_journal_entry_whose_transaction_failed_is_not_replayed(
        urls: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = Archive(tmp_path, urls[0])
    study = _study("P1", "DOE^JANE", "ACC-A")
    archive.receive(*study)
    index = archive.index
    index.correct_study(_uid(study), {"AccessionNumber": "A1"}, reason="r", actor="alice")

    def broken(*args: Any, **kwargs: Any) -> str:
        raise OperationalError("INSERT INTO audit", {}, Exception("database went away"))

    with monkeypatch.context() as patch:  # the commit fails after the journal write
        patch.setattr(index, "_append_audit", broken)
        with pytest.raises(Unavailable):
            index.correct_study(_uid(study), {"AccessionNumber": "WRONG"}, reason="r",
                                actor="mallory")
    journal = [decode(k, archive.blobs.open(k).read()) for k in archive.blobs.keys()
               if archive.blobs.read_range(k, 0, len(MAGIC)) == MAGIC]
    assert sorted(e.doc["changes"]["AccessionNumber"] for e in journal) == ["A1", "WRONG"]
    index.correct_study(_uid(study), {"AccessionNumber": "A2"}, reason="r", actor="alice")
    before = snapshot(index, ["P1"])
    assert [v["changes"] for v in before["versions"][_uid(study)]] == [
        {"AccessionNumber": "A1"}, {"AccessionNumber": "A2"}]

    rebuilt = SqlIndex.from_url(urls[1])
    report = reindex(blobs=archive.blobs, index=rebuilt)
    assert (report.journal, report.replayed, report.orphaned, report.mismatched) == (
        3, 2, 1, [])
    assert snapshot(rebuilt, ["P1"]) == before
    index.close()
    rebuilt.close()


def test_vna_reindex_command_rebuilds_corrections(tmp_path: Path) -> None:
    archive = Archive(tmp_path, f"sqlite:///{tmp_path / 'index.sqlite'}")
    s, _ = _day(archive)
    before = snapshot(archive.index, ["P1", "P2", "P3"])
    archive.index.close()
    env = {**os.environ, "VNA_DATA_DIR": str(tmp_path / "data"),
           "VNA_STORAGE_URL": archive.blobs.root.resolve().as_uri(),
           "VNA_INDEX_URL": f"sqlite:///{tmp_path / 'cli.sqlite'}"}
    done = subprocess.run([sys.executable, "-m", "vna", "reindex"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "replayed 7 of 7 correction journal entries" in done.stdout
    rebuilt = SqlIndex.from_url(f"sqlite:///{tmp_path / 'cli.sqlite'}")
    assert snapshot(rebuilt, ["P1", "P2", "P3"]) == before
    assert len(s) == 5
    rebuilt.close()


def test_an_entry_that_cannot_be_replayed_is_reported_and_the_chain_goes_on(
        urls: tuple[str, ...], tmp_path: Path) -> None:
    archive = Archive(tmp_path, urls[0])
    kept, lost = _study("P1", "DOE^JANE", "ACC-A"), _study("P2", "ROE^RICHARD", "ACC-B", 1)
    archive.receive(*kept, *lost)
    archive.index.correct_study(_uid(lost), {"AccessionNumber": "B1"}, reason="r", actor="a")
    archive.index.correct_study(_uid(kept), {"AccessionNumber": "A1"}, reason="r", actor="a")
    for path in (tmp_path / "blobs").glob("??/??/*"):  # the lost study's blob is gone
        if path.read_bytes()[:len(MAGIC)] != MAGIC and _uid(lost) in str(
                dcmread(path, stop_before_pixels=True).StudyInstanceUID):
            path.unlink()
    archive.index.close()

    rebuilt = SqlIndex.from_url(urls[1], journal=BlobJournal(archive.blobs))
    report = reindex(blobs=archive.blobs, index=rebuilt)
    assert (report.journal, report.replayed, report.orphaned) == (2, 2, 0)
    [differs] = report.mismatched
    assert "not applied" in differs and _uid(lost) in differs
    assert [v["changes"] for v in rebuilt.study_versions(_uid(kept))] == [
        {"AccessionNumber": "A1"}]
    assert [r["outcome"] for r in rebuilt.audit_records("index.reindexed")] == ["incomplete"]
    # Both keys are held, so the next entry chains to the last one: a later rebuild
    # does not mistake the rebuilt index's entries for dead ends.
    assert len(rebuilt.journal_keys()) == 2
    rebuilt.correct_study(_uid(kept), {"AccessionNumber": "A2"}, reason="r", actor="a")
    third = SqlIndex.from_url(urls[2])
    again = reindex(blobs=archive.blobs, index=third)
    assert (again.journal, again.replayed, again.orphaned, len(again.mismatched)) == (3, 3, 0, 1)
    assert [v["changes"] for v in third.study_versions(_uid(kept))] == [
        {"AccessionNumber": "A1"}, {"AccessionNumber": "A2"}]
    rebuilt.close()
    third.close()
