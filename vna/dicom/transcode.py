"""Transfer syntax conversion of instances and frames, derived on read (invariant 2).

The stored blob is only ever read: every function here takes a readable
Part-10 stream and returns new bytes. Decoding uses pydicom with the pylibjpeg
(libjpeg, openjpeg, rle) and pyjpegls plugins; encoding uses pydicom's
encoders: RLE Lossless, JPEG-LS (pyjpegls) and JPEG 2000 (openjpeg), and Pillow
for JPEG Baseline.

Nothing is made lossy unless a client names a lossy-only syntax. Syntaxes that
allow lossy and lossless coding (JPEG-LS Near-Lossless, JPEG 2000) are written
losslessly. JPEG Baseline, asked for by name, is made from 8-bit data (quality
90, no chroma subsampling) and marked lossy: Lossy Image Compression "01", its
method and ratio appended (PS3.3 C.7.6.1.1.5). It cannot hold more than 8 bits,
so a CT or MR is refused with that reason; JPEG Extended has no encoder here.
Data that was stored lossy stays marked so when it is decoded. SOP Instance UIDs
never change, and the stored blob stays as received.

``impossible`` says, from the header alone, why a conversion cannot be done
(no decoder, no encoder, pixel format outside the target's profile), so that
callers can refuse a request before they start answering it.
"""

from __future__ import annotations

import io
from typing import Any, BinaryIO

import numpy as np
import pydicom
import pydicom.multival
from PIL import Image, features
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import ENCODING_PROFILES, get_encoder
from pydicom.pixels.utils import pack_bits, pixel_array
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

from vna.dicom.part10 import file_meta_bytes, read_header

NATIVE = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian,
                    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian})
"""Syntaxes whose pixel data is not encapsulated."""

LOSSY_ONLY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})
"""Syntaxes whose codestreams are always lossy: decoding them keeps the data lossy."""

JPEG_QUALITY = 90
"""JPEG Baseline made on request: Pillow's quality, as Orthanc's default."""
_BASELINE_PHOTOMETRIC = {"MONOCHROME1": "MONOCHROME1", "MONOCHROME2": "MONOCHROME2",
                         "RGB": "YBR_FULL"}
"""Decoded photometric interpretation -> that of the JPEG Baseline made from it
(colour goes into JPEG as YCbCr, not subsampled: YBR_FULL, PS3.5 8.2.1)."""

# Written with a lossless codec under a syntax that also allows lossy coding.
_ENCODE_AS: dict[str, str] = {JPEG2000: JPEG2000Lossless}
_ENCODE_OPTIONS: dict[str, dict[str, Any]] = {JPEGLSNearLossless: {"jls_error": 0}}
_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_OTHER_PIXEL_DATA = (Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009))  # float, double float
# Values whose byte order follows the transfer syntax, by word size.
_WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


class TranscodeError(ValueError):
    """The conversion cannot be done; the message says why, for the client."""


