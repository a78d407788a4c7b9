"""Attribute matching shared by C-FIND and QIDO-RS (PS3.4 C.2.2.2, PS3.18 8.3.4).

This module turns a request's keys into a backend-neutral ``Query``; the
index adapter translates a ``Query`` into SQL. Nothing here knows about
tables, and nothing in the adapter knows about request syntax.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from vna.dicom.uids import is_valid_uid

if TYPE_CHECKING:
    from vna.dicom.extended import ExtendedAttribute, ExtendedAttributes


class QueryError(ValueError):
    """A request key or value that cannot be matched; the message says why."""


class Level(StrEnum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


LEVEL_ORDER = [Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE]


@dataclass(frozen=True)
class Attribute:
    keyword: str
    vr: str
    level: Level
    computed: bool = False
    """Derived from lower levels (counts, ModalitiesInStudy): not stored as-is."""


def _attrs(level: Level, spec: str, computed: bool = False) -> dict[str, Attribute]:
    out = {}
    for keyword in spec.split():
        out[keyword] = Attribute(keyword, dictionary_VR(keyword), level, computed)
    return out


# The attributes the index keeps as columns, by level. Everything else a client
# asks to have returned comes from the stored metadata of the instances.
ATTRIBUTES: dict[str, Attribute] = {
    **_attrs(Level.PATIENT, "PatientName PatientID IssuerOfPatientID PatientBirthDate PatientSex"),
    **_attrs(
        Level.PATIENT,
        "NumberOfPatientRelatedStudies NumberOfPatientRelatedSeries "
        "NumberOfPatientRelatedInstances",
        computed=True,
    ),
    **_attrs(
        Level.STUDY,
        "StudyInstanceUID StudyDate StudyTime AccessionNumber StudyID StudyDescription "
        "ReferringPhysicianName TimezoneOffsetFromUTC",
    ),
    **_attrs(
        Level.STUDY,
        "ModalitiesInStudy SOPClassesInStudy NumberOfStudyRelatedSeries "
        "NumberOfStudyRelatedInstances",
        computed=True,
    ),
    **_attrs(
        Level.SERIES,
        "SeriesInstanceUID Modality SeriesNumber SeriesDescription SeriesDate SeriesTime "
        "BodyPartExamined PerformedProcedureStepStartDate PerformedProcedureStepStartTime",
    ),
    **_attrs(Level.SERIES, "NumberOfSeriesRelatedInstances", computed=True),
    **_attrs(
        Level.IMAGE,
        "SOPInstanceUID SOPClassUID InstanceNumber Rows Columns BitsAllocated "
        "NumberOfFrames ContentDate ContentTime",
    ),
}

RETURN_ONLY = frozenset({"TimezoneOffsetFromUTC"})
"""Kept and returned, never matched on: a request's Timezone Offset From UTC says in
which zone its dates and times are (PS3.4 C.4.1.1.3.1), not what to find, and most
stored instances carry no offset, so the archive cannot apply it (C-FIND and QIDO-RS
both match dates and times as stored)."""


@dataclass(frozen=True)
class SequenceAttribute:
    """A sequence the index keeps item by item, to match on and to return.

    ``item_keys``: the attributes of an item it matches on (PS3.4 C.2.2.2.6: an
    entity matches when one of its items matches every key given for the
    sequence). An item is returned whole, as stored.
    """

    keyword: str
    level: Level
    item_keys: tuple[str, ...]


ITEM_VALUE_LENGTH = 64
"""What the index keeps of an item key's value (SH allows 16); longer ones are cut."""

VALUE_LENGTH = 256
"""What the index keeps of an attribute's text (an LO allows 64, a PN's three groups
194); longer ones, overlong or many values, are cut: the DICOM JSON keeps them."""

