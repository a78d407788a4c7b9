"""Read an instance's header into what the index keeps (no pixel data decoded).

Large values (pixel data, other bulk data) are deferred by pydicom and never
read: they are replaced by BulkDataURIs in the DICOM JSON (PS3.18 F.2).
"""

from __future__ import annotations

import json
from typing import Any, BinaryIO

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from vna.dicom.extended import NO_EXTENDED, ExtendedAttributes
from vna.dicom.matching import ATTRIBUTES, Level, normalize_person_name, stored_time
from vna.ports import IndexRecord

BULK_THRESHOLD = 1024
"""Values longer than this (bytes) are bulk data: deferred, served by URI."""

_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def instance_path(study: str, series: str, sop: str) -> str:
    return f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"


def read_dataset(fp: BinaryIO) -> Dataset:
    """Parse a Part-10 stream, deferring bulk values (the stream must be seekable)."""
    return pydicom.dcmread(fp, defer_size=BULK_THRESHOLD, force=False)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def dataset_to_json(ds: Dataset, base_uri: str) -> dict[str, Any]:
    """DICOM JSON of ``ds`` with bulk data (deferred or large binary) as BulkDataURIs."""
    out: dict[str, Any] = {}
    for tag in sorted(ds._dict.keys()):
        raw = ds._dict[tag]
        tag_hex = f"{tag:08X}"
        if tag.group == 0x0002 or tag.element == 0x0000:
            continue
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            vr = raw.VR or dictionary_VR(tag)
            if vr in ("OB or OW", "US or OW", "US or SS or OW"):
                vr = "OW"
            out[tag_hex] = {"vr": vr, "BulkDataURI": f"{base_uri}/bulkdata/{tag_hex}"}
            continue
        try:
            elem: DataElement = ds[tag]
        except Exception:  # noqa: BLE001 - an undecodable element is skipped, not fatal
            continue
        if elem.VR in _BINARY_VRS and elem.value is not None and len(elem.value) > BULK_THRESHOLD:
            out[tag_hex] = {"vr": elem.VR, "BulkDataURI": f"{base_uri}/bulkdata/{tag_hex}"}
            continue
        try:
            out[tag_hex] = elem.to_json_dict(
                bulk_data_element_handler=None, bulk_data_threshold=BULK_THRESHOLD
            )
        except Exception:  # noqa: BLE001 - keep the rest of the header usable
            continue
    return out


def extract_record(
    ds: Dataset, *, blob_key: str, size: int, transfer_syntax_uid: str,
    extended: ExtendedAttributes = NO_EXTENDED,
) -> IndexRecord:
    """The index's view of one instance, with the values of the ``extended`` attributes."""
    study = _text(ds, "StudyInstanceUID")
    series = _text(ds, "SeriesInstanceUID")
    sop = _text(ds, "SOPInstanceUID")
    columns: dict[Level, dict[str, Any]] = {level: {} for level in Level}
    for keyword, attr in ATTRIBUTES.items():
        if attr.computed:
            continue
        if attr.vr in ("IS", "US", "UL", "SL", "SS"):
            columns[attr.level][keyword] = _int(ds, keyword)
        else:
            columns[attr.level][keyword] = _text(ds, keyword)
    # Search forms: PN case/accent-folded, TM fixed-width for range matching.
    for level_cols in columns.values():
        for keyword in list(level_cols):
            vr = ATTRIBUTES[keyword].vr
            if vr == "PN":
                level_cols[keyword + "_norm"] = normalize_person_name(level_cols[keyword] or "")
            elif vr == "TM":
                level_cols[keyword + "_norm"] = stored_time(level_cols[keyword] or "")
    metadata = dataset_to_json(ds, instance_path(study, series, sop))
    return IndexRecord(
        patient=columns[Level.PATIENT],
        study=columns[Level.STUDY],
        series=columns[Level.SERIES],
        instance=columns[Level.IMAGE],
        metadata_json=json.dumps(metadata, separators=(",", ":")),
        blob_key=blob_key,  # type: ignore[arg-type]
        size=size,
        transfer_syntax_uid=transfer_syntax_uid,
        # From the DICOM JSON, as the backfill does: both index the same values.
        extended=extended.values(metadata),
    )


__all__ = ["Tag", "dataset_to_json", "extract_record", "instance_path", "read_dataset"]
