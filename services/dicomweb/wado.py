"""WADO-RS (PS3.18 10.4): instances, metadata, bulk data and frames, from the stored bytes.

Transfer syntaxes are negotiated through ``Accept`` (services/dicomweb/negotiation.py):
``transfer-syntax=*`` returns the stored bytes; a named syntax other than the
stored one is produced by vna/dicom/transcode.py, one instance (or frame) at a
time while the multipart response streams, and each part's Content-Type names
the syntax actually sent. The stored blob is only read (invariant 2).

Instances: before answering, every instance whose acceptable syntaxes need a
transcode has its header checked (decoder, encoder, pixel format); those that
cannot be sent in any acceptable syntax are left out with 206 and a Warning,
and when none can be sent the answer is 406 with the reasons. The first part
is produced before the status is sent; a later instance that fails to decode
leaves the stream unfinished rather than sending something else.

Responses stream from the blob store one chunk at a time; metadata is the
stored DICOM JSON joined as strings, cached per study/series under the study's
revision (``Index.metadata_revision``), which the index changes with anything
the metadata shows; the ETag is derived from it. Instances of
a corrected study are sent as a corrected copy (``vna.usecases.corrected``);
the stored bytes are never rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from services.dicomweb.common import (
    APPLICATION_DICOM,
    DICOM_JSON,
    NATIVE_TRANSFER_SYNTAXES,
    OCTET_STREAM,
    DepsDep,
    accepted,
    json_bytes_response,
    media_matches,
    warning,
)
from services.dicomweb.layout import (
    Extent,
    Layout,
    LayoutError,
    element_value,
    encapsulated_frame,
    item_element_value,
    native_frame,
    number_of_frames,
    open_blob,
    read_layout,
)
from services.dicomweb.multipart import closing, part_header, write_parts
from services.dicomweb.negotiation import (
    STORED,
    dicom_choices,
    frame_choices,
    sent_frame_syntax,
)
from services.dicomweb.sendfile import SENDFILE, Part, offers_sendfile
from vna import metrics
from vna.bootstrap import Deps
from vna.dicom.transcode import TranscodeError, impossible, transcode_frame, transcode_instance
from vna.dicom.uids import is_valid_uid
from vna.model import BlobKey, StoredInstance
from vna.usecases.corrected import Overlays, corrected_copy

log = logging.getLogger("vna.dicomweb.wado")
router = APIRouter()

_CHUNK = 1 << 20
# Stored instances go out in pieces of about this size: one read of each blob and
# one hand-over to the event loop per piece, not per instance (a CT slice is 0.5 MB).
_PIECE = 8 << 20
# Transcoding is CPU-bound and holds a decoded instance: one per core at a time
# bounds both, however many requests the thread pool runs.
_TRANSCODE_SLOTS = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))
_MAX_DECODED_BYTES = 1 << 30
_METADATA_TTL = 3600.0


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
@dataclass(frozen=True)
class _Planned:
    instance: StoredInstance
    choices: list[str]
    """Syntaxes to try, best first, each possible for this instance from its header."""


def _plan_instances(deps: Deps, found: list[StoredInstance], choices: list[str]
                    ) -> tuple[list[_Planned], list[str]]:
    """Per instance, the acceptable syntaxes it can be sent in; and why others cannot.

    Reads the header (pixel data deferred) of an instance only when an
    acceptable syntax needs transcoding, so as-stored retrievals read nothing.
    """
    planned: list[_Planned] = []
    refused: list[str] = []
    for instance in found:
        stored = instance.transfer_syntax_uid
        possible: list[str] = []
        reasons: list[str] = []
        header = None
        for choice in choices:
            if choice in (STORED, stored):
                possible.append(STORED)
                break  # the stored bytes can always be sent: later choices are never used
            if header is None:
                header = read_layout(deps.blobs, instance.blob_key, stored).dataset
            reason = impossible(header, stored, choice) or _too_large(header)
            if reason is None:
                possible.append(choice)
            else:
                reasons.append(reason)
        if possible:
            planned.append(_Planned(instance, possible))
        else:
            refused.append("; ".join(reasons))
    return planned, refused


def _too_large(header: Dataset) -> str | None:
    """Whole instances are decoded in memory: refuse those that would not fit."""
    try:
        decoded = (int(header.Rows) * int(header.Columns)
                   * int(header.get("SamplesPerPixel", 1) or 1) * int(header.BitsAllocated)
                   // 8 * number_of_frames(header))
    except (AttributeError, TypeError, ValueError):
        return None  # no pixel description: nothing to decode
    if decoded > _MAX_DECODED_BYTES:
        return (f"{decoded >> 20} MiB of decoded pixel data is more than this archive "
                f"transcodes whole ({_MAX_DECODED_BYTES >> 20} MiB): ask for "
                "transfer-syntax=* or for frames")
    return None


def _produce(deps: Deps, planned: _Planned, overlays: Overlays) -> tuple[str, Iterable[bytes]]:
    """(part Content-Type, body) of one instance: the first of its choices that works.

    Transcoding happens here, one instance in memory at a time; the stored
    blob is only read. Raises ``TranscodeError`` when every choice failed.
    """
    instance = planned.instance
    # A corrected study is sent with its current metadata version over the stored
    # bytes (as received: GET /worklist/.../pristine).
    overlay = overlays(instance.ref.study_instance_uid)
    errors: list[str] = []
    for choice in planned.choices:
        if choice == STORED:
            ts = instance.transfer_syntax_uid
            body: Iterable[bytes] = ([corrected_copy(instance.blob_key, overlay, blobs=deps.blobs)]
                                     if overlay else _blob(deps, instance.blob_key))
            return f"{APPLICATION_DICOM}; transfer-syntax={ts}", body
        try:
            source = (contextlib.nullcontext(io.BytesIO(
                corrected_copy(instance.blob_key, overlay, blobs=deps.blobs)))
                if overlay else open_blob(deps.blobs, instance.blob_key))
            with _TRANSCODE_SLOTS, source as fp:
                data = transcode_instance(fp, choice)
        except TranscodeError as exc:
            metrics.TRANSCODES.labels("instance", "failed").inc()
            log.warning("transcode failed: %s", exc,
                        extra={"sop_instance_uid": instance.ref.sop_instance_uid})
            errors.append(str(exc))
            continue
        metrics.TRANSCODES.labels("instance", "done").inc()
        return f"{APPLICATION_DICOM}; transfer-syntax={choice}", _slices(data)
    raise TranscodeError("; ".join(errors))


def _blob(deps: Deps, key: BlobKey) -> Iterator[bytes]:
    with deps.blobs.open(key) as fp:
        while chunk := fp.read(_CHUNK):
            yield chunk


def _slices(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for at in range(0, len(view), _CHUNK):
        yield bytes(view[at:at + _CHUNK])


async def _retrieve(request: Request, deps: Deps, found: list[StoredInstance]) -> Response:
    choices = dicom_choices(accepted(request))
    if not choices:
        raise HTTPException(406, 'this resource is multipart/related; type="application/dicom"')
    planned, refused = await run_in_threadpool(_plan_instances, deps, found, choices)

    def first() -> tuple[int, tuple[str, Iterable[bytes]] | None]:
        # The first part is made before answering, so that an instance that
        # cannot be converted is reported with a status, not a broken stream.
        for at, item in enumerate(planned):
            try:
                return at, _produce(deps, item, overlays)
            except TranscodeError as exc:
                refused.append(str(exc))
        return len(planned), None

    overlays = Overlays(deps.index)
    if planned and not refused and all(item.choices[0] == STORED for item in planned):
        fast = await run_in_threadpool(_as_stored_plan, deps, planned, overlays)
        if fast is not None:
            return _as_stored_response(request, deps, fast)
    at, head = await run_in_threadpool(first)
    if head is None:
        raise HTTPException(406, "no acceptable transfer syntax can be sent: " + _summary(refused))
    rest = planned[at + 1:]

    def parts() -> Iterator[tuple[str, Iterable[bytes]]]:
        yield head
        for item in rest:
            # Headers are sent: an instance that fails now ends the response
            # unfinished (no closing boundary), which clients see as an error.
            yield _produce(deps, item, overlays)

    headers: dict[str, str] = {}
    status = 200
    if refused:
        # PS3.18 8.6.3: some instances could not be sent in an acceptable syntax.
        status = 206
        headers["Warning"] = warning(f"{len(refused)} instance(s) not sent: {_summary(refused)}")
    boundary = uuid.uuid4().hex
    media_type = f'multipart/related; type="{APPLICATION_DICOM}"'
    # The whole response names its syntax only when no part can come in another.
    sent = {item.instance.transfer_syntax_uid if item.choices[0] == STORED
            else item.choices[0] for item in planned[at:] if len(item.choices) == 1}
    if len(sent) == 1 and all(len(item.choices) == 1 for item in planned[at:]):
        media_type += f"; transfer-syntax={sent.pop()}"
    # Sync generators: Starlette iterates them in a worker thread, so blocking
    # reads and transcoding do not stall the event loop.
    return StreamingResponse(
        write_parts(boundary, parts()), status_code=status, headers=headers,
        media_type=f"{media_type}; boundary={boundary}")


@dataclass(frozen=True)
class _AsStored:
    """A multipart response of stored blobs only: every part's header known up front."""

    boundary: str
    parts: list[tuple[bytes, StoredInstance]]
    """(delimiter and part headers, instance), in order."""
    length: int | None
    """The body's length when every blob's size was checked (files), else None."""
    paths: list[str] | None = None
    """Each part's blob file, in order, when ``length`` is known."""


