"""Stored blobs from the page cache to the client: sendfile(2), off the event loop.

uvicorn writes every response body from its event loop, one thread per process:
each byte of a whole-study retrieval was read from its blob into a buffer, then
copied from that buffer into the socket by that thread. Two retrievals served by
one worker shared the one thread, and four clients of three workers got 0.9x of
Orthanc's aggregate rate while the machine still had a core idle.

``SendfileExtension`` wraps the application and, when the server is uvicorn
(its HTTP/1.1 cycle, a socket underneath), offers it the ASGI extension
``vna.http.response.sendfile``: after ``http.response.start`` with a
Content-Length, the application may send

    {"type": "vna.http.response.sendfile",
     "parts": [b"bytes" or (path, size), ...], "more_body": bool}

and the parts are written to the socket by a thread of the response's own: bytes as they are,
files by ``os.sendfile`` (no copy through this process, no GIL held). Each file
must have exactly ``size`` bytes; otherwise the connection is closed with the
response unfinished, as a client must then see it. Elsewhere (HEAD, another
server, the test client) the extension is simply not offered and the
application sends its body as usual.

This reaches into uvicorn's request cycle (its transport, its flow control, the
bytes it still expects): uvicorn is pinned, and ``_cycle`` checks for every part
it uses, so a change there turns the extension off rather than breaking replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SENDFILE = "vna.http.response.sendfile"
Part = bytes | tuple[str | Path, int]
"""Bytes to send as they are, or a file's path and its exact size."""

_SEND_TIMEOUT_MS = 60_000
"""A client that takes no bytes for this long is let go (the connection closed)."""


class _Cycle(Protocol):
    """What is used of uvicorn's per-request cycle (``httptools_impl``; h11's cycle
    frames bodies itself, has no ``expected_content_length``, and is not offered)."""

    transport: asyncio.Transport
    flow: Any
    expected_content_length: int
    chunked_encoding: bool | None
    response_started: bool
    disconnected: bool

    async def send(self, message: Message) -> None: ...


def _cycle(send: Send) -> _Cycle | None:
    cycle = getattr(send, "__self__", None)
    needed = ("transport", "flow", "expected_content_length", "chunked_encoding",
              "response_started", "disconnected")
    if cycle is None or not all(hasattr(cycle, name) for name in needed):
        return None
    transport = cycle.transport
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(transport, "get_write_buffer_size"):
        return None
    if getattr(sock, "type", None) != socket.SOCK_STREAM:
        return None
    return cycle  # type: ignore[no-any-return]


class SendfileExtension:
    """Offers ``vna.http.response.sendfile`` to the application it wraps."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cycle = _cycle(send) if scope["type"] == "http" and scope["method"] != "HEAD" else None
        if cycle is None:
            await self.app(scope, receive, send)
            return
        scope = {**scope, "extensions": {**(scope.get("extensions") or {}), SENDFILE: {}}}

        async def send_with_files(message: Message) -> None:
            if message["type"] == SENDFILE:
                await _send_parts(cycle, message["parts"], more=message.get("more_body", False))
            else:
                await send(message)

        await self.app(scope, receive, send_with_files)


def offers_sendfile(scope: Scope) -> bool:
    return SENDFILE in (scope.get("extensions") or {})


async def _send_parts(cycle: _Cycle, parts: Sequence[Part], *, more: bool) -> None:
    if not cycle.response_started or cycle.chunked_encoding is not False:
        raise RuntimeError(f"{SENDFILE} needs a started response with a Content-Length")
    if cycle.disconnected:
        return
    length = sum(len(p) if isinstance(p, bytes) else p[1] for p in parts)
    if length > cycle.expected_content_length:
        raise RuntimeError("Response content longer than Content-Length")
    transport = cycle.transport
    await _drained(cycle)
    # Taken here, in the loop's thread, while the connection is known open.
    fd = os.dup(transport.get_extra_info("socket").fileno())
    try:
        await _in_own_thread(_write_parts, fd, parts)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        # The client went away (or stopped reading): as uvicorn does, stop sending.
        cycle.disconnected = True
        transport.close()
        return
    except BaseException:
        transport.close()  # the response cannot be finished: the client must see that
        raise
    cycle.expected_content_length -= length
    if not more:
        await cycle.send({"type": "http.response.body", "body": b"", "more_body": False})


async def _in_own_thread(write: Callable[[int, Sequence[Part]], None], fd: int,
                         parts: Sequence[Part]) -> None:
    """``write(fd, parts)`` in a thread of its own, awaited.

    Not Starlette's pool: a response holds its thread for as long as its client
    takes to read it, and slow clients must not take the threads every other
    request runs on (40 by default). A daemon: a client that stopped reading must
    not hold up the process's exit for the minute its writer waits. One thread per
    response, not per part: starting one costs well under a millisecond."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            write(fd, parts)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name="sendfile", daemon=True).start()
    await done


async def _drained(cycle: _Cycle) -> None:
    """Wait until what uvicorn wrote on this connection (the response's head, or the
    end of the previous response) has left its buffer: the socket is then ours
    until we return, as the application awaits us."""
    transport = cycle.transport
    if not transport.get_write_buffer_size():
        return
    low, high = transport.get_write_buffer_limits()
    # With a high-water mark of 0 the transport pauses the protocol now and resumes
    # it only when its buffer is empty: uvicorn's flow control then wakes us.
    transport.set_write_buffer_limits(high=0, low=0)
    try:
        while transport.get_write_buffer_size() and not cycle.disconnected:
            await cycle.flow.drain()
    finally:
        transport.set_write_buffer_limits(high=high, low=low)


def _write_parts(fd: int, parts: Sequence[Part]) -> None:
    """Blocking, in a thread: every part to the (non-blocking) socket ``fd``, a
    duplicate of the connection's descriptor that this closes when done.

    The duplicate keeps the socket this very connection's: were uvicorn to close
    its own descriptor meanwhile (the client gone), the number could be given to
    the next connection accepted, and the rest of one patient's study sent to
    whoever made it.

    Corked meanwhile (Linux): a part's few header bytes then leave in one segment
    with the start of its file, not in one of their own (uvicorn's sockets do not
    delay small writes); one client read 8 % more a second."""
    cork = getattr(socket, "TCP_CORK", None)
    with socket.socket(fileno=fd) as sock:
        if cork is not None:
            sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
        try:
            _write(fd, parts)
        finally:
            if cork is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, cork, 0)  # sends what is held


def _write(fd: int, parts: Sequence[Part]) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)

    def writable() -> None:
        if not poller.poll(_SEND_TIMEOUT_MS):
            raise TimeoutError("the client took nothing for a minute")

    for part in parts:
        if isinstance(part, bytes):
            view = memoryview(part)
            while view:
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    writable()
            continue
        path, size = part
        # A bare descriptor: Python's open() would add a buffer object, an isatty
        # ioctl and a seek per blob, a thousand of each for a CT study.
        blob = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            if os.fstat(blob).st_size != size:
                raise RuntimeError(f"{os.path.basename(path)} is not {size} bytes long any more")
            offset = 0
            while offset < size:
                try:
                    sent = os.sendfile(fd, blob, offset, size - offset)
                except BlockingIOError:
                    writable()
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                        raise ConnectionResetError(exc.errno, exc.strerror) from exc
                    raise
                if not sent:
                    raise RuntimeError(f"{os.path.basename(path)} ended before {size} bytes")
                offset += sent
        finally:
            os.close(blob)
