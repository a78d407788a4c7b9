"""Accept -> transfer syntax choices (services/dicomweb/negotiation.py), without HTTP."""

from __future__ import annotations

import pytest

from services.dicomweb.common import MediaRange
from services.dicomweb.negotiation import (
    STORED,
    FrameChoice,
    dicom_choices,
    frame_choices,
    sent_frame_syntax,
)

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
BIG = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG = "1.2.840.10008.1.2.4.50"
JLS = "1.2.840.10008.1.2.4.80"
J2K = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
OCTET = "application/octet-stream"


def dicom(ts: str | None, q: float = 1.0, media: str = "application/dicom") -> MediaRange:
    return MediaRange(media, ts, True, q)


def test_instance_choices_follow_q_then_client_order() -> None:
    assert dicom_choices([]) == [STORED]
    assert dicom_choices([dicom("*")]) == [STORED]
    assert dicom_choices([dicom(None)]) == [EXPLICIT]  # PS3.18 default
    assert dicom_choices([dicom(None, media="*/*")]) == [STORED]
    assert dicom_choices([dicom("*", 0.2), dicom(JLS), dicom(RLE, 0.5), dicom(J2K)]) == \
        [JLS, J2K, RLE, STORED]
    assert dicom_choices([MediaRange("application/dicom+json", None, False)]) == []


@pytest.mark.parametrize(("accept", "stored", "expected"), [
    ([], J2K, [FrameChoice("image/jp2", STORED)]),
    ([], EXPLICIT, [FrameChoice(OCTET, STORED)]),
    ([MediaRange(OCTET, None, True)], J2K, [FrameChoice(OCTET, EXPLICIT)]),
    ([MediaRange(OCTET, "*", True)], J2K, [FrameChoice(OCTET, STORED)]),
    ([MediaRange(OCTET, EXPLICIT, True)], JLS, [FrameChoice(OCTET, EXPLICIT)]),
    ([MediaRange("image/jls", None, True)], EXPLICIT, [FrameChoice("image/jls", JLS)]),
    ([MediaRange("image/jp2", None, True)], J2K, [FrameChoice("image/jp2", STORED)]),
    ([MediaRange("image/jpeg", None, True)], J2K, [FrameChoice("image/jpeg", JPEG)]),
    ([MediaRange("image/x-jls", None, True)], EXPLICIT, [FrameChoice("image/jls", JLS)]),
    ([MediaRange("image/jls", RLE, True)], EXPLICIT, []),  # a type and a syntax not its own
    ([MediaRange("image/jp2", "*", True)], JLS, []),
    ([MediaRange("*/*", RLE, True)], EXPLICIT, [FrameChoice("image/dicom-rle", RLE)]),
    ([MediaRange("image/jls", None, True, 0.5), MediaRange(OCTET, None, True)], JLS,
     [FrameChoice(OCTET, EXPLICIT), FrameChoice("image/jls", STORED)]),
    ([MediaRange(OCTET, DEFLATED, True)], EXPLICIT, []),  # not a frame syntax
])
def test_frame_choices(accept: list[MediaRange], stored: str, expected: list[FrameChoice]
                       ) -> None:
    assert frame_choices(accept, stored) == expected


@pytest.mark.parametrize(("stored", "choice", "expected"), [
    (J2K, FrameChoice("image/jp2", STORED), (J2K, False)),
    (IMPLICIT, FrameChoice(OCTET, STORED), (EXPLICIT, False)),
    (DEFLATED, FrameChoice(OCTET, EXPLICIT), (EXPLICIT, False)),
    (EXPLICIT, FrameChoice(OCTET, IMPLICIT), (IMPLICIT, False)),  # the same bytes
    (BIG, FrameChoice(OCTET, STORED), (BIG, False)),
    (BIG, FrameChoice(OCTET, EXPLICIT), (EXPLICIT, True)),
    (J2K, FrameChoice(OCTET, EXPLICIT), (EXPLICIT, True)),
    (EXPLICIT, FrameChoice("image/jls", JLS), (JLS, True)),
])
def test_sent_frame_syntax(stored: str, choice: FrameChoice, expected: tuple[str, bool]
                           ) -> None:
    assert sent_frame_syntax(stored, choice) == expected