def _as_stored_plan(deps: Deps, planned: list[_Planned], overlays: Overlays) -> _AsStored | None:
    """The plan of an as-stored retrieval; None when a study is corrected (its instances
    are rewritten on the way out, ``_produce``)."""
    if any(overlays(uid) for uid in {p.instance.ref.study_instance_uid for p in planned}):
        return None
    boundary = uuid.uuid4().hex
    parts = [((b"\r\n" if i else b"") + part_header(
        boundary, f"{APPLICATION_DICOM}; transfer-syntax={p.instance.transfer_syntax_uid}"),
        p.instance) for i, p in enumerate(planned)]
    length = sum(len(head) + i.size for head, i in parts) + len(_tail(boundary))
    paths: list[str] = []
    for _, instance in parts:
        # A Content-Length only when each blob is known to be as long as the index says.
        found = deps.blobs.local_file(instance.blob_key)
        if found is None or found[1] != instance.size:
            return _AsStored(boundary, parts, None)
        paths.append(found[0])
    return _AsStored(boundary, parts, length, paths)


def _tail(boundary: str) -> bytes:
    return b"\r\n" + closing(boundary)


def _as_stored_response(request: Request, deps: Deps, plan: _AsStored) -> Response:
    """The blobs as stored, in pieces of about ``_PIECE`` bytes.

    With a Content-Length the body is not chunk-encoded either. A blob that turns
    out shorter or longer than announced ends the response unfinished.
    """

    def pieces() -> Iterator[bytes | memoryview]:
        batch: list[tuple[bytes, StoredInstance]] = []
        size = 0
        for head, instance in plan.parts:
            if instance.size > _PIECE:  # a large one streams on its own
                if batch:
                    yield _piece(deps, batch, size, plan.length is not None)
                    batch, size = [], 0
                yield head
                sent = 0
                with deps.blobs.open(instance.blob_key) as fp:
                    while chunk := fp.read(_CHUNK):
                        sent += len(chunk)
                        yield chunk
                if plan.length is not None and sent != instance.size:
                    raise RuntimeError(f"blob {instance.blob_key} changed size")
                continue
            batch.append((head, instance))
            size += len(head) + instance.size
            if size >= _PIECE:
                yield _piece(deps, batch, size, plan.length is not None)
                batch, size = [], 0
        if batch:
            yield _piece(deps, batch, size, plan.length is not None)
        yield _tail(plan.boundary)

    syntaxes = {instance.transfer_syntax_uid for _, instance in plan.parts}
    media_type = f'multipart/related; type="{APPLICATION_DICOM}"'
    if len(syntaxes) == 1:
        media_type += f"; transfer-syntax={syntaxes.pop()}"
    headers = {} if plan.length is None else {"Content-Length": str(plan.length)}
    media_type = f"{media_type}; boundary={plan.boundary}"
    if plan.paths is not None and offers_sendfile(request.scope):
        return _SentFiles(plan, headers=headers, media_type=media_type)
    # A sync generator: Starlette reads it in a worker thread, one piece at a time.
    return StreamingResponse(pieces(), headers=headers, media_type=media_type)


