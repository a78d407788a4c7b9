"""Read an instance's header into what the index keeps (no pixel data decoded).

Large values (pixel data, other bulk data) are deferred by pydicom and never
read: they are replaced by BulkDataURIs in the DICOM JSON (PS3.18 F.2).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any, BinaryIO

import orjson
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from vna.dicom.extended import NO_EXTENDED, ExtendedAttributes
from vna.dicom.json_model import conform
from vna.dicom.matching import (
    ATTRIBUTES,
    ITEM_VALUE_LENGTH,
    SEQUENCES,
    VALUE_LENGTH,
    Level,
    normalize_person_name,
    stored_time,
)
from vna.model import SequenceItem
from vna.ports import IndexRecord

BULK_THRESHOLD = 1024
"""Values longer than this (bytes) are bulk data: deferred, served by URI."""

_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def instance_path(study: str, series: str, sop: str) -> str:
    return f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"


def read_dataset(fp: BinaryIO) -> Dataset:
    """Parse a Part-10 stream, deferring bulk values (the stream must be seekable)."""
    return pydicom.dcmread(fp, defer_size=BULK_THRESHOLD, force=False)


def dataset_to_json(ds: Dataset, base_uri: str) -> dict[str, Any]:
    """DICOM JSON of ``ds`` with bulk data (deferred or large binary) as BulkDataURIs.

    Empty values follow PS3.18 F.2.5: an empty attribute (a sequence of no items
    too) has no "Value"; an empty value among several is null. pydicom's own
    conversion gives "" and [] there, and drops a DS, IS or PN with an empty
    value among several altogether (it cannot convert it): ``conform`` and the
    fast paths below keep them."""
    return _elements_json(ds, f"{base_uri}/bulkdata", _simple_charset(ds))


def _elements_json(ds: Dataset, bulk: str, charset: str | None) -> dict[str, Any]:
    """The elements of ``ds``: the instance's data set, or an item of one of its
    sequences. ``bulk`` is where its bulk data is: ``.../bulkdata`` for the data
    set, ``.../bulkdata/SSSSSSSS/N`` for item N (from 1) of sequence SSSSSSSS, and so
    on down (``/bulkdata/{path}`` of WADO-RS resolves it)."""
    out: dict[str, Any] = {}
    elements = ds._dict
    # Tags as plain ints: a BaseTag compares and splits in Python, and this runs for
    # every element of every instance stored (a CT header has 250 or more).
    for tag in sorted(elements, key=int):
        if tag >> 16 == 0x0002 or not tag & 0xFFFF:
            continue  # File Meta; group lengths
        raw = elements[tag]
        tag_hex = f"{tag:08X}"
        if isinstance(raw, RawDataElement):
            if raw.value is None and raw.length:
                vr = raw.VR or _dictionary_vr(tag)
                if vr in ("OB or OW", "US or OW", "US or SS or OW"):
                    vr = "OW"
                # A long sequence is deferred by the parser too, but it is never bulk
                # data (PS3.18 F.2.7): it is read below, from the still open file.
                if vr != "SQ":
                    out[tag_hex] = {"vr": vr, "BulkDataURI": f"{bulk}/{tag_hex}"}
                    continue
            else:
                fast = _fast_json(raw, charset)
                if fast is not None:
                    out[tag_hex] = fast
                    continue
        try:
            elem: DataElement = ds[tag]
        except Exception:  # noqa: BLE001 - an undecodable element is skipped, not fatal
            continue
        if elem.VR == "SQ":
            items = [_elements_json(item, f"{bulk}/{tag_hex}/{number}",
                                    _item_charset(item, charset))
                     for number, item in enumerate(elem.value or [], start=1)]
            out[tag_hex] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            continue
        if (elem.VR in _BINARY_VRS and elem.value is not None
                and len(elem.value) > BULK_THRESHOLD):
            out[tag_hex] = {"vr": elem.VR, "BulkDataURI": f"{bulk}/{tag_hex}"}
            continue
        try:
            out[tag_hex] = conform(elem.to_json_dict(
                bulk_data_element_handler=None, bulk_data_threshold=BULK_THRESHOLD))
        except Exception:  # noqa: BLE001 - keep the rest of the header usable
            if elem.VR == "PN":  # pydicom fails on an empty name among several
                out[tag_hex] = _pn_json(elem)
            elif elem.VR in _BULK_DATA_VRS:
                # A value JSON cannot hold (an IS of "1A"): as stored, by URI,
                # rather than dropped from the metadata.
                out[tag_hex] = {"vr": elem.VR, "BulkDataURI": f"{bulk}/{tag_hex}"}
            continue
    return out


_BULK_DATA_VRS = {"DS", "FL", "FD", "IS", "LT", "OB", "OD", "OF", "OL", "OV", "OW", "SL",
                  "SS", "ST", "SV", "UC", "UL", "UN", "US", "UT", "UV"}
"""The VRs PS3.18 F.2.2 lets a BulkDataURI stand for."""


def _pn_json(elem: DataElement) -> dict[str, Any]:
    """A PN's DICOM JSON from pydicom's decoded names (any character set)."""
    names = list(elem.value) if elem.VM > 1 else [elem.value]
    values = [_pn_value(list(getattr(name, "components", ()))) for name in names]
    return {"vr": "PN", "Value": values} if any(values) else {"vr": "PN"}


def _pn_value(groups: list[str]) -> dict[str, str] | None:
    """One name's JSON from its component groups; None (null, F.2.5) when empty."""
    while groups and not groups[-1]:
        groups.pop()
    return dict(zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False)) \
        if groups else None


