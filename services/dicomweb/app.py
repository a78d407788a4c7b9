"""HTTP: DICOMweb under /dicomweb, health, readiness and metrics."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vna import metrics
from vna.bootstrap import Deps
from vna.dicom.matching import Level, QueryError, build_query
from vna.ports import Unavailable
from vna.usecases.search import search

DICOM_JSON = "application/dicom+json"
_RESERVED = {"limit", "offset", "fuzzymatching", "includefield"}


def query_from_params(level: Level, request: Request, fixed: dict[str, str] | None = None
                      ) -> Any:
    """A ``Query`` from QIDO-RS parameters; 400 with the reason when they are bad."""
    params = request.query_params
    keys: dict[str, str] = dict(fixed or {})
    includes: list[str] = []
    for name, value in params.multi_items():
        if name == "includefield":
            includes += [v for v in value.split(",") if v]
        elif name not in _RESERVED:
            keys[name] = value
    try:
        limit = int(params["limit"]) if "limit" in params else None
        offset = int(params.get("offset", "0"))
    except ValueError as exc:
        raise HTTPException(400, "limit and offset must be integers") from exc
    fuzzy = params.get("fuzzymatching", "false").lower() == "true"
    try:
        from vna.dicom.matching import DEFAULT_RETURN_KEYS, resolve_keyword

        returned = list(DEFAULT_RETURN_KEYS[level])
        returned += [resolve_keyword(k) for k in includes if k != "all"]
        return build_query(level, keys, return_keys=returned, fuzzy=fuzzy, limit=limit,
                           offset=offset, strict=True)
    except QueryError as exc:
        raise HTTPException(400, str(exc)) from exc


def create_app(deps: Deps) -> FastAPI:
    app = FastAPI(title="VNA", docs_url=None, redoc_url=None)
    app.state.deps = deps

    @app.exception_handler(Unavailable)
    def _unavailable(_request: Request, exc: Unavailable) -> Response:
        return JSONResponse({"detail": "backend unavailable, retry"}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> Response:
        problems = {}
        for name, port in (("blobs", deps.blobs), ("index", deps.index), ("bus", deps.bus),
                           ("cache", deps.cache)):
            try:
                port.check()
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                problems[name] = str(exc)[:200]
        code = 503 if problems else 200
        return JSONResponse({"status": "ready" if not problems else "not ready",
                             "problems": problems}, status_code=code)

    @app.get("/metrics")
    def prometheus() -> Response:
        counts = deps.index.counts()
        metrics.INDEX_LAG.set(counts["unindexed"])
        metrics.QUEUE_DEPTH.set(counts["outbox"] + deps.bus.queue_depth())
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/dicomweb/studies")
    def search_for_studies(request: Request) -> Response:
        query = query_from_params(Level.STUDY, request)
        return JSONResponse(search(query, index=deps.index), media_type=DICOM_JSON)

    @app.get("/dicomweb/studies/{study}/metadata")
    def retrieve_study_metadata(study: str) -> Response:
        docs = deps.index.metadata(study)
        if not docs:
            raise HTTPException(404, "no such study")
        body = "[" + ",".join(docs) + "]"
        return Response(body, media_type=DICOM_JSON)

    @app.get("/dicomweb/studies/{study}")
    def retrieve_study(study: str) -> Response:
        found = deps.index.instances(study_instance_uid=study)
        if not found:
            raise HTTPException(404, "no such study")
        boundary = uuid.uuid4().hex
        keys = [i.blob_key for i in found]

        def parts() -> Iterator[bytes]:
            for key in keys:
                yield (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode()
                with deps.blobs.open(key) as fp:
                    while chunk := fp.read(1 << 20):
                        yield chunk
                yield b"\r\n"
            yield f"--{boundary}--\r\n".encode()

        return StreamingResponse(
            parts(),
            media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
        )

    return app