class _SentFiles(Response):
    """The blobs as stored, from their files to the socket by the server (sendfile),
    all in one hand-over: only paths are held, however large the study."""

    def __init__(self, plan: _AsStored, *, headers: dict[str, str], media_type: str) -> None:
        assert plan.paths is not None  # a plan of local files, every size checked
        super().__init__(headers=headers, media_type=media_type)
        self.plan = plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        parts: list[Part] = []
        assert self.plan.paths is not None
        for (head, instance), path in zip(self.plan.parts, self.plan.paths, strict=True):
            parts += [head, (path, instance.size)]
        parts.append(_tail(self.plan.boundary))
        await send({"type": SENDFILE, "parts": parts, "more_body": False})


def _piece(deps: Deps, parts: list[tuple[bytes, StoredInstance]], size: int, exact: bool
           ) -> bytes | memoryview:
    """Part headers and blobs in one buffer, each blob read straight into its place.

    ``exact``: every blob was checked to be as long as the index says; otherwise
    they are read as they are.
    """
    if not exact:
        out: list[bytes] = []
        for head, instance in parts:
            out.append(head)
            with deps.blobs.open(instance.blob_key) as fp:
                out.append(fp.read())
        return b"".join(out)
    buffer = bytearray(size)
    view = memoryview(buffer)
    at = 0
    for head, instance in parts:
        view[at:at + len(head)] = head
        at += len(head)
        end = at + instance.size
        with deps.blobs.open(instance.blob_key) as fp:
            readinto = getattr(fp, "readinto", None)
            while at < end:
                if readinto is not None:
                    n = readinto(view[at:end])
                else:
                    chunk = fp.read(end - at)
                    n = len(chunk)
                    view[at:at + n] = chunk
                if not n:
                    raise RuntimeError(f"blob {instance.blob_key} is shorter than indexed")
                at += n
            if fp.read(1):
                raise RuntimeError(f"blob {instance.blob_key} is longer than indexed")
    return view


