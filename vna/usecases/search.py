"""One query function for C-FIND and QIDO-RS: a ``Query`` in, DICOM JSON out."""

from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

from vna.dicom.extended import element_of
from vna.dicom.matching import Query
from vna.ports import Index

_NUMERIC = {"IS", "US", "UL", "SL", "SS", "DS", "FL", "FD", "SV", "UV"}


def json_attribute(keyword: str, value: Any) -> tuple[str, dict[str, Any]]:
    """A DICOM JSON attribute (PS3.18 F.2) for a keyword and a plain value."""
    tag = tag_for_keyword(keyword)
    vr = dictionary_VR(keyword)
    key = f"{tag:08X}"
    if value is None or value == "" or value == []:
        return key, {"vr": vr}
    values = value if isinstance(value, list) else (
        value.split("\\") if isinstance(value, str) and vr not in ("PN",) else [value])
    if vr == "PN":
        return key, {"vr": vr, "Value": [{"Alphabetic": v} for v in
                                          str(value).split("\\")]}
    if vr in _NUMERIC:
        nums: list[Any] = []
        for v in values:
            try:
                nums.append(int(v) if vr not in ("DS", "FL", "FD") else float(v))
            except (TypeError, ValueError):
                continue
        return key, ({"vr": vr, "Value": nums} if nums else {"vr": vr})
    return key, {"vr": vr, "Value": [str(v) for v in values]}


def search(query: Query, *, index: Index) -> list[dict[str, Any]]:
    """Matching entities at ``query.level`` as DICOM JSON objects, in stable order."""
    results = []
    for row in index.search(query):
        obj: dict[str, Any] = {}
        for keyword in (*query.return_keys, "PatientID", "StudyInstanceUID",
                        "SeriesInstanceUID", "SOPInstanceUID"):
            if keyword in row:
                tag, attr = json_attribute(keyword, row[keyword])
                obj[tag] = attr
        metadata = row.get("_metadata") or {}
        for keyword in query.extra_return_keys:
            tag_int = tag_for_keyword(keyword)
            if tag_int is None:
                continue
            tag = f"{tag_int:08X}"
            obj[tag] = metadata.get(tag) or {"vr": dictionary_VR(keyword)}
        for ext in query.extended_return:
            # A private attribute keeps the tags it has in the instance, creator included.
            found = element_of(ext, metadata)
            if found is not None:
                creator_tag, tag, value = found
                obj[creator_tag] = metadata[creator_tag]
                obj[tag] = value
        results.append(dict(sorted(obj.items())))
    return results


def backfilling(query: Query, *, index: Index) -> list[str]:
    """Extended attributes ``query`` matches on whose values are still being backfilled."""
    keys = {m.extended.progress_key: m.extended.key for m in query.matches if m.extended}
    if not keys:
        return []
    states = index.extended_progress()
    return [key for pk, key in keys.items()
            if not ((s := states.get(pk)) is not None and s.completed)]