def _prefix_bulk_data_uris(elements: dict[str, Any], prefix: str) -> None:
    for element in elements.values():
        if "BulkDataURI" in element:
            element["BulkDataURI"] = prefix + element["BulkDataURI"]
        elif element.get("vr") == "SQ":
            for item in element.get("Value") or []:
                _prefix_bulk_data_uris(item, prefix)


def _item_charset(item: Dataset, charset: str | None) -> str | None:
    """A sequence item's character set: its own when it names one (PS3.5 7.5.1)."""
    return _simple_charset(item) if Tag(0x0008, 0x0005) in item._dict else charset


# The indexer turns every header into DICOM JSON: pydicom's general conversion
# (value objects, validation, then to_json_dict) costs ~3 ms an instance, more
# than receiving it. The common VRs are converted here straight from the raw
# bytes with pydicom's own rules (values.py: convert_string, convert_text,
# convert_UI, convert_AE_string, convert_PN; jsonrep.convert_to_python_number);
# anything else, or anything unusual, goes through pydicom. tests/unit/
# test_header_json.py holds the two to the same output over pydicom's test files.
_SIMPLE_CHARSETS = {"": "iso8859", "ISO_IR 6": "iso8859", "ISO_IR 100": "latin_1",
                    "ISO_IR 192": "utf_8"}
_STRING_VRS = {"AS", "CS", "DA", "DT", "TM"}  # convert_string: default encoding
_TEXT_VRS = {"SH", "LO", "UC"}  # convert_text: the data set's character set
_SINGLE_TEXT_VRS = {"LT", "ST", "UT"}  # convert_single_string
_STRUCT = {"US": ("H", 2), "SS": ("h", 2), "UL": ("L", 4), "SL": ("l", 4),
           "FL": ("f", 4), "FD": ("d", 8)}


def _dictionary_vr(tag: Any) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:  # a private element in implicit VR: its VR is unknown
        return "UN"


def _simple_charset(ds: Dataset) -> str | None:
    """The Python codec of a single-byte or UTF-8 character set; None for others."""
    raw = ds._dict.get(Tag(0x0008, 0x0005))
    if raw is None:
        return "iso8859"
    if not isinstance(raw, RawDataElement):
        value = raw.value
        text = value if isinstance(value, str) else None
    else:
        text = (raw.value or b"").decode("ascii", "replace").strip(" \x00")
    return _SIMPLE_CHARSETS.get(text) if text is not None else None