def _summary(reasons: list[str], limit: int = 3) -> str:
    """Distinct reasons, most frequent first, each with how many instances it concerns."""
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    shown = "; ".join(f"{reason} ({n} instance{'s' if n > 1 else ''})"
                      for reason, n in ranked[:limit])
    return shown + (f"; and {len(ranked) - limit} other reasons" if len(ranked) > limit else "")


@router.get("/studies/{study}")
async def retrieve_study(study: str, request: Request, deps: DepsDep
                         ) -> Response:
    return await _retrieve(request, deps, await _find(deps, study))


@router.get("/studies/{study}/series/{series}")
async def retrieve_series(study: str, series: str, request: Request,
                          deps: DepsDep) -> Response:
    return await _retrieve(request, deps, await _find(deps, study, series))


@router.get("/studies/{study}/series/{series}/instances/{sop}")
async def retrieve_instance(study: str, series: str, sop: str, request: Request,
                            deps: DepsDep) -> Response:
    return await _retrieve(request, deps, await _find(deps, study, series, sop))


# ------------------------------------------------------------------ metadata
def _etag(revision: str, series: str | None, sop: str | None) -> str:
    digest = hashlib.sha256(f"study revision {revision}\n{series or ''}\n{sop or ''}".encode())
    return '"' + digest.hexdigest()[:32] + '"'


