"""A matching key on a text column, as SQL: the one translation of the shared matching
rules (``vna.dicom.matching``) for the index's own columns and extended attributes.

The values a condition compares with (``text_params``) are kept apart from its
form, so that a search can build its statement once per form, with bound
parameters, and run it again with the values of the next request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, true

from vna.dicom.matching import Match, MatchKind, wildcard_to_like


def _fuzzy_words(m: Match) -> list[str]:
    return [w for w in m.values[0].replace("^", " ").replace(",", " ").split() if w]


def text_params(m: Match) -> list[str]:
    """The values ``text_condition(m, col)`` compares ``col`` with, in its order."""
    if m.kind is MatchKind.SINGLE:
        return [m.values[0]]
    if m.kind is MatchKind.LIST:
        return list(m.values)
    if m.kind is MatchKind.RANGE:
        return [v for v in m.values if v]
    if m.fuzzy:
        # Each query component matches the start of some name component.
        out = []
        for w in _fuzzy_words(m):
            like = wildcard_to_like(w.rstrip("*")) + "%"
            out += [like, "%^" + like, "% " + like]
        return out
    return [wildcard_to_like(m.values[0])]


def text_form(m: Match) -> tuple[Any, ...]:
    """What, besides its values, decides the SQL of ``text_condition(m, col)``."""
    open_ends = tuple(bool(v) for v in m.values) if m.kind is MatchKind.RANGE else ()
    return m.kind.value, m.fuzzy, len(text_params(m)), open_ends


def text_condition(m: Match, col: Any, params: Sequence[Any] | None = None
                   ) -> ColumnElement[bool]:
    """``m`` on ``col``: single value, list, range, wildcard or fuzzy person name.

    ``params``: what to compare with instead of ``text_params(m)`` (bound parameters
    of a statement built once for every match of the same ``text_form``).
    """
    values = text_params(m) if params is None else list(params)
    if m.kind is MatchKind.SINGLE:
        single: ColumnElement[bool] = col == values[0]
        return single
    if m.kind is MatchKind.LIST:
        listed: ColumnElement[bool] = col.in_(values)
        return listed
    if m.kind is MatchKind.RANGE:
        lo, hi = m.values
        ends = iter(values)
        parts = [col != ""]
        if lo:
            parts.append(col >= next(ends))
        if hi:
            parts.append(col <= next(ends))
        return and_(*parts)
    if m.fuzzy:
        conds = [or_(*[col.like(values[i + j], escape="\\") for j in range(3)])
                 for i in range(0, len(values), 3)]
        return and_(*conds) if conds else true()
    wildcard: ColumnElement[bool] = col.like(values[0], escape="\\")
    return wildcard