def _name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def _one_line(exc: Exception) -> str:
    """A codec's message (often several lines, one per plugin) as one short line."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def can_decode(transfer_syntax_uid: str) -> bool:
    """Whether pixel data in this syntax can be decoded with the plugins installed."""
    if transfer_syntax_uid in NATIVE:
        return True
    try:
        return bool(get_decoder(UID(transfer_syntax_uid)).is_available)
    except NotImplementedError:
        return False


def can_encode(transfer_syntax_uid: str) -> bool:
    """Whether pixel data can be written in this syntax (losslessly, but for JPEG
    Baseline)."""
    if transfer_syntax_uid in NATIVE:
        return True
    if transfer_syntax_uid == JPEGBaseline8Bit:
        return bool(features.check_codec("jpg"))
    if transfer_syntax_uid in LOSSY_ONLY:
        return False
    uid = UID(_ENCODE_AS.get(transfer_syntax_uid, transfer_syntax_uid))
    try:
        return bool(get_encoder(uid).is_available)
    except NotImplementedError:
        return False


def _has_pixels(ds: Dataset) -> bool:
    return _PIXEL_DATA in ds or any(t in ds for t in _OTHER_PIXEL_DATA)


def _decoded_photometric(ds: Dataset, source: str) -> str:
    """Photometric Interpretation of the pixels once decoded (YCbCr comes out as RGB)."""
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if source not in NATIVE and pi.startswith("YBR"):
        return "RGB"
    return pi


def impossible(header: Dataset, source: str, target: str) -> str | None:
    """Why ``source`` data cannot be converted to ``target``; None when it can.

    ``header`` is the data set, its pixel data may be deferred (never read here).
    """
    if source == target:
        return None
    if not can_encode(target):
        return f"no encoder for {_name(target)} is installed"
    if not _has_pixels(header):
        return None  # every syntax encodes a data set without pixel data alike
    if source not in NATIVE and not can_decode(source):
        return f"no decoder for the stored {_name(source)} is installed"
    if target in NATIVE:
        return None
    if _PIXEL_DATA not in header:
        return f"float pixel data cannot be encoded as {_name(target)}"
    profile = ENCODING_PROFILES.get(UID(_ENCODE_AS.get(target, target)), [])
    try:
        pi = _decoded_photometric(header, source)
        spp = int(header.get("SamplesPerPixel", 1) or 1)
        rep = int(header.get("PixelRepresentation", 0) or 0)
        allocated = int(header.BitsAllocated)
        stored = int(header.get("BitsStored", allocated) or allocated)
    except (AttributeError, TypeError, ValueError):
        return "the instance has no usable image pixel description"
    if target == JPEGBaseline8Bit:
        if allocated != 8 or stored != 8 or rep != 0:
            return (f"{_name(target)} holds 8-bit unsigned pixels only; this instance has "
                    f"{stored} bits stored, pixel representation {rep}")
        if pi not in _BASELINE_PHOTOMETRIC or spp != (3 if pi == "RGB" else 1):
            return f"{_name(target)} cannot hold {pi} pixels with {spp} sample(s)"
        return None
    for p_pi, p_spp, p_rep, p_allocated, p_stored in profile:
        if (pi == p_pi and spp == p_spp and rep in p_rep and allocated in p_allocated
                and stored in p_stored):
            return None
    return (f"{_name(target)} cannot hold {pi} pixels with {spp} sample(s), "
            f"{allocated} bits allocated, {stored} stored, pixel representation {rep}")


def _swap_words(ds: Dataset) -> None:
    """Swap the byte order of OW/OF/OL/OD/OV values in place (little <-> big endian).

    pydicom decodes numbers and strings in either order, but keeps these as
    raw bytes; writing them in the other order needs them turned around.
    """
    for elem in ds.iterall():
        size = _WORD_SIZE.get(str(elem.VR))
        if size is None or not isinstance(elem.value, bytes | bytearray) or not elem.value:
            continue
        raw = bytes(elem.value)
        usable = len(raw) - len(raw) % size
        swapped = np.frombuffer(raw[:usable], dtype=f"u{size}").byteswap().tobytes()
        elem.value = swapped + raw[usable:]


def transcode_instance(src: BinaryIO, target: str) -> bytes:
    """The Part-10 instance read from ``src``, re-encoded in ``target``.

    Holds the instance (decoded) in memory: call it for one instance at a time.
    Raises ``TranscodeError`` when it cannot be done or the pixel data does not
    decode.
    """
    ds = pydicom.dcmread(src)
    source = str(ds.file_meta.TransferSyntaxUID)
    reason = impossible(ds, source, target)
    if reason:
        raise TranscodeError(reason)
    if source != target:
        try:
            _convert(ds, source, target)
        except TranscodeError:
            raise
        except Exception as exc:  # codec plugins raise anything
            raise TranscodeError(f"conversion from {_name(source)} to {_name(target)} "
                                 f"failed: {_one_line(exc)}") from exc
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID"))
    sop_uid = str(ds.get("SOPInstanceUID", "") or ds.file_meta.get("MediaStorageSOPInstanceUID"))
    buf = io.BytesIO()
    # dcmwrite (not save_as) writes the data set in the byte order of its File Meta
    # syntax, whatever order it was read in; OW values were swapped above.
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    raw = buf.getbuffer()
    offset = read_header(io.BytesIO(bytes(raw[:64 * 1024]))).dataset_offset
    # VNA's own File Meta, as on every blob it stores.
    return file_meta_bytes(target, sop_class, sop_uid) + bytes(raw[offset:])


def _convert(ds: Dataset, source: str, target: str) -> None:
    pixels = _PIXEL_DATA in ds
    if pixels and source not in NATIVE:
        ds.decompress(as_rgb=True, generate_instance_uid=False)
        if source in LOSSY_ONLY:
            ds.LossyImageCompression = "01"
    elif source == ExplicitVRBigEndian:
        _swap_words(ds)
    # ds is now native little endian.
    if pixels and target == JPEGBaseline8Bit:
        _to_jpeg_baseline(ds)
    elif pixels and target not in NATIVE:
        encode_as = _ENCODE_AS.get(target, target)
        ds.compress(encode_as, generate_instance_uid=False,
                    **_ENCODE_OPTIONS.get(target, {}))
    elif target == ExplicitVRBigEndian:
        _swap_words(ds)
    ds.file_meta.TransferSyntaxUID = UID(target)


def transcode_frame(src: BinaryIO, header: Dataset, source: str, index: int,
                    target: str) -> bytes:
    """Frame ``index`` (0-based) of the instance in ``src``, encoded in ``target``.

    For a native ``target`` the frame is its uncompressed pixel bytes in that
    byte order (colour pixel-interleaved, YCbCr of lossy JPEG decoded to RGB);
    otherwise it is one codestream. Only that frame is decoded.
    """
    reason = impossible(header, source, target)
    if reason:
        raise TranscodeError(reason)
    try:
        # Native pixels keep their colour space; compressed ones come out as RGB.
        arr = pixel_array(src, index=index, as_rgb=source not in NATIVE)
        allocated = int(header.BitsAllocated)
        if target in NATIVE:
            return _native_bytes(arr, allocated, big_endian=target == ExplicitVRBigEndian)
        if target == JPEGBaseline8Bit:
            return _jpeg_baseline(arr)
        encode_as = UID(_ENCODE_AS.get(target, target))
        return bytes(get_encoder(encode_as).encode(
            arr, rows=int(header.Rows), columns=int(header.Columns), number_of_frames=1,
            samples_per_pixel=int(header.get("SamplesPerPixel", 1) or 1),
            bits_allocated=allocated,
            bits_stored=int(header.get("BitsStored", allocated) or allocated),
            pixel_representation=int(header.get("PixelRepresentation", 0) or 0),
            photometric_interpretation=_decoded_photometric(header, source),
            planar_configuration=0, **_ENCODE_OPTIONS.get(target, {})))
    except TranscodeError:
        raise
    except Exception as exc:  # codec plugins raise anything
        raise TranscodeError(f"frame {index + 1} could not be converted from "
                             f"{_name(source)} to {_name(target)}: {_one_line(exc)}") from exc


def _jpeg_baseline(frame: np.ndarray[Any, Any]) -> bytes:
    """One 8-bit frame (rows x columns, or x 3 for RGB) as a JPEG Baseline codestream."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8)).save(
        buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def _to_jpeg_baseline(ds: Dataset) -> None:
    """Native 8-bit pixel data of ``ds`` made JPEG Baseline, and marked lossy."""
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)  # samples come last in pixel_array
    codestreams = [_jpeg_baseline(frame) for frame in (arr if frames > 1 else [arr])]
    before = len(ds.PixelData)
    ds.PixelData = encapsulate(codestreams)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.PhotometricInterpretation = _BASELINE_PHOTOMETRIC[str(ds.PhotometricInterpretation)]
    if spp == 3:
        ds.PlanarConfiguration = 0
    ds.LossyImageCompression = "01"
    ratio = before / max(1, sum(len(c) for c in codestreams))
    ds.LossyImageCompressionRatio = [*_values(ds, "LossyImageCompressionRatio"),
                                     f"{ratio:.2f}"]
    ds.LossyImageCompressionMethod = [*_values(ds, "LossyImageCompressionMethod"),
                                      "ISO_10918_1"]


def _values(ds: Dataset, keyword: str) -> list[Any]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]


def _native_bytes(arr: np.ndarray[Any, Any], bits_allocated: int, *, big_endian: bool) -> bytes:
    if bits_allocated == 1:
        return pack_bits(arr, pad=False)
    dtype = arr.dtype.newbyteorder(">" if big_endian else "<")
    return bytes(np.ascontiguousarray(arr, dtype=dtype).tobytes())

