"""Extended query attributes: configuration, request keys and values (no I/O)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from vna.bootstrap import build
from vna.config import Settings
from vna.dicom.extended import (
    ExtendedAttributes,
    ExtraValue,
    parse_extended_attributes,
    values_of,
)
from vna.dicom.header import dataset_to_json, extract_record
from vna.dicom.matching import Level, Match, MatchKind, QueryError, build_query
from vna.testing.synthetic import ct_instance

CREATOR = "SIEMENS CT VA0 COAD"
SPEC = (f"Manufacturer, SliceThickness,ConvolutionKernel, instance:ImageType, "
        f"study:00080080, BodyPartExamined, 0019xx10@{CREATOR}/DS, OperatorsName")


@pytest.fixture
def extended() -> ExtendedAttributes:
    return parse_extended_attributes(SPEC)


def _match(q_matches: tuple[Match, ...], keyword: str) -> Match:
    (found,) = [m for m in q_matches if m.keyword == keyword]
    return found


# ------------------------------------------------------------------ configuration
def test_configuration_levels_vrs_and_private_tags(extended: ExtendedAttributes) -> None:
    by_key = {a.key: a for a in extended}
    # BodyPartExamined is a column already: queryable without configuration.
    assert set(by_key) == {"Manufacturer", "SliceThickness", "ConvolutionKernel", "ImageType",
                           "InstitutionName", f"0019xx10@{CREATOR}", "OperatorsName"}
    assert by_key["Manufacturer"].level is Level.SERIES
    assert by_key["ImageType"].level is Level.IMAGE
    assert by_key["InstitutionName"].level is Level.STUDY
    assert by_key["SliceThickness"].vr == "DS" and by_key["SliceThickness"].numeric
    private = by_key[f"0019xx10@{CREATOR}"]
    assert private.private and private.vr == "DS" and private.request_tag == "00191010"
    assert extended.lookup("00180050") is by_key["SliceThickness"]
    assert extended.lookup("(0018,0050)") is by_key["SliceThickness"]
    assert extended.lookup("00191010") is private
    assert extended.lookup(f"0019xx10@{CREATOR}") is private
    assert extended.lookup("StationName") is None


@pytest.mark.parametrize("spec, reason", [
    ("NoSuchKeyword", "unknown keyword"),
    ("00090010", "not a public attribute"),
    ("0018xx10@ACME", "odd group"),
    ("PixelData", "cannot be matched"),
    ("ReferencedImageSequence", "cannot be matched"),
    ("Manufacturer,Manufacturer", "listed twice"),
])
def test_bad_configuration_says_why(spec: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_extended_attributes(spec)


def test_empty_configuration_adds_nothing() -> None:
    assert not parse_extended_attributes("")
    assert not parse_extended_attributes(" , ")


# ------------------------------------------------------------------ requests
def test_unconfigured_attributes_stay_errors_for_qido(extended: ExtendedAttributes) -> None:
    with pytest.raises(QueryError, match="StationName"):
        build_query(Level.SERIES, {"StationName": "CT1"}, extended=extended)
    with pytest.raises(QueryError, match="Manufacturer"):
        build_query(Level.SERIES, {"Manufacturer": "SIEMENS"})  # not configured
    with pytest.raises(QueryError):
        build_query(Level.SERIES, {"00091010": "x"}, extended=extended)


def test_cohort_query_builds_numeric_and_string_matches(extended: ExtendedAttributes) -> None:
    q = build_query(Level.SERIES, {"Modality": "CT", "SliceThickness": "1.0",
                                   "ConvolutionKernel": "B30f", "Manufacturer": "SIEMENS"},
                    extended=extended)
    thickness = _match(q.matches, "SliceThickness")
    assert (thickness.kind, thickness.values) == (MatchKind.SINGLE, ("1",))
    assert thickness.extended is not None and thickness.extended.numeric
    kernel = _match(q.matches, "ConvolutionKernel")
    assert (kernel.kind, kernel.values) == (MatchKind.SINGLE, ("B30f",))
    assert _match(q.matches, "Modality").extended is None
    # Public extended attributes are returned from the stored metadata.
    assert {"SliceThickness", "ConvolutionKernel", "Manufacturer"} <= set(q.extra_return_keys)


@pytest.mark.parametrize("raw, kind, values", [
    ("1", MatchKind.SINGLE, ("1",)),
    ("1.00", MatchKind.SINGLE, ("1",)),
    (" 0.625 ", MatchKind.SINGLE, ("0.625",)),
    ("-5", MatchKind.SINGLE, ("-5",)),
    ("1e0", MatchKind.SINGLE, ("1",)),
    ("0.5-1.5", MatchKind.RANGE, ("0.5", "1.5")),
    ("2-", MatchKind.RANGE, ("2", "")),
    ("1\\2.50", MatchKind.LIST, ("1", "2.5")),
])
def test_numbers_compare_as_numbers(extended: ExtendedAttributes, raw: str, kind: MatchKind,
                                    values: tuple[str, ...]) -> None:
    q = build_query(Level.SERIES, {"SliceThickness": raw}, extended=extended)
    m = _match(q.matches, "SliceThickness")
    assert (m.kind, m.values) == (kind, values)


@pytest.mark.parametrize("raw", ["thin", "1*", "1.0-abc", "-", "nan"])
def test_a_bad_number_is_refused(extended: ExtendedAttributes, raw: str) -> None:
    with pytest.raises(QueryError, match="SliceThickness"):
        build_query(Level.SERIES, {"SliceThickness": raw}, extended=extended)


def test_string_rules_follow_the_vr(extended: ExtendedAttributes) -> None:
    q = build_query(Level.IMAGE, {"ConvolutionKernel": "B3?f*", "ImageType": "ORIGINAL\\DERIVED",
                                  "OperatorsName": "müller*", "Manufacturer": "*"},
                    extended=extended)
    assert _match(q.matches, "ConvolutionKernel").kind is MatchKind.WILDCARD
    listed = _match(q.matches, "ImageType")
    assert (listed.kind, listed.values) == (MatchKind.LIST, ("ORIGINAL", "DERIVED"))
    name = _match(q.matches, "OperatorsName")
    assert (name.kind, name.values) == (MatchKind.WILDCARD, ("MULLER*",))
    assert [m.keyword for m in q.matches if m.keyword == "Manufacturer"] == []  # universal


def test_levels_of_extended_attributes(extended: ExtendedAttributes) -> None:
    with pytest.raises(QueryError, match="below the SERIES level"):
        build_query(Level.SERIES, {"ImageType": "ORIGINAL"}, extended=extended)
    with pytest.raises(QueryError, match="below the STUDY level"):
        build_query(Level.STUDY, {"Manufacturer": "SIEMENS"}, extended=extended)
    # C-FIND (not strict): a key below the level is only returned.
    q = build_query(Level.SERIES, {"ImageType": "ORIGINAL"}, extended=extended, strict=False)
    assert q.matches == () and "ImageType" in q.extra_return_keys
    # A series attribute matches at the image level; a study one at every level below.
    q = build_query(Level.IMAGE, {"Manufacturer": "SIEMENS", "InstitutionName": "H*"},
                    extended=extended)
    assert {m.keyword for m in q.matches} == {"Manufacturer", "InstitutionName"}


def test_private_attribute_by_tag_is_matched_and_returned(extended: ExtendedAttributes) -> None:
    q = build_query(Level.SERIES, {"00191010": "0.5-2"}, return_keys=[], extended=extended)
    m = _match(q.matches, f"0019xx10@{CREATOR}")
    assert (m.kind, m.values) == (MatchKind.RANGE, ("0.5", "2"))
    assert [a.key for a in q.extended_return] == [f"0019xx10@{CREATOR}"]


# ------------------------------------------------------------------ values
def _metadata(**attributes: object) -> dict[str, object]:
    ds = ct_instance(attributes=attributes)
    return dataset_to_json(ds, "/x")


def test_values_a_column_cannot_hold_are_left_out_or_made_fit(
        extended: ExtendedAttributes) -> None:
    by_key = {a.key: a for a in extended}
    (kernel,) = values_of(by_key["ConvolutionKernel"], _metadata(ConvolutionKernel="B30\0f"))
    assert kernel.value_text == "B30f"  # a damaged value's NUL dropped (PostgreSQL)
    # 200 characters of "ß" fold to 400: longer than the column, left out.
    assert values_of(by_key["OperatorsName"], _metadata(OperatorsName="ß" * 200)) == []


def test_values_have_one_search_form(extended: ExtendedAttributes) -> None:
    by_key = {a.key: a for a in extended}
    for stored in ("1", "1.0", "1.00", " 1.000"):
        (value,) = values_of(by_key["SliceThickness"], _metadata(SliceThickness=stored))
        assert (value.value_text, value.value_num) == ("1", 1.0)
    image_type = values_of(by_key["ImageType"], _metadata(ImageType=["ORIGINAL", "PRIMARY",
                                                                      "ORIGINAL"]))
    assert [v.value_text for v in image_type] == ["ORIGINAL", "PRIMARY"]
    assert all(v.level is Level.IMAGE for v in image_type)
    (name,) = values_of(by_key["OperatorsName"], _metadata(OperatorsName="Müller^Jörg"))
    assert name.value_text == "MULLER^JORG"
    assert values_of(by_key["ConvolutionKernel"], _metadata()) == []
    assert values_of(by_key["SliceThickness"], {"00180050": {"vr": "DS"}}) == []


def test_private_values_are_found_through_their_creator(extended: ExtendedAttributes) -> None:
    private = extended.lookup("00191010")
    assert private is not None
    ds = ct_instance()
    ds.private_block(0x0019, "OTHER CREATOR", create=True).add_new(0x10, "DS", "9")
    ds.private_block(0x0019, CREATOR, create=True).add_new(0x10, "DS", "0.75")
    metadata = dataset_to_json(ds, "/x")
    assert "00191110" in metadata  # our creator got the second block
    assert values_of(private, metadata) == [ExtraValue(Level.SERIES, private.key, "0.75", 0.75)]
    # An implicit VR element unknown to the dictionary arrives as UN InlineBinary.
    inline = {"00190010": {"vr": "LO", "Value": [CREATOR]},
              "00191010": {"vr": "UN", "InlineBinary": base64.b64encode(b"1.25 ").decode()}}
    assert [v.value_num for v in values_of(private, inline)] == [1.25]


def test_extract_record_carries_extended_values(extended: ExtendedAttributes) -> None:
    ds = ct_instance(attributes={"Manufacturer": "SIEMENS", "ConvolutionKernel": "B30f",
                                 "SliceThickness": "1.00"})
    record = extract_record(ds, blob_key="b" * 64, size=1, transfer_syntax_uid="1.2",
                            extended=extended)
    found = {(v.key, v.value_text) for v in record.extended}
    assert {("Manufacturer", "SIEMENS"), ("ConvolutionKernel", "B30f"),
            ("SliceThickness", "1")} <= found
    plain = extract_record(ds, blob_key="b" * 64, size=1, transfer_syntax_uid="1.2")
    assert plain.extended == []


def test_a_wrong_setting_stops_the_start_with_the_reason(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, storage_url="", index_url="", bus_url="local://",
                        redis_url="", extra_query_attributes="Manufacturer,SliceThikness")
    with pytest.raises(ValueError, match="unknown keyword 'SliceThikness'"):
        build(settings)


def test_a_tag_shared_by_two_private_creators_must_be_named_by_creator() -> None:
    extended = parse_extended_attributes("0019xx10@ACME 1,0019xx10@OTHER 2")
    with pytest.raises(QueryError, match="name one as ggggxxee@Creator"):
        build_query(Level.SERIES, {"00191010": "x"}, extended=extended)
    q = build_query(Level.SERIES, {"0019xx10@OTHER 2": "x"}, extended=extended)
    assert q.matches[0].extended is not None and q.matches[0].extended.creator == "OTHER 2"
