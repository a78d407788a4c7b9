"""Synthetic DICOM instances for tests and benchmarks (no real patient data)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_instance(
    *,
    patient_id: str = "PAT001",
    patient_name: str = "DOE^JANE",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    instance_number: int = 1,
    rows: int = 64,
    columns: int = 64,
    study_date: str = "20240102",
    study_time: str = "101500",
    accession: str = "ACC001",
    modality: str = "CT",
    series_number: int = 1,
    pixel_seed: int | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    attributes: Mapping[str, object] | None = None,
) -> Dataset:
    """A small, valid CT image instance; pixel data is random unless ``pixel_seed`` is set.

    ``attributes`` sets or overrides attributes by keyword
    (``{"Manufacturer": "SIEMENS", "ConvolutionKernel": "B30f"}``).
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid or generate_uid())
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.SOPClassUID = UID(CTImageStorage)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDescription = "CT CHEST"
    ds.ReferringPhysicianName = "WHO^DR"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "AXIAL"
    ds.InstanceNumber = instance_number
    ds.Manufacturer = "VNA-SYNTHETIC"
    ds.SliceThickness = "1.0"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    n = rows * columns * 2
    if pixel_seed is None:
        ds.PixelData = os.urandom(n)
    else:
        ds.PixelData = (bytes(range(256)) * (n // 256 + 1))[:n]
    for keyword, value in (attributes or {}).items():
        setattr(ds, keyword, value)
    return ds


def write_ct_series(
    directory: Path, count: int, *, rows: int = 64, columns: int = 64, **kwargs: object
) -> list[Path]:
    """Write ``count`` instances of one series to ``directory``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = str(kwargs.pop("study_uid", None) or generate_uid())
    series_uid = str(kwargs.pop("series_uid", None) or generate_uid())
    paths = []
    for i in range(count):
        ds = ct_instance(study_uid=study_uid, series_uid=series_uid, instance_number=i + 1,
                         rows=rows, columns=columns, **kwargs)  # type: ignore[arg-type]
        path = directory / f"CT{i + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def iter_files(directory: Path) -> Iterator[Path]:
    yield from sorted(p for p in directory.rglob("*.dcm") if p.is_file())
