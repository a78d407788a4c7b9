"""DIMSE status codes used by VNA, by name (PS3.4 Annex B, C, PS3.7 C)."""

from __future__ import annotations

from pydicom.dataset import Dataset

SUCCESS = 0x0000
CANCEL = 0xFE00
PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # optional keys not supported

# Storage (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
DUPLICATE_SOP_INSTANCE_CONFLICT = 0xC001
"""Refused: same SOP Instance UID with other content (a C0xx 'cannot understand' code)."""
PATIENT_CONFLICT = 0xC002
"""Refused: Study Instance UID known under another Patient ID."""
INVALID_UID = 0xC003
SERIES_CONFLICT = 0xC004
"""Refused: Series Instance UID known under another Study Instance UID."""
COERCION_OF_DATA_ELEMENTS = 0xB000
ELEMENTS_DISCARDED = 0xB006

# Query/Retrieve (PS3.4 C.4)
FIND_OUT_OF_RESOURCES = 0xA700
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000
MOVE_OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801
SUBOPERATIONS_COMPLETE_WITH_FAILURES = 0xB000

# DIMSE N-services, and the general statuses every service may answer (PS3.7 C)
NO_SUCH_ATTRIBUTE = 0x0105
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
NO_SUCH_ACTION = 0x0123
RESOURCE_LIMITATION = 0x0213

# Application-level error comments are limited to 64 characters (LO).
ERROR_COMMENT_MAX = 64


def error_comment(text: str) -> str:
    """Fit a reason into an Error Comment (0000,0902) LO value."""
    return text if len(text) <= ERROR_COMMENT_MAX else text[: ERROR_COMMENT_MAX - 3] + "..."


def response(code: int, comment: str) -> Dataset:
    """A response status with its reason in the Error Comment (a handler's return)."""
    rsp = Dataset()
    rsp.Status = code
    rsp.ErrorComment = error_comment(comment)
    return rsp
