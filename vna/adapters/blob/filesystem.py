"""Blobs as files under a root: ``root/ab/cd/<sha256>``, fsynced before ack."""

from __future__ import annotations

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
        self.tmp = root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_url(cls, url: str) -> FilesystemBlobStore:
        return cls(Path(unquote(urlparse(url).path)))

    def _path(self, key: BlobKey) -> Path:
        if not is_blob_key(key):
            raise KeyError(key)
        return self.root / key[:2] / key[2:4] / key

    def staging_dir(self) -> Path:
        """A directory on the same filesystem, so that ``put_file`` can rename."""
        return self.tmp

    def put_file(self, key: BlobKey, path: Path) -> bool:
        target = self._path(key)
        if target.exists():
            return False
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            sync_path(path)
            try:
                # link() refuses to overwrite: two writers of one key cannot clobber.
                os.link(path, target)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                with tempfile.NamedTemporaryFile(dir=self.tmp, delete=False) as out:
                    with open(path, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                try:
                    os.link(out.name, target)
                except FileExistsError:
                    return False
                finally:
                    os.unlink(out.name)
            sync_path(target.parent)
            return True
        except (PermissionError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) and not path.exists():
                raise
            raise Unavailable(f"blob store: {exc.strerror or exc}") from exc

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
        path = self._path(key)
        return path if path.exists() else None

    def keys(self) -> Iterator[BlobKey]:
        for path in self.root.glob("??/??/*"):
            if is_blob_key(path.name):
                yield BlobKey(path.name)

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise Unavailable(f"blob store root {self.root} is not writable")
