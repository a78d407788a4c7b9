"""Extended query attributes in the Index port: SQLite (embedded) and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.uid import generate_uid

from vna.adapters.index.sqlalchemy import SqlIndex
from vna.dicom.extended import ExtendedAttributes, parse_extended_attributes
from vna.dicom.header import extract_record
from vna.dicom.matching import Level, build_query
from vna.testing.synthetic import ct_instance
from vna.usecases.backfill import backfill_extended, pending_attributes
from vna.usecases.search import backfilling, search

CREATOR = "SIEMENS CT VA0 COAD"
EXTENDED = parse_extended_attributes(
    f"Manufacturer,SliceThickness,ConvolutionKernel,instance:ImageType,"
    f"study:InstitutionName,0019xx10@{CREATOR}/DS")


def _series(index: SqlIndex, extended: ExtendedAttributes, *, count: int = 2,
            private: str | None = None, study_uid: str | None = None,
            per_instance: list[dict[str, object]] | None = None, **attributes: object) -> str:
    """Index one series of ``count`` instances; returns its Series Instance UID."""
    series_uid = generate_uid()
    study_uid = study_uid or generate_uid()
    for i in range(count):
        own = {**attributes, **(per_instance[i] if per_instance else {})}
        ds = ct_instance(study_uid=study_uid, series_uid=series_uid, instance_number=i + 1,
                         rows=8, columns=8, attributes=own)
        if private is not None:
            ds.private_block(0x0019, "ANOTHER VENDOR", create=True).add_new(0x10, "LO", "x")
            ds.private_block(0x0019, CREATOR, create=True).add_new(0x10, "DS", private)
        record = extract_record(ds, blob_key="b" * 64, size=100,
                                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                                extended=extended)
        assert index.upsert_instance(record) is True
    return series_uid


def _series_found(index: SqlIndex, keys: dict[str, str], **kwargs: Any) -> set[str]:
    query = build_query(Level.SERIES, keys, extended=EXTENDED, **kwargs)
    return {row["SeriesInstanceUID"] for row in index.search(query)}


def test_cohort_query_matches_exactly_the_right_series(index: SqlIndex) -> None:
    wanted = _series(index, EXTENDED, Manufacturer="SIEMENS", SliceThickness="1.0",
                     ConvolutionKernel="B30f")
    same_in_other_spelling = _series(index, EXTENDED, Manufacturer="SIEMENS",
                                     SliceThickness="1.00", ConvolutionKernel="B30f")
    thick = _series(index, EXTENDED, Manufacturer="SIEMENS", SliceThickness="5",
                    ConvolutionKernel="B30f")
    other_kernel = _series(index, EXTENDED, Manufacturer="SIEMENS", SliceThickness="1",
                           ConvolutionKernel="B70f")
    other_vendor = _series(index, EXTENDED, Manufacturer="GE MEDICAL SYSTEMS",
                           SliceThickness="1", ConvolutionKernel="B30f")
    cohort = {"Modality": "CT", "SliceThickness": "1.0", "ConvolutionKernel": "B30f",
              "Manufacturer": "SIEMENS"}
    assert _series_found(index, cohort) == {wanted, same_in_other_spelling}
    assert _series_found(index, {"SliceThickness": "0.5-1.5"}) == {
        wanted, same_in_other_spelling, other_kernel, other_vendor}
    assert _series_found(index, {"SliceThickness": "2-"}) == {thick}
    assert _series_found(index, {"SliceThickness": "5\\1"}) == {
        wanted, same_in_other_spelling, thick, other_kernel, other_vendor}
    assert _series_found(index, {"ConvolutionKernel": "B7*"}) == {other_kernel}
    # Matching is case-sensitive for LO and SH, as for the index's columns.
    assert _series_found(index, {"Manufacturer": "siemens"}) == set()
    assert _series_found(index, {"Manufacturer": "GE*"}) == {other_vendor}
    # Each series once, whatever the number of its instances.
    rows = index.search(build_query(Level.SERIES, cohort, extended=EXTENDED))
    assert len(rows) == 2


def test_a_series_with_mixed_values_matches_each_of_them(index: SqlIndex) -> None:
    mixed = _series(index, EXTENDED, count=2, per_instance=[
        {"SliceThickness": "1", "ConvolutionKernel": "B30f"},
        {"SliceThickness": "3", "ConvolutionKernel": "B70f"}])
    assert _series_found(index, {"SliceThickness": "1"}) == {mixed}
    assert _series_found(index, {"SliceThickness": "3"}) == {mixed}
    assert _series_found(index, {"SliceThickness": "2"}) == set()


def test_levels_instance_and_study_attributes(index: SqlIndex) -> None:
    study = generate_uid()
    derived = _series(index, EXTENDED, count=1, study_uid=study,
                      ImageType=["DERIVED", "SECONDARY"], InstitutionName="HOSP A",
                      Manufacturer="SIEMENS")
    _series(index, EXTENDED, count=1, InstitutionName="HOSP B", Manufacturer="SIEMENS")
    found = index.search(build_query(Level.IMAGE, {"ImageType": "SECONDARY",
                                                   "Manufacturer": "SIEMENS"},
                                     extended=EXTENDED))
    assert [r["SeriesInstanceUID"] for r in found] == [derived]
    studies = index.search(build_query(Level.STUDY, {"InstitutionName": "HOSP A"},
                                       extended=EXTENDED))
    assert [r["StudyInstanceUID"] for r in studies] == [study]
    assert _series_found(index, {"InstitutionName": "HOSP*"}) != set()


def test_private_attribute_is_matched_and_returned_with_its_creator(index: SqlIndex) -> None:
    thin = _series(index, EXTENDED, private="0.75")
    _series(index, EXTENDED, private="3")
    _series(index, EXTENDED)
    query = build_query(Level.SERIES, {"00191010": "0.5-1"}, return_keys=["SeriesInstanceUID"],
                        extended=EXTENDED)
    (found,) = search(query, index=index)
    assert found["0020000E"]["Value"] == [thin]
    # The creator took block 0x11 in these instances: returned as stored.
    assert found["00190011"] == {"vr": "LO", "Value": [CREATOR]}
    assert found["00191110"]["Value"] == [0.75]


def test_backfill_fills_values_of_instances_indexed_before(index: SqlIndex) -> None:
    nothing = ExtendedAttributes()
    wanted = _series(index, nothing, count=3, Manufacturer="SIEMENS", SliceThickness="1",
                     ConvolutionKernel="B30f")
    _series(index, nothing, count=3, Manufacturer="SIEMENS", SliceThickness="5",
            ConvolutionKernel="B30f")
    cohort = build_query(Level.SERIES, {"SliceThickness": "1", "Manufacturer": "SIEMENS"},
                         extended=EXTENDED)
    # Configured now: the query answers (nothing yet) and says the values are coming.
    assert index.search(cohort) == []
    assert set(backfilling(cohort, index=index)) == {"SliceThickness", "Manufacturer"}
    # Stopped after its first batch, then resumed where it was.
    batches: list[int] = []
    report = backfill_extended(EXTENDED, index=index, batch_size=2,
                               should_stop=lambda: len(batches) == 1, on_batch=batches.append)
    assert not report.completed and report.instances == 2
    assert {s.last_instance_pk for s in index.extended_progress().values()} == {batches[0]}
    # A new instance indexed with the configuration while the backfill is pending.
    late = _series(index, EXTENDED, count=1, Manufacturer="SIEMENS", SliceThickness="1.0")
    report = backfill_extended(EXTENDED, index=index, batch_size=2, on_batch=batches.append)
    assert report.completed and report.instances == 5
    assert {r["SeriesInstanceUID"] for r in index.search(cohort)} == {wanted, late}
    assert backfilling(cohort, index=index) == []
    assert pending_attributes(EXTENDED, index=index) == []
    # Completed: another run reads nothing.
    again = backfill_extended(EXTENDED, index=index)
    assert again.attributes == [] and again.instances == 0


def test_an_attribute_configured_again_is_backfilled_again(index: SqlIndex) -> None:
    only_kernel = parse_extended_attributes("ConvolutionKernel")
    backfill_extended(EXTENDED, index=index)
    assert pending_attributes(EXTENDED, index=index) == []
    # Manufacturer dropped from the configuration; instances indexed meanwhile lack it.
    report = backfill_extended(only_kernel, index=index)
    assert "SERIES:Manufacturer" in report.forgotten
    meanwhile = _series(index, only_kernel, Manufacturer="PHILIPS", ConvolutionKernel="B")
    report = backfill_extended(EXTENDED, index=index)
    assert "Manufacturer" in report.attributes and "ConvolutionKernel" not in report.attributes
    assert _series_found(index, {"Manufacturer": "PHILIPS"}) == {meanwhile}


def test_indexing_the_same_instance_again_adds_no_values(index: SqlIndex) -> None:
    ds = ct_instance(attributes={"Manufacturer": "SIEMENS"})
    record = extract_record(ds, blob_key="b" * 64, size=100, transfer_syntax_uid="1.2.840.10008"
                            ".1.2.1", extended=EXTENDED)
    assert index.upsert_instance(record) is True
    assert index.upsert_instance(record) is False
    backfill_extended(EXTENDED, index=index)  # writes the same values again: no error
    assert len(index.search(build_query(Level.IMAGE, {"Manufacturer": "SIEMENS"},
                                        extended=EXTENDED))) == 1


def test_values_are_written_in_the_instance_transaction(index: SqlIndex,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    from vna.adapters.index import extra
    from vna.ports import Unavailable

    def fail(*_args: object) -> None:
        raise OperationalError("INSERT INTO extra_attributes", {}, Exception("disk full"))

    ds = ct_instance(attributes={"Manufacturer": "SIEMENS"})
    record = extract_record(ds, blob_key="b" * 64, size=100,
                            transfer_syntax_uid="1.2.840.10008.1.2.1", extended=EXTENDED)
    monkeypatch.setattr(extra, "write_values", fail)
    with pytest.raises(Unavailable):
        index.upsert_instance(record)
    # Nothing of the instance stays: the redelivered event indexes it whole.
    assert index.instances(sop_instance_uid=str(ds.SOPInstanceUID)) == []
    monkeypatch.undo()
    assert index.upsert_instance(record) is True
    assert len(index.search(build_query(Level.IMAGE, {"Manufacturer": "SIEMENS"},
                                        extended=EXTENDED))) == 1
