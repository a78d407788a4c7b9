"""vna.dicom.transcode: conversions keep pixels and UIDs, refuse what cannot be done."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from tests.support.compressed import (
    compressed_ct,
    jpeg_baseline,
    jpeg_baseline_colour,
    native_8bit,
    native_ct,
    part10,
)
from vna.dicom.part10 import file_meta_bytes, read_header
from vna.dicom.transcode import (
    TranscodeError,
    impossible,
    transcode_frame,
    transcode_instance,
)

COMPRESSED = [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEG2000]
NATIVE_TARGETS = [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                  DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]


def _decoded(raw: bytes) -> np.ndarray:  # type: ignore[type-arg]
    return pydicom.dcmread(io.BytesIO(raw)).pixel_array


@pytest.mark.parametrize("source", COMPRESSED)
@pytest.mark.parametrize("target", NATIVE_TARGETS)
def test_compressed_to_native_keeps_pixels_and_uids(source: str, target: str) -> None:
    original = compressed_ct(source, frames=2)
    raw = part10(original)
    out = transcode_instance(io.BytesIO(raw), target)
    ds = pydicom.dcmread(io.BytesIO(out))
    assert ds.file_meta.TransferSyntaxUID == target
    assert read_header(io.BytesIO(out)).transfer_syntax_uid == target
    assert out.startswith(file_meta_bytes(target, ds.SOPClassUID, ds.SOPInstanceUID))
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    assert ds.PatientID == original.PatientID
    assert np.array_equal(ds.pixel_array, _decoded(raw))


@pytest.mark.parametrize("target", [*COMPRESSED, JPEGLSNearLossless])
def test_native_to_compressed_is_lossless(target: str) -> None:
    original = native_ct(frames=3)
    out = transcode_instance(io.BytesIO(part10(original)), target)
    ds = pydicom.dcmread(io.BytesIO(out))
    assert ds.file_meta.TransferSyntaxUID == target
    assert ds["PixelData"].is_undefined_length
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    assert ds.SOPInstanceUID == original.SOPInstanceUID


def test_big_endian_round_trip_swaps_words() -> None:
    original = native_ct()
    be = transcode_instance(io.BytesIO(part10(original)), ExplicitVRBigEndian)
    assert np.array_equal(_decoded(be), original.pixel_array)
    back = transcode_instance(io.BytesIO(be), ExplicitVRLittleEndian)
    assert pydicom.dcmread(io.BytesIO(back)).PixelData == original.PixelData


def test_lossy_source_decodes_and_stays_marked_lossy() -> None:
    original = jpeg_baseline()
    raw = part10(original)
    out = transcode_instance(io.BytesIO(raw), ExplicitVRLittleEndian)
    ds = pydicom.dcmread(io.BytesIO(out))
    assert ds.LossyImageCompression == "01"
    assert np.array_equal(ds.pixel_array, _decoded(raw))


def test_source_is_never_modified() -> None:
    raw = part10(compressed_ct(RLELossless))
    before = bytes(raw)
    transcode_instance(io.BytesIO(raw), ExplicitVRLittleEndian)
    assert raw == before


def test_impossible_conversions_say_why() -> None:
    ct = native_ct()
    assert impossible(ct, ExplicitVRLittleEndian, ExplicitVRLittleEndian) is None
    assert "8-bit unsigned pixels only" in (
        impossible(ct, ExplicitVRLittleEndian, JPEGBaseline8Bit) or "")
    assert "no encoder" in (impossible(ct, ExplicitVRLittleEndian, JPEGExtended12Bit) or "")
    assert "no encoder" in (impossible(ct, ExplicitVRLittleEndian, HTJ2KLossless) or "")
    assert "no encoder" in (impossible(ct, ExplicitVRLittleEndian, "1.2.840.10008.1.2.4.102")
                            or "")
    assert "no decoder" in (impossible(ct, "1.2.840.10008.1.2.4.102", ExplicitVRLittleEndian)
                            or "")
    wide = native_ct()
    wide.BitsAllocated, wide.BitsStored, wide.HighBit = 32, 32, 31
    assert "cannot hold" in (impossible(wide, ExplicitVRLittleEndian, JPEGLSLossless) or "")
    with pytest.raises(TranscodeError, match="8-bit unsigned pixels only"):
        transcode_instance(io.BytesIO(part10(ct)), JPEGBaseline8Bit)


def test_corrupt_pixel_data_is_a_transcode_error() -> None:
    ds = compressed_ct(JPEGLSLossless)
    ds.PixelData = encapsulate([b"\xff\xd8not a codestream\xff\xd9"])
    with pytest.raises(TranscodeError, match="failed"):
        transcode_instance(io.BytesIO(part10(ds)), ExplicitVRLittleEndian)


@pytest.mark.parametrize("source", COMPRESSED)
def test_one_frame_decoded_and_reencoded(source: str) -> None:
    original = native_ct(frames=3)
    raw = part10(compressed_ct(source, frames=3, sop_uid=original.SOPInstanceUID))
    header = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
    expected = original.pixel_array[1]
    frame = transcode_frame(io.BytesIO(raw), header, source, 1, ExplicitVRLittleEndian)
    assert frame == expected.astype("<u2").tobytes()
    jls = transcode_frame(io.BytesIO(raw), header, source, 1, JPEGLSLossless)
    single = native_ct()
    single.PixelData = encapsulate([jls])
    single["PixelData"].VR = "OB"
    single.file_meta.TransferSyntaxUID = JPEGLSLossless
    assert np.array_equal(single.pixel_array, expected)


def test_big_endian_frame_comes_out_little_endian() -> None:
    original = native_ct(frames=2)
    be = transcode_instance(io.BytesIO(part10(original)), ExplicitVRBigEndian)
    header = pydicom.dcmread(io.BytesIO(be), stop_before_pixels=True)
    frame = transcode_frame(io.BytesIO(be), header, ExplicitVRBigEndian, 1,
                            ExplicitVRLittleEndian)
    assert frame == original.pixel_array[1].astype("<u2").tobytes()


def test_colour_jpeg_decodes_to_rgb_and_says_so() -> None:
    original = jpeg_baseline_colour()
    raw = part10(original)
    expected = _decoded(raw)  # pydicom converts YCbCr to RGB
    out = pydicom.dcmread(io.BytesIO(transcode_instance(io.BytesIO(raw),
                                                        ExplicitVRLittleEndian)))
    assert out.PhotometricInterpretation == "RGB"
    assert out.SamplesPerPixel == 3 and out.PlanarConfiguration == 0
    assert np.array_equal(out.pixel_array, expected)
    header = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
    frame = transcode_frame(io.BytesIO(raw), header, JPEGBaseline8Bit, 0,
                            ExplicitVRLittleEndian)
    assert frame == expected.tobytes()  # pixel-interleaved RGB
    # Re-encoded losslessly from the decoded RGB: the same pixels come back.
    j2k = transcode_instance(io.BytesIO(raw), JPEG2000Lossless)
    assert np.array_equal(_decoded(j2k), expected)
    assert pydicom.dcmread(io.BytesIO(j2k)).LossyImageCompression == "01"


def test_jpeg_baseline_from_8_bit_frames_is_marked_lossy_with_method_and_ratio() -> None:
    sent = native_8bit(colour=True)
    sent.NumberOfFrames = 2
    sent.PixelData = sent.PixelData * 2
    made = pydicom.dcmread(io.BytesIO(transcode_instance(io.BytesIO(part10(sent)),
                                                         JPEGBaseline8Bit)))
    assert made.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert made.PhotometricInterpretation == "YBR_FULL"
    assert made.LossyImageCompression == "01"
    assert made.LossyImageCompressionMethod == "ISO_10918_1"
    assert len(list(generate_frames(made.PixelData, number_of_frames=2))) == 2
    error = np.abs(made.pixel_array.astype(int) - sent.pixel_array.astype(int))
    assert error.max() <= 8
    # Made from data that was lossy compressed before: both steps are on record.
    earlier = native_8bit()
    earlier.LossyImageCompression = "01"
    earlier.LossyImageCompressionMethod = "ISO_14495_1"
    earlier.LossyImageCompressionRatio = "2.5"
    again = pydicom.dcmread(io.BytesIO(transcode_instance(io.BytesIO(part10(earlier)),
                                                          JPEGBaseline8Bit)))
    assert list(again.LossyImageCompressionMethod) == ["ISO_14495_1", "ISO_10918_1"]
    assert len(again.LossyImageCompressionRatio) == 2
    assert float(again.LossyImageCompressionRatio[0]) == 2.5
