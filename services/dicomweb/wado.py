"""WADO-RS (PS3.18 10.4): instances, metadata, bulk data and frames, from the stored bytes.

Transfer syntaxes: nothing is transcoded yet. ``transfer-syntax=*`` or no
transfer-syntax parameter returns the stored bytes, and each part's
Content-Type says which syntax they are in; a request that names only other
syntaxes gets 406. Frames of encapsulated pixel data are returned as their
compressed fragments, typed with the stored syntax (``image/jls;
transfer-syntax=...``, or ``application/octet-stream; transfer-syntax=...``
when the client asked for octet-stream) — a client that needs decoded pixels
must decode them itself until transcoding lands.

Responses stream from the blob store one chunk at a time; metadata is the
stored DICOM JSON joined as strings, cached per study/series under an ETag
computed from the instance set and the study's metadata version. Instances of
a corrected study are sent as a corrected copy (``vna.usecases.corrected``);
the stored bytes are never rewritten.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterator

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.dicomweb.common import (
    APPLICATION_DICOM,
    DICOM_JSON,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    FRAME_MEDIA_TYPE,
    NATIVE_TRANSFER_SYNTAXES,
    OCTET_STREAM,
    DepsDep,
    MediaRange,
    accepted,
    json_bytes_response,
    media_matches,
)
from services.dicomweb.layout import (
    Extent,
    LayoutError,
    element_value,
    encapsulated_frame,
    native_frame,
    read_layout,
)
from services.dicomweb.multipart import write_parts
from vna.bootstrap import Deps
from vna.dicom.uids import is_valid_uid
from vna.model import BlobKey, StoredInstance
from vna.usecases.corrected import Overlays, corrected_copy

router = APIRouter()

_CHUNK = 1 << 20
_METADATA_TTL = 3600.0
_NOT_TRANSCODED = "transcoding is not supported yet: ask for transfer-syntax=* or "


def _check_uids(**uids: str | None) -> None:
    for name, value in uids.items():
        if value is not None and not is_valid_uid(value):
            raise HTTPException(400, f"{name}: {value!r} is not a valid UID")


async def _find(deps: Deps, study: str, series: str | None = None, sop: str | None = None
                ) -> list[StoredInstance]:
    _check_uids(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop)
    found = await run_in_threadpool(deps.index.instances, study_instance_uid=study,
                                    series_instance_uid=series, sop_instance_uid=sop)
    if not found:
        what = "instance" if sop else "series" if series else "study"
        raise HTTPException(404, f"no such {what}")
    return found


# ------------------------------------------------------------------ instances
def _dicom_syntaxes(request: Request) -> set[str] | None:
    """Transfer syntaxes acceptable for application/dicom; None means 'as stored'."""
    ranges = accepted(request)
    if not ranges:
        return None
    wanted: set[str] = set()
    for r in ranges:
        if not media_matches(r.media_type, APPLICATION_DICOM):
            continue
        if r.transfer_syntax in (None, "*"):
            return None
        wanted.add(r.transfer_syntax)
    if not wanted:
        raise HTTPException(406, 'this resource is multipart/related; type="application/dicom"')
    return wanted


def _retrieve(request: Request, deps: Deps, found: list[StoredInstance]) -> Response:
    wanted = _dicom_syntaxes(request)
    if wanted is not None:
        other = sorted({i.transfer_syntax_uid for i in found} - wanted)
        if other:
            raise HTTPException(406, _NOT_TRANSCODED + "the stored syntax " + ", ".join(other))
    boundary = uuid.uuid4().hex
    items = [(i.blob_key, i.transfer_syntax_uid, i.ref.study_instance_uid) for i in found]
    blobs = deps.blobs
    overlay_of = Overlays(deps.index)

    def blob(key: BlobKey, study: str) -> Iterator[bytes]:
        overlay = overlay_of(study)
        if overlay:
            # A corrected study: its current metadata version over the stored bytes.
            yield corrected_copy(key, overlay, blobs=blobs)
            return
        with blobs.open(key) as fp:
            while chunk := fp.read(_CHUNK):
                yield chunk

    # Sync generators: Starlette iterates them in a worker thread, so blocking
    # reads from the blob store do not stall the event loop.
    parts = ((f"{APPLICATION_DICOM}; transfer-syntax={ts}", blob(key, study))
             for key, ts, study in items)
    return StreamingResponse(
        write_parts(boundary, parts),
        media_type=f'multipart/related; type="{APPLICATION_DICOM}"; boundary={boundary}')


@router.get("/studies/{study}")
async def retrieve_study(study: str, request: Request, deps: DepsDep
                         ) -> Response:
    return _retrieve(request, deps, await _find(deps, study))


@router.get("/studies/{study}/series/{series}")
async def retrieve_series(study: str, series: str, request: Request,
                          deps: DepsDep) -> Response:
    return _retrieve(request, deps, await _find(deps, study, series))


@router.get("/studies/{study}/series/{series}/instances/{sop}")
async def retrieve_instance(study: str, series: str, sop: str, request: Request,
                            deps: DepsDep) -> Response:
    return _retrieve(request, deps, await _find(deps, study, series, sop))


# ------------------------------------------------------------------ metadata
def _etag(found: list[StoredInstance], version: int = 0) -> str:
    digest = hashlib.sha256(f"metadata version {version}\n".encode())
    for i in found:
        digest.update(f"{i.ref.sop_instance_uid}:{i.blob_key}\n".encode())
    return '"' + digest.hexdigest()[:32] + '"'


def _check_json_accept(request: Request) -> None:
    ranges = accepted(request)
    if ranges and not any(media_matches(r.media_type, t) for r in ranges
                          for t in (DICOM_JSON, "application/json")):
        raise HTTPException(406, "metadata is available as application/dicom+json")


async def _metadata(request: Request, deps: Deps, study: str, series: str | None = None,
                    sop: str | None = None) -> Response:
    _check_json_accept(request)
    found = await _find(deps, study, series, sop)
    # Corrections add metadata versions: the version is part of the ETag.
    etag = _etag(found, await run_in_threadpool(deps.index.metadata_version, study))
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    # The ETag hashes the instance set and version, so a cached body under it is current.
    cache_key = f"dicomweb:metadata:{study}:{series or ''}:{len(found)}:{etag}"
    body = None if sop else deps.cache.get(cache_key)
    if body is None:
        docs = await run_in_threadpool(deps.index.metadata, study, series, sop)
        body = ("[" + ",".join(docs) + "]").encode()
        if not sop:
            deps.cache.set(cache_key, body, ttl=_METADATA_TTL)
    return json_bytes_response(request, body, headers=headers)


@router.get("/studies/{study}/metadata")
async def retrieve_study_metadata(study: str, request: Request,
                                  deps: DepsDep) -> Response:
    return await _metadata(request, deps, study)


@router.get("/studies/{study}/series/{series}/metadata")
async def retrieve_series_metadata(study: str, series: str, request: Request,
                                   deps: DepsDep) -> Response:
    return await _metadata(request, deps, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
async def retrieve_instance_metadata(study: str, series: str, sop: str, request: Request,
                                     deps: DepsDep) -> Response:
    return await _metadata(request, deps, study, series, sop)


# ------------------------------------------------------------------ bulk data
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, length) of a single ``Range: bytes=`` request; None to send it all."""
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # absent, multiple ranges, or another unit: RFC 9110 lets us ignore it
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    else:
        start, end = max(0, size - int(m.group(2))), size - 1
    if start >= size or end < start:
        raise HTTPException(416, "range not satisfiable", headers={"Content-Range":
                                                                    f"bytes */{size}"})
    return start, end - start + 1


