"""Corrected copies for retrieval: the study's current metadata version over the stored bytes.

WADO-RS instance retrieval and C-GET/C-MOVE hand out the corrected attributes
(as dcm4chee and Orthanc do), so that a receiver files the images under the
right patient. The stored blob is never rewritten (design invariant 2).
"""

from __future__ import annotations

from vna.dicom.corrections import corrected_part10
from vna.model import BlobKey
from vna.ports import BlobStore, Index


def current_overlay(study_instance_uid: str, *, index: Index) -> dict[str, str]:
    """Attributes the study's current metadata version sets ({} when never corrected)."""
    versions = index.study_versions(study_instance_uid)
    return dict(versions[-1]["attributes"]) if versions else {}


def corrected_copy(key: BlobKey, overlay: dict[str, str], *, blobs: BlobStore) -> bytes:
    """The stored object at ``key`` with ``overlay`` applied, as Part-10 bytes."""
    with blobs.open(key) as fp:
        data = fp.read()
    return corrected_part10(data, overlay)


class Overlays:
    """Per-request cache of study overlays (one index read per study)."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self._found: dict[str, dict[str, str]] = {}

    def __call__(self, study_instance_uid: str) -> dict[str, str]:
        if study_instance_uid not in self._found:
            self._found[study_instance_uid] = current_overlay(study_instance_uid,
                                                              index=self.index)
        return self._found[study_instance_uid]
