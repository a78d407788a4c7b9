"""vna.dicom.json_instance: DICOM JSON plus bulk data parts -> a Part-10 file."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless

from tests.support.compressed import native_ct
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


@pytest.mark.parametrize(("obj", "message"), [
    ([], "not an object"),
    ({"zzzz0020": {"vr": "LO", "Value": ["x"]}}, "not a DICOM JSON instance"),
    ({"00100020": {"vr": "LO", "Value": ["x"]}}, "has no SOPClassUID"),
])
def test_bad_instances_say_why(tmp_path: Path, obj: object, message: str) -> None:
    with pytest.raises(JsonInstanceError, match=message):
        write_instance(obj, {}, tmp_path / "out.dcm")


def test_a_bulk_data_uri_without_its_part(tmp_path: Path) -> None:
    obj = native_ct().to_json_dict(bulk_data_threshold=256,
                                   bulk_data_element_handler=lambda _: "missing")
    with pytest.raises(JsonInstanceError, match="matches no part"):
        write_instance(obj, {}, tmp_path / "out.dcm")
