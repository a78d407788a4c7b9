"""HTTP: DICOMweb under /dicomweb (QIDO-RS, WADO-RS, STOW-RS), health, readiness, metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from services.dicomweb import qido, rendered, stow, wado
from services.dicomweb.common import PREFIX, warning
from services.dicomweb.sendfile import SendfileExtension
from services.dicomweb.viewer import viewer_router
from vna import metrics
from vna.bootstrap import Deps
from vna.ports import Unavailable

CAPABILITIES: dict[str, object] = {
    "service": "VNA DICOMweb (PS3.18)",
    "qido-rs": {
        "resources": ["/studies", "/series", "/instances", "/studies/{study}/series",
                      "/studies/{study}/instances",
                      "/studies/{study}/series/{series}/instances"],
        "parameters": ["{attribute}={value}", "includefield", "fuzzymatching", "limit",
                       "offset"],
        "order": "the order in which the archive first indexed each entity",
    },
    "wado-rs": {
        "resources": ["/studies/{study}", "/studies/{study}/series/{series}",
                      "/studies/{study}/series/{series}/instances/{instance}",
                      "{any of the above}/metadata",
                      "/studies/{study}/series/{series}/instances/{instance}/frames/{list}",
                      "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}"],
        "rendered": ["{study|series|instance}/rendered", "{instance}/frames/{n}/rendered",
                     "{study|series|instance}/thumbnail"],
        "rendered-media-types": ["image/jpeg", "image/png"],
        "rendered-parameters": ["window", "viewport", "quality"],
        "transfer-syntax": "'*' as stored; a named syntax is transcoded (decode: native, "
                           "JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE; encode: native, RLE, "
                           "JPEG-LS, JPEG 2000, always lossless); 406 when none acceptable",
    },
    "stow-rs": {
        "resources": ["/studies", "/studies/{study}"],
        "media-types": ['multipart/related; type="application/dicom"',
                        'multipart/related; type="application/dicom+json" (bulk data parts '
                        "by Content-Location)"],
    },
}


def served_app(deps: Deps) -> SendfileExtension:
    """The application as uvicorn serves it: with the sendfile extension that WADO-RS
    uses for blobs stored as files (``services.dicomweb.sendfile``)."""
    return SendfileExtension(create_app(deps))


class RefuseNul:
    """A NUL in a URL (``%00``) is no DICOM value and no person's input: 400 with the
    reason, for every route, before a handler hands it to a database that refuses it
    (PostgreSQL, which answered with an internal error). Plain ASGI: nothing added
    to the other requests but the test."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and ("\0" in scope.get("path", "")
                                        or b"%00" in scope.get("query_string", b"")):
            reason = "the URL holds a NUL character (%00)"
            response = JSONResponse({"detail": reason}, status_code=400,
                                    headers={"Warning": warning(reason)})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(deps: Deps) -> FastAPI:
    """The HTTP application over ``deps``; ``deps.extras['on_stored']`` is called after
    a STOW-RS request stored something (the outbox relay's wake-up)."""
    app = FastAPI(title="VNA", docs_url=None, redoc_url=None)
    app.state.deps = deps
    app.add_middleware(RefuseNul)
    origins = [o.strip() for o in deps.settings.cors_origins.split(",") if o.strip()]
    if origins:
        # Viewers served from another origin read these headers too.
        app.add_middleware(CORSMiddleware, allow_origins=origins,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                           expose_headers=["Warning", "ETag", "Content-Range", "Retry-After"])

    @app.exception_handler(Unavailable)
    def _unavailable(_request: Request, exc: Unavailable) -> Response:
        return JSONResponse({"detail": "backend unavailable, retry"}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(HTTPException)
    def _http_error(_request: Request, exc: HTTPException) -> Response:
        # The reason also goes in a Warning header: DICOMweb clients show it (PS3.18 8.6.3).
        headers = dict(exc.headers or {})
        if exc.status_code >= 400 and isinstance(exc.detail, str):
            headers.setdefault("Warning", warning(exc.detail))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=headers)

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
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get(PREFIX)
    def capabilities() -> dict[str, object]:
        """What this server supports, for a person or a client finding its way."""
        return CAPABILITIES

    app.include_router(qido.router, prefix=PREFIX, tags=["QIDO-RS"])
    app.include_router(wado.router, prefix=PREFIX, tags=["WADO-RS"])
    app.include_router(rendered.router, prefix=PREFIX, tags=["WADO-RS rendered"])
    app.include_router(stow.router, prefix=PREFIX, tags=["STOW-RS"])
    app.include_router(viewer_router(deps.settings.viewer_dir))
    _include_worklist(app)
    return app


def _include_worklist(app: FastAPI) -> None:
    """Orders, MPPS and reconciliation under /worklist (the worklist's JSON API)."""
    try:
        from services.worklist.api import PREFIX as WORKLIST
        from services.worklist.api import router
    except ImportError:
        return
    app.include_router(router, prefix=WORKLIST, tags=["Worklist"])
