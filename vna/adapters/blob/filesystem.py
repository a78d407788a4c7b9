"""Blobs as files under a root: ``root/ab/cd/<sha256>``, fsynced before ack."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from vna.durable import sync_path
from vna.model import BlobKey, is_blob_key
from vna.ports import Unavailable


class FilesystemBlobStore:
    """Write-once content-addressed files. Paths come from the key, never from UIDs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root = os.fspath(root)
        self.tmp = root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_url(cls, url: str) -> FilesystemBlobStore:
        return cls(Path(unquote(urlparse(url).path)))

    def _file(self, key: BlobKey) -> str:
        """The blob's file name, as a string: pathlib's joins cost more than the stat
        that usually follows (about 30 us a blob, 30 ms for a 1,000-instance study)."""
        if not is_blob_key(key):
            raise KeyError(key)
        return f"{self._root}/{key[:2]}/{key[2:4]}/{key}"

    def _path(self, key: BlobKey) -> Path:
        return Path(self._file(key))

    def staging_dir(self) -> Path:
        """A directory on the same filesystem, so that ``put_file`` can rename."""
        return self.tmp

    def put_file(self, key: BlobKey, path: Path) -> bool:
        target = self._path(key)
        try:
            if target.exists():
                # Perhaps another writer's, linked and not yet synced: our caller
                # answers "stored" on this, so the name must be durable first.
                sync_path(target.parent)
                return False
            sync_path(path)
            try:
                return self._link(path, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
            with tempfile.NamedTemporaryFile(dir=self.tmp, delete=False) as out:
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            try:
                return self._link(Path(out.name), target)
            finally:
                os.unlink(out.name)
        except (PermissionError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) and not path.exists():
                raise
            raise Unavailable(f"blob store: {exc.strerror or exc}") from exc

    def _link(self, source: Path, target: Path) -> bool:
        """Give the (synced) ``source`` the name ``target``, durably; False when that
        name exists: link() refuses to overwrite, so two writers cannot clobber.

        The directories are made on the first blob that needs them, not before
        each: the link is tried first, as nearly every directory exists."""
        try:
            os.link(source, target)
        except FileExistsError:
            sync_path(target.parent)  # another writer's name: durable before we say so
            return False
        except FileNotFoundError:
            if not source.exists():
                raise
            self._make_directories(target.parent)
            try:
                os.link(source, target)
            except FileExistsError:
                sync_path(target.parent)
                return False
        sync_path(target.parent)
        return True

    def _make_directories(self, directory: Path) -> None:
        """Make ``directory`` and its missing parents under the root, each one's name
        synced in its parent: a blob under a directory whose name was lost in a
        crash would be lost with it. POSIX promises that only by an fsync of the
        parent (Linux's ext4, XFS and btrfs also persist a new directory's name when
        it is fsynced itself). It costs one fsync more for the first blob of each
        of the 65,536 directories, then nothing."""
        missing: list[Path] = []
        while not directory.exists() and directory != self.root:
            missing.append(directory)
            directory = directory.parent
        for made in reversed(missing):
            # Made by another writer, its name is perhaps not synced yet, and the
            # blob linked into it next would be acknowledged first: sync it anyway.
            with contextlib.suppress(FileExistsError):
                made.mkdir()
            sync_path(made.parent)

    def exists(self, key: BlobKey) -> bool:
        return self._path(key).exists()

    def open(self, key: BlobKey) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise KeyError(key) from None

    def read_range(self, key: BlobKey, start: int, length: int | None = None) -> bytes:
        with self.open(key) as fp:
            fp.seek(start)
            return fp.read() if length is None else fp.read(length)

    def size(self, key: BlobKey) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise KeyError(key) from None

    def local_path(self, key: BlobKey) -> Path | None:
        found = self.local_file(key)
        return Path(found[0]) if found is not None else None

    def local_file(self, key: BlobKey) -> tuple[str, int] | None:
        path = self._file(key)
        try:
            return path, os.stat(path).st_size
        except FileNotFoundError:
            return None

    def keys(self) -> Iterator[BlobKey]:
        for path in self.root.glob("??/??/*"):
            if is_blob_key(path.name):
                yield BlobKey(path.name)

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise Unavailable(f"blob store root {self.root} is not writable")
