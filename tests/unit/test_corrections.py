"""Correction overlays on DICOM JSON and on Part-10 copies (vna.dicom.corrections)."""

from __future__ import annotations

import json
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.uid import RLELossless

from vna.dicom.corrections import (
    CorrectionError,
    apply_to_json,
    check_changes,
    corrected_part10,
    json_text,
)
from vna.dicom.header import dataset_to_json
from vna.testing.synthetic import ct_instance


def _part10(**kwargs: object) -> bytes:
    ds = ct_instance(**kwargs)  # type: ignore[arg-type]
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_overlay_on_json_sets_values_in_tag_order_and_leaves_the_rest() -> None:
    doc = dataset_to_json(ct_instance(patient_id="OLD", patient_name="WRONG^NAME"), "/x")
    fixed = apply_to_json(doc, {"PatientID": "NEW", "PatientName": "RIGHT^ANNA",
                                "IssuerOfPatientID": "HOSP"})
    assert json_text(fixed, "PatientID") == "NEW"
    assert fixed["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "RIGHT^ANNA"}]}
    assert fixed["00100021"] == {"vr": "LO", "Value": ["HOSP"]}
    assert list(fixed) == sorted(fixed)
    assert {k: v for k, v in fixed.items() if k not in ("00100010", "00100020", "00100021")
            } == {k: v for k, v in doc.items() if k not in ("00100010", "00100020")}
    assert json_text(doc, "PatientID") == "OLD"  # the stored document is not modified
    assert apply_to_json(doc, {}) is doc
    assert apply_to_json(doc, {"AccessionNumber": ""})["00080050"] == {"vr": "SH"}


@pytest.mark.parametrize("changes", [{}, {"StudyInstanceUID": "1.2"}, {"SOPClassUID": "1.2"},
                                     {"NotAKeyword": "x"}, {"PixelData": "x"},
                                     {"ReferencedImageSequence": "x"}])
def test_changes_that_cannot_be_applied_are_refused(changes: dict[str, str]) -> None:
    with pytest.raises(CorrectionError):
        check_changes(changes)


def test_corrected_copy_changes_only_the_overlay() -> None:
    data = _part10(patient_id="OLD", pixel_seed=3)
    copy = dcmread(BytesIO(corrected_part10(data, {"PatientID": "NEW",
                                                   "AccessionNumber": "A9"})))
    original = dcmread(BytesIO(data))
    assert (copy.PatientID, copy.AccessionNumber) == ("NEW", "A9")
    assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert copy.PixelData == original.PixelData
    for keyword in ("PatientID", "AccessionNumber"):
        delattr(copy, keyword)
        delattr(original, keyword)
    assert copy == original


def test_corrected_copy_keeps_compressed_pixel_data_as_received() -> None:
    ds = ct_instance(pixel_seed=1)
    ds.compress(RLELossless)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    copy = dcmread(BytesIO(corrected_part10(out.getvalue(), {"PatientID": "NEW"})))
    assert copy.file_meta.TransferSyntaxUID == RLELossless
    assert copy.PixelData == dcmread(BytesIO(out.getvalue())).PixelData


def test_non_ascii_corrections_switch_the_copy_to_utf8() -> None:
    copy = dcmread(BytesIO(corrected_part10(_part10(), {"PatientName": "MÜLLER^JÖRG"})))
    assert copy.SpecificCharacterSet == "ISO_IR 192"
    assert str(copy.PatientName) == "MÜLLER^JÖRG"
    assert json.loads(json.dumps(dataset_to_json(copy, "/x")))["00100010"]["Value"] == [
        {"Alphabetic": "MÜLLER^JÖRG"}]
