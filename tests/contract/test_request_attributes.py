"""Series' Request Attribute Sequence and studies' Timezone Offset From UTC in the index,
over SQLite and PostgreSQL: matched item by item, returned, kept once, migrated."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import text

from tests.contract.alembic_steps import to_revision
from vna.adapters.index.sqlalchemy import SqlIndex, make_engine, migrate
from vna.dicom.header import extract_record
from vna.dicom.matching import DEFAULT_RETURN_KEYS, Level, build_query
from vna.model import IndexRecord
from vna.testing.synthetic import ct_instance
from vna.usecases.search import search

SPS = "RequestAttributesSequence.ScheduledProcedureStepID"
RP = "RequestAttributesSequence.RequestedProcedureID"
REQUEST_ATTRIBUTES = "00400275"
SPS_TAG, RP_TAG, ACCESSION, OFFSET = "00400009", "00401001", "00080050", "00080201"


def _record(study: str, series: str, items: list[tuple[str, str]] | None,
            offset: str = "") -> IndexRecord:
    attributes: dict[str, Any] = {}
    if items is not None:
        sequence = []
        for sps, rp in items:
            item = Dataset()
            item.ScheduledProcedureStepID = sps
            item.RequestedProcedureID = rp
            item.AccessionNumber = f"ACC-{rp}"
            sequence.append(item)
        attributes["RequestAttributesSequence"] = sequence
    if offset:
        attributes["TimezoneOffsetFromUTC"] = offset
    ds = ct_instance(study_uid=study, series_uid=series, rows=4, columns=4,
                     attributes=attributes)
    return extract_record(ds, blob_key="b" * 64, size=100,
                          transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))


class _World:
    """Series A: items (SPS1, RP1) and (SPS2, RP2); B: (SPS3, RP1); C: no sequence."""

    def __init__(self, index: SqlIndex) -> None:
        self.study, self.other_study = generate_uid(), generate_uid()
        self.a, self.b, self.c = generate_uid(), generate_uid(), generate_uid()
        for record in (_record(self.study, self.a, [("SPS1", "RP1"), ("SPS2", "RP2")],
                               offset="+0100"),
                       _record(self.study, self.b, [("SPS3", "RP1")]),
                       _record(self.other_study, self.c, None)):
            assert index.upsert_instance(record)


def _series(index: SqlIndex, keys: dict[str, str], level: Level = Level.SERIES) -> set[str]:
    return {row["SeriesInstanceUID"] for row in index.search(build_query(level, keys))}


def test_a_series_matches_when_one_of_its_items_matches_every_key(index: SqlIndex) -> None:
    w = _World(index)
    assert _series(index, {SPS: "SPS1"}) == {w.a}
    assert _series(index, {RP: "RP1"}) == {w.a, w.b}
    # Both keys on one item (PS3.4 C.2.2.2.6): SPS1 and RP2 are in different items.
    assert _series(index, {SPS: "SPS1", RP: "RP2"}) == set()
    assert _series(index, {SPS: "SPS2", RP: "RP2"}) == {w.a}
    assert _series(index, {SPS: "SPS*"}) == {w.a, w.b}
    assert _series(index, {SPS: "SPS3\\SPS2"}) == {w.a, w.b}
    assert _series(index, {"00400275.00400009": "SPS3"}) == {w.b}
    assert _series(index, {SPS: "SPS3", "Modality": "CT"}) == {w.b}
    assert _series(index, {SPS: "NONE"}) == set()
    # At the instance level, the instances of the series that match.
    assert _series(index, {SPS: "SPS3"}, Level.IMAGE) == {w.b}
    assert _series(index, {}) == {w.a, w.b, w.c}


def test_series_return_their_items_and_studies_their_offset(index: SqlIndex) -> None:
    w = _World(index)
    found = {obj["0020000E"]["Value"][0]: obj for obj in search(build_query(
        Level.SERIES, {}, return_keys=DEFAULT_RETURN_KEYS[Level.SERIES]), index=index)}
    items = found[w.a][REQUEST_ATTRIBUTES]["Value"]
    assert [(i[SPS_TAG]["Value"][0], i[RP_TAG]["Value"][0]) for i in items] == [
        ("SPS1", "RP1"), ("SPS2", "RP2")]
    assert items[0][ACCESSION]["Value"] == ["ACC-RP1"]  # the whole item, as stored
    assert len(found[w.b][REQUEST_ATTRIBUTES]["Value"]) == 1
    assert found[w.c][REQUEST_ATTRIBUTES] == {"vr": "SQ"}

    studies = {obj["0020000D"]["Value"][0]: obj for obj in search(build_query(
        Level.STUDY, {}, return_keys=DEFAULT_RETURN_KEYS[Level.STUDY]), index=index)}
    assert studies[w.study][OFFSET] == {"vr": "SH", "Value": ["+0100"]}
    assert studies[w.other_study][OFFSET] == {"vr": "SH"}
    # An offset in a request is not a matching key: it names no study.
    by_offset = search(build_query(Level.STUDY, {"TimezoneOffsetFromUTC": "-0500"}),
                       index=index)
    assert {obj["0020000D"]["Value"][0] for obj in by_offset} == {w.study, w.other_study}


def test_a_study_takes_the_first_offset_that_comes(index: SqlIndex) -> None:
    study = generate_uid()
    for offset in ("", "-0500", "+0900"):
        assert index.upsert_instance(_record(study, generate_uid(), None, offset=offset))
    (found,) = index.search(build_query(Level.STUDY, {"StudyInstanceUID": study},
                                        return_keys=["TimezoneOffsetFromUTC"]))
    assert found["TimezoneOffsetFromUTC"] == "-0500"


def test_items_are_kept_once_per_series(index: SqlIndex) -> None:
    study, series = generate_uid(), generate_uid()
    first = _record(study, series, [("SPS1", "RP1")])
    assert index.upsert_instance(first)
    assert index.upsert_instance(_record(study, series, [("SPS1", "RP1"), ("SPS9", "RP9")]))
    assert not index.upsert_instance(first)  # a redelivery
    (obj,) = search(build_query(Level.SERIES, {"SeriesInstanceUID": series},
                                return_keys=["RequestAttributesSequence"]), index=index)
    assert [i[SPS_TAG]["Value"][0] for i in obj[REQUEST_ATTRIBUTES]["Value"]] == [
        "SPS1", "SPS9"]


def test_a_record_without_items_extracted_is_indexed_from_its_json(index: SqlIndex) -> None:
    # An instance.stored event written by an earlier version carries no items.
    study, series = generate_uid(), generate_uid()
    record = _record(study, series, [("SPS7", "RP7")])
    record.sequence_items = None
    assert index.upsert_instance(record)
    assert _series(index, {SPS: "SPS7"}) == {series}


@pytest.mark.parametrize("older", ["made before 0009", "downgraded to 0008"])
def test_migration_0009_fills_both_from_the_metadata_kept(database_url: str, older: str
                                                          ) -> None:
    index = SqlIndex.from_url(database_url)
    w = _World(index)
    index.close()
    engine = make_engine(database_url)
    with engine.begin() as conn:
        if older == "made before 0009":
            conn.execute(text("DROP TABLE request_attributes"))
            conn.execute(text("ALTER TABLE studies DROP COLUMN timezone_offset_from_utc"))
            conn.execute(text("UPDATE alembic_version SET version_num = '0008_bits_allocated'"))
        else:
            to_revision(conn, "0008_bits_allocated", down=True)
    migrate(engine)
    index = SqlIndex(engine)
    try:
        assert _series(index, {SPS: "SPS2", RP: "RP2"}) == {w.a}
        assert _series(index, {RP: "RP1"}) == {w.a, w.b}
        (study,) = index.search(build_query(Level.STUDY, {"StudyInstanceUID": w.study},
                                            return_keys=["TimezoneOffsetFromUTC"]))
        assert study["TimezoneOffsetFromUTC"] == "+0100"
    finally:
        index.close()
