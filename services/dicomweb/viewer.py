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
import re
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
# Files named by their content hash never change: browsers may keep them for good.
_HASHED = re.compile(r"(^|\.)[0-9a-f]{16}\.[a-z0-9]+$")
_IMMUTABLE = "public, max-age=31536000, immutable"
log = logging.getLogger("vna.dicomweb.viewer")


def _media_type(path: Path) -> str:
    return _MEDIA_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or \
        "application/octet-stream"


def _send_file(request: Request, path: Path) -> Response:
    """``path`` (its ``.gz`` sibling when the client takes gzip), with caching headers
    and 304 for a matching ``If-None-Match``."""
    headers = {"Cache-Control": _IMMUTABLE if _HASHED.search(path.name) else "no-cache",
               "Vary": "Accept-Encoding"}
    send = path
    packed = path.with_name(path.name + ".gz")
    if "gzip" in request.headers.get("accept-encoding", "") and packed.is_file():
        send = packed
    response = FileResponse(send, media_type=_media_type(path), headers=headers,
                            stat_result=send.stat())
    if send is packed:
        response.headers["Content-Encoding"] = "gzip"
    etag = response.headers.get("etag", "")
    wanted = request.headers.get("if-none-match", "")
    if etag and etag in (t.strip() for t in wanted.split(",")):
        return Response(status_code=304, headers={"ETag": etag, **headers})
    return response


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
            return _send_file(request, target)
        if "." in Path(path).name:
            return PlainTextResponse("not found\n", status_code=404)
        # One of the viewer's routes: the single page application answers it.
        return _send_file(request, root / "index.html")

    return router
