"""The series' Request Attribute Sequence and the study's Timezone Offset From UTC, end
to end: stored with dcmtk's storescu, found by QIDO-RS (PS3.18 Tables 10.6.1-5,
10.6.3-3 and -4) and by C-FIND with dcmtk's findscu (sequence matching, PS3.4
C.2.2.2.6)."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from services.dicomweb.app import create_app
from tests.support.archive import Archive
from vna.testing.synthetic import ct_instance

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
SERIES_UID, REQUESTS, SPS, RP, OFFSET = "0020000E", "00400275", "00400009", "00401001", "00080201"


def _need_dcmtk() -> None:
    missing = [t for t in ("storescu", "findscu") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"dcmtk tools missing ({', '.join(missing)}): apt-get install -y dcmtk")


def _write(root: Path, study: str, series: str, items: list[tuple[str, str]],
           count: int = 2) -> None:
    for i in range(count):
        sequence = []
        for sps, rp in items:
            item = Dataset()
            item.ScheduledProcedureStepID = sps
            item.RequestedProcedureID = rp
            item.RequestedProcedureDescription = "CT CHEST"
            sequence.append(item)
        attributes: dict[str, Any] = {"TimezoneOffsetFromUTC": "+0100"}
        if sequence:
            attributes["RequestAttributesSequence"] = sequence
        ds = ct_instance(study_uid=study, series_uid=series, instance_number=i + 1,
                         rows=8, columns=8, attributes=attributes)
        path = root / series / f"{i + 1:03d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)


def findscu(archive: Archive, out_root: Path, keys: list[str]) -> list[Dataset]:
    out = out_root / f"find-{uuid.uuid4().hex[:8]}"
    out.mkdir(parents=True)
    args = ["findscu", "-S", "-aec", archive.ae_title, "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    subprocess.run([*args, HOST, str(archive.port)], check=True, capture_output=True,
                   timeout=60)
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_request_attributes_by_qido_and_cfind(tmp_path: Path) -> None:
    _need_dcmtk()
    study, ordered, other = generate_uid(), generate_uid(), generate_uid()
    _write(tmp_path / "src", study, ordered, [("SPS1", "RP1"), ("SPS2", "RP2")])
    _write(tmp_path / "src", study, other, [])
    with Archive(tmp_path / "data") as archive:
        subprocess.run(["storescu", "-aec", archive.ae_title, "+sd", "+r", HOST,
                        str(archive.port), str(tmp_path / "src")], check=True,
                       capture_output=True, timeout=120)
        archive.wait_indexed(4)
        assert archive.deps is not None
        api = TestClient(create_app(archive.deps))

        def series(params: dict[str, str]) -> list[dict[str, Any]]:
            answer = api.get(f"/dicomweb/studies/{study}/series", params=params)
            assert answer.status_code == 200, answer.text
            found: list[dict[str, Any]] = answer.json()
            return found

        everything = {obj[SERIES_UID]["Value"][0]: obj for obj in series({})}
        assert set(everything) == {ordered, other}
        items = everything[ordered][REQUESTS]["Value"]
        assert [(i[SPS]["Value"][0], i[RP]["Value"][0]) for i in items] == [
            ("SPS1", "RP1"), ("SPS2", "RP2")]
        assert everything[other][REQUESTS] == {"vr": "SQ"}

        for params in ({"RequestAttributesSequence.ScheduledProcedureStepID": "SPS2"},
                       {"00400275.00401001": "RP1"},
                       {"RequestAttributesSequence.ScheduledProcedureStepID": "SPS*",
                        "RequestAttributesSequence.RequestedProcedureID": "RP2"}):
            assert [o[SERIES_UID]["Value"][0] for o in series(params)] == [ordered], params
        # One item must match every key: SPS1 and RP2 are in different items.
        assert series({"RequestAttributesSequence.ScheduledProcedureStepID": "SPS1",
                       "RequestAttributesSequence.RequestedProcedureID": "RP2"}) == []

        (found_study,) = api.get("/dicomweb/studies", params={"StudyInstanceUID": study}
                                 ).json()
        assert found_study[OFFSET] == {"vr": "SH", "Value": ["+0100"]}

        for path, params, reason in (
                ("/dicomweb/series", {"RequestAttributesSequence.PatientID": "X"},
                 "not a matching key"),
                ("/dicomweb/studies", {"RequestAttributesSequence.RequestedProcedureID": "X"},
                 "below the STUDY level")):
            bad = api.get(path, params=params)
            assert bad.status_code == 400 and reason in bad.text, bad.text

        # C-FIND: a sequence key with one item, matched on its attributes.
        (rsp,) = findscu(archive, tmp_path, [
            "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}", "SeriesInstanceUID",
            "RequestAttributesSequence[0].ScheduledProcedureStepID=SPS2",
            "RequestAttributesSequence[0].RequestedProcedureID"])
        assert rsp.SeriesInstanceUID == ordered
        assert [str(i.ScheduledProcedureStepID) for i in rsp.RequestAttributesSequence] == [
            "SPS1", "SPS2"]
        assert findscu(archive, tmp_path, [
            "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}", "SeriesInstanceUID",
            "RequestAttributesSequence[0].ScheduledProcedureStepID=NONE"]) == []
        (study_rsp,) = findscu(archive, tmp_path, [
            "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}",
            "TimezoneOffsetFromUTC"])
        assert study_rsp.TimezoneOffsetFromUTC == "+0100"
