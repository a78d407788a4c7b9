"""UID checks (PS3.5 9.1): what may be trusted as an identifier."""

from __future__ import annotations

import re

# Part of every stored file's File Meta (vna.dicom.part10): for one SOP Instance UID
# the blob key is what tells a resend from a conflicting instance, so changing either
# value makes every resend of an earlier instance look like a conflict.
IMPLEMENTATION_CLASS_UID = "2.25.254909517806440468250463924709282119819"
IMPLEMENTATION_VERSION_NAME = "VNA_010"

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a syntactically valid UID of at most 64 characters.

    Leading zeros in a component are tolerated nowhere; modalities that send
    them produce UIDs other systems reject, so we refuse them at the door too.
    """
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


def invalid_uid_reason(name: str, value: object) -> str | None:
    """A human-readable reason why ``value`` is not a valid UID, or None."""
    if not isinstance(value, str) or not value:
        return f"{name} is missing"
    if len(value) > 64:
        return f"{name} is longer than 64 characters"
    if not _UID.match(value):
        return f"{name} is not a valid UID (digits and dots, no leading zeros)"
    return None
