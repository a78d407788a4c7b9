"""A Part-10 instance from the DICOM JSON model plus bulk data (PS3.18 F, 10.5 STOW-RS).

STOW-RS may send an instance as its metadata in DICOM JSON, with bulk data
(pixel data above all) in other parts of the request that the JSON points to
by ``BulkDataURI``. This module turns one such instance into Part-10 bytes in
a file, which then takes the same store path as anything received over DIMSE.

The transfer syntax of the result is that of its pixel data: the syntax the
pixel data part names (its media type or ``transfer-syntax`` parameter), else
the JSON's own (0002,0010) if present, else Explicit VR Little Endian.
Compressed pixel data comes as one codestream, encapsulated as one frame; or, for
a multi-frame image, one part per frame at ``{BulkDataURI}/frames/{n}`` (the
Content-Location PS3.18 gives a frame of a multi-frame instance), encapsulated
one frame each. Uncompressed frames sent that way are joined.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian

from vna.dicom.json_model import dataset_from_json
from vna.dicom.transcode import NATIVE

_PIXEL_DATA = "7FE00010"
_TRANSFER_SYNTAX = "00020010"
_SOP_CLASS = "00080016"
_SOP_INSTANCE = "00080018"


class JsonInstanceError(ValueError):
    """The JSON instance cannot be made into a data set; the message says why."""


@dataclass(frozen=True)
class BulkPart:
    """A bulk data part of the request, staged in a file."""

    path: Path
    transfer_syntax_uid: str | None
    """The syntax its media type or ``transfer-syntax`` parameter names; None when
    it names none (application/octet-stream: uncompressed)."""


def json_uids(obj: Any) -> tuple[str, str]:
    """(SOP Class UID, SOP Instance UID) of a JSON instance, for failure reports."""

    def first(tag: str) -> str:
        try:
            value = obj[tag]["Value"][0]
        except (KeyError, IndexError, TypeError):
            return ""
        return value if isinstance(value, str) else ""

    return first(_SOP_CLASS), first(_SOP_INSTANCE)


def write_instance(obj: Any, bulk: Mapping[str, BulkPart], path: Path) -> str:
    """Write the JSON instance ``obj`` as a Part-10 file at ``path``; its transfer syntax.

    ``bulk`` maps each part's Content-Location (or ``cid:`` Content-ID) to it.
    """
    if not isinstance(obj, dict):
        raise JsonInstanceError("an instance in the JSON array is not an object")
    pixel_part: list[BulkPart] = []
    pixel_frames: list[BulkPart] = []

    def load(tag: str, vr: str, uri: str) -> bytes:
        part = bulk.get(uri)
        if part is None and tag.upper() == _PIXEL_DATA:
            pixel_frames.extend(_frame_parts(bulk, uri))
            if pixel_frames:
                pixel_part.append(pixel_frames[0])
                return b""  # put together below, once the syntax is known
        if part is None:
            raise JsonInstanceError(f"BulkDataURI {uri!r} of ({tag[:4]},{tag[4:]}) "
                                    "matches no part's Content-Location")
        if tag.upper() == _PIXEL_DATA:
            pixel_part.append(part)
        return part.path.read_bytes()

    try:
        # File Meta (group 0002) is the archive's to write, not the sender's.
        ds = dataset_from_json({k: v for k, v in obj.items() if not k.startswith("0002")},
                               bulk_data_uri_handler=load)
    except JsonInstanceError:
        raise
    except Exception as exc:  # pydicom raises many kinds on bad JSON
        raise JsonInstanceError(f"not a DICOM JSON instance: {_first_line(exc)}"
                                ) from exc
    syntax = _syntax(obj, pixel_part[0] if pixel_part else None)
    frames = _number_of_frames(ds)
    compressed = bool(pixel_part) and syntax not in NATIVE
    if pixel_frames:
        if len(pixel_frames) != frames:
            raise JsonInstanceError(f"{len(pixel_frames)} frame parts for "
                                    f"NumberOfFrames {frames}")
        if len({part.transfer_syntax_uid for part in pixel_frames}) > 1:
            raise JsonInstanceError("the frame parts name different transfer syntaxes")
        codestreams = [part.path.read_bytes() for part in pixel_frames]
        ds.PixelData = _encapsulated(codestreams) if compressed else b"".join(codestreams)
    elif compressed:
        if frames > 1:
            raise JsonInstanceError("compressed multi-frame pixel data in one bulk data "
                                    "part: send each frame as its own part, at "
                                    "{BulkDataURI}/frames/{n}, or application/dicom")
        ds.PixelData = _encapsulated([ds.PixelData])
    if compressed:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if keyword not in ds:
            raise JsonInstanceError(f"the instance has no {keyword}")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    try:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    except Exception as exc:  # pydicom's writer: bad values, VRs, lengths
        raise JsonInstanceError(f"the instance cannot be encoded: "
                                f"{_first_line(exc)}") from exc
    return syntax


def _first_line(exc: Exception) -> str:
    """pydicom's message without the traceback it appends to some (the reason goes
    back to the client, which has no use for the archive's file paths)."""
    return " ".join(str(exc).split("Traceback (most recent call last)")[0].split())


def _encapsulated(codestreams: list[bytes]) -> bytes:
    """The compressed frames as encapsulated Pixel Data; a frame too short to be one
    (pydicom needs two bytes a fragment) is the sender's error, not the archive's."""
    try:
        return encapsulate(codestreams)
    except ValueError as exc:
        raise JsonInstanceError(f"compressed pixel data: {exc}") from exc


def _frame_parts(bulk: Mapping[str, BulkPart], uri: str) -> list[BulkPart]:
    """The parts at ``{uri}/frames/1``, ``/2`` ... in order, up to the first missing."""
    found: list[BulkPart] = []
    while (part := bulk.get(f"{uri}/frames/{len(found) + 1}")) is not None:
        found.append(part)
    return found


def _number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError) as exc:
        raise JsonInstanceError("NumberOfFrames is not a number") from exc


def _syntax(obj: dict[str, Any], pixel: BulkPart | None) -> str:
    if pixel is not None and pixel.transfer_syntax_uid:
        return pixel.transfer_syntax_uid
    try:
        named = str(obj[_TRANSFER_SYNTAX]["Value"][0])
    except (KeyError, IndexError, TypeError):
        named = ""
    # Uncompressed pixel data is in a native syntax whatever the JSON claims.
    if named and (pixel is None or named in NATIVE):
        return named
    return str(ExplicitVRLittleEndian)
