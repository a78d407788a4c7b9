"""STOW-RS (PS3.18 10.5): multipart/related application/dicom into ``store_instance``.

The body is read as a stream: each part is written to a file in the staging
directory as it arrives, then handed to the same ``store_instance`` C-STORE
uses (in a worker thread: it does blocking I/O and fsyncs). A part that fails
fails alone.

``type="application/dicom+json"``: the application/dicom+json parts hold
instances in the DICOM JSON model (an array, or one object); every other part
is bulk data, staged byte for byte and found by its Content-Location (or
``cid:`` Content-ID) from the instances' BulkDataURIs. Its media type names
the pixel data's transfer syntax (application/octet-stream: uncompressed;
image/jpeg, image/jls, image/jp2, ...: PS3.18 Table 8.7.3-5, or the
``transfer-syntax`` parameter). After the whole body is in, each instance is
made into a Part-10 file (vna/dicom/json_instance.py) and stored through the
same ``store_instance``; one that cannot be built fails alone with 0xC000.
application/dicom+xml is refused with 415. The reasons for failures are also
given, for people, in a Warning header.

FailureReason (0008,1197) per store failure, the DIMSE storage statuses
(PS3.4 B.2.3) the C-STORE SCP answers too:

======================  ======  =========================================
failure                 reason
======================  ======  =========================================
UNAVAILABLE             0xA700  Out of resources: retry later
MISMATCH, INVALID       0xA900  Data set does not match (another study than
                                the URL names; invalid or missing UIDs)
UNREADABLE              0xC000  Cannot understand (not DICOM, truncated,
                                not application/dicom)
SOP_CONFLICT            0xC001  Same SOP Instance UID, different content
PATIENT_CONFLICT        0xC002  Study known under another Patient ID
SERIES_CONFLICT         0xC004  Series known under another Study
======================  ======  =========================================

HTTP status: 200 every instance stored (an identical resend counts as stored),
202 some failed, 409 none stored, 503 with Retry-After when nothing could be
stored because the archive's storage is unavailable, 415 for a body that is
not multipart/related application/dicom, 400 for a malformed body.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from services.dicomweb.common import (
    APPLICATION_DICOM,
    DICOM_JSON,
    OCTET_STREAM,
    DepsDep,
    base_url,
    warning,
)
from services.dicomweb.multipart import MultipartError, Part, parse_content_type, read_parts
from services.dicomweb.negotiation import DEFAULT_FRAME_SYNTAX
from vna.bootstrap import Deps
from vna.dicom import status
from vna.dicom.json_instance import BulkPart, JsonInstanceError, json_uids, write_instance
from vna.dicom.part10 import MAGIC, PREAMBLE, NotPart10Error, read_header
from vna.dicom.uids import is_valid_uid
from vna.usecases.store import (
    Framed,
    Received,
    Staging,
    StoreError,
    StoreFailure,
    store_instance,
)

log = logging.getLogger("vna.dicomweb.stow")
router = APIRouter()

FAILURE_REASON = {
    StoreFailure.UNAVAILABLE: status.OUT_OF_RESOURCES,
    StoreFailure.MISMATCH: status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    StoreFailure.INVALID: status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    StoreFailure.UNREADABLE: status.CANNOT_UNDERSTAND,
    StoreFailure.SOP_CONFLICT: status.DUPLICATE_SOP_INSTANCE_CONFLICT,
    StoreFailure.PATIENT_CONFLICT: status.PATIENT_CONFLICT,
    StoreFailure.SERIES_CONFLICT: status.SERIES_CONFLICT,
}

DICOM_XML = "application/dicom+xml"
_RETRIEVE_URL = "00081190"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_CLASS_UID = "00081150"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"


@dataclass
class _Outcome:
    sop_class_uid: str
    sop_instance_uid: str
    stored: bool
    failure: StoreFailure | None = None
    retrieve_url: str = ""
    reason: str = ""


_NOT_STORED = _Outcome("", "", stored=False, failure=StoreFailure.UNAVAILABLE,
                       reason="not stored")
"""A part's place while it is being stored."""


_PARTS_IN_FLIGHT = 8
"""Parts of one request being stored at once (each in a thread of the pool)."""


