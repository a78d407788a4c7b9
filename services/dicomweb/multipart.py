"""multipart/related (RFC 2387) for DICOMweb: a streaming reader and part framing.

The reader never holds a whole part in memory: bytes go to a sink as they
arrive, keeping back only as many as could be the start of the next boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from typing import Protocol


class MultipartError(ValueError):
    """The body is not well-formed multipart; the message says why."""


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """(media type in lower case, parameters with unquoted values and lower-case names)."""
    msg = Message()
    msg["content-type"] = value
    media = msg.get_content_type().lower()
    params: dict[str, str] = {}
    for name, val in (msg.get_params() or [])[1:]:
        params[name.lower()] = str(val).strip('"')
    return media, params


class PartSink(Protocol):
    def write(self, data: bytes | memoryview, /) -> int:
        """Take ``data`` now: it is a view of the reader's buffer, valid for the call."""
        ...


def _emit(sink: PartSink, buf: bytearray, end: int) -> None:
    """Hand ``buf[:end]`` to ``sink`` without copying it (twice, as bytes(buf[:end]) did)."""
    with memoryview(buf) as view, view[:end] as piece:
        sink.write(piece)


@dataclass
class Part:
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


_MAX_HEADER_BYTES = 16 * 1024


async def read_parts(
    chunks: AsyncIterator[bytes],
    boundary: str,
    open_part: Callable[[Part], PartSink],
    close_part: Callable[[Part], object],
) -> int:
    """Feed every part's body to the sink ``open_part`` returns; ``close_part`` at its end.

    ``close_part`` may return an awaitable, which is awaited before the next part
    is read (so that parts are processed in order, with back-pressure).
    Returns the number of parts.
    """
    import inspect

    # The first boundary may come without the CRLF that precedes the others.
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    buf = bytearray(b"\r\n")
    state = "preamble"
    part: Part | None = None
    sink: PartSink | None = None
    count = 0
    keep = len(delimiter) + 2
    ended = False

    async def finish_part() -> None:
        nonlocal part, sink
        if part is not None:
            result = close_part(part)
            if inspect.isawaitable(result):
                await result
        part, sink = None, None

    async for chunk in chunks:
        if ended:
            continue  # epilogue: ignored
        buf += chunk
        while True:
            if state == "preamble" or state == "body":
                at = buf.find(delimiter)
                if at < 0:
                    # Keep a tail that may hold the beginning of the delimiter.
                    if state == "body" and sink is not None and len(buf) > keep:
                        _emit(sink, buf, len(buf) - keep)
                        del buf[: len(buf) - keep]
                    elif state == "preamble" and len(buf) > keep:
                        del buf[: len(buf) - keep]
                    break
                if len(buf) < at + len(delimiter) + 2:
                    break  # need the two bytes after the delimiter
                if state == "body" and sink is not None:
                    _emit(sink, buf, at)
                await finish_part()
                after = bytes(buf[at + len(delimiter): at + len(delimiter) + 2])
                del buf[: at + len(delimiter) + 2]
                if after == b"--":
                    ended = True
                    break
                if after != b"\r\n":
                    # Transport padding (RFC 2046: spaces/tabs) before the CRLF.
                    line_end = buf.find(b"\r\n")
                    if after.strip(b" \t") or line_end < 0 or buf[:line_end].strip(b" \t"):
                        raise MultipartError("malformed boundary line")
                    del buf[: line_end + 2]
                state = "headers"
            if state == "headers":
                end = buf.find(b"\r\n\r\n")
                if buf.startswith(b"\r\n"):
                    end, head = 0, b""
                elif end < 0:
                    if len(buf) > _MAX_HEADER_BYTES:
                        raise MultipartError("part headers too long")
                    break
                else:
                    head = bytes(buf[:end])
                part = Part(_headers(head))
                del buf[: end + (2 if end == 0 else 4)]
                sink = open_part(part)
                count += 1
                state = "body"
                continue
            if ended:
                break
    if not ended:
        if part is not None:
            await finish_part()
        raise MultipartError("body ended before the closing boundary")
    return count


def _headers(head: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def part_header(boundary: str, content_type: str, extra: dict[str, str] | None = None
                ) -> bytes:
    """The delimiter and headers that open one part of a response."""
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("latin-1")


def write_parts(boundary: str, parts: Iterable[tuple[str, Iterable[bytes]]]) -> Iterator[bytes]:
    """A multipart body from ``(content type, body chunks)`` pairs, lazily."""
    first = True
    for content_type, body in parts:
        yield (b"" if first else b"\r\n") + part_header(boundary, content_type)
        first = False
        yield from body
    yield (b"" if first else b"\r\n") + closing(boundary)
