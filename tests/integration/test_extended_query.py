"""Extended query attributes end to end: C-STORE in, QIDO-RS and C-FIND (dcmtk) out.

The radiomics cohort query of issue #3 over a few CT series that differ in
Manufacturer, SliceThickness and ConvolutionKernel; and the online backfill of
an archive whose instances were stored before the attributes were configured,
queried while the backfill is under way.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from services.dicomweb.app import create_app
from tests.support.archive import Archive
from vna.cli import cmd_backfill
from vna.config import Settings
from vna.testing.synthetic import ct_instance
from vna.usecases.backfill import backfill_extended

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
ATTRIBUTES = "Manufacturer,SliceThickness,ConvolutionKernel"
CREATOR = "SIEMENS CT VA0 COAD"
PRIVATE = f"0019xx10@{CREATOR}/DS"
COHORT = {"Modality": "CT", "SliceThickness": "1.0", "ConvolutionKernel": "B30f",
          "Manufacturer": "SIEMENS"}
SERIES_UID = "0020000E"


def _need_dcmtk() -> None:
    missing = [t for t in ("storescu", "findscu") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"dcmtk tools missing ({', '.join(missing)}): apt-get install -y dcmtk")


@dataclass
class Cohort:
    root: Path
    wanted: set[str]
    all: set[str]
    instances: int
    private: str = ""
    """The one series whose private (0019,xx10) of CREATOR is 0.75 (3 elsewhere)."""


def write_cohort(root: Path, per_series: int = 2) -> Cohort:
    """Six CT series; two of them (SliceThickness spelled 1.0 and 1.00) are the cohort."""
    variants: list[tuple[bool, dict[str, object]]] = [
        (True, {"Manufacturer": "SIEMENS", "SliceThickness": "1.0", "ConvolutionKernel": "B30f"}),
        (True, {"Manufacturer": "SIEMENS", "SliceThickness": "1.00",
                "ConvolutionKernel": "B30f"}),
        (False, {"Manufacturer": "SIEMENS", "SliceThickness": "5", "ConvolutionKernel": "B30f"}),
        (False, {"Manufacturer": "SIEMENS", "SliceThickness": "1", "ConvolutionKernel": "B70f"}),
        (False, {"Manufacturer": "GE MEDICAL SYSTEMS", "SliceThickness": "1",
                 "ConvolutionKernel": "B30f"}),
        (False, {"Manufacturer": "SIEMENS", "SliceThickness": "1", "ConvolutionKernel": "B30f",
                 "Modality": "PT"}),
    ]
    wanted: set[str] = set()
    every: set[str] = set()
    private = ""
    study = generate_uid()
    for number, (in_cohort, attributes) in enumerate(variants, start=1):
        series_uid = generate_uid()
        private = private or series_uid
        modality = str(attributes.pop("Modality", "CT"))
        for i in range(per_series):
            ds = ct_instance(study_uid=study, series_uid=series_uid, instance_number=i + 1,
                             rows=8, columns=8, modality=modality, series_number=number,
                             attributes=attributes)
            # Our creator in block 0x11 here; requests name it in block 0x10.
            ds.private_block(0x0019, "ANOTHER VENDOR", create=True).add_new(0x10, "LO", "x")
            ds.private_block(0x0019, CREATOR, create=True).add_new(
                0x10, "DS", "0.75" if series_uid == private else "3")
            path = root / series_uid / f"{i + 1:03d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
        every.add(series_uid)
        if in_cohort:
            wanted.add(series_uid)
    return Cohort(root, wanted, every, len(variants) * per_series, private)


def store(archive: Archive, directory: Path) -> None:
    subprocess.run(["storescu", "-aec", archive.ae_title, "+sd", "+r", HOST,
                    str(archive.port), str(directory)], check=True, capture_output=True,
                   timeout=120)


def findscu(archive: Archive, out_root: Path, keys: dict[str, str]) -> list[Dataset]:
    out = out_root / f"find-{uuid.uuid4().hex[:8]}"
    out.mkdir(parents=True)
    args = ["findscu", "-S", "-aec", archive.ae_title, "-X", "-od", str(out)]
    for key, value in keys.items():
        args += ["-k", f"{key}={value}"]
    subprocess.run([*args, HOST, str(archive.port)], check=True, capture_output=True,
                   timeout=60)
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def cohort_by_cfind(archive: Archive, tmp: Path) -> list[Dataset]:
    return findscu(archive, tmp, {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": "",
                                  **COHORT})


def find_with_pynetdicom(archive: Archive, request: Dataset) -> list[Dataset]:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, archive.port, ae_title=archive.ae_title)
    assert assoc.is_established
    try:
        out = []
        for status, identifier in assoc.send_c_find(
                request, StudyRootQueryRetrieveInformationModelFind):
            assert status is not None and status.Status in (0xFF00, 0x0000), status
            if status.Status == 0xFF00:
                out.append(identifier)
        return out
    finally:
        assoc.release()


def qido(api: TestClient, params: dict[str, str]) -> Any:
    return api.get("/dicomweb/series", params=params)


def series_uids(found: list[dict[str, Any]]) -> set[str]:
    return {obj[SERIES_UID]["Value"][0] for obj in found}


def test_cohort_query_by_qido_and_cfind(tmp_path: Path) -> None:
    _need_dcmtk()
    cohort = write_cohort(tmp_path / "src")
    with Archive(tmp_path / "data", extra_query_attributes=f"{ATTRIBUTES},{PRIVATE}"
                 ) as archive:
        store(archive, cohort.root)
        archive.wait_indexed(cohort.instances)
        assert archive.backfill is not None and archive.backfill.wait(60)
        assert archive.deps is not None
        api = TestClient(create_app(archive.deps))
        exposition = api.get("/metrics").text
        assert 'vna_extended_backfill_pending{attribute="ConvolutionKernel"} 0.0' in exposition

        answer = qido(api, {**COHORT, "includefield": "ConvolutionKernel,00180050"})
        assert answer.status_code == 200, answer.text
        assert "Warning" not in answer.headers
        found = answer.json()
        assert series_uids(found) == cohort.wanted and len(found) == 2
        for obj in found:
            assert obj["00181210"]["Value"] == ["B30f"]
            assert obj["00180050"]["Value"] == [1.0]
        assert series_uids(qido(api, {"Manufacturer": "GE*"}).json()) != set()
        assert series_uids(qido(api, {"SliceThickness": "0-100"}).json()) == cohort.all

        # Bad parameters are 400 with the reason, never an empty 200.
        for params, reason in (({"StationName": "CT1"}, "StationName"),
                               ({"SliceThickness": "thin"}, "not a number"),
                               ({"StudyDate": "20241399"}, "not a valid date")):
            bad = qido(api, params)
            assert bad.status_code == 400 and reason in bad.text, bad.text
        instance_level = api.get("/dicomweb/studies", params={"Manufacturer": "SIEMENS"})
        assert instance_level.status_code == 400

        responses = cohort_by_cfind(archive, tmp_path)
        assert {str(r.SeriesInstanceUID) for r in responses} == cohort.wanted
        assert len(responses) == 2
        for rsp in responses:
            assert rsp.ConvolutionKernel == "B30f" and rsp.Manufacturer == "SIEMENS"
            assert float(rsp.SliceThickness) == 1.0

        # The private attribute: by its tag in QIDO-RS, by creator and element in C-FIND.
        by_tag = qido(api, {"00191010": "0.5-1", "includefield": "00191010"}).json()
        assert series_uids(by_tag) == {cohort.private}
        assert by_tag[0]["00190011"]["Value"] == [CREATOR]
        assert by_tag[0]["00191110"]["Value"] == [0.75]
        request = Dataset()
        request.QueryRetrieveLevel = "SERIES"
        request.SeriesInstanceUID = ""
        block = request.private_block(0x0019, CREATOR, create=True)
        block.add_new(0x10, "DS", "0.75")
        (rsp,) = find_with_pynetdicom(archive, request)
        assert rsp.SeriesInstanceUID == cohort.private
        assert rsp[0x00190010].value == CREATOR and float(rsp[0x00191010].value) == 0.75


def test_backfill_online_while_queries_answer(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    _need_dcmtk()
    cohort = write_cohort(tmp_path / "src", per_series=3)
    data = tmp_path / "data"
    with Archive(data) as before:  # not configured yet
        store(before, cohort.root)
        before.wait_indexed(cohort.instances)
        assert before.deps is not None
        refused = TestClient(create_app(before.deps)).get("/dicomweb/series",
                                                          params=COHORT)
        assert refused.status_code == 400 and "not a matching key" in refused.text

    # The test drives the backfill itself, to query while it is under way.
    with Archive(data, extra_query_attributes=ATTRIBUTES, backfill=False) as archive:
        deps = archive.deps
        assert deps is not None
        api = TestClient(create_app(deps))
        pending = qido(api, COHORT)
        assert pending.status_code == 200 and pending.json() == []
        assert "still being backfilled" in pending.headers["Warning"]

        # The backfill runs in its own thread and waits after its first batch
        # until this thread has queried and stored more: the archive serves meanwhile.
        first_batch, go_on = threading.Event(), threading.Event()

        def after_batch(_last_pk: int) -> None:
            if not first_batch.is_set():
                first_batch.set()
                assert go_on.wait(120)

        reports: list[Any] = []
        worker = threading.Thread(target=lambda: reports.append(backfill_extended(
            deps.extended, index=deps.index, batch_size=4, on_batch=after_batch)))
        worker.start()
        try:
            assert first_batch.wait(120)
            during = qido(api, COHORT)
            assert during.status_code == 200
            assert "still being backfilled" in during.headers["Warning"]
            assert series_uids(during.json()) <= cohort.wanted
            with caplog.at_level(logging.WARNING, logger="vna.qr"):
                assert {str(r.SeriesInstanceUID) for r in cohort_by_cfind(archive, tmp_path)
                        } <= cohort.wanted
            assert "C-FIND on attributes still being backfilled" in caplog.text
            # A new cohort series stored now is indexed with its values at once.
            late = write_cohort(tmp_path / "late", per_series=1)
            store(archive, late.root)
            archive.wait_indexed(cohort.instances + late.instances)
        finally:
            go_on.set()
            worker.join(120)
        assert reports and reports[0].completed
        assert reports[0].instances >= cohort.instances

        done = qido(api, COHORT)
        assert "Warning" not in done.headers
        assert series_uids(done.json()) == cohort.wanted | late.wanted
        assert {str(r.SeriesInstanceUID) for r in cohort_by_cfind(archive, tmp_path)
                } == cohort.wanted | late.wanted

    # `vna backfill` on the same data directory: nothing left to do; with one
    # more attribute, it backfills that one.
    settings = Settings(data_dir=data, index_url="", storage_url="", bus_url="local://",
                        redis_url="", extra_query_attributes=ATTRIBUTES)
    assert cmd_backfill(settings) == 0
    assert "nothing to backfill" in capsys.readouterr().out
    more = settings.model_copy(update={"extra_query_attributes": ATTRIBUTES + ",ImageType"})
    assert cmd_backfill(more) == 0
    out = capsys.readouterr().out
    assert "backfill of ImageType completed" in out
    assert f"{cohort.instances + late.instances} instances" in out
    # --restart: from the first instance again, for every configured attribute.
    assert cmd_backfill(more, restart=True) == 0
    out = capsys.readouterr().out
    assert "Manufacturer, SliceThickness, ConvolutionKernel, ImageType completed" in out
