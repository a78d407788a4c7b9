"""The BlobStore contract, over every adapter: memory, filesystem, S3 (rclone)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import S3Server
from vna.adapters.blob.filesystem import FilesystemBlobStore
from vna.adapters.blob.memory import MemoryBlobStore
from vna.model import BlobKey
from vna.ports import BlobStore, Unavailable

ADAPTERS = [
    "memory",
    "filesystem",
    pytest.param("s3", marks=pytest.mark.integration),
]


@pytest.fixture(params=ADAPTERS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "memory":
        yield MemoryBlobStore()
    elif request.param == "filesystem":
        yield FilesystemBlobStore(tmp_path / "blobs")
    else:
        from vna.adapters.blob.s3 import S3BlobStore

        server: S3Server = request.getfixturevalue("s3_server")
        bucket: str = request.getfixturevalue("s3_bucket")
        yield S3BlobStore.from_url(server.bucket_url(bucket), access_key=server.access_key,
                                   secret_key=server.secret_key)


class Staging:
    """Writes payloads to files, as the store path stages them before put_file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def file(self, data: bytes) -> tuple[BlobKey, Path]:
        self.count += 1
        path = self.root / f"staged-{self.count}"
        path.write_bytes(data)
        return BlobKey(hashlib.sha256(data).hexdigest()), path


@pytest.fixture
def staging(tmp_path: Path) -> Staging:
    return Staging(tmp_path / "staging")


