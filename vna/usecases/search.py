"""One query function for C-FIND and QIDO-RS: a ``Query`` in, DICOM JSON out."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

from vna.dicom.extended import element_of
from vna.dicom.matching import Query
from vna.ports import Index

_NUMERIC = {"IS", "US", "UL", "SL", "SS", "DS", "FL", "FD", "SV", "UV"}


@lru_cache(maxsize=1024)
def _tag_and_vr(keyword: str) -> tuple[str, str]:
    # pydicom's dictionary look-ups cost more than building the attribute; a search
    # returns the same few keywords for every row.
    return f"{tag_for_keyword(keyword):08X}", dictionary_VR(keyword)


def json_attribute(keyword: str, value: Any) -> tuple[str, dict[str, Any]]:
    """A DICOM JSON attribute (PS3.18 F.2) for a keyword and a plain value."""
    key, vr = _tag_and_vr(keyword)
    if value is None or value == "" or value == []:
        return key, {"vr": vr}
    if vr == "SQ":  # its items, already DICOM JSON
        return key, {"vr": vr, "Value": list(value)}
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
    keywords = tuple(dict.fromkeys((*query.return_keys, "PatientID", "StudyInstanceUID",
                                    "SeriesInstanceUID", "SOPInstanceUID")))
    extra = [(*_tag_and_vr(k), k) for k in query.extra_return_keys
             if tag_for_keyword(k) is not None]
    for row in index.search(query):
        obj: dict[str, Any] = {}
        for keyword in keywords:
            if keyword in row:
                tag, attr = json_attribute(keyword, row[keyword])
                obj[tag] = attr
        metadata = row.get("_metadata") or {}
        for tag, vr, _ in extra:
            obj[tag] = metadata.get(tag) or {"vr": vr}
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
