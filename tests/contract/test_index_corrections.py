"""Corrections and patient merges in the Index, over SQLite and PostgreSQL (issue #4)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydicom.uid import generate_uid

from vna.adapters.index.sqlalchemy import SqlIndex
from vna.dicom.corrections import CorrectionError, json_text
from vna.dicom.header import extract_record
from vna.dicom.matching import Level, build_query
from vna.events import InstanceStored
from vna.model import BlobKey, InstanceClaim
from vna.ports import ClaimOutcome, ConflictError, ConflictKind
from vna.testing.synthetic import ct_instance


def _study(index: SqlIndex, *, patient_id: str, patient_name: str = "DOE^JANE",
           accession: str = "ACC1", instances: int = 2) -> str:
    """Index (claim, then upsert) a study of ``instances`` instances; its UID."""
    study, series = generate_uid(), generate_uid()
    for n in range(instances):
        ds = ct_instance(patient_id=patient_id, patient_name=patient_name, study_uid=study,
                         series_uid=series, instance_number=n + 1, accession=accession)
        record = extract_record(ds, blob_key=f"{n:x}".rjust(64, "b"), size=100,
                                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))
        claim, event = _claim(study, patient_id, sop=str(ds.SOPInstanceUID), series=series)
        assert index.claim(claim, event) is ClaimOutcome.NEW
        assert index.upsert_instance(record)
    return study


def _claim(study: str, patient_id: str, *, sop: str | None = None,
           series: str | None = None) -> tuple[InstanceClaim, InstanceStored]:
    claim = InstanceClaim(
        sop_instance_uid=sop or generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=study, series_instance_uid=series or generate_uid(),
        patient_id=patient_id, transfer_syntax_uid="1.2.840.10008.1.2.1",
        blob_key=BlobKey(generate_uid()[-8:].rjust(64, "0")),
        dataset_sha256=generate_uid()[-8:].rjust(64, "0"), size=10)
    event = InstanceStored(
        sop_instance_uid=claim.sop_instance_uid, sop_class_uid=claim.sop_class_uid,
        study_instance_uid=study, series_instance_uid=claim.series_instance_uid,
        transfer_syntax_uid=claim.transfer_syntax_uid, blob_key=claim.blob_key, size=10)
    return claim, event


def _studies(index: SqlIndex, **keys: str) -> list[dict[str, Any]]:
    return index.search(build_query(
        Level.STUDY, keys, return_keys=["PatientID", "PatientName", "AccessionNumber",
                                        "IssuerOfPatientID"]))


def _shown(index: SqlIndex, study: str, keyword: str, version: int | None = None) -> set[str]:
    return {json_text(json.loads(doc), keyword)
            for doc in index.metadata(study, version=version)}


FIX = {"PatientID": "RIS42", "IssuerOfPatientID": "HOSP", "PatientName": "RIGHT^ANNA",
       "AccessionNumber": "A777"}


# ------------------------------------------------------------------ corrections
def test_a_correction_is_a_new_version_shown_by_queries_and_metadata(index: SqlIndex) -> None:
    study = _study(index, patient_id="CONSOLE1", patient_name="WRONG^NAME")
    pristine = index.metadata(study)
    assert index.metadata_version(study) == 0

    ref = index.correct_study(study, FIX, reason="reconciliation r1", actor="api:alice")

    assert ref == f"{study}@1"
    assert index.metadata_version(study) == 1
    [row] = _studies(index, StudyInstanceUID=study)
    assert (row["PatientID"], row["IssuerOfPatientID"], row["PatientName"],
            row["AccessionNumber"]) == ("RIS42", "HOSP", "RIGHT^ANNA", "A777")
    assert _shown(index, study, "PatientID") == {"RIS42"}
    assert _shown(index, study, "PatientName") == {"RIGHT^ANNA"}
    assert _shown(index, study, "AccessionNumber") == {"A777"}
    # The previous version stays retrievable: as received, exactly.
    assert index.metadata(study, version=0) == pristine
    assert index.metadata(study, version=1) == index.metadata(study)
    [version] = index.study_versions(study)
    assert version["version"] == 1 and version["kind"] == "correction"
    assert version["changes"] == FIX
    assert version["previous"] == {"PatientID": "CONSOLE1", "IssuerOfPatientID": "",
                                   "PatientName": "WRONG^NAME", "AccessionNumber": "ACC1"}
    assert version["reason"] == "reconciliation r1" and version["actor"] == "api:alice"
    # Queries on the corrected values find it; the old values do not.
    assert [r["StudyInstanceUID"] for r in _studies(index, AccessionNumber="A777")] == [study]
    assert _studies(index, AccessionNumber="ACC1") == []
    assert _studies(index, PatientID="CONSOLE1") == []
    # The wrong patient, left without studies, is no longer a patient of the archive.
    assert index.search(build_query(Level.PATIENT, {"PatientID": "CONSOLE1"})) == []
    [audit] = index.audit_records("study.corrected")
    assert audit["subject"] == f"study:{study}" and audit["actor"] == "api:alice"
    assert index.verify_audit()


def test_versions_accumulate_and_each_stays_readable(index: SqlIndex) -> None:
    study = _study(index, patient_id="P1")
    index.correct_study(study, {"AccessionNumber": "A2"}, reason="typo", actor="a")
    index.correct_study(study, {"PatientName": "NEW^NAME"}, reason="name", actor="b")
    assert [v["version"] for v in index.study_versions(study)] == [1, 2]
    assert _shown(index, study, "AccessionNumber", version=0) == {"ACC1"}
    assert _shown(index, study, "AccessionNumber", version=1) == {"A2"}
    assert _shown(index, study, "PatientName", version=1) == {"DOE^JANE"}
    assert _shown(index, study, "PatientName") == {"NEW^NAME"}
    assert _shown(index, study, "AccessionNumber") == {"A2"}
    with pytest.raises(LookupError):
        index.metadata(study, version=7)


def test_the_same_correction_again_adds_no_version(index: SqlIndex) -> None:
    study = _study(index, patient_id="P1")
    first = index.correct_study(study, FIX, reason="r", actor="a")
    assert index.correct_study(study, FIX, reason="r", actor="a") == first
    assert len(index.study_versions(study)) == 1


def test_corrections_that_cannot_be_applied_are_refused(index: SqlIndex) -> None:
    study = _study(index, patient_id="P1")
    with pytest.raises(LookupError):
        index.correct_study(generate_uid(), FIX, reason="r", actor="a")
    with pytest.raises(CorrectionError):
        index.correct_study(study, {"StudyInstanceUID": generate_uid()}, reason="r", actor="a")
    with pytest.raises(CorrectionError):
        index.correct_study(study, {"NotAKeyword": "x"}, reason="r", actor="a")
    assert index.study_versions(study) == []


def test_extra_return_keys_show_the_corrected_values(index: SqlIndex) -> None:
    study = _study(index, patient_id="P1")
    index.correct_study(study, {"PatientAge": "045Y"}, reason="r", actor="a")
    query = build_query(Level.STUDY, {"StudyInstanceUID": study},
                        return_keys=["PatientAge"], strict=False)
    assert query.extra_return_keys
    [row] = index.search(query)
    assert json_text(row["_metadata"], "PatientAge") == "045Y"


def test_new_instances_of_a_corrected_study_keep_its_identity(index: SqlIndex) -> None:
    study = _study(index, patient_id="CONSOLE1")
    index.correct_study(study, FIX, reason="r", actor="a")
    # The modality sends more under the identity it used (received), or the corrected one.
    for patient_id, issuer in (("CONSOLE1", ""), ("RIS42", "HOSP")):
        claim, event = _claim(study, patient_id)
        claim = claim.model_copy(update={"issuer_of_patient_id": issuer})
        assert index.check_claim(claim) is ClaimOutcome.NEW
        assert index.claim(claim, event) is ClaimOutcome.NEW
    # Any other patient is still a conflict.
    intruder, event = _claim(study, "SOMEONE-ELSE")
    with pytest.raises(ConflictError) as err:
        index.claim(intruder, event)
    assert err.value.kind is ConflictKind.PATIENT


def test_a_correction_to_a_known_patient_files_the_study_under_it(index: SqlIndex) -> None:
    known = _study(index, patient_id="RIS42", patient_name="RIGHT^ANNA")
    wrong = _study(index, patient_id="CONSOLE1", patient_name="WRONG^NAME")
    index.correct_study(wrong, {"PatientID": "RIS42", "PatientName": "RIGHT^ANNA"},
                        reason="r", actor="a")
    [patient] = index.search(build_query(
        Level.PATIENT, {"PatientID": "RIS42"},
        return_keys=["NumberOfPatientRelatedStudies", "PatientName"]))
    assert patient["NumberOfPatientRelatedStudies"] == 2
    assert {r["StudyInstanceUID"] for r in _studies(index, PatientID="RIS42")} == {known, wrong}


# ------------------------------------------------------------------ merges
def test_merge_finds_studies_under_the_prior_id_and_unmerge_restores(index: SqlIndex) -> None:
    prior_a = _study(index, patient_id="OLD1", patient_name="SMITH^JO", accession="X1")
    prior_b = _study(index, patient_id="OLD1", patient_name="SMITH^JO", accession="X2")
    own = _study(index, patient_id="NEW1", patient_name="SMITH^JOANNA", accession="Y1")
    before = {uid: index.metadata(uid) for uid in (prior_a, prior_b, own)}
    before_rows = {r["StudyInstanceUID"]: r for r in _studies(index)}
    patients_before = index.search(build_query(Level.PATIENT, {}, return_keys=["PatientName"]))

    ref = index.merge_patients("OLD1", "", "NEW1", "", actor="hl7:RIS")

    by_old = _studies(index, PatientID="OLD1")
    assert {r["StudyInstanceUID"] for r in by_old} == {prior_a, prior_b, own}
    assert {(r["PatientID"], r["PatientName"]) for r in by_old} == {("NEW1", "SMITH^JOANNA")}
    assert {r["StudyInstanceUID"] for r in _studies(index, PatientID="NEW1")} == {
        prior_a, prior_b, own}
    assert {r["StudyInstanceUID"] for r in _studies(index, PatientID="OLD*")} == {
        prior_a, prior_b, own}
    assert _shown(index, prior_a, "PatientID") == {"NEW1"}
    assert _shown(index, prior_a, "PatientName") == {"SMITH^JOANNA"}
    assert _shown(index, prior_a, "AccessionNumber") == {"X1"}
    assert index.metadata(own) == before[own]  # the survivor's own studies are untouched
    assert {i.ref.study_instance_uid for i in index.instances(patient_id="OLD1")} == {
        prior_a, prior_b, own}
    assert [p["PatientID"] for p in index.search(build_query(Level.PATIENT, {}))] == ["NEW1"]
    [merged] = index.study_versions(prior_a)
    assert merged["kind"] == "merge" and merged["changes"]["PatientID"] == "NEW1"
    assert merged["previous"]["PatientID"] == "OLD1"
    assert index.audit_records("studies.merged")[0]["detail"].startswith("into=NEW1")
    # A late instance of a merged study, sent under the old ID, is not a conflict.
    claim, event = _claim(prior_a, "OLD1")
    assert index.claim(claim, event) is ClaimOutcome.NEW

    index.unmerge_patients(ref, actor="api:bob")

    assert {r["StudyInstanceUID"]: r for r in _studies(index)} == before_rows
    assert index.search(build_query(Level.PATIENT, {}, return_keys=["PatientName"])) == \
        patients_before
    assert {r["StudyInstanceUID"] for r in _studies(index, PatientID="OLD1")} == {
        prior_a, prior_b}
    for uid, docs in before.items():
        assert index.metadata(uid) == docs
    assert [v["kind"] for v in index.study_versions(prior_a)] == ["merge", "unmerge"]
    assert index.metadata(prior_a, version=1) != before[prior_a]
    assert index.audit_records("studies.unmerged")[0]["actor"] == "api:bob"
    # Undoing twice changes nothing; the same patients can be merged again.
    index.unmerge_patients(ref, actor="api:bob")
    assert len(index.audit_records("studies.unmerged")) == 1
    again = index.merge_patients("OLD1", "", "NEW1", "", actor="hl7:RIS")
    assert again != ref
    assert index.verify_audit()


def test_merge_into_a_patient_the_archive_does_not_know(index: SqlIndex) -> None:
    study = _study(index, patient_id="OLD2", patient_name="DOE^JANE")
    ref = index.merge_patients("OLD2", "", "NEW2", "HOSP", actor="a")
    [row] = _studies(index, PatientID="OLD2")
    assert (row["PatientID"], row["IssuerOfPatientID"], row["PatientName"]) == (
        "NEW2", "HOSP", "DOE^JANE")
    index.unmerge_patients(ref, actor="a")
    [row] = _studies(index, PatientID="OLD2")
    assert row["StudyInstanceUID"] == study and row["IssuerOfPatientID"] == ""
    assert _studies(index, PatientID="NEW2") == []
    assert index.search(build_query(Level.PATIENT, {"PatientID": "NEW2"})) == []


def test_merges_that_cannot_be_done_are_refused(index: SqlIndex) -> None:
    with pytest.raises(CorrectionError):
        index.merge_patients("P", "", "P", "", actor="a")
    ref = index.merge_patients("NOBODY", "", "P", "", actor="a")  # recorded, moves nothing
    with pytest.raises(CorrectionError):
        index.merge_patients("NOBODY", "", "Q", "", actor="a")
    index.unmerge_patients(ref, actor="a")
    with pytest.raises(LookupError):
        index.unmerge_patients("no-such-merge", actor="a")


def test_after_unmerge_the_survivor_id_is_a_conflict_for_the_prior_study(
        index: SqlIndex) -> None:
    study = _study(index, patient_id="OLD3")
    index.unmerge_patients(index.merge_patients("OLD3", "", "NEW3", "", actor="a"), actor="a")
    claim, event = _claim(study, "NEW3")
    with pytest.raises(ConflictError):
        index.claim(claim, event)


def test_merge_from_the_ris_moves_images_sent_without_an_issuer(index: SqlIndex) -> None:
    study = _study(index, patient_id="OLD4")  # the modality sent no Issuer of Patient ID
    ref = index.merge_patients("OLD4", "HOSP", "NEW4", "HOSP", actor="hl7:RIS")
    [row] = _studies(index, PatientID="OLD4")
    assert (row["StudyInstanceUID"], row["PatientID"], row["IssuerOfPatientID"]) == (
        study, "NEW4", "HOSP")
    index.unmerge_patients(ref, actor="a")
    [row] = _studies(index, StudyInstanceUID=study)
    assert (row["PatientID"], row["IssuerOfPatientID"]) == ("OLD4", "")


def test_unmerge_is_refused_when_a_moved_study_was_refiled_since(index: SqlIndex) -> None:
    moved = _study(index, patient_id="OLD5")
    stays = _study(index, patient_id="OLD5", accession="ACC2")
    ref = index.merge_patients("OLD5", "", "NEW5", "", actor="a")
    index.correct_study(moved, {"PatientID": "THIRD5"}, reason="refiled", actor="a")
    with pytest.raises(CorrectionError):
        index.unmerge_patients(ref, actor="a")
    # Refused as a whole: nothing was half undone.
    [row] = _studies(index, StudyInstanceUID=stays)
    assert row["PatientID"] == "NEW5"
    assert [v["kind"] for v in index.study_versions(stays)] == ["merge"]
    assert index.audit_records("studies.unmerged") == []


def test_chained_merges_are_followed_and_undone_in_reverse(index: SqlIndex) -> None:
    a = _study(index, patient_id="CHAIN-A")
    b = _study(index, patient_id="CHAIN-B")
    first = index.merge_patients("CHAIN-A", "", "CHAIN-B", "", actor="a")
    second = index.merge_patients("CHAIN-B", "", "CHAIN-C", "", actor="a")
    for old in ("CHAIN-A", "CHAIN-B", "CHAIN-C"):
        rows = _studies(index, PatientID=old)
        assert {(r["StudyInstanceUID"], r["PatientID"]) for r in rows} == {
            (a, "CHAIN-C"), (b, "CHAIN-C")}
    with pytest.raises(CorrectionError):
        index.merge_patients("CHAIN-C", "", "CHAIN-A", "", actor="a")  # no cycles
    with pytest.raises(CorrectionError):
        index.unmerge_patients(first, actor="a")  # the later merge holds its studies
    index.unmerge_patients(second, actor="a")
    assert {r["StudyInstanceUID"] for r in _studies(index, PatientID="CHAIN-A")} == {a, b}
    index.unmerge_patients(first, actor="a")
    assert [r["StudyInstanceUID"] for r in _studies(index, PatientID="CHAIN-A")] == [a]
    assert [r["StudyInstanceUID"] for r in _studies(index, PatientID="CHAIN-B")] == [b]
    assert _studies(index, PatientID="CHAIN-C") == []


def test_a_study_arriving_under_a_merged_away_id_follows_the_merge(index: SqlIndex) -> None:
    own = _study(index, patient_id="NEW6", patient_name="SURVIVOR^SUE")
    ref = index.merge_patients("OLD6", "", "NEW6", "", actor="hl7:RIS")  # no images yet
    late = _study(index, patient_id="OLD6", patient_name="TEMP^SUE")
    rows = _studies(index, PatientID="OLD6")
    assert {(r["StudyInstanceUID"], r["PatientID"], r["PatientName"]) for r in rows} == {
        (own, "NEW6", "SURVIVOR^SUE"), (late, "NEW6", "SURVIVOR^SUE")}
    assert _shown(index, late, "PatientID") == {"NEW6"}
    assert [p["PatientID"] for p in index.search(build_query(Level.PATIENT, {}))] == ["NEW6"]
    assert [v["kind"] for v in index.study_versions(late)] == ["merge"]
    index.unmerge_patients(ref, actor="a")
    [row] = _studies(index, PatientID="OLD6")
    assert (row["StudyInstanceUID"], row["PatientName"]) == (late, "TEMP^SUE")
    assert index.metadata(late) == index.metadata(late, version=0)


def test_a_late_study_without_issuer_follows_a_merge_from_the_ris(index: SqlIndex) -> None:
    ref = index.merge_patients("OLD7", "HOSP", "NEW7", "HOSP", actor="hl7:RIS")
    late = _study(index, patient_id="OLD7")
    [row] = _studies(index, StudyInstanceUID=late)
    assert (row["PatientID"], row["IssuerOfPatientID"]) == ("NEW7", "HOSP")
    index.unmerge_patients(ref, actor="a")
    [row] = _studies(index, StudyInstanceUID=late)
    assert (row["PatientID"], row["IssuerOfPatientID"]) == ("OLD7", "")
    assert index.search(build_query(Level.PATIENT, {"PatientID": "NEW7"})) == []
