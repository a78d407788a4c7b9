"""Query/Retrieve SCP: C-FIND, C-MOVE and C-GET on the archive's AE (PS3.4 Annex C).

C-FIND shares the matching module and the one query function with QIDO-RS;
C-MOVE and C-GET send the stored Part-10 files as they are (pristine data:
the data set bytes that were received are the bytes that go out).

Handlers are plain functions with the event first; dependencies are bound
keyword-only with ``functools.partial`` by :func:`register_query_retrieve`.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    StoragePresentationContexts,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from services.ingest.scp import ACCEPTED_TRANSFER_SYNTAXES
from vna.bootstrap import Deps
from vna.dicom import status
from vna.dicom.extended import NO_EXTENDED, ExtendedAttribute, ExtendedAttributes, element_of
from vna.dicom.json_model import dataset_from_json
from vna.dicom.matching import SEQUENCES, Level, Query, QueryError, build_query
from vna.dicom.uids import is_valid_uid
from vna.model import StoredInstance
from vna.ports import Unavailable
from vna.usecases.corrected import Overlays, corrected_copy
from vna.usecases.search import backfilling, search

log = logging.getLogger("vna.qr")

PATIENT_ROOT = {
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
}
FIND_MODELS = (PatientRootQueryRetrieveInformationModelFind,
               StudyRootQueryRetrieveInformationModelFind)
MOVE_MODELS = (PatientRootQueryRetrieveInformationModelMove,
               StudyRootQueryRetrieveInformationModelMove)
GET_MODELS = (PatientRootQueryRetrieveInformationModelGet,
              StudyRootQueryRetrieveInformationModelGet)

UNIQUE_KEY = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}

# Request keys that are not matching keys: answered by the SCP itself.
# (TimezoneOffsetFromUTC is returned as kept, never matched: see RETURN_ONLY.)
_NOT_MATCHING = {
    "QueryRetrieveLevel", "SpecificCharacterSet", "QueryRetrieveView",
    "RetrieveAETitle", "InstanceAvailability",
}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_TEXT_VRS = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}

Handlers = list[tuple[Any, Callable[..., Any]]]


class LevelError(QueryError):
    """The Query/Retrieve Level is missing, unknown or not part of the information model."""


class RetrieveRequestError(Exception):
    """A C-MOVE/C-GET identifier that names nothing retrievable; ``code`` is the status."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# ------------------------------------------------------------------ registration
def register_query_retrieve(ae: AE, handlers: Handlers, deps: Deps) -> None:
    """Add the Q/R presentation contexts to ``ae`` and the C-FIND/MOVE/GET handlers."""
    for model in (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS):
        ae.add_supported_context(model, ALL_TRANSFER_SYNTAXES)
    # C-GET sends over the requester's own association, on storage contexts in
    # which the requester is the SCP: accept that role (and the usual one).
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), ACCEPTED_TRANSFER_SYNTAXES,
                                 scu_role=True, scp_role=True)
    _install_stored_file_sending()
    _nodelay_on_outgoing_associations(ae)
    bind_for_sop_classes(handlers, evt.EVT_C_FIND, FIND_MODELS, partial(handle_find, deps=deps))
    bind_for_sop_classes(handlers, evt.EVT_C_MOVE, MOVE_MODELS, partial(handle_move, deps=deps))
    bind_for_sop_classes(handlers, evt.EVT_C_GET, GET_MODELS, partial(handle_get, deps=deps))


def _nodelay_on_outgoing_associations(ae: AE) -> None:
    """Set TCP_NODELAY on the sockets of associations ``ae`` requests (C-MOVE).

    Without it each C-STORE sub-operation waits on Nagle's algorithm and the
    peer's delayed ACK (tens of milliseconds per instance); pynetdicom has no
    socket-options hook, so the AE's socket factory is wrapped.
    """
    create = ae._create_socket

    def create_socket(assoc: Association, address: Any, tls_args: Any) -> Any:
        sock = create(assoc, address, tls_args)
        if sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    ae._create_socket = create_socket  # type: ignore[method-assign]


