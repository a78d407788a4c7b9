"""Extended query attributes: tags an operator makes queryable by configuration.

``VNA_EXTRA_QUERY_ATTRIBUTES`` lists them, comma-separated, each as
``[level:]key[/VR]``:

- ``key`` is a keyword (``ConvolutionKernel``), a tag (``00181210``) or a
  private tag by group, element offset and creator (``0019xx10@SIEMENS CT VA0 COAD``);
- ``level`` is ``patient``, ``study``, ``series`` (the default) or ``instance``:
  the entity a value belongs to. An entity above the instance holds every
  distinct value of its instances, so a series matches when any of its
  instances does;
- ``VR`` overrides the dictionary's (needed for private tags pydicom does not
  know; they default to LO).

Values are taken from an instance's DICOM JSON (PS3.18 F.2), the same form for
the write path and the backfill, so both index the same values. This module is
pure: no I/O, no SQL.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, get_private_entry, keyword_for_tag, tag_for_keyword

from vna.dicom.matching import (
    ATTRIBUTES,
    NUMERIC_VRS,
    VALUE_LENGTH,
    Level,
    QueryError,
    normalize_person_name,
    number_text,
    parse_number,
    stored_time,
)

_UNSUPPORTED_VRS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_LEVEL_NAMES = {"patient": Level.PATIENT, "study": Level.STUDY, "series": Level.SERIES,
                "instance": Level.IMAGE, "image": Level.IMAGE}
_PRIVATE = re.compile(r"^([0-9A-Fa-f]{4})xx([0-9A-Fa-f]{2})@(.+)$")
_HEX_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")


@dataclass(frozen=True)
class ExtendedAttribute:
    """One configured attribute.

    ``key`` names it everywhere (requests, storage, progress): the keyword of a
    public attribute, ``ggggxxee@Creator`` of a private one. ``tag`` is the full
    tag of a public attribute, or group and element offset (``0x0019_0010``)
    of a private one.
    """

    key: str
    tag: int
    vr: str
    level: Level
    creator: str = ""

    @property
    def private(self) -> bool:
        return bool(self.creator)

    @property
    def numeric(self) -> bool:
        return self.vr in NUMERIC_VRS

    @property
    def request_tag(self) -> str:
        """The 8-hex tag a request may use; private ones in block 0x10 (``00191010``)."""
        if self.private:
            return f"{self.tag >> 16:04X}10{self.tag & 0xFF:02X}"
        return f"{self.tag:08X}"

    @property
    def progress_key(self) -> str:
        """Backfill progress is kept per key and level (a level change backfills again)."""
        return f"{self.level.value}:{self.key}"


@dataclass(frozen=True)
class ExtraValue:
    """One value of one extended attribute of one instance, in its search form."""

    level: Level
    key: str
    value_text: str
    value_num: float | None = None


class ExtendedAttributes:
    """The configured set, looked up by any name a request may use."""

    def __init__(self, attributes: list[ExtendedAttribute] | None = None) -> None:
        self._by_key: dict[str, ExtendedAttribute] = {}
        self._by_name: dict[str, ExtendedAttribute] = {}
        self._ambiguous: set[str] = set()
        """Request tags of private attributes of several creators (same group and element)."""
        for attr in attributes or []:
            if attr.key in self._by_key:
                raise ValueError(f"VNA_EXTRA_QUERY_ATTRIBUTES: {attr.key} is listed twice")
            self._by_key[attr.key] = attr
            self._by_name[attr.key] = attr
            if attr.request_tag in self._by_name:
                self._ambiguous.add(attr.request_tag)
            self._by_name[attr.request_tag] = attr

    def __iter__(self) -> Iterator[ExtendedAttribute]:
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def lookup(self, name: str) -> ExtendedAttribute | None:
        """The attribute a request key names: keyword, tag (any spelling) or private key.

        Raises ``QueryError`` for a tag that several configured private
        attributes share (they are then named ``ggggxxee@Creator``).
        """
        name = name.strip()
        found = self._by_name.get(name)
        if found is None:
            m = _HEX_TAG.match(name)
            if not m:
                return None
            name = (m.group(1) + m.group(2)).upper()
            found = self._by_name.get(name)
        if name in self._ambiguous:
            raise QueryError(f"{name}: several private attributes are configured with this "
                             "tag; name one as ggggxxee@Creator")
        return found

    def values(self, metadata: Mapping[str, Any]) -> list[ExtraValue]:
        """The search forms of every configured attribute in one instance's DICOM JSON."""
        out: list[ExtraValue] = []
        for attr in self._by_key.values():
            out += values_of(attr, metadata)
        return out


NO_EXTENDED = ExtendedAttributes()


# ------------------------------------------------------------------ configuration
def parse_extended_attributes(spec: str) -> ExtendedAttributes:
    """Parse ``VNA_EXTRA_QUERY_ATTRIBUTES``; ValueError says which item is wrong and why.

    Attributes the index already keeps as columns (``BodyPartExamined``,
    ``Modality`` ...) are queryable anyway and are left out.
    """
    attrs = []
    for item in filter(None, (i.strip() for i in spec.split(","))):
        attr = _parse_item(item)
        if attr is not None:
            attrs.append(attr)
    return ExtendedAttributes(attrs)


