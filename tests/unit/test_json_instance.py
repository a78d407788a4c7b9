"""vna.dicom.json_instance: DICOM JSON plus bulk data parts -> a Part-10 file."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import generate_frames
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
)

from tests.support.compressed import compressed_ct, native_ct
from vna.dicom.json_instance import BulkPart, JsonInstanceError, json_uids, write_instance


def _bulk(tmp_path: Path, name: str, data: bytes, ts: str | None = None) -> BulkPart:
    path = tmp_path / name
    path.write_bytes(data)
    return BulkPart(path, ts)


def test_native_pixel_data_from_a_bulk_part(tmp_path: Path) -> None:
    ds = native_ct()
    obj = ds.to_json_dict(bulk_data_threshold=256, bulk_data_element_handler=lambda _: "px")
    obj["00020010"] = {"vr": "UI", "Value": [JPEGLSLossless]}  # wrong: the pixels are native
    out = tmp_path / "out.dcm"
    syntax = write_instance(obj, {"px": _bulk(tmp_path, "px", ds.PixelData)}, out)
    assert syntax == ExplicitVRLittleEndian
    back = pydicom.dcmread(out)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.PixelData == ds.PixelData
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert json_uids(obj) == (ds.SOPClassUID, ds.SOPInstanceUID)


def test_without_pixel_data_the_json_syntax_is_kept(tmp_path: Path) -> None:
    ds = native_ct()
    del ds.PixelData
    obj = ds.to_json_dict()
    obj["00020010"] = {"vr": "UI", "Value": [ImplicitVRLittleEndian]}
    out = tmp_path / "out.dcm"
    assert write_instance(obj, {}, out) == ImplicitVRLittleEndian
    assert pydicom.dcmread(out).PatientID == ds.PatientID


def test_compressed_bulk_part_is_encapsulated(tmp_path: Path) -> None:
    ds = native_ct()
    obj = ds.to_json_dict(bulk_data_threshold=256, bulk_data_element_handler=lambda _: "px")
    out = tmp_path / "out.dcm"
    write_instance(obj, {"px": _bulk(tmp_path, "px", b"\xff\xd8codestream\xff\xd9",
                                     JPEGLSLossless)}, out)
    back = pydicom.dcmread(out)
    assert back.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert back["PixelData"].is_undefined_length


def test_an_empty_compressed_bulk_part_is_refused(tmp_path: Path) -> None:
    obj = native_ct().to_json_dict(bulk_data_threshold=256,
                                   bulk_data_element_handler=lambda _: "px")
    with pytest.raises(JsonInstanceError, match="compressed pixel data"):
        write_instance(obj, {"px": _bulk(tmp_path, "px", b"", JPEGLSLossless)},
                       tmp_path / "out.dcm")


@pytest.mark.parametrize(("obj", "message"), [
    ([], "not an object"),
    ({"zzzz0020": {"vr": "LO", "Value": ["x"]}}, "not a DICOM JSON instance"),
    ({"00100020": {"vr": "LO", "Value": ["x"]}}, "has no SOPClassUID"),
])
def test_bad_instances_say_why(tmp_path: Path, obj: object, message: str) -> None:
    with pytest.raises(JsonInstanceError, match=message):
        write_instance(obj, {}, tmp_path / "out.dcm")


def test_a_value_pydicom_cannot_encode_is_refused_without_a_traceback(tmp_path: Path) -> None:
    ds = native_ct()
    del ds.PixelData
    obj = ds.to_json_dict()
    obj["00281051"] = {"vr": "LO", "Value": [5]}  # a number where LO needs a string
    with pytest.raises(JsonInstanceError, match=r"cannot be encoded: .*\(0028,1051\)") as err:
        write_instance(obj, {}, tmp_path / "out.dcm")
    # The reason goes back to the client: pydicom's appended traceback stays here.
    assert "Traceback" not in str(err.value) and ".py" not in str(err.value)


def test_a_bulk_data_uri_without_its_part(tmp_path: Path) -> None:
    obj = native_ct().to_json_dict(bulk_data_threshold=256,
                                   bulk_data_element_handler=lambda _: "missing")
    with pytest.raises(JsonInstanceError, match="matches no part"):
        write_instance(obj, {}, tmp_path / "out.dcm")


def test_compressed_frames_in_parts_of_their_own(tmp_path: Path) -> None:
    rle = compressed_ct(RLELossless, frames=3)
    codestreams = list(generate_frames(rle.PixelData, number_of_frames=3))
    obj = rle.to_json_dict(bulk_data_threshold=256, bulk_data_element_handler=lambda _: "px")
    bulk = {f"px/frames/{n}": _bulk(tmp_path, f"f{n}", data, RLELossless)
            for n, data in enumerate(codestreams, start=1)}
    out = tmp_path / "out.dcm"
    assert write_instance(obj, bulk, out) == RLELossless
    back = pydicom.dcmread(out)
    assert list(generate_frames(back.PixelData, number_of_frames=3)) == codestreams
    assert (back.pixel_array == native_ct(frames=3).pixel_array).all()


def test_uncompressed_frames_in_parts_are_joined(tmp_path: Path) -> None:
    ds = native_ct(frames=2)
    size = len(ds.PixelData) // 2
    obj = ds.to_json_dict(bulk_data_threshold=256, bulk_data_element_handler=lambda _: "px")
    bulk = {f"px/frames/{n}": _bulk(tmp_path, f"f{n}", ds.PixelData[(n - 1) * size:n * size])
            for n in (1, 2)}
    out = tmp_path / "out.dcm"
    assert write_instance(obj, bulk, out) == ExplicitVRLittleEndian
    assert pydicom.dcmread(out).PixelData == ds.PixelData


@pytest.mark.parametrize(("frames", "syntaxes", "message"), [
    (2, [RLELossless, RLELossless], "2 frame parts for NumberOfFrames 3"),
    (3, [RLELossless, RLELossless, JPEGLSLossless], "different transfer syntaxes"),
])
def test_frame_parts_that_do_not_add_up(tmp_path: Path, frames: int, syntaxes: list[str],
                                        message: str) -> None:
    rle = compressed_ct(RLELossless, frames=3)
    obj = rle.to_json_dict(bulk_data_threshold=256, bulk_data_element_handler=lambda _: "px")
    bulk = {f"px/frames/{n}": _bulk(tmp_path, f"f{n}", b"\x00" * 8, syntaxes[n - 1])
            for n in range(1, frames + 1)}
    with pytest.raises(JsonInstanceError, match=message):
        write_instance(obj, bulk, tmp_path / "out.dcm")


def test_compressed_multi_frame_in_one_part_says_how_to_send_it(tmp_path: Path) -> None:
    rle = compressed_ct(RLELossless, frames=2)
    obj = rle.to_json_dict(bulk_data_threshold=256, bulk_data_element_handler=lambda _: "px")
    with pytest.raises(JsonInstanceError, match="each frame as its own part"):
        write_instance(obj, {"px": _bulk(tmp_path, "px", rle.PixelData, RLELossless)},
                       tmp_path / "out.dcm")