def _read(deps: Deps, key: BlobKey, extent: Extent) -> Iterator[bytes]:
    pos, end = extent.offset, extent.offset + extent.length
    while pos < end:
        n = min(_CHUNK, end - pos)
        yield deps.blobs.read_range(key, pos, n)
        pos += n


@router.get("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}")
async def retrieve_bulkdata(study: str, series: str, sop: str, tag: str, request: Request,
                            deps: DepsDep) -> Response:
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag):
        raise HTTPException(400, f"{tag!r} is not a tag (8 hexadecimal digits)")
    instance = (await _find(deps, study, series, sop))[0]
    key = instance.blob_key
    layout = await run_in_threadpool(read_layout, deps.blobs, key,
                                     instance.transfer_syntax_uid)
    try:
        extent, data = await run_in_threadpool(element_value, layout, deps.blobs, key,
                                               int(tag, 16))
    except LayoutError as exc:
        raise HTTPException(404, str(exc)) from exc
    if extent is None:
        assert data is not None
        extent_bytes: Iterator[bytes] = iter([data])
        size = len(data)
    else:
        size = extent.length
    ranges = accepted(request)
    if any(r.multipart for r in ranges):
        # PS3.18 8.7.3.3: bulk data is multipart/related by default.
        boundary = uuid.uuid4().hex
        body = extent_bytes if extent is None else _read(deps, key, extent)

        return StreamingResponse(
            write_parts(boundary, [(OCTET_STREAM, body)]),
            media_type=f'multipart/related; type="{OCTET_STREAM}"; boundary={boundary}')
    headers = {"Accept-Ranges": "bytes"}
    wanted = _byte_range(request.headers.get("range", ""), size)
    if wanted is None:
        body = extent_bytes if extent is None else _read(deps, key, extent)
        headers["Content-Length"] = str(size)
        return StreamingResponse(body, media_type=OCTET_STREAM, headers=headers)
    start, length = wanted
    headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{size}"
    headers["Content-Length"] = str(length)
    if extent is None:
        assert data is not None
        body = iter([data[start:start + length]])
    else:
        body = _read(deps, key, Extent(extent.offset + start, length))
    return StreamingResponse(body, status_code=206, media_type=OCTET_STREAM, headers=headers)


