"""SQL fragments that keep a statement compiled once; imports SQLAlchemy only.

`column IN (…)` over a list of values binds them as an "expanding" parameter, which SQLAlchemy
renders into the SQL text again at every execution, after its cache: a hot statement paid that
on every call. Fixed names (states, statuses: the code's constants, never input) are inlined
instead, and the statement's text is built once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy import literal_column
from sqlalchemy.sql.elements import ColumnElement

__all__ = ["constants", "none_of", "one_of"]

_NAME = re.compile(r"[A-Za-z0-9_.:-]+")


def constants(values: Iterable[str]) -> list[ColumnElement[str]]:
    """Fixed names as SQL string literals, sorted (one text for one set)."""
    names = sorted({str(value) for value in values})
    for name in names:
        if not _NAME.fullmatch(name):
            raise ValueError(f"not a fixed name: {name!r}")
    return [literal_column(f"'{name}'") for name in names]


def one_of(column: Any, values: Iterable[str]) -> ColumnElement[bool]:
    """`column IN ('a', 'b', …)`, the names inlined."""
    return column.in_(constants(values))


def none_of(column: Any, values: Iterable[str]) -> ColumnElement[bool]:
    """`column NOT IN ('a', 'b', …)`, the names inlined."""
    return column.not_in(constants(values))