def _check_json_accept(request: Request) -> None:
    ranges = accepted(request)
    if ranges and not any(media_matches(r.media_type, t) for r in ranges
                          for t in (DICOM_JSON, "application/json")):
        raise HTTPException(406, "metadata is available as application/dicom+json")


async def _metadata(request: Request, deps: Deps, study: str, series: str | None = None,
                    sop: str | None = None) -> Response:
    _check_json_accept(request)
    _check_uids(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop)
    # The study's revision changes in the transaction of any change to what its
    # metadata shows (new instance, correction, merge): one small look-up tells
    # whether a cached body, in this process or another, is current.
    revision = await run_in_threadpool(deps.index.metadata_revision, study, series, sop)
    if revision is None:
        what = "instance" if sop else "series" if series else "study"
        raise HTTPException(404, f"no such {what}")
    etag = _etag(revision, series, sop)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    # Read after the revision, the body is at least as new as the key it is cached under.
    cache_key = f"dicomweb:metadata:{study}:{series or ''}:{revision}"
    # Warm answers for gzip clients (viewers) are cached compressed too: compressing
    # a 1,000-instance study's JSON again on every request was a good part of its time.
    gzipped = "gzip" in request.headers.get("accept-encoding", "")
    if gzipped and not sop and (zipped := deps.cache.get(cache_key + ":gzip")) is not None:
        return Response(zipped, media_type=DICOM_JSON, headers={
            **headers, "Vary": "Accept-Encoding", "Content-Encoding": "gzip"})
    body = None if sop else deps.cache.get(cache_key)
    if body is None:
        docs = await run_in_threadpool(deps.index.metadata, study, series, sop)
        body = ("[" + ",".join(docs) + "]").encode()
        if not sop:
            deps.cache.set(cache_key, body, ttl=_METADATA_TTL)
    response = json_bytes_response(request, body, headers=headers)
    if gzipped and not sop and response.headers.get("content-encoding") == "gzip":
        deps.cache.set(cache_key + ":gzip", bytes(response.body), ttl=_METADATA_TTL)
    return response


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


def _bulk_path(path: str) -> tuple[list[tuple[int, int]], int]:
    """``TAG``, or ``SEQ/N/TAG`` (item N, from 1, of sequence SEQ; nested as deep as
    the metadata's BulkDataURIs go): the items on the way and the element's tag."""
    steps = path.split("/")
    tags, numbers = steps[::2], steps[1::2]
    if len(steps) % 2 == 0 or not all(re.fullmatch(r"[0-9A-Fa-f]{8}", t) for t in tags):
        raise HTTPException(400, f"{path!r} is not a tag (8 hexadecimal digits), or a "
                                 "sequence's tag, item number and tag")
    if not all(n.isdigit() and int(n) >= 1 for n in numbers):
        raise HTTPException(400, f"{path!r}: item numbers start at 1")
    items = [(int(t, 16), int(n)) for t, n in zip(tags[:-1], numbers, strict=True)]
    return items, int(tags[-1], 16)


