"""Blobs in any S3 API (MinIO, AWS, rclone) via boto3: the only module that imports it."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import parse_qs, urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from vna.model import BlobKey, is_blob_key
from vna.ports import Unavailable

MULTIPART_THRESHOLD = 64 << 20
PART_SIZE = 32 << 20


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


class S3BlobStore:
    """Write-once, content-addressed objects ``ab/cd/<sha256>`` in one bucket.

    Every upload carries Content-MD5, so the server verifies what it received
    before it answers (servers differ on x-amz-checksum-*; MD5 they all check).
    """

    def __init__(self, bucket: str, *, endpoint: str | None, access_key: str, secret_key: str,
                 region: str = "us-east-1", prefix: str = "") -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client: Any = boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None, region_name=region,
            config=Config(s3={"addressing_style": "path"}, connect_timeout=3, read_timeout=30,
                          retries={"max_attempts": 2, "mode": "standard"},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
        )
        self._bucket_ready = False

    @classmethod
    def from_url(cls, url: str, *, access_key: str, secret_key: str,
                 region: str = "us-east-1") -> S3BlobStore:
        """``s3://bucket[/prefix]?endpoint=http://host:port``."""
        parsed = urlparse(url)
        query = parse_qs(parsed.query)
        endpoint = query.get("endpoint", [None])[0]
        return cls(parsed.netloc, endpoint=endpoint, access_key=access_key,
                   secret_key=secret_key, region=query.get("region", [region])[0],
                   prefix=parsed.path)

    def _key(self, key: BlobKey) -> str:
        if not is_blob_key(key):
            raise KeyError(key)
        return f"{self.prefix}{key[:2]}/{key[2:4]}/{key}"

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            self.client.create_bucket(Bucket=self.bucket)
        self._bucket_ready = True

    def _call(self, fn: Any, **kwargs: Any) -> Any:
        try:
            self._ensure_bucket()
            return fn(**kwargs)
        except (EndpointConnectionError, BotoCoreError) as exc:
            raise Unavailable(f"blob store: {exc}") from exc
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise KeyError(kwargs.get("Key")) from exc
            raise Unavailable(f"blob store: {code or exc}") from exc

    def put_file(self, key: BlobKey, path: Path) -> bool:
        if self.exists(key):
            return False
        size = path.stat().st_size
        if size <= MULTIPART_THRESHOLD:
            body = path.read_bytes()
            self._call(self.client.put_object, Bucket=self.bucket, Key=self._key(key),
                       Body=body, ContentMD5=_md5_b64(body),
                       ContentType="application/dicom")
        else:
            self._multipart(key, path)
        if self.size(key) != size:
            raise Unavailable("blob store: stored size differs from what was sent")
        return True

    def _multipart(self, key: BlobKey, path: Path) -> None:
        upload = self._call(self.client.create_multipart_upload, Bucket=self.bucket,
                            Key=self._key(key), ContentType="application/dicom")
        parts = []
        try:
            with open(path, "rb") as fp:
                number = 1
                while chunk := fp.read(PART_SIZE):
                    done = self._call(self.client.upload_part, Bucket=self.bucket,
                                      Key=self._key(key), UploadId=upload["UploadId"],
                                      PartNumber=number, Body=chunk,
                                      ContentMD5=_md5_b64(chunk))
                    parts.append({"ETag": done["ETag"], "PartNumber": number})
                    number += 1
            self._call(self.client.complete_multipart_upload, Bucket=self.bucket,
                       Key=self._key(key), UploadId=upload["UploadId"],
                       MultipartUpload={"Parts": parts})
        except BaseException:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key),
                                               UploadId=upload["UploadId"])
            raise

    def exists(self, key: BlobKey) -> bool:
        try:
            self._call(self.client.head_object, Bucket=self.bucket, Key=self._key(key))
            return True
        except KeyError:
            return False

    def open(self, key: BlobKey) -> BinaryIO:
        obj = self._call(self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return cast(BinaryIO, obj["Body"])

    def read_range(self, key: BlobKey, start: int, length: int | None = None) -> bytes:
        end = "" if length is None else str(start + length - 1)
        if length == 0:
            return b""
        obj = self._call(self.client.get_object, Bucket=self.bucket, Key=self._key(key),
                         Range=f"bytes={start}-{end}")
        return cast(bytes, obj["Body"].read())

    def size(self, key: BlobKey) -> int:
        head = self._call(self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        return int(head["ContentLength"])

    def local_path(self, key: BlobKey) -> Path | None:
        return None

    def keys(self) -> Iterator[BlobKey]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            self._ensure_bucket()
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for item in page.get("Contents", []):
                    name = item["Key"].rsplit("/", 1)[-1]
                    if is_blob_key(name):
                        yield BlobKey(name)
        except (BotoCoreError, ClientError) as exc:
            raise Unavailable(f"blob store: {exc}") from exc

    def check(self) -> None:
        try:
            self._bucket_ready = False
            self._ensure_bucket()
        except (BotoCoreError, ClientError) as exc:
            raise Unavailable(f"blob store: {exc}") from exc
