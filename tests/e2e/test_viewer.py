"""The OHIF viewer at /viewer, in headless Chromium, on a `vna run` archive.

A CT series (a bright disc on a dark background) goes in with storescu; the
viewer's study list shows its study; the viewer opened on it draws the disc:
the middle of the viewport's canvas is bright and its background dark on a
screenshot. Needs the installed viewer (``make viewer``) and Chromium
(Debian's ``chromium``), driven through playwright from the dev extras.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from tests.conftest import backend_missing
from tests.support.processes import VnaProcess, wait_for
from vna.testing.synthetic import ct_instance
from vna.viewer import is_current

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SIZE = 128


def _viewer_dir() -> Path:
    return Path(os.environ.get("VNA_VIEWER_DIR") or REPO / "viewer" / "dist").resolve()


def _chromium() -> str | None:
    # Debian's /usr/bin/chromium is a shell wrapper; the binary itself starts cleaner.
    for candidate in (os.environ.get("VNA_TEST_CHROMIUM"), "/usr/lib/chromium/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium through playwright (no browser download: the machine's own)."""
    executable = _chromium()
    if executable is None:
        backend_missing("chromium", "no chromium binary found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        backend_missing("chromium", f"playwright is not importable: {exc}")
        raise
    with sync_playwright() as pw:
        # SwiftShader gives headless Chromium the WebGL that cornerstone3D draws with.
        chromium = pw.chromium.launch(
            executable_path=executable, headless=True,
            args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
        try:
            yield chromium
        finally:
            chromium.close()


def _write_disc_series(directory: Path, count: int, study_uid: str) -> None:
    """``count`` CT slices: HU -1024 outside a disc of HU +76 (inside window 40/400)."""
    directory.mkdir(parents=True)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = (yy - SIZE // 2) ** 2 + (xx - SIZE // 2) ** 2 < (SIZE * 5 // 16) ** 2
    pixels = np.where(disc, 1100, 0).astype("<u2").tobytes()
    series_uid = generate_uid()
    for i in range(count):
        ds = ct_instance(study_uid=study_uid, series_uid=series_uid, instance_number=i + 1,
                         rows=SIZE, columns=SIZE, patient_id="VIEWER-E2E",
                         patient_name="VIEWER^E2E")
        ds.PixelData = pixels
        ds.save_as(directory / f"CT{i + 1:03d}.dcm", enforce_file_format=True)


def _instance_count(base: str, study_uid: str) -> int:
    r = httpx.get(f"{base}/dicomweb/studies/{study_uid}/instances", timeout=5)
    return len(r.json()) if r.status_code == 200 else 0


def _disc_drawn(png: bytes) -> bool:
    """True when the canvas shows a bright middle over a dark background."""
    gray = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    h, w = gray.shape
    middle = gray[h * 2 // 5: h * 3 // 5, w * 9 // 20: w * 11 // 20].mean()
    # Above the disc, below the viewport's corner overlays: the image's dark background.
    top = gray[h // 20: h // 10, w * 9 // 20: w * 11 // 20].mean()
    return bool(middle > 80 and middle - top > 60)


def test_viewer_lists_and_renders_a_stored_ct(tmp_path: Path, browser: Any) -> None:
    viewer = _viewer_dir()
    if not is_current(viewer):
        backend_missing("viewer", f"no current viewer build in {viewer}")
    storescu = shutil.which("storescu")
    assert storescu, "dcmtk is missing: apt-get install -y dcmtk"
    study_uid = generate_uid()
    _write_disc_series(tmp_path / "ct", 5, study_uid)
    # One DIMSE receiver (not one per core): five slices need no more, and it starts faster.
    archive = VnaProcess(tmp_path / "data", env={"VNA_VIEWER_DIR": str(viewer),
                                                 "VNA_INGEST_WORKERS": "1"}).start()
    context = browser.new_context(viewport={"width": 1024, "height": 768})
    # The onboarding tour would dim the viewport; a returning user has seen it.
    context.add_init_script(
        "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
    page = context.new_page()
    try:
        done = subprocess.run([storescu, "-aec", "VNA", "127.0.0.1", str(archive.dimse_port),
                               "+sd", str(tmp_path / "ct")], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        wait_for(lambda: _instance_count(archive.base_url, study_uid) == 5, 30, 0.1,
                 "5 instances indexed")

        # The study list (QIDO-RS) shows the study.
        page.goto(f"{archive.base_url}/viewer/")
        page.get_by_text("VIEWER, E2E").first.wait_for(timeout=60_000)

        # A deep link (SPA fallback) opens the viewer on it; WADO-RS draws the image.
        page.goto(f"{archive.base_url}/viewer/viewer?StudyInstanceUIDs={study_uid}")
        canvas = page.locator("canvas.cornerstone-canvas").first
        canvas.wait_for(timeout=60_000)
        try:
            wait_for(lambda: _disc_drawn(canvas.screenshot()), 60, 0.5,
                     "the CT image drawn in the viewport (bright disc on dark background)")
        except AssertionError:
            page.screenshot(path=str(tmp_path / "viewer.png"))
            raise AssertionError(f"no image drawn; screenshot: {tmp_path / 'viewer.png'}, "
                                 f"archive log: {archive.log}") from None
    finally:
        context.close()
        archive.stop()
