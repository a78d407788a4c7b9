"""Attribute corrections as overlays: DICOM keyword -> new value, applied on read.

A correction never rewrites what was received. The index keeps, per study, the
overlay in force (the current metadata version); readers lay it over the
pristine DICOM JSON (``apply_to_json``) or over a decoded data set
(``apply_to_dataset``) when they hand out a corrected copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from io import BytesIO
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from vna.dicom.header import BULK_THRESHOLD
from vna.dicom.json_model import conform

# Identity of the objects themselves: never "corrected" (that would be another object).
NOT_CORRECTABLE = frozenset({
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
    "TransferSyntaxUID", "PixelData",
})
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
             "UC", "UI", "UR", "UT"}


class CorrectionError(ValueError):
    """A correction that cannot be applied (unknown keyword, not correctable)."""


class UnknownStudy(LookupError):
    """The study to correct is not in the index (yet)."""


def check_changes(changes: Mapping[str, str]) -> dict[str, str]:
    """``changes`` as a plain dict, or ``CorrectionError`` saying which key is wrong."""
    if not changes:
        raise CorrectionError("no attributes to correct")
    out: dict[str, str] = {}
    for keyword, value in changes.items():
        if keyword in NOT_CORRECTABLE:
            raise CorrectionError(f"{keyword} identifies the object and cannot be corrected")
        if tag_for_keyword(keyword) is None:
            raise CorrectionError(f"{keyword!r} is not a DICOM keyword")
        if dictionary_VR(keyword) not in _TEXT_VRS:
            raise CorrectionError(f"{keyword} ({dictionary_VR(keyword)}) is not a text value")
        out[keyword] = "" if value is None else str(value)
    return out


def tag_hex(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise CorrectionError(f"{keyword!r} is not a DICOM keyword")
    return f"{tag:08X}"


def json_element(keyword: str, value: str) -> dict[str, Any]:
    """The DICOM JSON (PS3.18 F.2) of ``keyword`` set to ``value`` ('' is empty)."""
    elem = DataElement(int(tag_hex(keyword), 16), dictionary_VR(keyword), value)
    result: dict[str, Any] = conform(elem.to_json_dict(None, BULK_THRESHOLD))
    return result


def apply_to_json(doc: dict[str, Any], overlay: Mapping[str, str]) -> dict[str, Any]:
    """``doc`` (one instance's DICOM JSON) with the overlay's attributes set."""
    if not overlay:
        return doc
    out = dict(doc)
    for keyword, value in overlay.items():
        out[tag_hex(keyword)] = json_element(keyword, value)
    return dict(sorted(out.items()))


def json_text(doc: Mapping[str, Any], keyword: str) -> str:
    """The value of ``keyword`` in a DICOM JSON object as text ('' when absent)."""
    attr = doc.get(tag_hex(keyword)) or {}
    values = attr.get("Value") or []
    parts = []
    for v in values:
        if isinstance(v, dict):
            parts.append(str(v.get("Alphabetic", "")))
        else:
            parts.append("" if v is None else str(v))
    return "\\".join(parts)


def apply_to_dataset(ds: Dataset, overlay: Mapping[str, str]) -> Dataset:
    """Set the overlay's attributes on ``ds`` (in place) and return it."""
    for keyword, value in overlay.items():
        setattr(ds, keyword, value)
    return ds


def corrected_part10(data: bytes, overlay: Mapping[str, str]) -> bytes:
    """A Part-10 copy of ``data`` with the overlay applied, in the same transfer syntax.

    Pixel data and every other element are written back as read (compressed
    fragments untouched); only the overlay's attributes differ. Non-ASCII values
    switch the copy to UTF-8 (ISO_IR 192), re-encoding its other text.
    """
    ds = pydicom.dcmread(BytesIO(data))
    if any(not value.isascii() for value in overlay.values()):
        ds.decode()
        ds.SpecificCharacterSet = "ISO_IR 192"
    apply_to_dataset(ds, overlay)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
