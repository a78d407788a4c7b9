"""What the DICOMweb routers share: dependencies, media types, Accept negotiation."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import Response

from services.dicomweb.multipart import parse_content_type
from vna.bootstrap import Deps

DICOM_JSON = "application/dicom+json"
APPLICATION_DICOM = "application/dicom"
OCTET_STREAM = "application/octet-stream"
PREFIX = "/dicomweb"

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
NATIVE_TRANSFER_SYNTAXES = {
    IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
}

# PS3.18 Table 8.7.3-5: the media type of a compressed frame, by transfer syntax.
FRAME_MEDIA_TYPE = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


def warning(text: str, agent: str = "VNA") -> str:
    """A ``Warning`` header value (PS3.18 8.6.3, RFC 7234 5.5) carrying ``text``:
    one line of printable ASCII, its own quotes made single. A reason may quote what
    the client sent, and a control character in a header value is refused by the
    HTTP server, which then drops the connection instead of answering."""
    line = " ".join(text.replace('"', "'").split())
    return f'299 {agent}: "' + "".join(c if " " <= c <= "~" else "?" for c in line) + '"'


def get_deps(request: Request) -> Deps:
    deps: Deps = request.app.state.deps
    return deps


DepsDep = Annotated[Deps, Depends(get_deps)]
"""The archive's ports, injected into route functions."""


def base_url(request: Request) -> str:
    """The absolute DICOMweb root as this client reached it (for RetrieveURL)."""
    return str(request.base_url).rstrip("/") + PREFIX


@dataclass(frozen=True)
class MediaRange:
    """One acceptable representation from ``Accept``: multipart/related's ``type`` unwrapped."""

    media_type: str
    transfer_syntax: str | None
    multipart: bool
    q: float = 1.0


def accepted(request: Request) -> list[MediaRange]:
    """The media ranges of ``Accept`` with q > 0, in the client's order (none: empty).

    ``by_preference`` orders them by q-value.
    """
    header = request.headers.get("accept", "").strip()
    out: list[MediaRange] = []
    if not header:
        return out
    for item in _split_accept(header):
        media, params = parse_content_type(item)
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            continue
        if q <= 0:
            continue
        if media == "multipart/related":
            inner = params.get("type", "*/*").lower()
            out.append(MediaRange(inner, params.get("transfer-syntax"), True, q))
        else:
            out.append(MediaRange(media, params.get("transfer-syntax"), False, q))
    return out


def by_preference(ranges: list[MediaRange]) -> list[MediaRange]:
    """Highest q-value first; equal q-values keep the client's order."""
    return sorted(ranges, key=lambda r: -r.q)


def _split_accept(header: str) -> list[str]:
    """Split on commas outside quotes (a quoted ``type`` may not hold one, but be safe)."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in header:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    items.append("".join(current).strip())
    return [i for i in items if i]


def media_matches(pattern: str, media_type: str) -> bool:
    if pattern in ("*/*", "*"):
        return True
    if pattern.endswith("/*"):
        return media_type.startswith(pattern[:-1])
    return pattern == media_type


_GZIP_MIN = 1024


def json_bytes_response(request: Request, body: bytes, *, status_code: int = 200,
                        headers: dict[str, str] | None = None,
                        media_type: str = DICOM_JSON) -> Response:
    """A JSON body, gzip-compressed when the client accepts it.

    Only JSON is compressed: DICOM and pixel data are already dense, and
    compressing them would cost CPU for nothing (so no GZipMiddleware).
    """
    out_headers = dict(headers or {})
    out_headers["Vary"] = "Accept-Encoding"
    if len(body) >= _GZIP_MIN and "gzip" in request.headers.get("accept-encoding", ""):
        body = gzip.compress(body, compresslevel=1)
        out_headers["Content-Encoding"] = "gzip"
    return Response(body, status_code=status_code, media_type=media_type, headers=out_headers)


def json_response(request: Request, content: Any, *, status_code: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()
    return json_bytes_response(request, body, status_code=status_code, headers=headers)
