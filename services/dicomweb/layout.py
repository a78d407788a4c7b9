"""Where an instance's values sit inside its stored blob, read without loading them.

The header is parsed by pydicom with large values deferred (only element
headers are read), through a seekable reader over ``BlobStore.read_range``, so
this works the same on files and on S3. Bulk data, native frames and the
fragments of encapsulated frames are then served as byte ranges of the blob.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from vna.model import BlobKey
from vna.ports import BlobStore

DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_DEFER = 1024


class LayoutError(ValueError):
    """The requested value or frame is not in the instance; the message says why."""


class _BlobReader(io.RawIOBase):
    """A seekable, read-only view of a blob through ranged reads."""

    def __init__(self, blobs: BlobStore, key: BlobKey) -> None:
        self.blobs, self.key = blobs, key
        self.size = blobs.size(key)
        self.pos = 0
        # pydicom wants a name when it defers values; they are never loaded through
        # it here (we read their extents), so a label is enough.
        self.name = f"blob:{key}"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        want = min(len(view), self.size - self.pos)
        if want <= 0:
            return 0
        data = self.blobs.read_range(self.key, self.pos, want)
        view[: len(data)] = data
        self.pos += len(data)
        return len(data)


def open_blob(blobs: BlobStore, key: BlobKey) -> io.BufferedReader:
    path = blobs.local_path(key)
    if path is not None:
        return open(path, "rb")
    return io.BufferedReader(_BlobReader(blobs, key), buffer_size=64 * 1024)


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int


@dataclass
class Layout:
    """An instance's header with the byte extents of its deferred values."""

    dataset: Dataset
    transfer_syntax_uid: str
    extents: dict[int, Extent]
    """Top-level deferred values of defined length: tag -> extent in the blob."""
    encapsulated_at: int | None
    """Offset of the first item of encapsulated pixel data, when it is encapsulated."""
    in_memory: bytes | None = None
    """Deflated data sets: offsets would point into the inflated stream, so the
    whole instance is parsed in memory instead (rare, and small in practice)."""


def read_layout(blobs: BlobStore, key: BlobKey, transfer_syntax_uid: str) -> Layout:
    if transfer_syntax_uid == DEFLATED:
        with blobs.open(key) as fp:
            data = fp.read()
        ds = pydicom.dcmread(io.BytesIO(data))
        return Layout(ds, transfer_syntax_uid, {}, None, in_memory=data)
    with open_blob(blobs, key) as fp:
        ds = pydicom.dcmread(fp, defer_size=_DEFER)
    extents: dict[int, Extent] = {}
    encapsulated_at = None
    for tag, elem in ds._dict.items():
        if isinstance(elem, RawDataElement) and elem.value is None and elem.length:
            if elem.length == _UNDEFINED:
                if tag == PIXEL_DATA:
                    encapsulated_at = elem.value_tell
            else:
                extents[int(tag)] = Extent(elem.value_tell, elem.length)
    return Layout(ds, transfer_syntax_uid, extents, encapsulated_at)


def element_value(layout: Layout, blobs: BlobStore, key: BlobKey, tag: int
                  ) -> tuple[Extent | None, bytes | None]:
    """(extent in the blob, or the bytes when they are not a plain range of the blob)."""
    if tag in layout.extents:
        return layout.extents[tag], None
    if tag not in layout.dataset._dict:
        raise LayoutError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is not in the instance")
    if tag == PIXEL_DATA and layout.encapsulated_at is not None:
        end = _fragments(blobs, key, layout.encapsulated_at)[1]
        return Extent(layout.encapsulated_at, end - layout.encapsulated_at), None
    return None, _stored_bytes(layout.dataset, tag)


def item_element_value(blobs: BlobStore, key: BlobKey, items: list[tuple[int, int]],
                       tag: int) -> tuple[Extent | None, bytes | None]:
    """The bytes of ``tag`` in the sequence item that ``items`` leads to ((sequence tag,
    item number from 1), ... from the data set down), as stored.

    The header is read whole up to the pixel data (nested values are not deferred:
    a deferred sequence could not be read back from every blob store), which
    holds the sequences such values are in: waveforms, icons, LUTs, overlays."""
    with open_blob(blobs, key) as fp:  # deflated too: pydicom inflates it
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
    for seq_tag, number in items:
        seq = ds.get(Tag(seq_tag))
        if seq is None or seq.VR != "SQ" or not 1 <= number <= len(seq.value):
            raise LayoutError(f"({seq_tag >> 16:04X},{seq_tag & 0xFFFF:04X}) has no item "
                              f"{number} in the instance")
        ds = seq.value[number - 1]
    if Tag(tag) not in ds._dict:
        raise LayoutError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is not in that item")
    return None, _stored_bytes(ds, tag)