def _parse_item(item: str) -> ExtendedAttribute | None:
    where = f"VNA_EXTRA_QUERY_ATTRIBUTES item {item!r}"
    level = Level.SERIES
    body = item
    prefix, sep, rest = item.partition(":")
    if sep and prefix.strip().lower() in _LEVEL_NAMES:
        level, body = _LEVEL_NAMES[prefix.strip().lower()], rest.strip()
    vr_override = ""
    head, sep, tail = body.rpartition("/")
    if sep and re.fullmatch(r"[A-Za-z]{2}", tail.strip()):
        body, vr_override = head.strip(), tail.strip().upper()
    private = _PRIVATE.match(body)
    if private:
        group, offset, creator = int(private.group(1), 16), int(private.group(2), 16), \
            private.group(3).strip()
        if group % 2 == 0 or not creator:
            raise ValueError(f"{where}: a private tag needs an odd group and a creator")
        vr = vr_override
        if not vr:
            try:
                vr = get_private_entry((group << 16) | 0x1000 | offset, creator)[0]
            except KeyError:
                vr = "LO"
        vr = _single_vr(vr, where)
        key = f"{group:04X}xx{offset:02X}@{creator}"
        return ExtendedAttribute(key, (group << 16) | offset, vr, level, creator)
    m = _HEX_TAG.match(body)
    if m:
        tag = int(m.group(1) + m.group(2), 16)
        keyword = keyword_for_tag(tag)
        if not keyword:
            raise ValueError(f"{where}: not a public attribute (private tags are "
                             "written ggggxxee@Creator)")
    else:
        found = tag_for_keyword(body)
        if found is None:
            raise ValueError(f"{where}: unknown keyword {body!r}")
        keyword, tag = body, found
    if keyword in ATTRIBUTES:
        return None  # already a column: queryable without configuration
    vr = _single_vr(vr_override or dictionary_VR(tag), where)
    return ExtendedAttribute(keyword, tag, vr, level)


def _single_vr(vr: str, where: str) -> str:
    vr = vr.split(" or ")[0]
    if vr in _UNSUPPORTED_VRS:
        raise ValueError(f"{where}: values of VR {vr} cannot be matched")
    return vr


# ------------------------------------------------------------------ values
def element_of(attr: ExtendedAttribute, metadata: Mapping[str, Any]
               ) -> tuple[str, str, dict[str, Any]] | None:
    """(creator tag or '', element tag, DICOM JSON attribute) of ``attr`` in ``metadata``.

    A private element is found through its creator's reservation in that
    instance (the block may differ from one instance to the next).
    """
    if not attr.private:
        tag = f"{attr.tag:08X}"
        found = metadata.get(tag)
        return ("", tag, found) if isinstance(found, dict) else None
    group = f"{attr.tag >> 16:04X}"
    for block in range(0x10, 0x100):
        creator_tag = f"{group}00{block:02X}"
        creator = metadata.get(creator_tag)
        if creator is None:
            continue
        if [str(v).strip() for v in _raw_values(creator)] == [attr.creator]:
            tag = f"{group}{block:02X}{attr.tag & 0xFF:02X}"
            found = metadata.get(tag)
            return (creator_tag, tag, found) if isinstance(found, dict) else None
    return None


def _raw_values(element: Mapping[str, Any]) -> list[Any]:
    if "Value" in element:
        return [v.get("Alphabetic", "") if isinstance(v, dict) else v
                for v in element["Value"] if v is not None]
    if "InlineBinary" in element:
        # An implicit VR private element unknown to the dictionary arrives as UN.
        raw = base64.b64decode(element["InlineBinary"]).decode("latin-1")
        return raw.rstrip("\x00 ").split("\\")
    return []


def values_of(attr: ExtendedAttribute, metadata: Mapping[str, Any]) -> list[ExtraValue]:
    """The distinct search forms of ``attr``'s values in one instance's DICOM JSON."""
    found = element_of(attr, metadata)
    if found is None:
        return []
    out: dict[tuple[str, float | None], None] = {}
    for raw in _raw_values(found[2]):
        # NUL inside a damaged value is dropped: a PostgreSQL text column refuses it.
        text = str(raw).replace("\0", "").strip()
        # Longer values are not indexed (the column's width); no query needs them.
        if not text or len(text) > VALUE_LENGTH:
            continue
        num: float | None = None
        if attr.numeric:
            num = parse_number(text)
            if num is None:
                continue
            text = number_text(num)
        elif attr.vr == "PN":
            text = normalize_person_name(text)  # "ß" folds to "ss": may grow
        elif attr.vr == "TM":
            text = stored_time(text)
        if text and len(text) <= VALUE_LENGTH:
            out.setdefault((text, num), None)
    return [ExtraValue(attr.level, attr.key, text, num) for text, num in out]
