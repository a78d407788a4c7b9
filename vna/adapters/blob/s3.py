"""Blobs in an S3 bucket (AWS, MinIO, rclone, any S3 API) through boto3.

The only module that imports boto3. Objects live at ``[prefix/]ab/cd/<sha256>``:
the key comes from the content, never from a UID. Every upload carries
Content-MD5 so the server refuses bytes damaged on the way.

Write-once: where the server honours ``If-None-Match: *`` on PUT (AWS S3 since
2024, MinIO, Ceph RGW, moto), one conditional PUT both writes a new blob and
refuses to replace one that is there (412), atomically. Where it does not (rclone
serve s3 ignores the header), each write first asks with a HEAD. A probe at
start tells the two apart: a second conditional PUT of a small object under
``.vna/`` must be refused.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import parse_qs, urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from vna.model import BlobKey, is_blob_key
from vna.ports import Unavailable

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 64 * 1024 * 1024
"""Files above this go up in parts (a single PUT is limited and retries all of it)."""
PART_SIZE = 16 * 1024 * 1024
"""Each part is read into memory once to compute its MD5, so keep it modest."""

_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_PROBE = ".vna/conditional-write-probe"
"""Under the prefix: the object that tells whether conditional writes are honoured
(not a blob key: ``keys`` and reindex pass over it)."""


def _code(exc: ClientError) -> str:
    error: dict[str, Any] = exc.response.get("Error", {})
    return str(error.get("Code", ""))


def _status(exc: ClientError) -> int:
    meta: dict[str, Any] = exc.response.get("ResponseMetadata", {})
    return int(meta.get("HTTPStatusCode", 0) or 0)


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def _file_md5_b64(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fp:
        while chunk := fp.read(1 << 20):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


class S3BlobStore:
    """Write-once, content-addressed blobs in one bucket.

    Parameters
    ----------
    bucket:
        Bucket name; created on first use when missing.
    endpoint:
        ``http(s)://host:port`` of the S3 API, or None for AWS.
    prefix:
        Optional key prefix inside the bucket (several archives in one bucket).
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint: str | None = None,
        access_key: str = "",
        secret_key: str = "",
        region: str = "us-east-1",
        prefix: str = "",
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
    ) -> None:
        self.bucket = bucket
        self.endpoint = endpoint
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        config = Config(
            region_name=region,
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Few, quick retries: an unreachable store must surface as Unavailable
            # soon enough for the DIMSE layer to answer 0xA700 within its timeout.
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            # We send Content-MD5 ourselves; botocore's default CRC trailers use
            # aws-chunked encoding, which not every S3 implementation verifies.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=32,
        )
        session = boto3.session.Session()
        self._client: Any = session.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            config=config,
        )
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()
        self.conditional_writes = False
        """Whether the server refuses a conditional PUT over an existing object; known
        once the bucket is (``_ensure_bucket``): then ``put_file`` asks no HEAD."""
        try:
            self._ensure_bucket()
        except Unavailable as exc:
            # Starting while the store is away is allowed: readiness says so, and
            # the first write tries again.
            log.warning("S3 blob store not reachable yet: %s", exc)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        access_key: str = "",
        secret_key: str = "",
        region: str = "us-east-1",
    ) -> S3BlobStore:
        """``s3://bucket[/prefix]?endpoint=http://host:port[&region=...]``."""
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError("S3 URL must look like s3://bucket?endpoint=http://host:port")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        return cls(
            parsed.netloc,
            endpoint=query.get("endpoint") or None,
            access_key=access_key,
            secret_key=secret_key,
            region=query.get("region", region),
            prefix=parsed.path,
        )

    # ----------------------------------------------------------------- helpers
    def _object_key(self, key: BlobKey) -> str:
        if not is_blob_key(key):
            raise KeyError(key)
        return f"{self.prefix}{key[:2]}/{key[2:4]}/{key}"

    def _unavailable(self, what: str, exc: Exception) -> Unavailable:
        if isinstance(exc, ClientError):
            detail = f"{_code(exc) or _status(exc)}"
        else:
            detail = type(exc).__name__
        return Unavailable(f"S3 {what} failed ({detail}) at {self.endpoint or 'AWS'}")

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        with self._bucket_lock:
            if self._bucket_ready:
                return
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _code(exc) not in _NOT_FOUND and _status(exc) != 404:
                    raise self._unavailable("HEAD bucket", exc) from exc
                try:
                    self._client.create_bucket(Bucket=self.bucket)
                except ClientError as create_exc:
                    # Another process may have won the race: that is fine.
                    if _code(create_exc) not in ("BucketAlreadyOwnedByYou",
                                                 "BucketAlreadyExists"):
                        raise self._unavailable("create bucket", create_exc) from create_exc
            except BotoCoreError as exc:
                raise self._unavailable("HEAD bucket", exc) from exc
            self.conditional_writes = self._probe_conditional_writes()
            log.info("S3 blob store ready", extra={
                "bucket": self.bucket, "conditional_writes": self.conditional_writes})
            self._bucket_ready = True

    def _probe_conditional_writes(self) -> bool:
        """Two conditional PUTs of the probe object: honoured when one is refused
        (412); the first may be, the object being there from an earlier start."""
        for _ in range(2):
            try:
                self._client.put_object(Bucket=self.bucket, Key=self.prefix + _PROBE,
                                        Body=b"", IfNoneMatch="*")
            except ClientError as exc:
                if _status(exc) == 412:
                    return True
                # Not implemented, or not allowed here: HEAD before each write.
                log.info("S3 conditional PUT refused (%s): writes ask with HEAD first",
                         _code(exc) or _status(exc))
                return False
            except BotoCoreError as exc:
                raise self._unavailable("PUT probe", exc) from exc
        return False

    def _head(self, key: BlobKey) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any],
                        self._client.head_object(Bucket=self.bucket, Key=self._object_key(key)))
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND or _status(exc) == 404:
                return None
            raise self._unavailable("HEAD object", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("HEAD object", exc) from exc

    # -------------------------------------------------------------------- port
    def put_file(self, key: BlobKey, path: Path) -> bool:
        """Upload ``path`` at ``key`` unless an object is already there.

        Two writers of one key may both upload; both carry the same bytes
        (the key is their hash), so the race is harmless.
        """
        object_key = self._object_key(key)
        size = path.stat().st_size
        self._ensure_bucket()
        conditional = self.conditional_writes and size <= MULTIPART_THRESHOLD
        if not conditional and self._head(key) is not None:
            return False
        try:
            if size > MULTIPART_THRESHOLD:
                self._put_multipart(object_key, path)
            else:
                with open(path, "rb") as body:
                    self._client.put_object(
                        Bucket=self.bucket, Key=object_key, Body=body,
                        ContentLength=size, ContentMD5=_file_md5_b64(path),
                        ContentType="application/dicom",
                        **({"IfNoneMatch": "*"} if conditional else {}),
                    )
        except ClientError as exc:
            # 412: there already, kept as it is. 409: another conditional write of
            # the key in flight (AWS): there if that one finished.
            if conditional and (_status(exc) == 412
                                or (_status(exc) == 409 and self._head(key) is not None)):
                return False
            raise self._unavailable("PUT object", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("PUT object", exc) from exc
        # No read-back: the server checked Content-MD5 (each part's, for multipart)
        # before answering 200, which is the durability the store path waits for.
        return True

    def _put_multipart(self, object_key: str, path: Path) -> None:
        upload_id = self._client.create_multipart_upload(
            Bucket=self.bucket, Key=object_key, ContentType="application/dicom",
        )["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            with open(path, "rb") as fp:
                number = 1
                while chunk := fp.read(PART_SIZE):
                    answer = self._client.upload_part(
                        Bucket=self.bucket, Key=object_key, UploadId=upload_id,
                        PartNumber=number, Body=chunk, ContentLength=len(chunk),
                        ContentMD5=_md5_b64(chunk),
                    )
                    parts.append({"PartNumber": number, "ETag": answer["ETag"]})
                    number += 1
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=object_key, UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            try:
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=object_key, UploadId=upload_id)
            except (ClientError, BotoCoreError):
                log.warning("could not abort a failed multipart upload; the server expires it")
            raise

    def exists(self, key: BlobKey) -> bool:
        try:
            return self._head(key) is not None
        except KeyError:
            return False

    def open(self, key: BlobKey) -> BinaryIO:
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND or _status(exc) == 404:
                raise KeyError(key) from None
            raise self._unavailable("GET object", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("GET object", exc) from exc
        # botocore's StreamingBody is a sequential, closable reader.
        return cast(BinaryIO, answer["Body"])

    def read_range(self, key: BlobKey, start: int, length: int | None = None) -> bytes:
        if start < 0 or (length is not None and length < 0):
            raise ValueError("range start and length must not be negative")
        object_key = self._object_key(key)
        if length == 0:
            if not self.exists(key):
                raise KeyError(key)
            return b""
        wanted = f"bytes={start}-" if length is None else f"bytes={start}-{start + length - 1}"
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=object_key, Range=wanted)
        except ClientError as exc:
            code = _code(exc)
            if code in _NOT_FOUND or _status(exc) == 404:
                raise KeyError(key) from None
            if code == "InvalidRange" or _status(exc) == 416:
                # Past the end: like a file read there, nothing (if the blob exists).
                if not self.exists(key):
                    raise KeyError(key) from None
                return b""
            raise self._unavailable("ranged GET", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("ranged GET", exc) from exc
        body = answer["Body"]
        try:
            return cast(bytes, body.read())
        except BotoCoreError as exc:
            raise self._unavailable("ranged GET", exc) from exc
        finally:
            body.close()

    def size(self, key: BlobKey) -> int:
        head = self._head(key)
        if head is None:
            raise KeyError(key)
        return int(head["ContentLength"])

    def local_path(self, key: BlobKey) -> Path | None:
        return None

    def local_file(self, key: BlobKey) -> tuple[str, int] | None:
        return None

    def keys(self) -> Iterator[BlobKey]:
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for item in page.get("Contents", []):
                    name = os.path.basename(str(item["Key"]))
                    if is_blob_key(name):
                        yield BlobKey(name)
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return
            raise self._unavailable("LIST objects", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("LIST objects", exc) from exc

    def check(self) -> None:
        if not self._bucket_ready:
            self._ensure_bucket()
            return
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable("HEAD bucket", exc) from exc
