"""Part-10 framing (PS3.10 7.1): preamble, 'DICM', File Meta group, data set.

VNA frames every stored data set with the same deterministic File Meta
Information, so the bytes stored for a given data set do not depend on who
sent it or how (C-STORE or STOW-RS).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO

from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from vna.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

PREAMBLE = b"\x00" * 128
MAGIC = b"DICM"
CHUNK = 1 << 20


class NotPart10Error(ValueError):
    """The bytes are not a DICOM Part-10 file."""


@dataclass(frozen=True)
class Part10Header:
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    dataset_offset: int
    """Byte offset at which the data set (after the File Meta group) starts."""


def _element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta_bytes(transfer_syntax_uid: str, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """Preamble, magic and File Meta group as VNA writes them (PS3.10 Table 7.1-1).

    Encoded directly (explicit VR little endian, as group 2 always is): this runs
    once per stored instance, and pydicom's general writer costs a millisecond.
    """
    body = b"".join((
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _even(sop_class_uid, b"\x00")),
        _element(0x0003, b"UI", _even(sop_instance_uid, b"\x00")),
        _element(0x0010, b"UI", _even(transfer_syntax_uid, b"\x00")),
        _element(0x0012, b"UI", _even(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _element(0x0013, b"SH", _even(IMPLEMENTATION_VERSION_NAME, b" ")),
    ))
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return PREAMBLE + MAGIC + length + body


def file_meta_bytes_reference(transfer_syntax_uid: str, sop_class_uid: str,
                              sop_instance_uid: str) -> bytes:
    """The same through pydicom's writer (used by the tests to check ours)."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buf = BytesIO()
    buf.write(PREAMBLE + MAGIC)
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue()


def read_header(fp: BinaryIO) -> Part10Header:
    """Read the File Meta group of a Part-10 stream positioned at its start.

    Only the group-2 elements are decoded (always explicit VR little endian);
    the stream is left positioned at the start of the data set.
    """
    head = fp.read(132)
    if len(head) < 132 or head[128:132] != MAGIC:
        raise NotPart10Error("no DICM prefix: not a DICOM Part-10 file")
    values: dict[int, bytes] = {}
    offset = 132
    while True:
        tag_bytes = fp.read(8)
        if len(tag_bytes) < 4 or struct.unpack("<H", tag_bytes[:2])[0] != 0x0002:
            fp.seek(offset)
            break
        if len(tag_bytes) < 8:
            raise NotPart10Error("File Meta Information is truncated")
        (elem,) = struct.unpack("<H", tag_bytes[2:4])
        vr = tag_bytes[4:6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            extra = fp.read(4)
            if len(extra) < 4:
                raise NotPart10Error("File Meta Information is truncated")
            (length,) = struct.unpack("<I", extra)
            header_len = 12
        else:
            (length,) = struct.unpack("<H", tag_bytes[6:8])
            header_len = 8
        if length > 1 << 16:
            raise NotPart10Error("File Meta element is implausibly long")
        value = fp.read(length)
        if len(value) < length:
            raise NotPart10Error("File Meta Information is truncated")
        values[elem] = value
        offset += header_len + length

    def text(elem: int, name: str) -> str:
        if elem not in values:
            raise NotPart10Error(f"File Meta Information lacks {name}")
        return values[elem].rstrip(b"\x00 ").decode("ascii", "replace")

    return Part10Header(
        transfer_syntax_uid=text(0x0010, "TransferSyntaxUID"),
        sop_class_uid=text(0x0002, "MediaStorageSOPClassUID"),
        sop_instance_uid=text(0x0003, "MediaStorageSOPInstanceUID"),
        dataset_offset=offset,
    )


def iter_chunks(fp: BinaryIO, size: int = CHUNK) -> Iterator[bytes]:
    while chunk := fp.read(size):
        yield chunk


def sha256_file(fp: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter_chunks(fp):
        digest.update(chunk)
    return digest.hexdigest()
