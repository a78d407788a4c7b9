"""The header's fast DICOM JSON gives what pydicom's own conversion gives, with the
empty values of PS3.18 F.2.5 (``conform``), and keeps what pydicom cannot convert."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from vna.dicom.header import BULK_THRESHOLD, dataset_to_json, extract_record, read_dataset
from vna.dicom.json_model import conform, dataset_from_json
from vna.testing.synthetic import ct_instance

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def pydicom_json(ds: Dataset, base_uri: str, failed: set[str] | None = None
                 ) -> dict[str, Any]:
    """The reference: every element through pydicom's value conversion and to_json_dict,
    empty values made F.2.5's; the elements pydicom cannot convert go to ``failed``.
    Sequence items likewise, item by item, their bulk data by URIs of their own."""
    return _reference(ds, f"{base_uri}/bulkdata", failed)


def _reference(ds: Dataset, bulk: str, failed: set[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in sorted(ds._dict.keys()):
        raw = ds._dict[tag]
        tag_hex = f"{tag:08X}"
        if tag.group == 0x0002 or tag.element == 0x0000:
            continue
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            vr = raw.VR or dictionary_VR(tag)
            vr = "OW" if vr in ("OB or OW", "US or OW", "US or SS or OW") else vr
            if vr != "SQ":  # a sequence is never bulk data, however long
                out[tag_hex] = {"vr": vr, "BulkDataURI": f"{bulk}/{tag_hex}"}
                continue
        try:
            elem = ds[tag]
        except Exception:  # noqa: BLE001
            continue
        if elem.VR == "SQ":
            items = [_reference(item, f"{bulk}/{tag_hex}/{n}", None)
                     for n, item in enumerate(elem.value, start=1)]
            out[tag_hex] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            continue
        if elem.VR in ("OB", "OD", "OF", "OL", "OV", "OW", "UN") and elem.value is not None \
                and len(elem.value) > BULK_THRESHOLD:
            out[tag_hex] = {"vr": elem.VR, "BulkDataURI": f"{bulk}/{tag_hex}"}
            continue
        try:
            out[tag_hex] = conform(elem.to_json_dict(None, BULK_THRESHOLD))
        except Exception:  # noqa: BLE001
            if failed is not None:
                failed.add(tag_hex)
            continue
    return out


def _corpus() -> list[Path]:
    """pydicom's own test files that parse as Part-10 (some are deliberately not)."""
    return [p for p in sorted(TEST_FILES.rglob("*")) if p.is_file() and _read(p) is not None]


def _read(path: Path) -> Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open(path, "rb") as fp:
                return read_dataset(fp)
    except Exception:  # noqa: BLE001 - not every test file is Part-10
        return None


def test_corpus_is_not_empty() -> None:
    assert len(_corpus()) > 50