def bind_for_sop_classes(handlers: Handlers, event_type: Any, sop_classes: tuple[str, ...],
                         handler: Callable[..., Any]) -> None:
    """Bind ``handler`` for requests of ``sop_classes`` only.

    pynetdicom keeps one handler per intervention event, and C-FIND also carries
    Modality Worklist queries: a handler already bound for ``event_type`` keeps
    every request of another SOP class.
    """
    previous = [h for e, h in handlers if e is event_type]
    handlers[:] = [(e, h) for e, h in handlers if e is not event_type]
    if not previous:
        handlers.append((event_type, handler))
        return
    fallback = previous[-1]
    mine = {str(uid) for uid in sop_classes}

    def route(event: evt.Event) -> Any:
        if str(event.request.AffectedSOPClassUID) in mine:
            return handler(event)
        return fallback(event)

    handlers.append((event_type, route))


# ------------------------------------------------------------------ identifiers
def _level(identifier: Dataset, sop_class: str) -> Level:
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    try:
        level = Level(raw)
    except ValueError:
        raise LevelError(f"QueryRetrieveLevel {raw!r} is not PATIENT/STUDY/SERIES/IMAGE"
                         ) from None
    if level is Level.PATIENT and sop_class not in PATIENT_ROOT:
        raise LevelError("PATIENT level is not part of the Study Root model")
    return level


def _as_text(elem: DataElement) -> str:
    value = elem.value
    if value is None or elem.VR == "SQ" or elem.VR in _BINARY_VRS:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join("" if v is None else str(v) for v in value)
    return str(value)


def identifier_keys(identifier: Dataset, extended: ExtendedAttributes = NO_EXTENDED
                    ) -> dict[str, str]:
    """Matching and return keys of a request identifier: keyword -> raw value.

    Multiple values are joined with backslashes (UID lists), person names are
    given as their string form; binary values are return keys only, and so are
    sequences, but for the item attributes of a sequence the index matches on
    (``Sequence.Item`` keys, PS3.4 C.2.2.2.6: a sequence key has one item).
    Private elements count when they are configured extended attributes (by key).
    """
    keys: dict[str, str] = {}
    for elem in identifier:
        if elem.tag.group in (0x0000, 0x0002) or elem.tag.is_private:
            continue
        keyword = elem.keyword
        if not keyword or keyword in _NOT_MATCHING:
            continue
        keys[keyword] = _as_text(elem)
        if keyword in SEQUENCES and elem.value is not None and len(elem.value) == 1:
            for item_elem in elem.value[0]:
                if item_elem.keyword in SEQUENCES[keyword].item_keys:
                    keys[f"{keyword}.{item_elem.keyword}"] = _as_text(item_elem)
    for _creator, elem, attr in private_keys(identifier, extended):
        keys[attr.key] = _private_text(elem)
    return keys


PrivateKey = tuple[DataElement, DataElement, ExtendedAttribute]


def private_keys(identifier: Dataset, extended: ExtendedAttributes) -> list[PrivateKey]:
    """(creator element, element, attribute) of each configured private key requested."""
    out: list[PrivateKey] = []
    if not any(a.private for a in extended):
        return out
    for elem in identifier:
        tag = elem.tag
        if not tag.is_private or tag.element < 0x1000:
            continue
        creator = identifier.get((tag.group, tag.element >> 8))
        if creator is None:
            continue
        attr = extended.lookup(
            f"{tag.group:04X}xx{tag.element & 0xFF:02X}@{_private_text(creator).strip()}")
        if attr is not None:
            out.append((creator, elem, attr))
    return out


def _private_text(elem: DataElement) -> str:
    # Implicit VR: a private element the dictionary does not know arrives as UN bytes.
    if isinstance(elem.value, bytes):
        return elem.value.decode("latin-1").rstrip("\x00 ")
    return _as_text(elem)