def _fast_json(raw: RawDataElement, charset: str | None) -> dict[str, Any] | None:
    """DICOM JSON of a raw element of a common VR; None to let pydicom do it (and for
    text, when the character set is not one of the simple ones)."""
    vr = raw.VR
    if vr is None:
        if raw.tag.is_private:
            return None
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return None
    data: bytes = raw.value or b""
    if not data:
        return {"vr": vr} if vr not in ("SQ", "UN") else None
    if charset is None:
        # Numbers are ASCII in every character set; text is left to pydicom.
        return _fast_number_string(data, vr) if vr in ("IS", "DS") else None
    values: list[Any]
    try:
        if vr == "UI":
            values = data.decode("iso8859").rstrip("\0 ").rstrip(" \x00").split("\\")
        elif vr in _STRING_VRS:
            values = data.decode("iso8859").rstrip(" \x00").split("\\")
        elif vr == "AE":
            values = [v.strip() for v in data.decode("iso8859").split("\\")]
        elif vr in _TEXT_VRS:
            values = [v.rstrip("\0 ") for v in data.decode(charset).split("\\")]
        elif vr in _SINGLE_TEXT_VRS:
            values = [data.decode(charset).rstrip("\0 ")]
        elif vr == "PN":
            return _fast_pn(data, charset)
        elif vr in ("IS", "DS"):
            return _fast_number_string(data, vr)
        elif vr in _STRUCT:
            code, size = _STRUCT[vr]
            if len(data) % size:
                return None
            order = "<" if raw.is_little_endian else ">"
            return {"vr": vr, "Value": list(struct.unpack(f"{order}{len(data) // size}{code}",
                                                          data))}
        else:
            return None
    except (UnicodeDecodeError, struct.error):
        return None
    if len(values) == 1 and not values[0]:
        return {"vr": vr}
    return {"vr": vr, "Value": [v or None for v in values]}  # F.2.5: empty is null


def _fast_pn(data: bytes, charset: str) -> dict[str, Any] | None:
    names = data.rstrip(b"\x00 ").decode(charset).split("\\")
    if len(names) == 1 and not names[0]:
        return {"vr": "PN"}
    return {"vr": "PN", "Value": [_pn_value(name.split("=")) for name in names]}


def _fast_number_string(data: bytes, vr: str) -> dict[str, Any] | None:
    items = data.decode("iso8859").rstrip(" \x00").split("\\")
    if len(items) == 1 and not items[0].strip():
        return {"vr": vr}
    numbers: list[Any] = []
    for item in items:
        text = item.strip()
        if not text:
            numbers.append(None)  # an empty value among several (F.2.5)
            continue
        try:
            numbers.append(int(text) if vr == "IS" else float(text))
        except ValueError:
            return None
    return {"vr": vr, "Value": numbers}


def _column_value(element: dict[str, Any] | None, vr: str) -> Any:
    """A column's value from an element's DICOM JSON (as the index stores it)."""
    values = (element or {}).get("Value")
    if vr in _INT_VRS:
        if not values or len(values) != 1:
            return None  # absent, or several values where the column holds one
        try:
            number = int(values[0])
        except (TypeError, ValueError):
            return None
        # An IS out of its range (PS3.5 6.2: -2^31 to 2^31-1) would not fit the
        # column (PostgreSQL's integer): the instance is indexed without it, its
        # DICOM JSON keeps it, rather than its indexing failing with every
        # instance of its batch.
        return number if _INT_MIN <= number <= _INT_MAX else None
    if not values:
        return ""
    text = "\\".join(
        "=".join(v.get(k, "") for k in ("Alphabetic", "Ideographic", "Phonetic") if k in v)
        if vr == "PN" and isinstance(v, dict) else "" if v is None else str(v)
        for v in values)
    # NUL inside a value (a damaged one: padding is stripped already) is dropped: a
    # PostgreSQL text column refuses it, and with it the indexer's whole batch.
    return text.replace("\0", "")[:VALUE_LENGTH]


