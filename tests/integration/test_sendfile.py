"""Whole-study retrieval by sendfile (``services.dicomweb.sendfile``), under uvicorn
on a real loopback connection, as ``vna run`` serves it."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from anyio import to_thread
from pydicom.uid import generate_uid
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from services.dicomweb import sendfile
from services.dicomweb.sendfile import SENDFILE, SendfileExtension, offers_sendfile
from tests.integration.test_dicomweb import (
    Web,
    a_study,
    dataset_bytes,
    encode,
    multipart_parts,
    serve,
)
from tests.support.processes import free_port, wait_for

pytestmark = pytest.mark.integration


class _Files(Response):
    """Sends ``parts`` by the extension in two messages; records whether it was offered."""

    def __init__(self, parts: list[sendfile.Part], offered: list[bool]) -> None:
        super().__init__()
        self.parts = parts
        self.offered = offered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = sum(len(p) if isinstance(p, bytes) else p[1] for p in self.parts)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(length).encode()),
                                (b"content-type", b"application/octet-stream")]})
        half = len(self.parts) // 2
        await send({"type": SENDFILE, "parts": self.parts[:half], "more_body": True})
        await send({"type": SENDFILE, "parts": self.parts[half:], "more_body": False})


@pytest.fixture
def files(tmp_path: Path) -> dict[str, tuple[Path, bytes]]:
    out = {}
    for name, size in (("a", 1), ("b", 300_001), ("c", 5 << 20)):
        data = os.urandom(size)
        path = tmp_path / name
        path.write_bytes(data)
        out[name] = (path, data)
    return out


@pytest.fixture
def app_server(files: dict[str, tuple[Path, bytes]]) -> Iterator[tuple[str, list[bool]]]:
    offered: list[bool] = []

    async def endpoint(request: Request) -> Response:
        offered.append(offers_sendfile(request.scope))
        if not offers_sendfile(request.scope):
            return Response(b"no extension")
        names = request.query_params.get("files", "abc")
        parts: list[sendfile.Part] = []
        for name in names:
            path, data = files[name]
            size = int(request.query_params.get("claim", len(data)))
            parts += [f"--{name}--".encode(), (path, size)]
        return _Files(parts, offered)

    async def one_thread(request: Request) -> Response:
        # Starlette's pool down to one thread, then a request that needs it.
        to_thread.current_default_thread_limiter().total_tokens = 1
        return Response(str(await run_in_threadpool(lambda: 1 + 1)).encode())

    app = Starlette(routes=[Route("/files", endpoint, methods=["GET", "HEAD"]),
                            Route("/threaded", one_thread)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(SendfileExtension(app), host="127.0.0.1",
                                           port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, 0.02, "uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}", offered
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _expected(files: dict[str, tuple[Path, bytes]], names: str) -> bytes:
    return b"".join(f"--{n}--".encode() + files[n][1] for n in names)


def test_files_and_bytes_arrive_in_order_on_a_kept_alive_connection(
        app_server: tuple[str, list[bool]], files: dict[str, tuple[Path, bytes]]) -> None:
    base, offered = app_server
    with httpx.Client() as client:
        for names in ("abc", "cba", "b"):  # one connection: each response ends exactly
            r = client.get(f"{base}/files", params={"files": names})
            assert r.status_code == 200
            assert r.content == _expected(files, names)
            assert int(r.headers["content-length"]) == len(r.content)
    assert offered == [True, True, True]


def test_head_is_answered_without_the_extension(app_server: tuple[str, list[bool]]) -> None:
    base, offered = app_server
    r = httpx.head(f"{base}/files")
    assert r.status_code == 200
    assert r.content == b""
    assert offered == [False]


def test_a_file_not_of_its_announced_size_ends_the_response_unfinished(
        app_server: tuple[str, list[bool]], files: dict[str, tuple[Path, bytes]]) -> None:
    base, _ = app_server
    longer = len(files["b"][1]) + 10
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{base}/files", params={"files": "b", "claim": str(longer)})
    # The server goes on serving.
    r = httpx.get(f"{base}/files", params={"files": "ab"})
    assert r.content == _expected(files, "ab")


def test_a_client_that_leaves_midway_does_not_stop_the_server(
        app_server: tuple[str, list[bool]], files: dict[str, tuple[Path, bytes]]) -> None:
    base, _ = app_server
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /files?files=cccc HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    r = httpx.get(f"{base}/files", params={"files": "cb"})
    assert r.content == _expected(files, "cb")


def test_a_client_that_reads_nothing_holds_no_thread_of_the_app(
        app_server: tuple[str, list[bool]]) -> None:
    """A response being sent holds a writer thread for as long as its client takes;
    the threads the application's other requests run on stay free."""
    base, _ = app_server
    assert httpx.get(f"{base}/threaded").text == "2"  # the app's pool is one thread now
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /files?files=cccc HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")  # 20 MiB on their way, unread
        # Were the writer on the app's one thread, this would wait for the minute
        # after which an unread response is given up.
        assert httpx.get(f"{base}/threaded", timeout=20).text == "2"


def test_not_offered_outside_uvicorn() -> None:
    seen: list[bool] = []

    async def endpoint(request: Request) -> Response:
        seen.append(offers_sendfile(request.scope))
        return Response(b"ok")

    app = SendfileExtension(Starlette(routes=[Route("/", endpoint)]))
    with TestClient(app) as client:
        assert client.get("/").content == b"ok"
    assert seen == [False]


def test_whole_study_retrieval_goes_out_by_sendfile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The WADO-RS as-stored path under uvicorn: every blob by sendfile, bytes intact."""
    calls: list[int] = []
    write_parts = sendfile._write_parts

    def counted(fd: int, parts: list[sendfile.Part]) -> None:
        calls.append(sum(1 for p in parts if not isinstance(p, bytes)))
        write_parts(fd, parts)

    monkeypatch.setattr(sendfile, "_write_parts", counted)
    with serve(tmp_path) as web:
        _check_round_trip(web)
    assert sum(calls) == 6  # each of the six blobs, sent as a file


def _check_round_trip(web: Web) -> None:
    sent = a_study()
    encoded = {d.SOPInstanceUID: dataset_bytes(encode(d)) for d in sent}
    web.client().store_instances(sent)
    web.index_all()
    r = httpx.get(f"{web.root}/studies/{sent[0].StudyInstanceUID}",
                  headers={"Accept": 'multipart/related; type="application/dicom"; '
                                     "transfer-syntax=*"})
    assert r.status_code == 200
    parts = multipart_parts(r)
    assert len(parts) == len(sent)
    import io

    import pydicom

    for _, body in parts:
        ds = pydicom.dcmread(io.BytesIO(body))
        assert dataset_bytes(body) == encoded[ds.SOPInstanceUID]
    assert httpx.get(f"{web.root}/studies/{generate_uid()}").status_code == 404