# ------------------------------------------------------------------ C-FIND
def handle_find(event: evt.Event, *, deps: Deps) -> Iterator[tuple[Any, Dataset | None]]:
    """C-FIND (Patient Root and Study Root): one pending response per match."""
    sop_class = str(event.request.AffectedSOPClassUID)
    try:
        identifier = event.identifier
        level = _level(identifier, sop_class)
        keys = identifier_keys(identifier, deps.extended)
        private = private_keys(identifier, deps.extended)
        query = build_query(level, keys, strict=False, patient_root=sop_class in PATIENT_ROOT,
                            extended=deps.extended)
        results = search(query, index=deps.index)
    except QueryError as exc:
        yield status.response(_find_failure_code(exc), str(exc)), None
        return
    except Unavailable:
        log.warning("C-FIND: index unavailable")
        yield status.response(status.FIND_OUT_OF_RESOURCES, "index unavailable, retry later"), None
        return
    except Exception as exc:  # noqa: BLE001 - an undecodable identifier is the peer's error
        log.warning("C-FIND: cannot process identifier (%s)", type(exc).__name__)
        yield status.response(status.UNABLE_TO_PROCESS, "identifier cannot be processed"), None
        return
    requested = [elem for elem in identifier
                 if elem.keyword and elem.keyword not in ("QueryRetrieveLevel",
                                                          "SpecificCharacterSet")
                 and elem.tag.group not in (0x0000, 0x0002) and not elem.tag.is_private]
    charset = identifier.get("SpecificCharacterSet")
    log.info("C-FIND", extra={"query_level": str(level), "matches": len(results)})
    incomplete = _backfilling(query, deps)
    if incomplete:
        # DIMSE has no warning for partial results: answered all the same, and logged.
        log.warning("C-FIND on attributes still being backfilled",
                    extra={"attributes": incomplete})
    for result in results:
        if event.is_cancelled:
            yield status.CANCEL, None
            return
        yield status.PENDING, find_response(result, level, requested, charset,
                                            ae_title=deps.settings.ae_title, private=private)
    yield status.SUCCESS, None


def _backfilling(query: Query, deps: Deps) -> list[str]:
    try:
        return backfilling(query, index=deps.index)
    except Exception:  # noqa: BLE001 - a log line must not fail the answer
        return []


def _find_failure_code(exc: QueryError) -> int:
    # A wrong level or model is an identifier that does not fit the SOP class;
    # a bad value (date range, UID) is one the SCP cannot process.
    return (status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS if isinstance(exc, LevelError)
            else status.UNABLE_TO_PROCESS)


def _without_bulk_data(obj: dict[str, Any]) -> dict[str, Any]:
    """DICOM JSON with BulkDataURIs emptied (a C-FIND answer never carries bulk data)."""
    out: dict[str, Any] = {}
    for tag, attr in obj.items():
        if "BulkDataURI" in attr:
            out[tag] = {"vr": attr.get("vr", "UN")}
        elif attr.get("vr") == "SQ" and "Value" in attr:
            out[tag] = {"vr": "SQ", "Value": [_without_bulk_data(i) for i in attr["Value"]]}
        else:
            out[tag] = attr
    return out


