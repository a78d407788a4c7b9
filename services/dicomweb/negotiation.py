"""Which transfer syntax to send, from ``Accept`` (PS3.18 8.7.3): pure functions.

Instances (multipart/related; type="application/dicom"):

- ``transfer-syntax=*``, ``*/*``, or no Accept at all: the stored bytes.
- no transfer-syntax parameter on application/dicom: Explicit VR Little Endian,
  the default of PS3.18 Table 8.7.3-2.
- a named syntax: that syntax, transcoded when it is not the stored one.

Frames (PS3.18 Table 8.7.3-5):

- application/octet-stream without transfer-syntax: uncompressed, Explicit VR
  Little Endian; ``transfer-syntax=*``: the stored frame bytes.
- image/jpeg, image/jls, image/jp2, image/jpx, image/jphc, image/dicom-rle
  without transfer-syntax: the stored frame when it already is of that type,
  else the type's default syntax; with one: that syntax.
- ``*/*`` (or no Accept): the stored frame, typed by its syntax.

Ranges are tried by q-value, then in the client's order; the first one that
can be served wins, and 406 is answered only when none can.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.dicomweb.common import (
    APPLICATION_DICOM,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    FRAME_MEDIA_TYPE,
    IMPLICIT_VR_LITTLE_ENDIAN,
    NATIVE_TRANSFER_SYNTAXES,
    OCTET_STREAM,
    MediaRange,
    by_preference,
    media_matches,
)

STORED = "*"
"""A choice meaning: the stored bytes, in whatever syntax they are."""

# PS3.18 Table 8.7.3-5: the syntax a frame media type means when none is named.
DEFAULT_FRAME_SYNTAX = {
    "image/jpeg": "1.2.840.10008.1.2.4.50",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/jphc": "1.2.840.10008.1.2.4.201",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
}
_ALIASES = {"image/x-jls": "image/jls", "image/x-dicom-rle": "image/dicom-rle"}
# Native frames of these syntaxes are the same bytes (little endian, uncompressed).
LITTLE_ENDIAN_NATIVE = frozenset(NATIVE_TRANSFER_SYNTAXES - {EXPLICIT_VR_BIG_ENDIAN})


def _wildcard(media_type: str) -> bool:
    return media_type in ("*", "*/*") or media_type.endswith("/*")


def dicom_choices(ranges: list[MediaRange]) -> list[str]:
    """Syntaxes acceptable for application/dicom, best first; ``STORED`` for as stored.

    An empty list: nothing in ``Accept`` is application/dicom.
    """
    if not ranges:
        return [STORED]
    out: list[str] = []
    for r in by_preference(ranges):
        if not media_matches(r.media_type, APPLICATION_DICOM):
            continue
        if r.transfer_syntax == "*" or (r.transfer_syntax is None and _wildcard(r.media_type)):
            choice = STORED
        else:
            choice = r.transfer_syntax or EXPLICIT_VR_LITTLE_ENDIAN
        if choice not in out:
            out.append(choice)
    return out


@dataclass(frozen=True)
class FrameChoice:
    """One way to send frames: the part media type and the syntax (or ``STORED``)."""

    media_type: str
    transfer_syntax: str


def stored_frame_media_type(stored_ts: str) -> str:
    if stored_ts in NATIVE_TRANSFER_SYNTAXES:
        return OCTET_STREAM
    return FRAME_MEDIA_TYPE.get(stored_ts, OCTET_STREAM)


def frame_media_type(transfer_syntax: str) -> str | None:
    """The media type of a frame in ``transfer_syntax``; None for whole-data-set syntaxes."""
    if transfer_syntax in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
                           EXPLICIT_VR_BIG_ENDIAN):
        return OCTET_STREAM
    return FRAME_MEDIA_TYPE.get(transfer_syntax)


def frame_choices(ranges: list[MediaRange], stored_ts: str) -> list[FrameChoice]:
    """Ways to send frames of an instance stored in ``stored_ts``, best first."""
    stored_media = stored_frame_media_type(stored_ts)
    out: list[FrameChoice] = []
    for r in by_preference(ranges or [MediaRange("*/*", None, True)]):
        media = _ALIASES.get(r.media_type, r.media_type)
        ts = r.transfer_syntax
        choice: FrameChoice | None = None
        if _wildcard(media):
            if ts in (None, "*"):
                if media_matches(media, stored_media):
                    choice = FrameChoice(stored_media, STORED)
            else:
                named = frame_media_type(ts)
                if named is not None and media_matches(media, named):
                    choice = FrameChoice(named, ts)
        elif media == OCTET_STREAM:
            # Octet-stream names the bytes, not a codec: compressed frames may go
            # under it when the client asks for them (transfer-syntax=* or named).
            if ts in (None, "*") or frame_media_type(ts) is not None:
                choice = FrameChoice(OCTET_STREAM, STORED if ts == "*" else
                                     ts or EXPLICIT_VR_LITTLE_ENDIAN)
        elif media in DEFAULT_FRAME_SYNTAX:
            if ts is None:
                choice = FrameChoice(media, STORED if stored_media == media
                                     else DEFAULT_FRAME_SYNTAX[media])
            elif ts == "*":
                if stored_media == media:
                    choice = FrameChoice(media, STORED)
            elif FRAME_MEDIA_TYPE.get(ts) == media:
                choice = FrameChoice(media, ts)
        if choice is not None and choice not in out:
            out.append(choice)
    return out


def sent_frame_syntax(stored_ts: str, choice: FrameChoice) -> tuple[str, bool]:
    """(the syntax the frames will be in, whether they must be transcoded)."""
    if choice.transfer_syntax == STORED:
        if stored_ts in LITTLE_ENDIAN_NATIVE:
            return EXPLICIT_VR_LITTLE_ENDIAN, False
        return stored_ts, False
    target = choice.transfer_syntax
    if target == stored_ts:
        return target, False
    if stored_ts in LITTLE_ENDIAN_NATIVE and target in LITTLE_ENDIAN_NATIVE:
        return target, False  # uncompressed little endian frames are the same bytes
    return target, True