@router.get("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{path:path}")
async def retrieve_bulkdata(study: str, series: str, sop: str, path: str, request: Request,
                            deps: DepsDep) -> Response:
    items, tag = _bulk_path(path)
    instance = (await _find(deps, study, series, sop))[0]
    key = instance.blob_key
    try:
        if items:
            extent, data = await run_in_threadpool(
                item_element_value, deps.blobs, key, items, tag)
        else:
            layout = await run_in_threadpool(read_layout, deps.blobs, key,
                                             instance.transfer_syntax_uid)
            extent, data = await run_in_threadpool(element_value, layout, deps.blobs, key,
                                                   tag)
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


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}")
async def retrieve_instance_frames(study: str, series: str, sop: str, frames: str,
                                   request: Request, deps: DepsDep
                                   ) -> Response:
    numbers = _frame_numbers(frames)
    instance = (await _find(deps, study, series, sop))[0]
    ts = instance.transfer_syntax_uid
    choices = frame_choices(accepted(request), ts)
    if not choices:
        raise HTTPException(406, "frames are available as application/octet-stream or as "
                                 "image/jpeg, image/jls, image/jp2, image/jpx, image/jphc, "
                                 "image/dicom-rle (PS3.18 Table 8.7.3-5)")
    key = instance.blob_key
    layout = await run_in_threadpool(read_layout, deps.blobs, key, ts)
    refused: list[str] = []
    for choice in choices:
        sent, convert = sent_frame_syntax(ts, choice)
        content_type = f"{choice.media_type}; transfer-syntax={sent}"
        if not convert:
            return await _stored_frames(deps, key, layout, numbers, content_type)
        reason = impossible(layout.dataset, ts, sent)
        if reason is not None:
            refused.append(reason)
            continue
        count = number_of_frames(layout.dataset)
        for n in numbers:
            if n > count:
                raise HTTPException(404, f"frame {n} does not exist (the instance has {count})")
        try:
            head = await run_in_threadpool(_transcoded_frame, deps, key, layout, numbers[0], sent)
        except TranscodeError as exc:
            refused.append(str(exc))
            continue
        rest = numbers[1:]

        def bodies(head: bytes = head, rest: list[int] = rest, sent: str = sent
                   ) -> Iterator[Iterable[bytes]]:
            yield [head]
            for n in rest:
                # Headers are sent: a frame that fails now leaves the response
                # unfinished (no closing boundary), which clients see as an error.
                yield [_transcoded_frame(deps, key, layout, n, sent)]

        return _frames_response(content_type, bodies())
    raise HTTPException(406, "no acceptable transfer syntax can be sent: " + "; ".join(refused))


def _transcoded_frame(deps: Deps, key: BlobKey, layout: Layout, number: int, target: str
                      ) -> bytes:
    try:
        with _TRANSCODE_SLOTS, open_blob(deps.blobs, key) as fp:
            data = transcode_frame(fp, layout.dataset, layout.transfer_syntax_uid,
                                   number - 1, target)
    except TranscodeError as exc:
        metrics.TRANSCODES.labels("frame", "failed").inc()
        log.warning("frame transcode failed: %s", exc)
        raise
    metrics.TRANSCODES.labels("frame", "done").inc()
    return data


def _frames_response(content_type: str, bodies: Iterable[Iterable[bytes]]) -> Response:
    boundary = uuid.uuid4().hex
    inner, _, syntax = content_type.partition(";")
    return StreamingResponse(
        write_parts(boundary, ((content_type, body) for body in bodies)),
        media_type=f'multipart/related; type="{inner}";{syntax}; boundary={boundary}')


async def _stored_frames(deps: Deps, key: BlobKey, layout: Layout, numbers: list[int],
                         content_type: str) -> Response:
    """Frames as their stored bytes: native extents or encapsulated fragments."""
    native = layout.transfer_syntax_uid in NATIVE_TRANSFER_SYNTAXES

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

    def frame_bytes(frame: list[Extent] | bytes) -> Iterator[bytes]:
        if isinstance(frame, bytes):
            yield frame
            return
        for extent in frame:
            yield from _read(deps, key, extent)

    return _frames_response(content_type, (frame_bytes(f) for f in located))