def find_response(result: dict[str, Any], level: Level, requested: list[DataElement],
                  charset: Any, *, ae_title: str, private: list[PrivateKey] | None = None
                  ) -> Dataset:
    """The response identifier for one match: every requested key, nothing else.

    Requested keys the archive has no value for are returned empty (universal
    matching); the unique key of the level is always returned. ``private``
    extended attributes are returned under the tags the request used.
    """
    found = dataset_from_json(_without_bulk_data(result))
    rsp = Dataset()
    for elem in requested:
        if elem.keyword == "RetrieveAETitle":
            rsp.RetrieveAETitle = ae_title
        elif elem.keyword == "InstanceAvailability":
            rsp.InstanceAvailability = "ONLINE"
        elif elem.tag in found:
            rsp[elem.tag] = found[elem.tag]
        else:
            rsp[elem.tag] = DataElement(elem.tag, elem.VR, [] if elem.VR == "SQ" else None)
    for creator, elem, attr in private or []:
        rsp[creator.tag] = DataElement(creator.tag, "LO", attr.creator)
        stored = element_of(attr, result)
        value = None
        if stored is not None:
            creator_tag, tag, value_json = stored
            value = dataset_from_json({creator_tag: result[creator_tag], tag: value_json}
                                      )[int(tag, 16)].value
        rsp[elem.tag] = DataElement(elem.tag, attr.vr, value)
    unique = Tag(UNIQUE_KEY[level])
    if unique not in rsp and unique in found:
        rsp[unique] = found[unique]
    rsp.QueryRetrieveLevel = str(level)
    response_charset = _response_charset(rsp, charset)
    if response_charset is not None:
        rsp.SpecificCharacterSet = response_charset
    return rsp


def _response_charset(rsp: Dataset, requested: Any) -> Any:
    """The Specific Character Set the response values can be encoded in.

    The requester's own character set when it can carry every value, UTF-8
    (ISO_IR 192) otherwise; none at all when everything is ASCII and none was sent.
    """
    texts = [str(e.value) for e in rsp.iterall() if e.VR in _TEXT_VRS and e.value]
    if all(t.isascii() for t in texts):
        return requested
    if requested:
        values = list(requested) if isinstance(requested, MultiValue | list) else [requested]
        codecs = convert_encodings([str(v) for v in values])
        # Single-byte character sets only: ISO 2022 code extensions need escapes.
        if len(codecs) == 1:
            try:
                for t in texts:
                    t.encode(codecs[0])
                return requested
            except (UnicodeEncodeError, LookupError):
                pass
    return "ISO_IR 192"


# ------------------------------------------------------------------ retrieval
def _uids(identifier: Dataset, keyword: str) -> list[str]:
    elem = identifier.get(keyword)
    if elem is None:
        return []
    values = elem if isinstance(elem, MultiValue | list) else str(elem).split("\\")
    return [str(v).strip() for v in values if str(v).strip()]


def instances_to_retrieve(identifier: Dataset, sop_class: str, *, deps: Deps
                          ) -> list[StoredInstance]:
    """The stored instances a C-MOVE/C-GET identifier names (UID lists allowed)."""
    try:
        level = _level(identifier, sop_class)
    except QueryError as exc:
        raise RetrieveRequestError(status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)
                                   ) from None
    unique = UNIQUE_KEY[level]
    wanted = _uids(identifier, unique)
    if not wanted:
        raise RetrieveRequestError(status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                                   f"{unique} is required at the {level} level")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        for uid in _uids(identifier, keyword):
            if not is_valid_uid(uid):
                raise RetrieveRequestError(status.UNABLE_TO_PROCESS,
                                           f"{keyword}: not a valid UID")
    # Higher-level keys narrow the match (they must agree with the lower ones).
    patient_id = str(identifier.get("PatientID", "") or "") or None
    studies = _uids(identifier, "StudyInstanceUID") if level is not Level.STUDY else []
    series = _uids(identifier, "SeriesInstanceUID") if level is Level.IMAGE else []
    found: dict[str, StoredInstance] = {}
    for uid in wanted:
        kwargs: dict[str, str | None] = {"patient_id": patient_id}
        if level is Level.PATIENT:
            kwargs["patient_id"] = uid
        elif level is Level.STUDY:
            kwargs["study_instance_uid"] = uid
        elif level is Level.SERIES:
            kwargs["series_instance_uid"] = uid
        else:
            kwargs["sop_instance_uid"] = uid
        for inst in deps.index.instances(**kwargs):
            if studies and inst.ref.study_instance_uid not in studies:
                continue
            if series and inst.ref.series_instance_uid not in series:
                continue
            found.setdefault(inst.ref.sop_instance_uid, inst)
    return list(found.values())


