"""WADO-RS rendered and thumbnail resources (PS3.18 10.4.1.1.3, 8.3.5): JPEG or PNG.

Rendering applies, in order, the Modality LUT (rescale or LUT sequence), the
VOI LUT (the ``window`` parameter, else the data set's window or VOI LUT
sequence, else the pixel range), MONOCHROME1 inversion, then ``viewport``
scaling. It decodes what pydicom can decode with the plugins installed
(native, RLE, JPEG, JPEG-LS, JPEG 2000, HTJ2K: pylibjpeg, pyjpegls, Pillow);
anything else gets 406.

A multi-frame instance's ``/rendered`` renders its first frame; other frames
through ``/frames/{n}/rendered``. A study's or series' ``/rendered`` is its
representative image, the first frame of the middle instance (of the series,
or of the study's first series), as Orthanc renders them; thumbnails are the
same image fit into the viewport (default 128x128).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pydicom
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool

from services.dicomweb.common import DepsDep, accepted, media_matches
from services.dicomweb.wado import _find
from vna.bootstrap import Deps
from vna.model import StoredInstance

router = APIRouter()

_THUMBNAIL = (128, 128)
_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG"}


def _media_type(request: Request) -> str:
    ranges = accepted(request)
    if not ranges:
        return "image/jpeg"
    for r in ranges:
        for media in _FORMATS:
            if media_matches(r.media_type, media):
                return media
    raise HTTPException(406, "rendered images are available as image/jpeg or image/png")


def _params(request: Request, default_viewport: tuple[int, int] | None
            ) -> tuple[tuple[float, float, str] | None, tuple[int, int] | None, int]:
    q = request.query_params
    window = None
    if "window" in q:
        parts = q["window"].split(",")
        try:
            center, width = float(parts[0]), float(parts[1])
        except (ValueError, IndexError) as exc:
            raise HTTPException(400, "window: expected center,width[,function]") from exc
        function = parts[2].strip().upper() if len(parts) > 2 else "LINEAR"
        if width <= 0 or function not in ("LINEAR", "SIGMOID"):
            raise HTTPException(400, "window: width must be positive, function "
                                     "LINEAR or SIGMOID")
        window = (center, width, function)
    viewport = default_viewport
    if "viewport" in q:
        try:
            vw, vh = (int(v) for v in q["viewport"].split(",")[:2])
        except ValueError as exc:
            raise HTTPException(400, "viewport: expected width,height") from exc
        if not (0 < vw <= 8192 and 0 < vh <= 8192):
            raise HTTPException(400, "viewport: width and height must be 1..8192")
        viewport = (vw, vh)
    try:
        quality = int(q.get("quality", "90"))
    except ValueError as exc:
        raise HTTPException(400, "quality: expected an integer 1..100") from exc
    if not 1 <= quality <= 100:
        raise HTTPException(400, "quality: expected an integer 1..100")
    return window, viewport, quality


def render(ds: Dataset, frame: int, media_type: str,
           window: tuple[float, float, str] | None, viewport: tuple[int, int] | None,
           quality: int) -> bytes:
    """One frame of ``ds`` (1-based) as an encoded image."""
    from PIL import Image
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= frames:
        raise HTTPException(404, f"frame {frame} does not exist (the instance has {frames})")
    try:
        arr: Any = ds.pixel_array
    except Exception as exc:  # any decoder failure means we cannot render
        raise HTTPException(406, f"pixel data cannot be decoded here ({type(exc).__name__})"
                            ) from exc
    if frames > 1:
        arr = arr[frame - 1]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        values = apply_modality_lut(arr, ds).astype(np.float64)
        if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
            window = _dataset_window(ds)
        if window is not None:
            center, width, function = window
            if function == "SIGMOID":
                values = 255.0 / (1 + np.exp(-4 * (values - center) / width))
            else:
                low = center - 0.5 - (width - 1) / 2
                values = np.clip((values - low) / max(width - 1, 1), 0, 1) * 255.0
        elif "VOILUTSequence" in ds:
            values = apply_voi_lut(values, ds).astype(np.float64)
            values = _stretch(values)
        else:
            values = _stretch(values)
        pixels = values.astype(np.uint8)
        if photometric == "MONOCHROME1":
            pixels = 255 - pixels
        image = Image.fromarray(pixels, mode="L")
    else:
        # pydicom's pixel_array already converts YBR to RGB.
        if arr.dtype != np.uint8:
            arr = _stretch(arr.astype(np.float64)).astype(np.uint8)
        image = Image.fromarray(arr, mode="RGB")
    if viewport is not None:
        image.thumbnail(viewport)
    out = io.BytesIO()
    if _FORMATS[media_type] == "JPEG":
        image.save(out, "JPEG", quality=quality)
    else:
        image.save(out, "PNG")
    return out.getvalue()


def _dataset_window(ds: Dataset) -> tuple[float, float, str] | None:
    """The data set's first window (C.11.2.1.2), applied as the windowing we do ourselves
    so that its output always spans 0..255."""
    def first(value: Any) -> float:
        return float(value[0] if isinstance(value, (list, tuple)) or
                     type(value).__name__ == "MultiValue" else value)

    try:
        center, width = first(ds.WindowCenter), first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if width <= 0:
        return None
    return center, width, "SIGMOID" if function == "SIGMOID" else "LINEAR"


def _stretch(values: Any) -> Any:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values)
    return (values - lo) / (hi - lo) * 255.0


def _load(deps: Deps, instance: StoredInstance) -> Dataset:
    with deps.blobs.open(instance.blob_key) as fp:
        return pydicom.dcmread(io.BytesIO(fp.read()))


async def _rendered(request: Request, deps: Deps, instance: StoredInstance, frame: int,
                    default_viewport: tuple[int, int] | None) -> Response:
    media_type = _media_type(request)
    window, viewport, quality = _params(request, default_viewport)
    ds = await run_in_threadpool(_load, deps, instance)
    body = await run_in_threadpool(render, ds, frame, media_type, window, viewport, quality)
    return Response(body, media_type=media_type)


def _middle(found: list[StoredInstance]) -> StoredInstance:
    series = found[0].ref.series_instance_uid
    first_series = [i for i in found if i.ref.series_instance_uid == series]
    return first_series[len(first_series) // 2]


@router.get("/studies/{study}/series/{series}/instances/{sop}/rendered")
async def retrieve_rendered_instance(study: str, series: str, sop: str, request: Request,
                                     deps: DepsDep) -> Response:
    instance = (await _find(deps, study, series, sop))[0]
    return await _rendered(request, deps, instance, 1, None)


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frame}/rendered")
async def retrieve_rendered_frame(study: str, series: str, sop: str, frame: str,
                                  request: Request, deps: DepsDep) -> Response:
    if not frame.isdigit() or int(frame) < 1:
        raise HTTPException(400, "rendered frames are requested one at a time, from 1")
    instance = (await _find(deps, study, series, sop))[0]
    return await _rendered(request, deps, instance, int(frame), None)


@router.get("/studies/{study}/rendered")
async def retrieve_rendered_study(study: str, request: Request, deps: DepsDep) -> Response:
    """The study as one representative image, as Orthanc does: the middle instance of
    its first series, full size (``viewport`` and ``window`` apply)."""
    return await _rendered(request, deps, _middle(await _find(deps, study)), 1, None)


@router.get("/studies/{study}/series/{series}/rendered")
async def retrieve_rendered_series(study: str, series: str, request: Request,
                                   deps: DepsDep) -> Response:
    """The series as its middle instance, rendered."""
    return await _rendered(request, deps, _middle(await _find(deps, study, series)), 1, None)


@router.get("/studies/{study}/thumbnail")
async def retrieve_study_thumbnail(study: str, request: Request, deps: DepsDep) -> Response:
    return await _rendered(request, deps, _middle(await _find(deps, study)), 1, _THUMBNAIL)


@router.get("/studies/{study}/series/{series}/thumbnail")
async def retrieve_series_thumbnail(study: str, series: str, request: Request,
                                    deps: DepsDep) -> Response:
    found = await _find(deps, study, series)
    return await _rendered(request, deps, _middle(found), 1, _THUMBNAIL)


@router.get("/studies/{study}/series/{series}/instances/{sop}/thumbnail")
async def retrieve_instance_thumbnail(study: str, series: str, sop: str, request: Request,
                                      deps: DepsDep) -> Response:
    instance = (await _find(deps, study, series, sop))[0]
    return await _rendered(request, deps, instance, 1, _THUMBNAIL)