class _PartFile:
    """Where one application/dicom part's body goes as it arrives.

    Its File Meta is read from the first bytes; the data set after it then goes
    straight into a ``Staging`` (VNA's File Meta, the data set, hashed as written),
    the file ``store_instance`` takes over as it is, as for C-STORE: one write of
    the bytes, not a part file and then a framed copy of it. A part whose head
    is not a usable File Meta is kept as it came, for ``store_instance`` to frame
    or refuse with its reason.

    Some clients (dicomweb-client through pydicom's ``dcmwrite`` of a data set
    built in memory) send the File Meta group without the 128-byte preamble and
    'DICM'; the preamble is restored here so the part is a Part-10 file again.
    """

    _META_ROOM = 1 << 14
    """The File Meta must be within this many bytes to be framed as it arrives."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path: Path | None = None
        self.fp: BinaryIO | None = None
        self.staging: Staging | None = None
        self.framed: Framed | None = None
        self.uids = ("", "")
        """(SOP Class UID, SOP Instance UID) of its File Meta, for a failure report."""
        self._head: bytearray | None = bytearray()

    def write(self, data: bytes | memoryview, /) -> int:
        if self.staging is not None:
            self.staging.write(data)
        elif self.fp is not None:
            self.fp.write(data)
        else:
            assert self._head is not None
            self._head += data
            if len(self._head) >= self._META_ROOM:
                self._begin(final=False)
        return len(data)

    def _begin(self, *, final: bool) -> None:
        """Frame from here on when the head holds a whole File Meta, else keep it raw."""
        head, self._head = bytes(self._head or b""), None
        if head[128:132] != MAGIC and head[:2] == b"\x02\x00":
            head = PREAMBLE + MAGIC + head
        try:
            header = read_header(io.BytesIO(head))
            # read_header stops at the first element of another group: with less than
            # a tag after its end the group may go on in bytes not here yet.
            if header.dataset_offset + 4 > len(head) and not final:
                raise NotPart10Error("File Meta longer than the head")
            self.uids = (header.sop_class_uid, header.sop_instance_uid)
            self.staging = Staging(self.directory, header.transfer_syntax_uid,
                                   header.sop_class_uid, header.sop_instance_uid)
        except (NotPart10Error, StoreError, ValueError, struct.error):
            fd, name = tempfile.mkstemp(prefix="stow-", suffix=".part", dir=self.directory)
            self.path = Path(name)
            self.fp = os.fdopen(fd, "wb")
            self.fp.write(head)
            return
        self.path = self.staging.path
        self.staging.write(memoryview(head)[header.dataset_offset:])

    def close(self) -> None:
        if self._head is not None:
            self._begin(final=True)
        if self.staging is not None:
            staging, self.staging = self.staging, None
            try:
                self.framed = staging.finish()
            except StoreError:
                self.path = None  # discarded by finish(): stored as an empty part
                raise
        elif self.fp is not None:
            self.fp.close()

    def received(self, study: str | None) -> Received:
        assert self.path is not None
        return Received(path=self.path, framed=self.framed, study_instance_uid=study)

    def discard(self) -> None:
        if self.staging is not None:
            self.staging.discard()
            self.staging = None
        if self.fp is not None:
            with contextlib.suppress(OSError):
                self.fp.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _uids_of(sink: _PartFile) -> tuple[str, str]:
    """(SOP Class UID, SOP Instance UID) from the File Meta, for the failure report."""
    if sink.uids != ("", "") or sink.path is None:
        return sink.uids
    try:
        with open(sink.path, "rb") as fp:
            header = read_header(fp)
    except (NotPart10Error, OSError):
        return "", ""
    return header.sop_class_uid, header.sop_instance_uid


def _store_part(sink: _PartFile, study: str | None, deps: Deps, staging: Path, root: str
                ) -> _Outcome:
    if sink.path is None:  # a framed part that held nothing after its File Meta
        return _Outcome(*sink.uids, stored=False, failure=StoreFailure.UNREADABLE,
                        reason="empty data set")
    return _store(sink.received(study), lambda: _uids_of(sink), deps, staging, root)


def _store(received: Received, uids: Callable[[], tuple[str, str]], deps: Deps,
           staging: Path, root: str) -> _Outcome:
    try:
        result = store_instance(received, blobs=deps.blobs, index=deps.index,
                                staging_dir=staging)
    except StoreError as exc:
        return _Outcome(*uids(), stored=False, failure=exc.failure, reason=exc.reason)
    ref = result.ref
    return _Outcome(
        result.sop_class_uid, ref.sop_instance_uid, stored=True,
        retrieve_url=f"{root}/studies/{ref.study_instance_uid}/series/"
                     f"{ref.series_instance_uid}/instances/{ref.sop_instance_uid}")


def _uid_attr(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def store_response(outcomes: list[_Outcome], study_url: str | None) -> dict[str, Any]:
    """The PS3.18 Table 10.5.3-1 response data set, as DICOM JSON."""
    body: dict[str, Any] = {}
    if study_url:
        body[_RETRIEVE_URL] = {"vr": "UR", "Value": [study_url]}
    failed = [
        {_REFERENCED_SOP_CLASS_UID: _uid_attr(o.sop_class_uid),
         _REFERENCED_SOP_INSTANCE_UID: _uid_attr(o.sop_instance_uid),
         _FAILURE_REASON: {"vr": "US", "Value": [
             FAILURE_REASON[o.failure or StoreFailure.UNREADABLE]]}}
        for o in outcomes if not o.stored
    ]
    stored = [
        {_REFERENCED_SOP_CLASS_UID: _uid_attr(o.sop_class_uid),
         _REFERENCED_SOP_INSTANCE_UID: _uid_attr(o.sop_instance_uid),
         _RETRIEVE_URL: {"vr": "UR", "Value": [o.retrieve_url]}}
        for o in outcomes if o.stored
    ]
    if failed:
        body[_FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
    if stored:
        body[_REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": stored}
    return dict(sorted(body.items()))


class _BulkFile:
    """A bulk data part's body, byte for byte, in a staging file."""

    def __init__(self, directory: Path) -> None:
        fd, name = tempfile.mkstemp(prefix="stow-", suffix=".bulk", dir=directory)
        self.path = Path(name)
        self.fp: BinaryIO = os.fdopen(fd, "wb")

    def write(self, data: bytes | memoryview, /) -> int:
        return self.fp.write(data)

    def close(self) -> None:
        self.fp.close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.fp.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class _JsonBuffer:
    """An application/dicom+json part, in memory up to a limit."""

    LIMIT = 64 * 1024 * 1024

    def __init__(self) -> None:
        self.data = bytearray()
        self.too_large = False

    def write(self, data: bytes | memoryview, /) -> int:
        if len(self.data) + len(data) > self.LIMIT:
            self.too_large = True
        else:
            self.data += data
        return len(data)


