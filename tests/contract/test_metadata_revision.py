"""A study's metadata revision (WADO-RS metadata ETags and caches), over SQLite and
PostgreSQL: it changes with everything the study's metadata shows, in the same
transaction, and with nothing else; revision 0007 gives indexed studies one."""

from __future__ import annotations

from pydicom.uid import generate_uid
from sqlalchemy import String, column, insert, select, table, text

from tests.contract.alembic_steps import to_revision
from tests.contract.test_index_corrections import FIX, _study
from vna.adapters.index.schema import patients, studies
from vna.adapters.index.sqlalchemy import SqlIndex, make_engine, migrate
from vna.dicom.header import extract_record
from vna.dicom.matching import Level, build_query
from vna.testing.synthetic import ct_instance


def _add_instance(index: SqlIndex, study: str, patient_id: str) -> str:
    """Index one more instance (a new series) of ``study``; its SOP Instance UID."""
    ds = ct_instance(patient_id=patient_id, study_uid=study, instance_number=9)
    record = extract_record(ds, blob_key="c" * 64, size=100,
                            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))
    assert index.upsert_instance(record)
    return str(ds.SOPInstanceUID)


def test_the_revision_changes_when_an_instance_is_indexed(index: SqlIndex) -> None:
    study = _study(index, patient_id="P1")
    other = _study(index, patient_id="P2")
    first = index.metadata_revision(study)
    assert first and first == index.metadata_revision(study)
    [series] = {r["SeriesInstanceUID"] for r in index.search(
        build_query(Level.SERIES, {"StudyInstanceUID": study}))}
    sops = [r["SOPInstanceUID"] for r in index.search(
        build_query(Level.IMAGE, {"StudyInstanceUID": study}))]
    # Series and instance look-ups answer the study's revision, or None when absent.
    assert index.metadata_revision(study, series) == first
    assert index.metadata_revision(study, series, sops[0]) == first
    assert index.metadata_revision(study, None, sops[0]) == first
    assert index.metadata_revision(other, series) is None
    assert index.metadata_revision(study, series, generate_uid()) is None
    assert index.metadata_revision(generate_uid()) is None

    other_before = index.metadata_revision(other)
    _add_instance(index, study, "P1")
    assert index.metadata_revision(study) not in (None, first)
    # Another study's revision, and so its cached metadata, is left alone.
    assert index.metadata_revision(other) == other_before


def test_the_revision_changes_with_corrections_merges_and_unmerges(index: SqlIndex) -> None:
    study = _study(index, patient_id="CONSOLE1")
    seen = {index.metadata_revision(study)}

    index.correct_study(study, FIX, reason="r1", actor="test")
    seen.add(index.metadata_revision(study))
    assert len(seen) == 2

    moved = _study(index, patient_id="OLD7")
    before_merge = index.metadata_revision(moved)
    ref = index.merge_patients("OLD7", "", "NEW7", "", actor="test")
    after_merge = index.metadata_revision(moved)
    assert after_merge != before_merge

    index.unmerge_patients(ref, actor="test")
    assert index.metadata_revision(moved) not in (before_merge, after_merge)
    # The corrected study was not part of the merge.
    assert index.metadata_revision(study) in seen


def test_migration_0007_gives_studies_indexed_before_it_a_revision(database_url: str) -> None:
    engine = make_engine(database_url)
    with engine.begin() as conn:
        to_revision(conn, "0006_correction_journal")
        # 0001 creates tables as defined now: take the column away to stand for an
        # index created before revision 0007.
        conn.execute(text("ALTER TABLE studies DROP COLUMN revision"))
        conn.execute(patients.insert().values(patient_id="P1", issuer_of_patient_id=""))
        pk = conn.execute(select(patients.c.pk)).scalar_one()
        before_0007 = [c for c in studies.columns if c.name not in ("pk", "revision")]
        for uid in ("1.2.3.1", "1.2.3.2"):
            values = {c.name: "" for c in before_0007 if isinstance(c.type, String)}
            conn.execute(insert(table("studies", *[column(c.name) for c in before_0007]))
                         .values({**values, "study_instance_uid": uid, "patient_pk": pk}))
    migrate(engine)
    index = SqlIndex(engine)
    try:
        revisions = [index.metadata_revision(uid) for uid in ("1.2.3.1", "1.2.3.2")]
        assert all(revisions) and len(set(revisions)) == 2
        # Studies indexed after the migration get one too.
        study = _study(index, patient_id="P9")
        assert index.metadata_revision(study) not in (None, "", *revisions)
    finally:
        index.close()


def test_migration_0008_fills_bits_allocated_from_the_metadata_kept(database_url: str) -> None:
    # QIDO-RS returns Bits Allocated (PS3.18 Table 10.6.3-5) from a column; an index
    # made before revision 0008 has none, and gets it filled without reading a blob.
    index = SqlIndex.from_url(database_url)
    study = _study(index, patient_id="P1")
    index.close()
    engine = make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE instances DROP COLUMN bits_allocated"))
        conn.execute(text("UPDATE alembic_version SET version_num = '0007_study_revision'"))
    migrate(engine)
    index = SqlIndex(engine)
    try:
        found = index.search(build_query(Level.IMAGE, {"StudyInstanceUID": study},
                                         return_keys=["BitsAllocated"]))
        assert found and {r["BitsAllocated"] for r in found} == {16}
    finally:
        index.close()
