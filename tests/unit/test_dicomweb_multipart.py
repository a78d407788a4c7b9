"""The streaming multipart reader: parts intact whatever the chunking."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import pytest

from services.dicomweb.multipart import MultipartError, Part, read_parts, write_parts


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def _read(body: bytes, boundary: str, size: int) -> list[tuple[str, bytes]]:
    parts: list[tuple[Part, io.BytesIO]] = []

    def open_part(part: Part) -> io.BytesIO:
        sink = io.BytesIO()
        parts.append((part, sink))
        return sink

    asyncio.run(read_parts(_chunks(body, size), boundary, open_part, lambda _p: None))
    return [(p.content_type, s.getvalue()) for p, s in parts]


# Bodies that contain near-boundaries, CRLFs and dashes must come back unchanged.
BODIES = [b"", b"x", b"\r\n--bound", b"--bound\r\n", b"a\r\n-", bytes(range(256)) * 40]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1 << 20])
def test_parts_survive_any_chunking(size: int) -> None:
    boundary = "bound-ary"
    body = b"".join(write_parts(boundary, [("application/dicom", [b]) for b in BODIES]))
    assert _read(body, boundary, size) == [("application/dicom", b) for b in BODIES]


def test_preamble_epilogue_and_leading_crlf() -> None:
    body = (b"ignored preamble\r\n--B\r\nContent-Type: application/dicom\r\n\r\nONE"
            b"\r\n--B\r\n\r\nTWO\r\n--B--\r\nepilogue")
    assert _read(body, "B", 5) == [("application/dicom", b"ONE"), ("", b"TWO")]
    client_style = b"\r\n--B\r\nContent-Type: application/dicom\r\n\r\nONE\r\n--B--"
    assert _read(client_style, "B", 4) == [("application/dicom", b"ONE")]


def test_a_body_without_the_closing_boundary_is_an_error() -> None:
    body = b"--B\r\nContent-Type: application/dicom\r\n\r\nONE\r\n--B\r\n\r\nTW"
    with pytest.raises(MultipartError, match="closing boundary"):
        _read(body, "B", 3)
