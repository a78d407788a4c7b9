"""A matching key on a text column, as SQL: the one translation of the shared matching
rules (``vna.dicom.matching``) for the index's own columns and extended attributes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, and_, or_, true

from vna.dicom.matching import Match, MatchKind, wildcard_to_like


def text_condition(m: Match, col: Any) -> ColumnElement[bool]:
    """``m`` on ``col``: single value, list, range, wildcard or fuzzy person name."""
    if m.kind is MatchKind.SINGLE:
        single: ColumnElement[bool] = col == m.values[0]
        return single
    if m.kind is MatchKind.LIST:
        listed: ColumnElement[bool] = col.in_(list(m.values))
        return listed
    if m.kind is MatchKind.RANGE:
        lo, hi = m.values
        parts = [col != ""]
        if lo:
            parts.append(col >= lo)
        if hi:
            parts.append(col <= hi)
        return and_(*parts)
    if m.fuzzy:
        # Each query component matches the start of some name component.
        words = [w for w in m.values[0].replace("^", " ").replace(",", " ").split() if w]
        conds = []
        for w in words:
            like = wildcard_to_like(w.rstrip("*")) + "%"
            conds.append(or_(col.like(like, escape="\\"), col.like("%^" + like, escape="\\"),
                             col.like("% " + like, escape="\\")))
        return and_(*conds) if conds else true()
    wildcard: ColumnElement[bool] = col.like(wildcard_to_like(m.values[0]), escape="\\")
    return wildcard