# ------------------------------------------------------------------ frames
def _frame_numbers(raw: str) -> list[int]:
    try:
        numbers = [int(n) for n in raw.split(",") if n.strip()]
    except ValueError as exc:
        raise HTTPException(400, f"{raw!r} is not a list of frame numbers") from exc
    if not numbers or any(n < 1 for n in numbers):
        raise HTTPException(400, "frame numbers start at 1")
    return numbers


def _frame_type(request: Request, stored_ts: str) -> str:
    """The part Content-Type for frames, or 406 when the client wants another syntax."""
    native = stored_ts in NATIVE_TRANSFER_SYNTAXES
    # Native little endian frames are the same bytes in every little endian syntax.
    produced = EXPLICIT_VR_BIG_ENDIAN if stored_ts == EXPLICIT_VR_BIG_ENDIAN else (
        EXPLICIT_VR_LITTLE_ENDIAN if native else stored_ts)
    media = OCTET_STREAM if native else FRAME_MEDIA_TYPE.get(stored_ts, OCTET_STREAM)
    ranges: list[MediaRange] = accepted(request) or [MediaRange("*/*", None, True)]
    for r in ranges:
        if not (media_matches(r.media_type, media) or media_matches(r.media_type, OCTET_STREAM)):
            continue
        # The client's own type when it named one we can label the frames with.
        typed = OCTET_STREAM if r.media_type == OCTET_STREAM else media
        if r.transfer_syntax == "*" or r.transfer_syntax == produced:
            return f"{typed}; transfer-syntax={produced}"
        if r.transfer_syntax is None and produced != EXPLICIT_VR_BIG_ENDIAN:
            # Compressed frames go as stored; the part type tells the client which.
            return f"{typed}; transfer-syntax={produced}"
    raise HTTPException(406, _NOT_TRANSCODED + f"the stored syntax {produced}")


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}")
async def retrieve_instance_frames(study: str, series: str, sop: str, frames: str,
                                   request: Request, deps: DepsDep
                                   ) -> Response:
    numbers = _frame_numbers(frames)
    instance = (await _find(deps, study, series, sop))[0]
    ts = instance.transfer_syntax_uid
    content_type = _frame_type(request, ts)
    key = instance.blob_key
    layout = await run_in_threadpool(read_layout, deps.blobs, key, ts)
    native = ts in NATIVE_TRANSFER_SYNTAXES

    def locate() -> list[list[Extent] | bytes]:
        out: list[list[Extent] | bytes] = []
        for n in numbers:
            if native:
                found = native_frame(layout, deps.blobs, key, n)
                out.append([found] if isinstance(found, Extent) else found)
            else:
                out.append(encapsulated_frame(layout, deps.blobs, key, n))
        return out

    try:
        located = await run_in_threadpool(locate)
    except LayoutError as exc:
        raise HTTPException(404, str(exc)) from exc
    boundary = uuid.uuid4().hex

    def frame_bytes(frame: list[Extent] | bytes) -> Iterator[bytes]:
        if isinstance(frame, bytes):
            yield frame
            return
        for extent in frame:
            yield from _read(deps, key, extent)

    inner = content_type.split(";")[0]
    return StreamingResponse(
        write_parts(boundary, ((content_type, frame_bytes(f)) for f in located)),
        media_type=f'multipart/related; type="{inner}"; boundary={boundary}')
