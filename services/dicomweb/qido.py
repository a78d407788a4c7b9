"""QIDO-RS (PS3.18 10.6): search at every resource, with C-FIND's matching rules.

Order of results: the order in which the index first recorded each entity
(its primary key), stable across requests, so ``limit``/``offset`` page
through a result without gaps or repeats while nothing new arrives.

No match answers ``200 []`` (PS3.18 allows 200 with an empty array or 204;
dicomweb-client and OHIF handle both, and an empty array is simpler for
scripts). When a result is cut at the server's maximum
(``VNA_QIDO_MAX_RESULTS``) the response carries
``Warning: 299 <host>: "The number of results exceeded the maximum supported
by the server. Additional results can be requested."`` (PS3.18 8.3.4.4.2).

Dates and times match as stored. ``TimezoneOffsetFromUTC`` in a request is
checked (``+HHMM`` or ``-HHMM``; anything else is 400) and otherwise not
applied, as the C-FIND SCP does (and Orthanc, since 2024): most instances carry
no offset of their own, so the archive cannot know which instant a stored date
names. It used to be refused here as an unknown matching key.

Extended query attributes (``VNA_EXTRA_QUERY_ATTRIBUTES``) match like the
index's own; while the values of one a request matches on are still being
backfilled the answer is given all the same, with a 299 Warning saying so.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from services.dicomweb.common import DepsDep, base_url, json_response, warning
from vna.bootstrap import Deps
from vna.dicom.extended import NO_EXTENDED, ExtendedAttributes
from vna.dicom.matching import (
    ATTRIBUTES,
    DEFAULT_RETURN_KEYS,
    LEVEL_ORDER,
    SEQUENCES,
    Level,
    Query,
    QueryError,
    build_query,
    resolve_keyword,
)
from vna.dicom.uids import is_valid_uid
from vna.usecases.search import backfilling, search

router = APIRouter()

_RESERVED = {"limit", "offset", "fuzzymatching", "includefield"}
_SQL_INTEGER_MAX = 2**63 - 1
"""The largest LIMIT or OFFSET SQLite and PostgreSQL take (a signed 64-bit integer)."""
_UTC_OFFSET = re.compile(r"[+-](?:0\d|1[0-4])[0-5]\d")
"""TimezoneOffsetFromUTC (0008,0201): ±HHMM, hours up to 14 (PS3.3 C.12.1.1.8)."""
_RETRIEVE_URL = "00081190"
_INSTANCE_AVAILABILITY = "00080056"
_ONLINE = {"vr": "CS", "Value": ["ONLINE"]}
"""Every stored instance is on line: PS3.18 Tables 10.6.3-3 and -5 ask for Instance
Availability whenever it is known (C-FIND answers it the same)."""


def _require_uid(name: str, value: str) -> None:
    if not is_valid_uid(value):
        raise HTTPException(400, f"{name}: {value!r} is not a valid UID")


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError as exc:
        raise HTTPException(400, f"{name}: {raw!r} is not an integer") from exc
    if value < 0:
        raise HTTPException(400, f"{name}: must not be negative")
    # Beyond what a database integer holds, the answer is the same as at its maximum
    # (nothing skipped past, nothing more returned), not an error.
    return min(value, _SQL_INTEGER_MAX)


def query_from_params(level: Level, request: Request, fixed: dict[str, str] | None = None,
                      *, max_results: int | None = None,
                      extended: ExtendedAttributes = NO_EXTENDED) -> tuple[Query, bool]:
    """A ``Query`` from QIDO-RS parameters and whether the server's maximum caps it.

    ``extended``: the configured extended query attributes, matched and returned
    like the index's own. Raises ``HTTPException(400)`` with the reason when a
    parameter is bad (an attribute neither kept nor configured among them).
    """
    params = request.query_params
    keys: dict[str, str] = {}
    includes: list[str] = []
    for name, value in params.multi_items():
        if name == "includefield":
            includes += [v.strip() for v in value.split(",") if v.strip()]
        elif name not in _RESERVED:
            if name in keys:
                raise HTTPException(400, f"{name}: given more than once")
            keys[name] = value
    for name in [name for name in keys if _names_timezone_offset(name)]:
        given = keys.pop(name).strip()
        if given and not _UTC_OFFSET.fullmatch(given):
            raise HTTPException(400, f"TimezoneOffsetFromUTC: {given!r} is not an offset "
                                     "such as +0100 or -0500")
    # Path UIDs win over query parameters naming the same attribute.
    keys.update(fixed or {})
    fuzzy_raw = params.get("fuzzymatching", "false").lower()
    if fuzzy_raw not in ("true", "false"):
        raise HTTPException(400, f"fuzzymatching: {fuzzy_raw!r} is not true or false")
    limit = _int_param(request, "limit")
    offset = _int_param(request, "offset") or 0
    capped = False
    if max_results is not None and (limit is None or limit > max_results):
        # One more than the maximum tells us whether the result was truncated.
        limit, capped = max_results + 1, True
    try:
        returned = list(DEFAULT_RETURN_KEYS[level])
        for item in includes:
            if item == "all":
                returned += _all_keys(level)
            elif (ext := extended.lookup(item)) is not None:
                returned.append(ext.key)
            else:
                returned.append(resolve_keyword(item))
        query = build_query(level, keys, return_keys=returned, fuzzy=fuzzy_raw == "true",
                            limit=limit, offset=offset, strict=True, extended=extended)
    except QueryError as exc:
        raise HTTPException(400, str(exc)) from exc
    return query, capped


def _names_timezone_offset(name: str) -> bool:
    try:
        return resolve_keyword(name) == "TimezoneOffsetFromUTC"
    except QueryError:
        return False  # build_query says what is wrong with it


def _all_keys(level: Level) -> list[str]:
    """``includefield=all``: every attribute the index keeps at or above ``level``."""
    depth = LEVEL_ORDER.index(level)
    levels = {**{k: a.level for k, a in ATTRIBUTES.items()},
              **{k: s.level for k, s in SEQUENCES.items()}}
    return [k for k, at in levels.items() if LEVEL_ORDER.index(at) <= depth]


def _retrieve_url(root: str, level: Level, obj: dict[str, Any]) -> str | None:
    def uid(tag: str) -> str | None:
        values = obj.get(tag, {}).get("Value")
        return str(values[0]) if values else None

    study, series, sop = uid("0020000D"), uid("0020000E"), uid("00080018")
    if study is None:
        return None
    url = f"{root}/studies/{study}"
    if level is Level.STUDY:
        return url
    if series is None:
        return None
    url += f"/series/{series}"
    if level is Level.SERIES:
        return url
    return f"{url}/instances/{sop}" if sop else None


def _search(query: Query, deps: Deps) -> tuple[list[dict[str, Any]], list[str]]:
    # One trip to the thread pool per request, not one per look-up.
    return search(query, index=deps.index), backfilling(query, index=deps.index)


async def _answer(level: Level, request: Request, deps: Deps,
                  fixed: dict[str, str] | None = None) -> Response:
    max_results = deps.settings.qido_max_results
    query, capped = query_from_params(level, request, fixed, max_results=max_results,
                                      extended=deps.extended)
    results, incomplete = await run_in_threadpool(_search, query, deps)
    host = request.url.hostname or "vna"
    warnings: list[str] = []
    if capped and len(results) > max_results:
        results = results[:max_results]
        warnings.append(warning("The number of results exceeded the maximum supported by "
                                "the server. Additional results can be requested.", host))
    if incomplete:
        warnings.append(warning(f"Values of {', '.join(incomplete)} are still being "
                                "backfilled: the results may be incomplete.", host))
    headers = {"Warning": ", ".join(warnings)} if warnings else {}
    root = base_url(request)
    for obj in results:
        url = _retrieve_url(root, level, obj)
        if url:
            obj[_RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
        if level is not Level.SERIES:  # Table 10.6.3-4 (series) does not list it
            obj[_INSTANCE_AVAILABILITY] = _ONLINE
    return json_response(request, results, headers=headers)


@router.get("/studies")
async def search_for_studies(request: Request, deps: DepsDep) -> Response:
    return await _answer(Level.STUDY, request, deps)


@router.get("/series")
async def search_for_series(request: Request, deps: DepsDep) -> Response:
    return await _answer(Level.SERIES, request, deps)


@router.get("/instances")
async def search_for_instances(request: Request, deps: DepsDep) -> Response:
    return await _answer(Level.IMAGE, request, deps)


@router.get("/studies/{study}/series")
async def search_for_series_in_study(study: str, request: Request,
                                     deps: DepsDep) -> Response:
    _require_uid("StudyInstanceUID", study)
    return await _answer(Level.SERIES, request, deps, {"StudyInstanceUID": study})


@router.get("/studies/{study}/instances")
async def search_for_instances_in_study(study: str, request: Request,
                                        deps: DepsDep) -> Response:
    _require_uid("StudyInstanceUID", study)
    return await _answer(Level.IMAGE, request, deps, {"StudyInstanceUID": study})


@router.get("/studies/{study}/series/{series}/instances")
async def search_for_instances_in_series(study: str, series: str, request: Request,
                                         deps: DepsDep) -> Response:
    _require_uid("StudyInstanceUID", study)
    _require_uid("SeriesInstanceUID", series)
    return await _answer(Level.IMAGE, request, deps,
                         {"StudyInstanceUID": study, "SeriesInstanceUID": series})