@pytest.mark.parametrize("path", _corpus(), ids=lambda p: p.name)
def test_fast_json_equals_pydicom(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(path, "rb") as fp:
            fast = dataset_to_json(read_dataset(fp), "/x")
        failed: set[str] = set()
        with open(path, "rb") as fp:
            reference = pydicom_json(read_dataset(fp), "/x", failed)
    kept = {tag: fast[tag] for tag in reference if tag in fast}
    assert json.dumps(kept, sort_keys=True) == json.dumps(reference, sort_keys=True)
    assert set(fast) - set(reference) <= failed  # only what pydicom could not convert
    assert not any(e.get("vr") == "SQ" and "BulkDataURI" in e for e in fast.values())


def test_character_sets_and_values(tmp_path: Path) -> None:
    ds = ct_instance(study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5",
                     rows=32, columns=32)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jörg=ミュラー^ヨルグ"
    ds.StudyDescription = "Thorax  "
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = "1.25"
    ds.InstanceNumber = "7"
    ds.Manufacturer = ""
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    with open(path, "rb") as fp:
        fast = dataset_to_json(read_dataset(fp), "/x")
    with open(path, "rb") as fp:
        reference = pydicom_json(read_dataset(fp), "/x")
    assert fast == reference
    assert fast["00100010"]["Value"] == [{"Alphabetic": "Müller^Jörg",
                                          "Ideographic": "ミュラー^ヨルグ"}]
    assert fast["00080008"]["Value"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert fast["00180050"]["Value"] == [1.25]
    assert fast["00080070"] == {"vr": "LO"}
    with open(path, "rb") as fp:
        record = extract_record(read_dataset(fp), blob_key="k" * 64, size=1,
                                transfer_syntax_uid="1.2.840.10008.1.2.1")
    assert record.patient["PatientName"] == "Müller^Jörg=ミュラー^ヨルグ"
    assert record.instance["InstanceNumber"] == 7
    assert record.study["StudyDescription"] == "Thorax"
    bulk = json.loads(record.metadata_json)["7FE00010"]["BulkDataURI"]
    assert bulk == "/dicomweb/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5/bulkdata/7FE00010"


@pytest.mark.parametrize("instance_number", ["7", "123456789012345678901"],
                         ids=["orjson", "beyond-64-bits"])
def test_the_stored_json_keeps_text_as_utf_8_and_every_number(
        tmp_path: Path, instance_number: str) -> None:
    ds = ct_instance(rows=16, columns=16)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jörg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns: an IS of 21 digits is invalid
        ds.InstanceNumber = instance_number  # 21 digits: orjson refuses, json takes it
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    with open(path, "rb") as fp:
        record = extract_record(read_dataset(fp), blob_key="k" * 64, size=1,
                                transfer_syntax_uid="1.2.840.10008.1.2.1")
    assert "Müller^Jörg" in record.metadata_json  # UTF-8 either way, no \u escapes
    stored = json.loads(record.metadata_json)
    assert stored["00200013"]["Value"] == [int(instance_number)]
    assert stored["00100010"]["Value"] == [{"Alphabetic": "Müller^Jörg"}]


@pytest.mark.parametrize("charset", ["ISO_IR 100", ["", "ISO 2022 IR 87"]])
def test_empty_values_are_as_ps3_18_f_2_5_has_them(tmp_path: Path, charset: Any) -> None:
    # An empty attribute (an empty sequence too) has no "Value"; an empty value
    # among several is null, in sequence items as well. pydicom gives "" and [],
    # and drops a DS or PN with an empty value among several. Both character set
    # paths: the fast one (ISO_IR 100) and pydicom's (ISO 2022 IR 87).
    ds = ct_instance(study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5",
                     rows=8, columns=8)
    ds.SpecificCharacterSet = charset
    ds.ImageType = ["DERIVED", "", "MPR"]
    ds.ReferencedSeriesSequence = Sequence([])
    item = Dataset()
    item.ImageOrientationPatient = ["1", "", "0"]
    item.AccessionNumber = ""
    ds.ReferencedStudySequence = Sequence([item, Dataset()])
    ds.ImageOrientationPatient = ["1", "", "0"]
    ds.NameOfPhysiciansReadingStudy = ["A^B", "", "C^D"]
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    with open(path, "rb") as fp:
        ds_read = read_dataset(fp)
    doc = json.loads(json.dumps(dataset_to_json(ds_read, "/x")))
    assert doc["00080008"] == {"vr": "CS", "Value": ["DERIVED", None, "MPR"]}
    assert doc["00081115"] == {"vr": "SQ"}
    assert doc["00081110"] == {"vr": "SQ", "Value": [
        {"00080050": {"vr": "SH"},
         "00200037": {"vr": "DS", "Value": [1, None, 0]}},
        {}]}
    assert doc["00200037"] == {"vr": "DS", "Value": [1, None, 0]}
    assert doc["00081060"] == {"vr": "PN", "Value": [{"Alphabetic": "A^B"}, None,
                                                     {"Alphabetic": "C^D"}]}
    # And back (STOW-RS of DICOM JSON, C-FIND answers): nulls are empty values,
    # never the text "None".
    back = dataset_from_json(doc)
    assert list(back.ImageType) == ["DERIVED", "", "MPR"]
    assert [v if v == "" else float(v) for v in back.ImageOrientationPatient] == [1, "", 0]
    assert [v if v == "" else float(v)
            for v in back.ReferencedStudySequence[0].ImageOrientationPatient] == [1, "", 0]
    assert len(back.ReferencedSeriesSequence) == 0
    written = tmp_path / "back.dcm"
    back.file_meta = ds.file_meta
    back.save_as(written, enforce_file_format=True)
    assert b"None" not in written.read_bytes()
    assert b"1.0\\\\0.0" in written.read_bytes()