_INT_VRS = {"IS", "US", "UL", "SL", "SS"}
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_TAGS = {keyword: f"{tag_for_keyword(keyword):08X}" for keyword in (
    *ATTRIBUTES, *SEQUENCES, *(key for s in SEQUENCES.values() for key in s.item_keys))}
"""The DICOM JSON key of every attribute the index keeps."""


def extract_record(
    ds: Dataset, *, blob_key: str, size: int, transfer_syntax_uid: str,
    extended: ExtendedAttributes = NO_EXTENDED,
) -> IndexRecord:
    """The index's view of one instance: its DICOM JSON, and the query columns."""
    metadata = dataset_to_json(ds, "")
    uid = {k: _column_value(metadata.get(_TAGS[k]), "UI")
           for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    base_uri = instance_path(uid["StudyInstanceUID"], uid["SeriesInstanceUID"],
                             uid["SOPInstanceUID"])
    _prefix_bulk_data_uris(metadata, base_uri)  # made relative above: they need the UIDs
    columns: dict[Level, dict[str, Any]] = {level: {} for level in Level}
    for keyword, attr in ATTRIBUTES.items():
        if attr.computed:
            continue
        columns[attr.level][keyword] = _column_value(metadata.get(_TAGS[keyword]),
                                                     attr.vr)
    # Search forms: PN case/accent-folded, TM fixed-width for range matching.
    for level_cols in columns.values():
        for keyword in list(level_cols):
            vr = ATTRIBUTES[keyword].vr
            if vr == "PN":
                level_cols[keyword + "_norm"] = normalize_person_name(
                    level_cols[keyword] or "")[:VALUE_LENGTH]  # "ß" folds to "ss"
            elif vr == "TM":
                level_cols[keyword + "_norm"] = stored_time(level_cols[keyword] or "")
    return IndexRecord(
        patient=columns[Level.PATIENT],
        study=columns[Level.STUDY],
        series=columns[Level.SERIES],
        instance=columns[Level.IMAGE],
        metadata_json=_json_text(metadata),
        blob_key=blob_key,  # type: ignore[arg-type]
        size=size,
        transfer_syntax_uid=transfer_syntax_uid,
        # From the DICOM JSON, as the backfill does: both index the same values.
        extended=extended.values(metadata),
        sequence_items=sequence_items(metadata),
    )


def _json_text(value: Any) -> str:
    """Compact JSON, as UTF-8 text. orjson: a CT header of 250 elements took the
    standard library 130 us, a tenth of the instance's whole header work, and orjson
    12 us. The standard library for what orjson refuses (an integer beyond 64 bits,
    from a malformed IS)."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def sequence_items(metadata: Mapping[str, Any]) -> dict[str, list[SequenceItem]]:
    """The items of each sequence the index keeps (``SEQUENCES``) in one instance's
    DICOM JSON; the same for the write path, an older event and the migration."""
    out: dict[str, list[SequenceItem]] = {}
    for keyword, sequence in SEQUENCES.items():
        element = metadata.get(_TAGS[keyword])
        items = element.get("Value") if isinstance(element, dict) else None
        for item in items or []:
            if not isinstance(item, dict):
                continue
            values = {key: _column_value(item.get(_TAGS[key]), dictionary_VR(key))
                      for key in sequence.item_keys}
            out.setdefault(keyword, []).append(SequenceItem(
                {k: str(v)[:ITEM_VALUE_LENGTH] for k, v in values.items()},
                json.dumps(item, separators=(",", ":"))))
    return out


__all__ = ["Tag", "dataset_to_json", "extract_record", "instance_path", "read_dataset",
           "sequence_items"]
