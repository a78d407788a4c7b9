"""The one store path: durability order, idempotence, conflicts, bad input."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.unit.conftest import Core
from vna.dicom.matching import Level, build_query
from vna.dicom.part10 import read_header
from vna.ports import ClaimOutcome
from vna.testing.synthetic import ct_instance
from vna.usecases.reindex import reindex
from vna.usecases.search import search
from vna.usecases.store import Received, StoreError, StoreFailure, store_instance


def _file(tmp: Path, ds: pydicom.Dataset, name: str | None = None) -> Path:
    path = tmp / (name or f"{ds.SOPInstanceUID}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


def _store(core: Core, path: Path) -> ClaimOutcome:
    return store_instance(Received(path=path), blobs=core.blobs, index=core.index,
                          staging_dir=core.staging).outcome


def _dataset_bytes(path_or_bytes: Path | bytes) -> bytes:
    raw = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    import io

    header = read_header(io.BytesIO(raw))
    return raw[header.dataset_offset:]


def test_store_then_index_keeps_the_data_set_bytes(core: Core, tmp_path: Path) -> None:
    path = _file(tmp_path, ct_instance())
    result = store_instance(Received(path=path), blobs=core.blobs, index=core.index,
                            staging_dir=core.staging)
    assert result.outcome is ClaimOutcome.NEW
    stored = core.blobs.read_range(result.blob_key, 0)
    assert _dataset_bytes(stored) == _dataset_bytes(path)
    import hashlib

    assert hashlib.sha256(stored).hexdigest() == result.blob_key
    assert core.index.counts()["instances"] == 0  # not yet: indexing is asynchronous
    assert core.index.outbox_depth() == 1
    core.drain()
    assert core.index.counts()["instances"] == 1
    assert list(core.staging.iterdir()) == []


def test_sending_the_same_instances_again_adds_nothing(core: Core, tmp_path: Path) -> None:
    study = generate_uid()
    paths = [_file(tmp_path, ct_instance(study_uid=study, instance_number=i)) for i in range(20)]
    assert all(_store(core, p) is ClaimOutcome.NEW for p in paths)
    core.drain()
    before = core.index.counts()
    blobs_before = sorted(core.blobs.keys())
    assert all(_store(core, p) is ClaimOutcome.DUPLICATE for p in paths)
    core.drain()
    assert core.index.counts() == before
    assert sorted(core.blobs.keys()) == blobs_before
    assert before["instances"] == 20


def test_redelivered_event_adds_nothing(core: Core, tmp_path: Path) -> None:
    from vna.events import decode_event
    from vna.usecases.index import index_instance

    _store(core, _file(tmp_path, ct_instance()))
    captured: list[bytes] = []
    core.index.relay_outbox(lambda msgs: captured.extend(p for _, p in msgs))
    event = decode_event(captured[0])
    assert index_instance(event, blobs=core.blobs, index=core.index) is True
    assert index_instance(event, blobs=core.blobs, index=core.index) is False
    assert core.index.counts()["instances"] == 1


def test_same_sop_instance_with_other_bytes_is_refused(core: Core, tmp_path: Path) -> None:
    original = ct_instance()
    _store(core, _file(tmp_path, original, "a.dcm"))
    changed = ct_instance(sop_uid=original.SOPInstanceUID, study_uid=original.StudyInstanceUID,
                          series_uid=original.SeriesInstanceUID)
    with pytest.raises(StoreError) as err:
        _store(core, _file(tmp_path, changed, "b.dcm"))
    assert err.value.failure is StoreFailure.SOP_CONFLICT
    assert "different content" in err.value.reason
    claim = core.index.find_claim(original.SOPInstanceUID)
    assert claim is not None
    assert _dataset_bytes(core.blobs.read_range(claim.blob_key, 0)) == _dataset_bytes(
        tmp_path / "a.dcm")
    assert len(list(core.blobs.keys())) == 1


def test_study_under_another_patient_is_refused(core: Core, tmp_path: Path) -> None:
    first = ct_instance(patient_id="P1")
    _store(core, _file(tmp_path, first))
    intruder = ct_instance(patient_id="P2", study_uid=first.StudyInstanceUID)
    with pytest.raises(StoreError) as err:
        _store(core, _file(tmp_path, intruder))
    assert err.value.failure is StoreFailure.PATIENT_CONFLICT
    assert "another Patient ID" in err.value.reason
    assert core.index.find_claim(intruder.SOPInstanceUID) is None
    assert len(list(core.blobs.keys())) == 1


def test_series_under_another_study_is_refused(core: Core, tmp_path: Path) -> None:
    first = ct_instance(patient_id="P1")
    _store(core, _file(tmp_path, first))
    # Another patient's study claiming the first one's series: indexed by series it
    # would have joined the first patient's study.
    stray = ct_instance(patient_id="P2", series_uid=first.SeriesInstanceUID)
    with pytest.raises(StoreError) as err:
        _store(core, _file(tmp_path, stray))
    assert err.value.failure is StoreFailure.SERIES_CONFLICT
    assert "another study" in err.value.reason
    assert core.index.find_claim(stray.SOPInstanceUID) is None
    assert len(list(core.blobs.keys())) == 1
    core.drain()
    assert [i.ref.sop_instance_uid for i in core.index.instances(
        series_instance_uid=first.SeriesInstanceUID)] == [first.SOPInstanceUID]


@pytest.mark.parametrize("bad_uid", ["../x", "1." + "2" * 64, "1.2.abc", "1.02.3", ""])
def test_invalid_uids_are_refused_and_nothing_is_written(
    core: Core, tmp_path: Path, bad_uid: str
) -> None:
    ds = ct_instance()
    ds.StudyInstanceUID = bad_uid
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(StoreError) as err:
        _store(core, path)
    assert err.value.failure is StoreFailure.INVALID
    assert list(core.blobs.keys()) == []
    assert core.index.counts()["claims"] == 0
    assert list(core.staging.iterdir()) == []


@pytest.mark.parametrize("keyword", ["PatientID", "IssuerOfPatientID"])
def test_a_patient_identifier_longer_than_its_lo_is_refused(
        core: Core, tmp_path: Path, keyword: str) -> None:
    # The claim binds a study to its patient by these (64 characters, as an LO):
    # refused with a reason, not an index that cannot hold it ("retry" for ever).
    ds = ct_instance()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the overlong LO
        setattr(ds, keyword, "P" * 65)
    with pytest.raises(StoreError) as err:
        _store(core, _file(tmp_path, ds))
    assert err.value.failure is StoreFailure.INVALID
    assert keyword in err.value.reason
    assert core.index.counts()["claims"] == 0
    assert list(core.blobs.keys()) == []


def test_truncated_and_garbage_data_sets_are_refused(core: Core, tmp_path: Path) -> None:
    good = _file(tmp_path, ct_instance(rows=128, columns=128))
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-5000])
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 300)
    for path in (truncated, garbage):
        with pytest.raises(StoreError) as err:
            _store(core, path)
        assert err.value.failure is StoreFailure.UNREADABLE
    not_dicom = tmp_path / "hello.txt"
    not_dicom.write_text("hello")
    with pytest.raises(StoreError):
        _store(core, not_dicom)
    assert list(core.blobs.keys()) == []
    assert _store(core, good) is ClaimOutcome.NEW  # and the archive keeps working


def test_an_element_header_cut_short_is_refused_as_unreadable(core: Core,
                                                               tmp_path: Path) -> None:
    # Explicit VR, a 4-byte length field (OB) of which only 2 bytes arrived: pydicom
    # fails to unpack it rather than reporting the end of the file.
    good = _file(tmp_path, ct_instance(rows=16, columns=16))
    cut = tmp_path / "cut-header.dcm"
    cut.write_bytes(good.read_bytes() + b"\xe1\x7f\x10\x00OB\x00\x00\x01\x00")
    with pytest.raises(StoreError) as err:
        _store(core, cut)
    assert err.value.failure is StoreFailure.UNREADABLE
    assert "cannot be parsed" in err.value.reason
    assert list(core.blobs.keys()) == []
    assert _store(core, good) is ClaimOutcome.NEW


def test_unreachable_blob_store_answers_retry_and_records_nothing(
    core: Core, tmp_path: Path
) -> None:
    core.blobs.available = False  # type: ignore[union-attr]
    with pytest.raises(StoreError) as err:
        _store(core, _file(tmp_path, ct_instance()))
    assert err.value.failure is StoreFailure.UNAVAILABLE
    assert core.index.counts()["claims"] == 0
    assert core.index.outbox_depth() == 0


def test_mismatch_between_command_and_data_set(core: Core, tmp_path: Path) -> None:
    path = _file(tmp_path, ct_instance())
    with pytest.raises(StoreError) as err:
        store_instance(Received(path=path, sop_instance_uid=generate_uid()), blobs=core.blobs,
                       index=core.index, staging_dir=core.staging)
    assert err.value.failure is StoreFailure.MISMATCH


def test_reindex_from_blobs_alone_gives_the_same_answers(fs_core: Core, tmp_path: Path) -> None:
    study = generate_uid()
    for i in range(6):
        _store(fs_core, _file(tmp_path, ct_instance(study_uid=study, instance_number=i,
                                                   series_number=1 + i % 2)))
    fs_core.drain()
    query = build_query(Level.STUDY, {"PatientID": "PAT001"},
                        return_keys=["NumberOfStudyRelatedInstances", "ModalitiesInStudy",
                                     "StudyDate", "PatientName"])
    before = search(query, index=fs_core.index)
    from vna.adapters.index.sqlalchemy import SqlIndex

    fresh = SqlIndex.from_url(f"sqlite:///{tmp_path / 'rebuilt.sqlite'}")
    report = reindex(blobs=fs_core.blobs, index=fresh)
    assert (report.blobs, report.indexed, report.failed) == (6, 6, 0)
    assert search(query, index=fresh) == before
    assert before[0]["00201208"]["Value"] == [6]
    fresh.close()


def test_refusals_leave_a_tamper_evident_audit_record(core: Core, tmp_path: Path) -> None:
    first = ct_instance(patient_id="P1")
    _store(core, _file(tmp_path, first))
    with pytest.raises(StoreError):
        _store(core, _file(tmp_path, ct_instance(patient_id="P2",
                                                 study_uid=first.StudyInstanceUID)))
    records = core.index.audit_records("store")
    assert [r["outcome"] for r in records] == ["patient-conflict"]
    assert first.StudyInstanceUID in records[0]["detail"]
    assert core.index.verify_audit()
    with core.index.engine.begin() as conn:  # someone edits the trail behind our back
        from sqlalchemy import text

        conn.execute(text("UPDATE audit SET detail = 'nothing to see'"))
    assert not core.index.verify_audit()


def test_truncated_encapsulated_pixel_data_is_refused(core: Core, tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds = ct_instance(rows=32, columns=32, transfer_syntax=JPEG2000Lossless)
    ds.PixelData = encapsulate([bytes(range(256)) * 7])
    ds["PixelData"].VR = "OB"
    whole = _file(tmp_path, ds, "whole.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole.read_bytes()[:-900])
    with pytest.raises(StoreError) as err:
        _store(core, cut)
    assert err.value.failure is StoreFailure.UNREADABLE
    assert "truncated" in err.value.reason
    assert _store(core, whole) is ClaimOutcome.NEW
