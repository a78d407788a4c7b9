"""Instances whose pixel data is really compressed (decodable), for transcoding tests.

tests/e2e/test_transfer_syntaxes.py stores opaque fragments (the archive never
decodes on store); transcoding needs codestreams that decode, so these are
encoded with pydicom's encoders (RLE, JPEG-LS, JPEG 2000) and, for JPEG
Baseline, with Pillow.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from vna.testing.synthetic import ct_instance

LOSSLESS = [RLELossless, JPEGLSLossless, JPEG2000Lossless]


def ct_pixels(rows: int, columns: int, frames: int = 1, seed: int = 7) -> np.ndarray[Any, Any]:
    """12-bit CT-like values (within Bits Stored, as a lossless codec requires)."""
    rng = np.random.default_rng(seed)
    shape = (frames, rows, columns) if frames > 1 else (rows, columns)
    base = np.linspace(0, 3000, rows * columns).reshape(rows, columns)
    return (base + rng.integers(0, 1000, size=shape)).astype(np.uint16)


def native_ct(rows: int = 32, columns: int = 32, frames: int = 1, **kw: Any) -> Dataset:
    """An Explicit VR Little Endian CT image with 12-bit pixels."""
    ds = ct_instance(rows=rows, columns=columns, transfer_syntax=ExplicitVRLittleEndian, **kw)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = ct_pixels(rows, columns, frames).tobytes()
    return ds


def compressed_ct(transfer_syntax: str, rows: int = 32, columns: int = 32, frames: int = 1,
                  **kw: Any) -> Dataset:
    """A CT image compressed losslessly in ``transfer_syntax`` (RLE, JPEG-LS, JPEG 2000)."""
    ds = native_ct(rows, columns, frames, **kw)
    if transfer_syntax == JPEG2000:
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = UID(JPEG2000)
    else:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    return ds


def jpeg_baseline(rows: int = 32, columns: int = 32, **kw: Any) -> Dataset:
    """An 8-bit MONOCHROME2 image in JPEG Baseline (lossy), encoded by Pillow."""
    ds = ct_instance(rows=rows, columns=columns, transfer_syntax=JPEGBaseline8Bit, **kw)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.LossyImageCompression = "01"
    for keyword in ("RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    gradient = np.linspace(0, 255, rows * columns).reshape(rows, columns).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gradient, mode="L").save(buf, format="JPEG", quality=90)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    return ds


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def jpeg_baseline_colour(rows: int = 32, columns: int = 48, **kw: Any) -> Dataset:
    """A colour image in JPEG Baseline as cameras and ultrasound send it (YBR_FULL_422)."""
    ds = jpeg_baseline(rows=rows, columns=columns, **kw)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = \
        3, "YBR_FULL_422", 0
    y, x = np.mgrid[0:rows, 0:columns]
    rgb = np.stack([x * 255 // columns, y * 255 // rows, (x + y) % 256], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(buf, format="JPEG", quality=90)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    return ds


def native_8bit(rows: int = 32, columns: int = 48, *, colour: bool = False,
                **kw: Any) -> Dataset:
    """An 8-bit image in Explicit VR Little Endian, smooth gradients (as a secondary
    capture or an ultrasound frame): MONOCHROME2, or RGB with ``colour``."""
    ds = ct_instance(rows=rows, columns=columns, transfer_syntax=ExplicitVRLittleEndian, **kw)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for keyword in ("RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    y, x = np.mgrid[0:rows, 0:columns]
    if colour:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = \
            3, "RGB", 0
        pixels = np.stack([x * 255 // columns, y * 255 // rows, (x + y) * 127 //
                           (rows + columns)], axis=-1)
    else:
        pixels = (x + y) * 255 // (rows + columns)
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    return ds
