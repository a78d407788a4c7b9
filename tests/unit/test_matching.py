"""The matching module shared by C-FIND and QIDO-RS."""

from __future__ import annotations

import pytest

from vna.dicom.matching import (
    Level,
    MatchKind,
    QueryError,
    build_query,
    normalize_person_name,
    normalize_time,
    wildcard_to_like,
)


def _match(query, keyword):  # type: ignore[no-untyped-def]
    return next(m for m in query.matches if m.keyword == keyword)


def test_empty_value_is_universal_matching_and_a_return_key() -> None:
    q = build_query(Level.STUDY, {"PatientName": "", "StudyDate": ""})
    assert q.matches == ()
    assert set(q.return_keys) == {"PatientName", "StudyDate"}


def test_wildcards_become_wildcard_matches_and_like_patterns() -> None:
    q = build_query(Level.STUDY, {"AccessionNumber": "AC?1*"})
    m = _match(q, "AccessionNumber")
    assert m.kind is MatchKind.WILDCARD
    assert wildcard_to_like(m.values[0]) == "AC_1%"
    assert wildcard_to_like("50%_off") == "50\\%\\_off"


def test_person_names_are_folded_for_case_and_accents() -> None:
    assert normalize_person_name("Müller^José") == "MULLER^JOSE"
    q = build_query(Level.PATIENT, {"PatientName": "müller*"})
    assert _match(q, "PatientName").values == ("MULLER*",)


def test_date_ranges_open_and_closed() -> None:
    q = build_query(Level.STUDY, {"StudyDate": "20200101-20201231"})
    assert _match(q, "StudyDate").values == ("20200101", "20201231")
    q = build_query(Level.STUDY, {"StudyDate": "-20201231"})
    assert _match(q, "StudyDate").values == ("", "20201231")
    q = build_query(Level.STUDY, {"StudyDate": "20200101-"})
    assert _match(q, "StudyDate").values == ("20200101", "")


def test_times_compare_over_their_precision() -> None:
    assert normalize_time("1010") == "101000.000000"
    assert normalize_time("1010", upper=True) == "101059.999999"
    q = build_query(Level.STUDY, {"StudyTime": "10"})
    assert _match(q, "StudyTime").values == ("100000.000000", "105959.999999")


def test_uid_lists() -> None:
    q = build_query(Level.STUDY, {"StudyInstanceUID": "1.2.3\\1.2.4"})
    m = _match(q, "StudyInstanceUID")
    assert m.kind is MatchKind.LIST and m.values == ("1.2.3", "1.2.4")


@pytest.mark.parametrize(
    ("keys", "reason"),
    [
        ({"StudyDate": "2020-13-45"}, "StudyDate"),
        ({"StudyDate": "yesterday"}, "StudyDate"),
        ({"StudyInstanceUID": "../x"}, "StudyInstanceUID"),
        ({"StudyInstanceUID": "1." + "2" * 70}, "StudyInstanceUID"),
        ({"NoSuchAttribute": "x"}, "NoSuchAttribute"),
        ({"StudyTime": "2599"}, "StudyTime"),
        # No stored value holds NUL; PostgreSQL refuses one in a query (was a 500).
        ({"PatientID": "PAT\0001"}, "PatientID: a value holds a NUL"),
        ({"PatientName": "DOE\0*"}, "PatientName: a value holds a NUL"),
    ],
)
def test_bad_values_are_errors_with_a_reason(keys: dict[str, str], reason: str) -> None:
    with pytest.raises(QueryError, match=reason):
        build_query(Level.STUDY, keys)


def test_c_find_is_lenient_about_keys_it_cannot_match() -> None:
    q = build_query(Level.STUDY, {"Manufacturer": "ACME"}, strict=False)
    assert q.matches == ()
    assert q.extra_return_keys == ("Manufacturer",)
    with pytest.raises(QueryError):
        build_query(Level.STUDY, {"Manufacturer": "ACME"}, strict=True)


def test_tags_are_accepted_as_keys() -> None:
    q = build_query(Level.STUDY, {"00100020": "PAT1"})
    assert _match(q, "PatientID").values == ("PAT1",)


def test_keys_on_sequence_items_match_at_their_level_and_return_the_sequence() -> None:
    q = build_query(Level.SERIES, {"RequestAttributesSequence.ScheduledProcedureStepID": "S*",
                                   "00400275.00401001": "RP1\\RP2"})
    assert {(m.keyword, m.kind) for m in q.matches} == {
        ("RequestAttributesSequence.ScheduledProcedureStepID", MatchKind.WILDCARD),
        ("RequestAttributesSequence.RequestedProcedureID", MatchKind.LIST)}
    assert "RequestAttributesSequence" in q.return_keys
    assert "RequestAttributesSequence" not in q.extra_return_keys
    # Above the series level the sequence is not kept: one instance's, from its metadata.
    study = build_query(Level.STUDY, {"RequestAttributesSequence": ""}, strict=False)
    assert "RequestAttributesSequence" in study.extra_return_keys


@pytest.mark.parametrize(("level", "keys", "reason"), [
    (Level.SERIES, {"RequestAttributesSequence.PatientName": "X"}, "not a matching key"),
    (Level.SERIES, {"ReferencedStudySequence.StudyInstanceUID": "1.2"}, "not a matching key"),
    (Level.STUDY, {"RequestAttributesSequence.ScheduledProcedureStepID": "X"},
     "below the STUDY level"),
    (Level.SERIES, {"RequestAttributesSequence.RequestAttributesSequence.PatientID": "X"},
     "one level deep"),
    (Level.SERIES, {"RequestAttributesSequence.NoSuchKeyword": "X"}, "unknown attribute"),
])
def test_bad_sequence_keys_are_errors_with_a_reason(level: Level, keys: dict[str, str],
                                                     reason: str) -> None:
    with pytest.raises(QueryError, match=reason):
        build_query(level, keys)
    if "unknown" not in reason and "deep" not in reason:
        # C-FIND returns what it cannot match on.
        assert build_query(level, keys, strict=False).matches == ()


def test_timezone_offset_is_returned_and_never_matched() -> None:
    q = build_query(Level.STUDY, {"TimezoneOffsetFromUTC": "+0100"})
    assert q.matches == ()
    assert "TimezoneOffsetFromUTC" in q.return_keys