class StoredFile(Dataset):
    """A stored Part-10 file to send as a C-STORE sub-operation, bytes untouched.

    pynetdicom's retrieve service classes only pass ``Dataset`` objects on; this
    one carries the path of the file, and :func:`_install_stored_file_sending`
    makes ``Association.send_c_store`` send the file's data set without decoding
    it. It holds only the SOP Class and Instance UIDs (for the failed list).
    """

    def __init__(self, inst: StoredInstance, path: Path | None) -> None:
        super().__init__()
        self.SOPClassUID = inst.sop_class_uid
        self.SOPInstanceUID = inst.ref.sop_instance_uid
        object.__setattr__(self, "stored_path", path)


_original_send_c_store: Callable[..., Dataset] | None = None


def _install_stored_file_sending() -> None:
    """Let ``Association.send_c_store`` send a :class:`StoredFile` from its path.

    With ``STORE_SEND_CHUNKED_DATASET`` (set by the ingest SCP) a path is sent in
    chunks straight from disk, the data set bytes exactly as stored. When the
    peer accepted no context in the stored transfer syntax, the file is decoded
    once so that pynetdicom can convert between uncompressed syntaxes. Every
    other caller of ``send_c_store`` is unaffected.
    """
    global _original_send_c_store
    if _original_send_c_store is not None:
        return
    original = Association.send_c_store
    _original_send_c_store = original

    def send_c_store(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        if not isinstance(dataset, StoredFile):
            return original(self, dataset, *args, **kwargs)
        path: Path | None = getattr(dataset, "stored_path", None)
        if path is None or not path.exists():
            raise FileNotFoundError("stored object is not readable")
        try:
            return original(self, path, *args, **kwargs)
        except ValueError:
            # No exact presentation context: decode and let pynetdicom convert.
            from pydicom import dcmread

            return original(self, dcmread(path), *args, **kwargs)

    Association.send_c_store = send_c_store  # type: ignore[method-assign]


def _sub_operations(instances: list[StoredInstance], event: evt.Event, *, deps: Deps
                    ) -> Iterator[tuple[int, Dataset | None]]:
    """One pending (status, StoredFile) per instance; temporary copies are removed.

    Instances of a corrected study are sent as a corrected copy (issue #4).
    """
    overlay_of = Overlays(deps.index)
    for inst in instances:
        if event.is_cancelled:
            yield status.CANCEL, None
            return
        local = _local_path(inst, deps, overlay_of)
        path, temporary = local if local is not None else (None, False)
        try:
            # An unreadable object is still yielded: its send fails and is counted.
            yield status.PENDING, StoredFile(inst, path)
        finally:
            if temporary and path is not None:
                path.unlink(missing_ok=True)


def _local_path(inst: StoredInstance, deps: Deps, overlay_of: Overlays | None = None
                ) -> tuple[Path, bool] | None:
    """A local path of the stored file and whether it is a temporary copy."""
    try:
        overlay = overlay_of(inst.ref.study_instance_uid) if overlay_of else {}
        if overlay:
            fd, name = tempfile.mkstemp(prefix="vna-corrected-", suffix=".dcm",
                                        dir=_temp_dir(deps))
            with os.fdopen(fd, "wb") as out:
                out.write(corrected_copy(inst.blob_key, overlay, blobs=deps.blobs))
            return Path(name), True
        path = deps.blobs.local_path(inst.blob_key)
        if path is not None:
            return path, False
        # A store without local files (S3): copy to a temporary file for this send.
        fd, name = tempfile.mkstemp(prefix="vna-retrieve-", suffix=".dcm",
                                    dir=_temp_dir(deps))
        with os.fdopen(fd, "wb") as out, deps.blobs.open(inst.blob_key) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        return Path(name), True
    except (KeyError, OSError, Unavailable, ValueError, InvalidDicomError) as exc:
        log.warning("retrieve: stored object unreadable (%s)", type(exc).__name__,
                    extra={"blob_key": inst.blob_key})
        return None


def _temp_dir(deps: Deps) -> Path:
    path = deps.settings.data_dir / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def move_contexts(instances: list[StoredInstance]) -> list[PresentationContext]:
    """Contexts to propose to a C-MOVE destination: each stored (SOP class, syntax).

    Uncompressed objects are also offered in Explicit and Implicit VR Little
    Endian, so a destination that refuses the stored syntax can still receive
    them. At most 128 contexts can be proposed (PS3.8 9.3.2.2).
    """
    pairs: dict[tuple[str, str], None] = {}
    for inst in instances:
        pairs.setdefault((inst.sop_class_uid, inst.transfer_syntax_uid), None)
    contexts: list[PresentationContext] = [build_context(a, t) for a, t in pairs]
    fallbacks: dict[str, None] = {}
    for sop_class, ts in pairs:
        if not UID(ts).is_compressed:
            fallbacks.setdefault(sop_class, None)
    for sop_class in fallbacks:
        contexts.append(build_context(sop_class, [ExplicitVRLittleEndian,
                                                  ImplicitVRLittleEndian]))
    if len(contexts) > 128:
        log.warning("retrieve: more than 128 presentation contexts needed; some "
                    "instances will fail", extra={"contexts": len(contexts)})
    return contexts[:128]


def refusal_contexts() -> list[PresentationContext]:
    """Contexts for the empty association pynetdicom opens to the destination before
    it answers a refused C-MOVE: Verification and the common storage classes. Were it
    Verification alone, a destination that accepts only storage would reject the
    association, and pynetdicom would answer 0xA801 (destination unknown) instead of
    the reason the request was refused."""
    return [build_context(Verification)] + [
        build_context(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
        for cx in StoragePresentationContexts[:127]]


def _retrieve_failure(exc: RetrieveRequestError | Unavailable) -> Dataset:
    if isinstance(exc, RetrieveRequestError):
        return status.response(exc.code, exc.reason)
    log.warning("retrieve: index unavailable")
    return status.response(status.MOVE_OUT_OF_RESOURCES_SUBOPERATIONS,
                           "index unavailable, retry later")


def handle_move(event: evt.Event, *, deps: Deps) -> Iterator[Any]:
    """C-MOVE: send the identified instances to a destination named in VNA_PEERS.

    Yields the destination ``(host, port, {contexts})`` (``(None, None)`` when
    unknown: 0xA801), then the number of sub-operations, then one pending
    ``(status, StoredFile)`` per instance; pynetdicom sends them and reports
    the counts in every pending response.
    """
    destination = str(event.move_destination or "").strip()
    peers = deps.settings.peer_table()
    if destination not in peers:
        log.warning("C-MOVE: unknown destination", extra={"destination": destination})
        yield None, None
        return
    host, port = peers[destination]
    sop_class = str(event.request.AffectedSOPClassUID)
    try:
        instances = instances_to_retrieve(event.identifier, sop_class, deps=deps)
    except (RetrieveRequestError, Unavailable) as exc:
        # pynetdicom answers a failure only after the destination and one
        # sub-operation are announced; the association it opens carries nothing.
        yield host, port, {"contexts": refusal_contexts()}
        yield 1
        yield _retrieve_failure(exc), None
        return
    yield host, port, {"contexts": move_contexts(instances)}
    yield len(instances)
    log.info("C-MOVE", extra={"destination": destination, "instances": len(instances)})
    yield from _sub_operations(instances, event, deps=deps)


def handle_get(event: evt.Event, *, deps: Deps) -> Iterator[Any]:
    """C-GET: send the identified instances back over the requester's association."""
    sop_class = str(event.request.AffectedSOPClassUID)
    try:
        instances = instances_to_retrieve(event.identifier, sop_class, deps=deps)
    except (RetrieveRequestError, Unavailable) as exc:
        yield 1
        yield _retrieve_failure(exc), None
        return
    yield len(instances)
    log.info("C-GET", extra={"instances": len(instances)})
    yield from _sub_operations(instances, event, deps=deps)