def _stored_bytes(ds: Dataset, tag: int) -> bytes:
    """The value of ``tag`` (in ``ds``) as bytes. As encoded when still raw: also a
    number or text that DICOM JSON could not hold (an IS of "1A"), which the
    metadata then gives by BulkDataURI (PS3.18 F.2.2)."""
    raw = ds._dict[Tag(tag)]
    if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes) and raw.VR != "SQ":
        return raw.value
    value = ds[tag].value
    if isinstance(value, bytes):
        return value
    raise LayoutError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is not bulk data")


def _fragments(blobs: BlobStore, key: BlobKey, start: int
               ) -> tuple[list[Extent], int]:
    """Item extents of encapsulated pixel data (the first is the Basic Offset Table)
    and the offset just after the sequence delimiter. Reads headers only."""
    items: list[Extent] = []
    pos = start
    size = blobs.size(key)
    while pos + 8 <= size:
        tag_group, tag_elem, length = struct.unpack("<HHI", blobs.read_range(key, pos, 8))
        tag = (tag_group << 16) | tag_elem
        pos += 8
        if tag == _SEQUENCE_DELIMITER:
            return items, pos
        if tag != _ITEM or length == _UNDEFINED or pos + length > size:
            raise LayoutError("encapsulated pixel data is malformed")
        items.append(Extent(pos, length))
        pos += length
    raise LayoutError("encapsulated pixel data is truncated")


def number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def native_frame(layout: Layout, blobs: BlobStore, key: BlobKey, frame: int) -> Extent | bytes:
    """Frame ``frame`` (1-based) of native pixel data: its extent, or bytes when in memory."""
    ds = layout.dataset
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise LayoutError("the instance has no image pixel description") from exc
    frames = number_of_frames(ds)
    if not 1 <= frame <= frames:
        raise LayoutError(f"frame {frame} does not exist (the instance has {frames})")
    frame_bits = rows * cols * samples * bits
    if frame_bits % 8:
        raise LayoutError("frames of this instance do not start on byte boundaries")
    length = frame_bits // 8
    if layout.in_memory is not None:
        pixels = ds.PixelData
        return bytes(pixels[(frame - 1) * length: frame * length])
    extent = layout.extents.get(PIXEL_DATA)
    if extent is None:
        if PIXEL_DATA in ds._dict and isinstance(ds.PixelData, bytes):
            return bytes(ds.PixelData[(frame - 1) * length: frame * length])
        raise LayoutError("the instance has no pixel data")
    if frame * length > extent.length:
        raise LayoutError(f"frame {frame} lies beyond the pixel data")
    return Extent(extent.offset + (frame - 1) * length, length)


def encapsulated_frame(layout: Layout, blobs: BlobStore, key: BlobKey, frame: int
                       ) -> list[Extent] | bytes:
    """The fragments that make up frame ``frame`` (1-based) of encapsulated pixel data."""
    frames = number_of_frames(layout.dataset)
    if not 1 <= frame <= frames:
        raise LayoutError(f"frame {frame} does not exist (the instance has {frames})")
    if layout.in_memory is not None or layout.encapsulated_at is None:
        from pydicom.encaps import get_frame

        return bytes(get_frame(layout.dataset.PixelData, frame - 1, number_of_frames=frames))
    items, _end = _fragments(blobs, key, layout.encapsulated_at)
    if not items:
        raise LayoutError("encapsulated pixel data has no offset table item")
    bot, fragments = items[0], items[1:]
    if frames == 1:
        return fragments
    if bot.length:
        raw = blobs.read_range(key, bot.offset, bot.length)
        offsets = list(struct.unpack(f"<{bot.length // 4}I", raw))
        if len(offsets) == frames:
            first = fragments[0].offset - 8 if fragments else 0
            starts = [first + o for o in offsets] + [1 << 62]
            return [f for f in fragments
                    if starts[frame - 1] <= f.offset - 8 < starts[frame]]
    if len(fragments) == frames:
        return [fragments[frame - 1]]
    # No usable offset table and several fragments per frame: let pydicom find
    # the frame boundaries (it reads the fragments of this instance).
    from pydicom.encaps import get_frame

    with open_blob(blobs, key) as fp:
        ds = pydicom.dcmread(fp)
    return bytes(get_frame(ds.PixelData, frame - 1, number_of_frames=frames))
