"""VNA's File Meta framing."""

from __future__ import annotations

import io

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from vna.dicom.part10 import (
    NotPart10Error,
    file_meta_bytes,
    file_meta_bytes_reference,
    read_header,
)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, JPEG2000Lossless, "1.2.840.10008.1.2"])
def test_direct_encoding_equals_pydicoms_writer(ts: str) -> None:
    for uid in (generate_uid(), "1.2.3", "1.23"):
        assert file_meta_bytes(ts, CTImageStorage, uid) == file_meta_bytes_reference(
            ts, CTImageStorage, uid)


def test_header_round_trip() -> None:
    uid = generate_uid()
    raw = file_meta_bytes(JPEG2000Lossless, CTImageStorage, uid) + b"\x08\x00\x18\x00"
    header = read_header(io.BytesIO(raw))
    assert (header.transfer_syntax_uid, header.sop_class_uid, header.sop_instance_uid) == (
        JPEG2000Lossless, CTImageStorage, uid)
    assert raw[header.dataset_offset:] == b"\x08\x00\x18\x00"


def test_not_part10() -> None:
    with pytest.raises(NotPart10Error):
        read_header(io.BytesIO(b"hello"))
    with pytest.raises(NotPart10Error, match="truncated"):
        read_header(io.BytesIO(b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL"))