def _part_syntax(content_type: str) -> str | None:
    """The transfer syntax a bulk data part's Content-Type names (PS3.18 Table 8.7.3-5)."""
    media, params = parse_content_type(content_type or OCTET_STREAM)
    named = params.get("transfer-syntax")
    if named and named != "*":
        return named
    return DEFAULT_FRAME_SYNTAX.get(media)


def _locations(part: Part) -> list[str]:
    """The names a BulkDataURI may use for this part: Content-Location, cid:Content-ID."""
    out = []
    if part.headers.get("content-location"):
        out.append(part.headers["content-location"])
    content_id = part.headers.get("content-id", "").strip().strip("<>")
    if content_id:
        out.append(f"cid:{content_id}")
    return out


def _store_json_instance(obj: Any, bulk: dict[str, BulkPart], study: str | None, deps: Deps,
                         staging: Path, root: str) -> _Outcome:
    sop_class, sop_uid = json_uids(obj)
    fd, name = tempfile.mkstemp(prefix="stow-", suffix=".dcm", dir=staging)
    os.close(fd)
    path = Path(name)
    try:
        try:
            write_instance(obj, bulk, path)
        except JsonInstanceError as exc:
            log.warning("refused JSON instance: %s", exc, extra={"sop_instance_uid": sop_uid})
            return _Outcome(sop_class, sop_uid, stored=False, failure=StoreFailure.UNREADABLE,
                            reason=str(exc))
        return _store(Received(path=path, study_instance_uid=study),
                      lambda: (sop_class, sop_uid), deps, staging, root)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _stow(request: Request, deps: Deps, study: str | None) -> Response:
    media, params = parse_content_type(request.headers.get("content-type", ""))
    inner = params.get("type", "").lower()
    if media == "multipart/related" and inner == DICOM_XML:
        raise HTTPException(415, "application/dicom+xml is not supported: send "
                                 'type="application/dicom", or type="application/dicom+json" '
                                 "with bulk data parts")
    if media != "multipart/related" or inner not in (APPLICATION_DICOM, DICOM_JSON, ""):
        raise HTTPException(
            415, 'expected Content-Type: multipart/related; type="application/dicom" '
                 '(or type="application/dicom+json" with bulk data parts)')
    json_mode = inner == DICOM_JSON
    boundary = params.get("boundary")
    if not boundary:
        raise HTTPException(400, "multipart/related without a boundary")
    if study is not None and not is_valid_uid(study):
        raise HTTPException(400, f"StudyInstanceUID: {study!r} is not a valid UID")
    staging = deps.staging_dir()
    root = base_url(request)
    outcomes: list[_Outcome] = []
    current: dict[int, _PartFile | _BulkFile | _JsonBuffer] = {}
    # JSON mode: instances wait for the end of the body, when all bulk data is in.
    json_instances: list[Any] = []
    bulk: dict[str, BulkPart] = {}
    bulk_files: list[_BulkFile] = []

    def open_part(part: Part) -> _PartFile | _BulkFile | _JsonBuffer:
        part_media, _ = parse_content_type(part.content_type or inner or APPLICATION_DICOM)
        sink: _PartFile | _BulkFile | _JsonBuffer
        if not json_mode or part_media == APPLICATION_DICOM:
            sink = _PartFile(staging)
        elif part_media == DICOM_JSON:
            sink = _JsonBuffer()
        else:
            sink = _BulkFile(staging)
            bulk_files.append(sink)
        current[id(part)] = sink
        return sink

    async def close_part(part: Part) -> None:
        sink = current.pop(id(part))
        if isinstance(sink, _JsonBuffer):
            _take_json(sink, json_instances, outcomes)
            return
        if isinstance(sink, _BulkFile):
            sink.close()
            entry = BulkPart(sink.path, _part_syntax(part.content_type))
            for location in _locations(part):
                bulk[location] = entry
            return
        try:
            part_media, _ = parse_content_type(part.content_type or APPLICATION_DICOM)
            sink.close()
        except StoreError:
            pass  # nothing after its File Meta: _store_part reports it, in its place
        except BaseException:
            sink.discard()
            raise
        if part_media != APPLICATION_DICOM:
            sink.discard()
            outcomes.append(_Outcome("", "", stored=False, failure=StoreFailure.UNREADABLE,
                                     reason=f"a part of type {part_media} in a request of "
                                            "application/dicom"))
            return
        # Stored while the next parts are read: the claims of one request then share
        # the index's group commits and their fsyncs overlap, instead of one
        # instance's fsyncs after another's. Its outcome keeps the part's place.
        outcomes.append(_NOT_STORED)
        storing.append(asyncio.ensure_future(store_part(sink, len(outcomes) - 1)))
        running = [t for t in storing if not t.done()]
        if len(running) >= _PARTS_IN_FLIGHT:
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)

    async def store_part(sink: _PartFile, slot: int) -> None:
        try:
            outcomes[slot] = await run_in_threadpool(
                _store_part, sink, study, deps, staging, root)
        finally:
            sink.discard()

    storing: list[asyncio.Task[None]] = []
    try:
        try:
            await read_parts(request.stream(), boundary, open_part, close_part)
        finally:
            # Answered only once every part is stored (or failed): acknowledged means durable.
            if storing:
                await asyncio.wait(storing)
        for task in storing:
            task.result()  # an unexpected error in a store fails the request, as before
        for obj in json_instances:
            outcomes.append(await run_in_threadpool(
                _store_json_instance, obj, bulk, study, deps, staging, root))
    except MultipartError as exc:
        raise HTTPException(400, f"malformed multipart body: {exc}") from exc
    finally:
        for sink in current.values():
            if not isinstance(sink, _JsonBuffer):
                sink.discard()
        for bulk_file in bulk_files:
            bulk_file.discard()
    if not outcomes:
        raise HTTPException(400, "the request holds no part")
    stored = sum(o.stored for o in outcomes)
    if stored:
        _wake(deps.extras.get("on_stored"))
    study_url = f"{root}/studies/{study}" if study else None
    body = store_response(outcomes, study_url)
    headers: dict[str, str] = {}
    reasons = sorted({o.reason for o in outcomes if not o.stored and o.reason})
    if reasons:
        # FailureReason is a code; the words go in a Warning for people (PS3.18 8.6.3).
        headers["Warning"] = warning("; ".join(reasons[:3])[:900])
    if stored == len(outcomes):
        code = 200
    elif stored:
        code = 202
    elif all(o.failure is StoreFailure.UNAVAILABLE for o in outcomes):
        code = 503
        headers["Retry-After"] = "5"
    else:
        code = 409
    log.info("stow", extra={"parts": len(outcomes), "stored": stored, "status": code})
    return JSONResponse(body, status_code=code, media_type=DICOM_JSON, headers=headers)


def _take_json(buffer: _JsonBuffer, instances: list[Any], outcomes: list[_Outcome]) -> None:
    """The instances of an application/dicom+json part (an array, or one object)."""
    if buffer.too_large:
        outcomes.append(_Outcome("", "", stored=False, failure=StoreFailure.UNREADABLE,
                                 reason="application/dicom+json part larger than "
                                        f"{_JsonBuffer.LIMIT} bytes"))
        return
    try:
        parsed = json.loads(bytes(buffer.data))
    except (ValueError, UnicodeDecodeError) as exc:
        outcomes.append(_Outcome("", "", stored=False, failure=StoreFailure.UNREADABLE,
                                 reason=f"application/dicom+json part is not JSON: {exc}"))
        return
    instances.extend(parsed if isinstance(parsed, list) else [parsed])


def _wake(hook: Callable[[], None] | None) -> None:
    if hook is not None:
        try:
            hook()
        except Exception:
            log.exception("on_stored hook failed")


@router.post("/studies")
async def store_instances(request: Request, deps: DepsDep) -> Response:
    return await _stow(request, deps, None)


@router.post("/studies/{study}")
async def store_instances_in_study(study: str, request: Request,
                                   deps: DepsDep) -> Response:
    return await _stow(request, deps, study)
