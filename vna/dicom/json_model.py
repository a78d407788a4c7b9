"""Empty values in the DICOM JSON model (PS3.18 F.2.5), both ways through pydicom.

An attribute present but empty (a sequence of no items too) has no "Value"; an
empty value among several is null. pydicom writes "" and [] instead, cannot
write a DS, IS or PN with an empty value among several at all, and reading
JSON it turns a null DS or IS value into the text "None": ``conform`` and
``dataset_from_json`` put that right.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.valuerep import DSfloat

_NUMBER_STRINGS = ("IS", "DS")


def conform(element: dict[str, Any]) -> dict[str, Any]:
    """``element`` (DICOM JSON as pydicom gives it) with its empty values as F.2.5
    has them, in sequence items too."""
    values = element.get("Value")
    if values is None:
        return element
    if element.get("vr") == "SQ":
        if not values:
            return {k: v for k, v in element.items() if k != "Value"}
        element["Value"] = [{tag: conform(e) for tag, e in item.items()} for item in values]
        return element
    if any(v == "" or v == {} for v in values):
        if len(values) == 1:
            return {k: v for k, v in element.items() if k != "Value"}
        element["Value"] = [None if v == "" or v == {} else v for v in values]
    return element


def dataset_from_json(obj: Mapping[str, Any],
                      bulk_data_uri_handler: Callable[..., Any] | None = None) -> Dataset:
    """``Dataset.from_json``, with null values as F.2.5 means them: empty."""
    plain: dict[str, Any] = {}
    later: dict[int, DataElement] = {}
    for key, element in obj.items():
        vr, values = element.get("vr"), element.get("Value")
        if vr in _NUMBER_STRINGS and values and None in values:
            tag = int(key, 16)
            later[tag] = DataElement(tag, vr, [_number_string(vr, v) for v in values])
        elif vr == "SQ" and values and _has_null(values):
            tag = int(key, 16)
            later[tag] = DataElement(tag, "SQ", Sequence(
                [dataset_from_json(item, bulk_data_uri_handler) for item in values]))
        else:
            plain[key] = element
    ds = Dataset.from_json(plain, bulk_data_uri_handler=bulk_data_uri_handler)
    for tag, elem in later.items():
        ds[tag] = elem
    return ds


def _number_string(vr: str, value: Any) -> Any:
    if value is None:
        return ""
    return DSfloat(value, auto_format=True) if vr == "DS" else value


def _has_null(items: list[Any]) -> bool:
    """A null IS or DS value anywhere in these sequence items."""
    for item in items:
        for element in (item or {}).values():
            values = element.get("Value") or []
            if element.get("vr") in _NUMBER_STRINGS and None in values:
                return True
            if element.get("vr") == "SQ" and _has_null(values):
                return True
    return False
