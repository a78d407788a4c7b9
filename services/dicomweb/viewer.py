"""The OHIF viewer at /viewer: its installed build, its app-config.js, SPA deep links.

The build is installed by ``python -m vna.viewer install`` (``make viewer``,
``make run``) into ``VNA_VIEWER_DIR``; it is looked up on each request, so a
viewer installed while the archive runs is served without a restart. Paths
that name no file and have no extension are the viewer's own routes
(``/viewer/viewer?StudyInstanceUIDs=…``) and get ``index.html``.
"""

from __future__ import annotations

import logging
import mimetypes
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response

from vna.viewer import HOW_TO_ADD, VIEWER_PATH, app_config_js, installed

# Not every machine's mime.types knows these; a wrong type breaks wasm streaming.
_MEDIA_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
                ".wasm": "application/wasm", ".json": "application/json",
                ".map": "application/json", ".woff2": "font/woff2", ".svg": "image/svg+xml",
                ".html": "text/html; charset=utf-8"}
_NO_CACHE = {"Cache-Control": "no-cache"}
log = logging.getLogger("vna.dicomweb.viewer")


def _media_type(path: Path) -> str:
    return _MEDIA_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or \
        "application/octet-stream"


def viewer_router(directory: Path) -> APIRouter:
    """Routes under ``/viewer`` serving the build in ``directory``."""
    router = APIRouter(include_in_schema=False)
    root = directory.resolve()
    config = app_config_js()
    if installed(root) is None:
        log.warning("no viewer in %s: %s", root, HOW_TO_ADD)

    def not_installed() -> Response:
        return PlainTextResponse(HOW_TO_ADD + "\n", status_code=404, headers=_NO_CACHE)

    @router.get(VIEWER_PATH)
    def viewer_root() -> Response:
        return RedirectResponse(VIEWER_PATH + "/", status_code=308)

    @router.get(VIEWER_PATH + "/app-config.js")
    def viewer_config() -> Response:
        return Response(config, media_type="text/javascript", headers=_NO_CACHE)

    @router.api_route(VIEWER_PATH + "/{path:path}", methods=["GET", "HEAD"])
    def viewer_file(path: str, request: Request) -> Response:
        if installed(root) is None:
            return not_installed()
        target = (root / path).resolve()
        if not target.is_relative_to(root):
            return PlainTextResponse("not found\n", status_code=404)
        if target.is_file():
            headers = _NO_CACHE if target.suffix == ".html" else None
            return FileResponse(target, media_type=_media_type(target), headers=headers)
        if "." in Path(path).name:
            return PlainTextResponse("not found\n", status_code=404)
        # One of the viewer's routes: the single page application answers it.
        return FileResponse(root / "index.html", media_type=_MEDIA_TYPES[".html"],
                            headers=_NO_CACHE)

    return router
