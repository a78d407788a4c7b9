"""Write-once on S3 without a HEAD before each write, where the server allows it.

moto's S3 server honours ``If-None-Match: *`` on PUT, as AWS S3, MinIO and Ceph do:
one conditional PUT writes a new blob and is refused (412) over one that is there.
rclone serve s3 ignores the header: there each write still asks with a HEAD first.
Both must keep a blob's bytes once written.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import S3Server, backend_missing
from tests.support.processes import free_port, wait_for
from vna.adapters.blob.s3 import S3BlobStore
from vna.model import BlobKey

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


def _answers(url: str) -> bool:
    """True once the server answers; refused, URLError is raised: wait_for polls again."""
    with contextlib.suppress(urllib.error.HTTPError):  # an answer all the same
        urllib.request.urlopen(url, timeout=2).close()
    return True


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = Path(sys.executable).with_name("moto_server")
    if not server.exists():
        backend_missing("moto", f"{server} not found")
    port = free_port()
    proc = subprocess.Popen([str(server), "-H", HOST, "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://{HOST}:{port}"
    try:
        wait_for(lambda: _answers(url), 30, 0.1, "moto_server answering")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _staged(directory: Path, data: bytes, name: str) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def _written_once(store: S3BlobStore, directory: Path) -> BlobKey:
    """A blob written, then the same key from other bytes (a broken caller): that
    second write is refused and the blob keeps its bytes."""
    data = b"DICM" * 1000
    key = BlobKey(hashlib.sha256(data).hexdigest())
    assert store.put_file(key, _staged(directory, data, "a")) is True
    assert store.put_file(key, _staged(directory, b"other", "b")) is False
    assert store.read_range(key, 0) == data
    return key


def _heads(store: S3BlobStore) -> list[Any]:
    """The HEAD requests ``store`` sends from now on."""
    sent: list[Any] = []
    store._client.meta.events.register("before-call.s3.HeadObject",
                                       lambda **kwargs: sent.append(kwargs))
    return sent


def test_where_conditional_puts_are_honoured_a_write_asks_no_head(
        moto_url: str, s3_bucket: str, tmp_path: Path) -> None:
    store = S3BlobStore(s3_bucket, endpoint=moto_url, access_key="motomoto",
                        secret_key="motomoto")
    assert store.conditional_writes
    heads = _heads(store)
    key = _written_once(store, tmp_path)
    assert heads == []
    # The probe object is not a blob.
    assert list(store.keys()) == [key]
    # Another process on the bucket finds the probe there and writes conditionally too.
    assert S3BlobStore(s3_bucket, endpoint=moto_url, access_key="motomoto",
                       secret_key="motomoto").conditional_writes


def test_where_they_are_ignored_each_write_asks_first_and_keeps_the_blob(
        s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = S3BlobStore.from_url(s3_server.bucket_url(s3_bucket),
                                 access_key=s3_server.access_key,
                                 secret_key=s3_server.secret_key)
    assert not store.conditional_writes  # rclone serve s3 ignores If-None-Match
    heads = _heads(store)
    key = _written_once(store, tmp_path)
    assert len(heads) == 2
    assert list(store.keys()) == [key]