SEQUENCES: dict[str, SequenceAttribute] = {
    # PS3.18 Tables 10.6.1-5 and 10.6.3-4: the series' Request Attribute Sequence.
    "RequestAttributesSequence": SequenceAttribute(
        "RequestAttributesSequence", Level.SERIES,
        ("ScheduledProcedureStepID", "RequestedProcedureID")),
}

UNIQUE_KEY = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}

DEFAULT_RETURN_KEYS: dict[Level, list[str]] = {
    # PS3.18 Table 10.6.3-3..5: what QIDO-RS returns without includefield.
    Level.PATIENT: [
        "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    ],
    Level.STUDY: [
        "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
        "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
        "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
        "TimezoneOffsetFromUTC",
    ],
    Level.SERIES: [
        "Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime", "RequestAttributesSequence",
    ],
    Level.IMAGE: [
        "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
        "BitsAllocated", "NumberOfFrames",
    ],
}


class MatchKind(StrEnum):
    SINGLE = "single"
    WILDCARD = "wildcard"
    RANGE = "range"
    LIST = "list"


@dataclass(frozen=True)
class Match:
    """One matching key: ``keyword`` compared by ``kind`` against ``values``.

    SINGLE: one value. WILDCARD: one pattern with ``*``/``?``. RANGE: (low, high)
    with '' for an open end, already normalised for comparison. LIST: any of.
    ``fuzzy`` (PN only): compare case- and accent-insensitively, by component.
    """

    keyword: str
    kind: MatchKind
    values: tuple[str, ...]
    fuzzy: bool = False
    extended: ExtendedAttribute | None = None
    """Set for a configured extended attribute (``vna.dicom.extended``): numeric
    VRs then carry numbers in ``number_text`` form and compare as numbers."""


@dataclass(frozen=True)
class Query:
    level: Level
    matches: tuple[Match, ...] = ()
    return_keys: tuple[str, ...] = ()
    """Return keys the index keeps: columns (``ATTRIBUTES``) and sequences (``SEQUENCES``)."""
    limit: int | None = None
    offset: int = 0
    patient_root: bool = False
    extra_return_keys: tuple[str, ...] = field(default=())
    """Return keys the index does not keep as columns (filled from metadata)."""
    extended_return: tuple[ExtendedAttribute, ...] = field(default=())
    """Private extended attributes to return (filled from metadata, with their creator)."""


# ------------------------------------------------------------------ normalisation
def normalize_person_name(value: str) -> str:
    """Upper-case, accents stripped, only the alphabetic group: the PN search form."""
    alphabetic = value.split("=")[0]
    decomposed = unicodedata.normalize("NFKD", alphabetic)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return stripped.upper().strip()


_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")


def normalize_date(value: str, keyword: str = "date") -> str:
    value = value.strip().replace("-", "") if len(value.strip()) == 10 else value.strip()
    if not _DA.match(value):
        raise QueryError(f"{keyword}: {value!r} is not a date (YYYYMMDD)")
    month, day = int(value[4:6]), int(value[6:8])
    if not (1 <= month <= 12 and 1 <= day <= 31):
        raise QueryError(f"{keyword}: {value!r} is not a valid date")
    return value


def normalize_time(value: str, keyword: str = "time", upper: bool = False) -> str:
    """Fixed-width ``HHMMSS.ffffff`` so that times compare as strings.

    Missing components are filled with their lowest value, or their highest
    when ``upper`` (so that a range up to ``1010`` includes ``101059``).
    """
    value = value.strip().replace(":", "")
    m = _TM.match(value)
    if not m:
        raise QueryError(f"{keyword}: {value!r} is not a time (HHMMSS.FFFFFF)")
    hh = m.group(1)
    mm = m.group(2) or ("59" if upper else "00")
    ss = m.group(3) or ("59" if upper else "00")
    frac = (m.group(4) or ".")[1:]
    frac = frac.ljust(6, "9" if upper and not m.group(4) else "0")
    if int(hh) > 23 or int(mm) > 59 or int(ss) > 60:
        raise QueryError(f"{keyword}: {value!r} is not a valid time")
    return f"{hh}{mm}{ss}.{frac}"


NUMERIC_VRS = frozenset({"DS", "IS", "FL", "FD", "US", "UL", "SS", "SL", "SV", "UV"})


def parse_number(text: str) -> float | None:
    """A finite number from a DS/IS/binary numeric value, None when it is not one."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def number_text(value: float) -> str:
    """One spelling per number: ``1``, ``1.0`` and ``1.00`` all read ``1``."""
    return str(int(value)) if value.is_integer() else repr(value)


def stored_time(value: str) -> str:
    """The form a TM value is stored in for range matching ('' when unparsable)."""
    try:
        return normalize_time(value) if value else ""
    except QueryError:
        return ""


# ------------------------------------------------------------------ building
def resolve_keyword(key: str) -> str:
    """A keyword for ``key`` given as keyword or as tag ('00100010', '0010,0010')."""
    cleaned = key.replace(",", "").replace("(", "").replace(")", "").strip()
    if re.fullmatch(r"[0-9A-Fa-f]{8}", cleaned):
        keyword = keyword_for_tag(int(cleaned, 16))
        if not keyword:
            raise QueryError(f"{key}: not an attribute this archive can match on")
        return keyword
    if tag_for_keyword(cleaned) is None:
        raise QueryError(f"{key}: unknown attribute")
    return cleaned


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def build_match(keyword: str, raw: str, *, fuzzy: bool = False, vr: str = "") -> Match | None:
    """A ``Match`` for one key, or None for universal matching (empty value)."""
    if not vr:
        attr = ATTRIBUTES.get(keyword)
        vr = attr.vr if attr else dictionary_VR(keyword)
    value = raw.strip() if vr not in ("PN",) else raw
    if value == "" or value == "*":
        return None
    if vr == "UI":
        uids = tuple(u.strip() for u in value.split("\\") if u.strip())
        for uid in uids:
            if not is_valid_uid(uid):
                raise QueryError(f"{keyword}: {uid!r} is not a valid UID")
        if len(uids) == 1:
            return Match(keyword, MatchKind.SINGLE, uids)
        return Match(keyword, MatchKind.LIST, uids)
    if vr in ("DA", "TM", "DT"):
        norm_lo, norm_hi = _normalizers(vr, keyword)
        if "-" in value and not (vr == "DA" and len(value) == 10 and value[4] == "-"):
            lo, _, hi = value.partition("-")
            if not lo and not hi:
                raise QueryError(f"{keyword}: {value!r} is not a range")
            return Match(
                keyword,
                MatchKind.RANGE,
                (norm_lo(lo) if lo else "", norm_hi(hi) if hi else ""),
            )
        if vr == "TM":
            # A single time matches the whole precision it is given in.
            return Match(keyword, MatchKind.RANGE, (norm_lo(value), norm_hi(value)))
        return Match(keyword, MatchKind.SINGLE, (norm_lo(value),))
    if vr == "PN":
        value = value.strip()
        if fuzzy:
            return Match(keyword, MatchKind.WILDCARD, (normalize_person_name(value),), fuzzy=True)
        norm = normalize_person_name(value)
        kind = MatchKind.WILDCARD if _has_wildcard(norm) else MatchKind.SINGLE
        return Match(keyword, kind, (norm,))
    if "\\" in value and vr in ("CS", "SH", "LO", "IS"):
        return Match(keyword, MatchKind.LIST, tuple(v.strip() for v in value.split("\\")))
    if _has_wildcard(value):
        return Match(keyword, MatchKind.WILDCARD, (value,))
    return Match(keyword, MatchKind.SINGLE, (value,))


_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER_RANGE = re.compile(rf"^\s*({_NUMBER})?\s*-\s*({_NUMBER})?\s*$")


def build_extended_match(attr: ExtendedAttribute, raw: str, *, fuzzy: bool = False
                         ) -> Match | None:
    """A ``Match`` on a configured extended attribute, or None (universal).

    Strings, dates, times, names and UIDs follow the rules of their VR as the
    index's own columns do. Numbers compare as numbers: ``SliceThickness=1.0``
    matches stored ``1``, ``1.0`` and ``1.00``; ``a-b`` is a range (either end
    open), ``a\\b`` a list; a single signed value such as ``-5`` is a value.
    """
    if not attr.numeric:
        match = build_match(attr.key, raw, fuzzy=fuzzy, vr=attr.vr)
        if match is None:
            return None
        return Match(match.keyword, match.kind, match.values, match.fuzzy, extended=attr)
    value = raw.strip()
    if value in ("", "*"):
        return None

    def number(text: str) -> str:
        num = parse_number(text)
        if num is None:
            raise QueryError(f"{attr.key}: {text.strip()!r} is not a number")
        return number_text(num)

    if "\\" in value:
        return Match(attr.key, MatchKind.LIST, tuple(number(v) for v in value.split("\\")),
                     extended=attr)
    if parse_number(value) is not None:
        return Match(attr.key, MatchKind.SINGLE, (number(value),), extended=attr)
    m = _NUMBER_RANGE.match(value)
    if m and (m.group(1) or m.group(2)):
        lo, hi = m.group(1), m.group(2)
        return Match(attr.key, MatchKind.RANGE,
                     (number(lo) if lo else "", number(hi) if hi else ""), extended=attr)
    raise QueryError(f"{attr.key}: {value!r} is not a number, a list or a range "
                     "(wildcards do not apply to numbers)")


def _normalizers(vr: str, keyword: str) -> tuple[Callable[[str], str], Callable[[str], str]]:
    if vr == "DA":
        def da(v: str) -> str:
            return normalize_date(v, keyword)
        return da, da
    if vr == "TM":
        def tm_lo(v: str) -> str:
            return normalize_time(v, keyword)

        def tm_hi(v: str) -> str:
            return normalize_time(v, keyword, upper=True)
        return tm_lo, tm_hi

    def dt(v: str) -> str:
        v = v.strip()
        if not re.fullmatch(r"\d{4,14}(\.\d{1,6})?([+-]\d{4})?", v):
            raise QueryError(f"{keyword}: {v!r} is not a date-time")
        return v
    return dt, dt



def level_of(keyword: str) -> Level | None:
    attr = ATTRIBUTES.get(keyword)
    return attr.level if attr else None


def build_query(
    level: Level,
    keys: Mapping[str, str],
    *,
    return_keys: list[str] | None = None,
    fuzzy: bool = False,
    limit: int | None = None,
    offset: int = 0,
    patient_root: bool = False,
    strict: bool = True,
    extended: ExtendedAttributes | None = None,
) -> Query:
    """Build a ``Query`` at ``level`` from matching keys ``keyword -> raw value``.

    Keys with empty values are universal: they are return keys only. With
    ``strict`` (QIDO-RS) a key the index cannot match on is an error; without
    it (C-FIND) such a key is only returned. ``extended`` adds the configured
    extended attributes to the keys the index can match on. ``Sequence.Item``
    keys match on the items of a sequence the index keeps (``SEQUENCES``); keys
    in ``RETURN_ONLY`` are returned, never matched.
    """
    matches: list[Match] = []
    returned: list[str] = list(return_keys or [])
    for key, raw in keys.items():
        if "\0" in raw:
            # No value the index holds has one (they are dropped), and PostgreSQL
            # refuses it in a query: a reason, not an internal error.
            raise QueryError(f"{key}: a value holds a NUL character")
        ext = extended.lookup(key) if extended else None
        if ext is None and "." in key:  # a private creator may hold a dot: looked up first
            match = _sequence_match(level, key, raw, returned, fuzzy=fuzzy, strict=strict)
            if match is not None:
                matches.append(match)
            continue
        if ext is not None:
            returned.append(ext.key)
            if LEVEL_ORDER.index(ext.level) > LEVEL_ORDER.index(level):
                if raw.strip() and raw.strip() != "*" and strict:
                    raise QueryError(f"{ext.key}: is below the {level} level")
                continue
            match = build_extended_match(ext, raw, fuzzy=fuzzy)
            if match is not None:
                matches.append(match)
            continue
        keyword = resolve_keyword(key)
        attr = ATTRIBUTES.get(keyword)
        returned.append(keyword)
        if keyword in RETURN_ONLY:
            continue
        if attr is None or (attr.computed and keyword != "ModalitiesInStudy"):
            if raw.strip() and raw.strip() != "*" and strict:
                raise QueryError(f"{keyword}: not a matching key at the {level} level")
            continue
        if LEVEL_ORDER.index(attr.level) > LEVEL_ORDER.index(level):
            if raw.strip() and strict:
                raise QueryError(f"{keyword}: is below the {level} level")
            continue
        match = build_match(keyword, raw, fuzzy=fuzzy)
        if match is not None:
            matches.append(match)
    if limit is not None and limit < 0:
        raise QueryError("limit must not be negative")
    if offset < 0:
        raise QueryError("offset must not be negative")
    seen: dict[str, None] = {}
    for k in returned:
        seen.setdefault(k, None)
    private = {k: ext for k in seen
               if extended and (ext := extended.lookup(k)) is not None and ext.private}
    # A sequence the index keeps comes from its items at or below its level; above
    # it (a study's), from the metadata of one instance like any other attribute.
    kept = {k for k in seen if k in ATTRIBUTES or (
        k in SEQUENCES and LEVEL_ORDER.index(SEQUENCES[k].level) <= LEVEL_ORDER.index(level))}
    columns = tuple(k for k in seen if k in kept)
    extra = tuple(k for k in seen if k not in kept and k not in private)
    return Query(
        level=level,
        matches=tuple(matches),
        return_keys=columns,
        limit=limit,
        offset=offset,
        patient_root=patient_root,
        extra_return_keys=extra,
        extended_return=tuple(private.values()),
    )


def sequence_key(keyword: str) -> tuple[str, str] | None:
    """(sequence, item attribute) of a matching key on a sequence's items, else None."""
    sequence, dot, item = keyword.partition(".")
    return (sequence, item) if dot else None


def _sequence_match(level: Level, key: str, raw: str, returned: list[str], *,
                    fuzzy: bool, strict: bool) -> Match | None:
    """A match on an item attribute of a sequence, as QIDO-RS names it
    (``RequestAttributesSequence.ScheduledProcedureStepID``, ``00400275.00400009``);
    the sequence becomes a return key."""
    parts = key.split(".")
    if len(parts) != 2:
        raise QueryError(f"{key}: only attributes of a sequence's items can be matched, "
                         "one level deep")
    sequence, item = resolve_keyword(parts[0]), resolve_keyword(parts[1])
    returned.append(sequence)
    given = raw.strip() not in ("", "*")
    found = SEQUENCES.get(sequence)
    if found is None or item not in found.item_keys:
        if given and strict:
            known = ", ".join(f"{s.keyword}.{k}" for s in SEQUENCES.values()
                              for k in s.item_keys)
            raise QueryError(f"{sequence}.{item}: not a matching key (sequence items "
                             f"matched: {known})")
        return None
    if LEVEL_ORDER.index(found.level) > LEVEL_ORDER.index(level):
        if given and strict:
            raise QueryError(f"{sequence}.{item}: is below the {level} level")
        return None
    return build_match(f"{sequence}.{item}", raw, fuzzy=fuzzy, vr=dictionary_VR(item))


def wildcard_to_like(pattern: str) -> str:
    """A SQL LIKE pattern (escape character backslash) for a DICOM wildcard."""
    out = []
    for ch in pattern:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)