def _payload(n: int, seed: int = 0) -> bytes:
    # Deterministic, not all-zero, differs by seed: a swapped blob would show.
    block = hashlib.sha256(f"{seed}".encode()).digest()
    return (block * (n // len(block) + 1))[:n]


def test_protocol_is_implemented(store: BlobStore) -> None:
    assert isinstance(store, BlobStore)


def test_round_trip(store: BlobStore, staging: Staging) -> None:
    data = _payload(100_000, seed=1)
    key, path = staging.file(data)
    assert not store.exists(key)
    assert store.put_file(key, path) is True
    assert store.exists(key)
    assert store.size(key) == len(data)
    with store.open(key) as fp:
        assert fp.read() == data


def test_open_reads_sequentially_in_chunks(store: BlobStore, staging: Staging) -> None:
    data = _payload(300_000, seed=2)
    key, path = staging.file(data)
    store.put_file(key, path)
    chunks = []
    with store.open(key) as fp:
        while chunk := fp.read(65_536):
            chunks.append(chunk)
    assert b"".join(chunks) == data
    assert len(chunks) >= 5


def test_write_once(store: BlobStore, staging: Staging) -> None:
    data = _payload(5000, seed=3)
    key, path = staging.file(data)
    assert store.put_file(key, path) is True
    # Same key again (from a file that, say, a broken caller filled differently):
    # the store must neither write nor change the bytes it holds.
    _, other = staging.file(_payload(5000, seed=99))
    assert store.put_file(key, other) is False
    assert store.read_range(key, 0) == data
    assert store.size(key) == len(data)


def test_empty_blob(store: BlobStore, staging: Staging) -> None:
    key, path = staging.file(b"")
    assert store.put_file(key, path) is True
    assert store.size(key) == 0
    assert store.read_range(key, 0) == b""
    with store.open(key) as fp:
        assert fp.read() == b""


@pytest.mark.parametrize(("start", "length"), [
    (0, 10), (1, 1), (1000, 4096), (12_345, None), (0, None), (49_990, 10), (49_995, 100),
])
def test_read_range(store: BlobStore, staging: Staging, start: int, length: int | None) -> None:
    data = _payload(50_000, seed=4)
    key, path = staging.file(data)
    store.put_file(key, path)
    expected = data[start:] if length is None else data[start:start + length]
    assert store.read_range(key, start, length) == expected


def test_read_range_zero_length_and_past_end(store: BlobStore, staging: Staging) -> None:
    data = _payload(1000, seed=5)
    key, path = staging.file(data)
    store.put_file(key, path)
    assert store.read_range(key, 10, 0) == b""
    assert store.read_range(key, 5000, 10) == b""
    assert store.read_range(key, 1000) == b""


def test_keys_lists_every_blob(store: BlobStore, staging: Staging) -> None:
    assert list(store.keys()) == []
    written = set()
    for seed in range(7):
        key, path = staging.file(_payload(100 + seed, seed=seed))
        store.put_file(key, path)
        written.add(key)
    listed = list(store.keys())
    assert set(listed) == written
    assert len(listed) == len(written)


def test_unknown_key(store: BlobStore) -> None:
    missing = BlobKey(hashlib.sha256(b"never stored").hexdigest())
    assert store.exists(missing) is False
    with pytest.raises(KeyError):
        store.open(missing)
    with pytest.raises(KeyError):
        store.size(missing)
    with pytest.raises(KeyError):
        store.read_range(missing, 0, 10)


def test_local_path_is_none_or_the_bytes(store: BlobStore, staging: Staging) -> None:
    data = _payload(777, seed=6)
    key, path = staging.file(data)
    store.put_file(key, path)
    local = store.local_path(key)
    assert local is None or local.read_bytes() == data
    file = store.local_file(key)
    assert file is None or (file[1] == len(data) and Path(file[0]).read_bytes() == data)
    assert (file is None) == (local is None)
    missing = BlobKey(hashlib.sha256(b"never stored").hexdigest())
    assert store.local_file(missing) is None


def test_check_passes_when_usable(store: BlobStore) -> None:
    store.check()


def test_many_blobs_do_not_mix(store: BlobStore, staging: Staging) -> None:
    blobs = {}
    for seed in range(20):
        data = os.urandom(1 + seed * 97)
        key, path = staging.file(data)
        assert store.put_file(key, path) is True
        blobs[key] = data
    for key, data in blobs.items():
        assert store.read_range(key, 0) == data


# ------------------------------------------------------------- S3 specifics
@pytest.mark.integration
def test_s3_layout_and_bucket_creation(s3_server: S3Server, s3_bucket: str,
                                       staging: Staging) -> None:
    from vna.adapters.blob.s3 import S3BlobStore

    store = S3BlobStore.from_url(s3_server.bucket_url(s3_bucket),
                                 access_key=s3_server.access_key,
                                 secret_key=s3_server.secret_key)
    data = _payload(2048, seed=7)
    key, path = staging.file(data)
    assert store.put_file(key, path)
    # The bucket was created, and the object sits at ab/cd/<sha256> (rclone maps
    # buckets and keys to directories and files).
    on_disk = s3_server.root / s3_bucket / key[:2] / key[2:4] / key
    assert on_disk.read_bytes() == data


@pytest.mark.integration
def test_s3_multipart_upload(s3_server: S3Server, s3_bucket: str, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    from vna.adapters.blob import s3 as s3mod

    # The threshold is 64 MB in production; lower it so that three parts are sent.
    monkeypatch.setattr(s3mod, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(s3mod, "PART_SIZE", 5 * 1024 * 1024)
    store = s3mod.S3BlobStore.from_url(s3_server.bucket_url(s3_bucket),
                                       access_key=s3_server.access_key,
                                       secret_key=s3_server.secret_key)
    data = os.urandom(12 * 1024 * 1024 + 123)
    path = tmp_path / "big"
    path.write_bytes(data)
    key = BlobKey(hashlib.sha256(data).hexdigest())
    assert store.put_file(key, path) is True
    assert store.size(key) == len(data)
    assert hashlib.sha256(store.read_range(key, 0)).hexdigest() == key
    assert store.read_range(key, 5 * 1024 * 1024 - 3, 6) == data[5 * 1024 * 1024 - 3:
                                                                 5 * 1024 * 1024 + 3]


@pytest.mark.integration
def test_s3_server_verifies_content_md5(s3_server: S3Server, s3_bucket: str,
                                        staging: Staging,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes damaged on the way are refused by the server, and we say Unavailable."""
    from vna.adapters.blob import s3 as s3mod

    store = s3mod.S3BlobStore.from_url(s3_server.bucket_url(s3_bucket),
                                       access_key=s3_server.access_key,
                                       secret_key=s3_server.secret_key)
    # A digest that does not match the body, as if bits flipped in transit
    # (it is the MD5 of b"hello", a well-formed but wrong digest).
    wrong = "XUFAKrxLKna5cZ2REBfFkg=="
    monkeypatch.setattr(s3mod, "_md5_b64", lambda data: wrong)
    monkeypatch.setattr(s3mod, "_file_md5_b64", lambda path: wrong, raising=False)
    data = _payload(4096, seed=8)
    key, path = staging.file(data)
    with pytest.raises(Unavailable):
        store.put_file(key, path)
    assert not store.exists(key)


@pytest.mark.integration
def test_s3_unreachable_is_unavailable_and_fast(staging: Staging) -> None:
    import time

    from vna.adapters.blob.s3 import S3BlobStore
    from vna.testing.s3server import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    began = time.monotonic()
    store = S3BlobStore.from_url(f"s3://nobody?endpoint={dead}", access_key="a",
                                 secret_key="b")
    key, path = staging.file(b"payload")
    with pytest.raises(Unavailable):
        store.put_file(key, path)
    with pytest.raises(Unavailable):
        store.check()
    # Refused connections, a few quick retries: well inside a DIMSE timeout.
    assert time.monotonic() - began < 15


def test_journal_entries_are_listed_and_read_back_like_any_blob(store: BlobStore) -> None:
    """The correction journal (vna.journal) lives in the blob store: reindex finds its
    entries by listing and tells them from DICOM by their first line."""
    from vna.journal import MAGIC, BlobJournal, is_journal

    journal = BlobJournal(store)
    doc = {"kind": "unmerge", "seq": 3, "prev": "ab" * 32, "at": "2026-12-01T10:00:00+00:00",
           "merge_ref": "m1", "actor": "adt", "studies": ["1.2.3"]}
    key = journal.write(doc)
    assert journal.write(doc) == key
    assert key in set(store.keys())
    assert is_journal(store.read_range(key, 0, len(MAGIC)))
    assert journal.read(key).doc == doc
    assert hashlib.sha256(store.read_range(key, 0)).hexdigest() == key


def test_filesystem_syncs_the_blob_then_every_name_it_made(
        tmp_path: Path, staging: Staging, monkeypatch: pytest.MonkeyPatch) -> None:
    # Durable means the bytes, the blob's name, and the names of the directories
    # made for it: a blob under a directory whose name a crash lost is lost too.
    import vna.adapters.blob.filesystem as filesystem

    synced: list[Path] = []
    real = filesystem.sync_path

    def recording(path: Path, *, data_only: bool = False) -> None:
        synced.append(Path(path))
        real(path, data_only=data_only)

    monkeypatch.setattr(filesystem, "sync_path", recording)
    root = tmp_path / "blobs"
    store = FilesystemBlobStore(root)
    key, path = staging.file(_payload(100, seed=1))
    assert store.put_file(key, path)
    first, second = root / key[:2], root / key[:2] / key[2:4]
    assert synced == [path, root, first, second]
    # Next to it, the directories are there: the bytes and the blob's name only.
    synced.clear()
    sibling = BlobKey(key[:4] + "0" * 60)
    staged = staging.root / "sibling"
    staged.write_bytes(b"x")
    assert store.put_file(sibling, staged)
    assert synced == [staged, second]
    # Already there ("stored" all the same): perhaps another writer's name, linked
    # and not yet synced by it, so its directory is synced before the answer.
    synced.clear()
    again = staging.root / "again"
    again.write_bytes(b"x")
    assert not store.put_file(sibling, again)
    assert synced == [second]


def test_filesystem_syncs_names_another_writer_made_before_answering(
        tmp_path: Path, staging: Staging, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another receiver makes the directories, or links the same blob, a moment
    # before this one: its syncs may not have happened yet, and this writer's
    # caller answers "stored" on its word, so this writer syncs those names too.
    import vna.adapters.blob.filesystem as filesystem

    synced: list[Path] = []
    real_sync, real_mkdir, real_link = filesystem.sync_path, Path.mkdir, os.link

    def recording(path: Path, *, data_only: bool = False) -> None:
        synced.append(Path(path))
        real_sync(path, data_only=data_only)

    def made_by_another(self: Path, *args: Any, **kwargs: Any) -> None:
        real_mkdir(self, *args, **kwargs)
        raise FileExistsError(self)

    def linked_by_another(source: Any, target: Any) -> None:
        real_link(source, target)
        raise FileExistsError(target)

    root = tmp_path / "blobs"
    store = FilesystemBlobStore(root)
    monkeypatch.setattr(filesystem, "sync_path", recording)
    monkeypatch.setattr(Path, "mkdir", made_by_another)
    key, path = staging.file(_payload(100, seed=2))
    assert store.put_file(key, path)
    first, second = root / key[:2], root / key[:2] / key[2:4]
    assert synced == [path, root, first, second]

    synced.clear()
    monkeypatch.setattr(filesystem.os, "link", linked_by_another)
    other = BlobKey(key[:4] + "1" * 60)
    staged = staging.root / "other"
    staged.write_bytes(b"y")
    assert not store.put_file(other, staged)
    assert synced == [staged, second]
    assert (second / other).exists()
