"""Fixed names inlined in SQL (service/sql.py), and the webhooks' statements built once: none of
them has a parameter that SQLAlchemy renders again at every execution (an "expanding" IN list),
and none is built per call (issue 26)."""

from __future__ import annotations

import pytest
from sqlalchemy import column, select, table
from sqlalchemy.dialects import postgresql, sqlite

from service.ledger import calls, cancellation
from service.sql import constants, none_of, one_of

_T = table("t", column("state"))
_DIALECTS = [postgresql.dialect(), sqlite.dialect()]


@pytest.mark.parametrize("dialect", _DIALECTS, ids=lambda d: d.name)
def test_names_are_inlined_sorted_once(dialect) -> None:
    sql = str(select(_T.c.state).where(one_of(_T.c.state, ["ringing", "queued", "ringing"]),
                                       none_of(_T.c.state, {"busy"})).compile(dialect=dialect))
    assert "IN ('queued', 'ringing')" in sql
    assert "NOT IN ('busy')" in sql


@pytest.mark.parametrize("name", ["x'); DROP TABLE t; --", "", "a b", "é"])
def test_only_fixed_names(name: str) -> None:
    with pytest.raises(ValueError, match="not a fixed name"):
        constants([name])


HOT = {
    **{f"PROGRESS[{state}]": statement for state, statement in calls.PROGRESS.items()},
    "ANSWERED": calls.ANSWERED, "BIND": calls.BIND, "KEYPAD_READ": calls.KEYPAD_READ,
    "KEYPAD_ROUND": calls.KEYPAD_ROUND, "CONFIRM": calls.CONFIRM,
    "LOCK_OF_APPOINTMENT": cancellation.LOCK_OF_APPOINTMENT, "SKIP_OF_APPOINTMENT": cancellation.SKIP_OF_APPOINTMENT,
}


@pytest.mark.parametrize("dialect", _DIALECTS, ids=lambda d: d.name)
@pytest.mark.parametrize("name", sorted(HOT))
def test_webhook_statements_render_once(name: str, dialect) -> None:
    compiled = HOT[name].compile(dialect=dialect)
    assert not compiled.post_compile_params, f"{name}: re-rendered at every execution"
    assert not compiled.literal_execute_params, f"{name}: re-rendered at every execution"


def test_statements_are_not_built_per_call() -> None:
    """The keypad's and the answer's UPDATE of an attempt come from a cache of built statements."""
    first = calls._attempt_update(frozenset({"provider_call_id", "last_event_at"}))
    assert calls._attempt_update(frozenset({"last_event_at", "provider_call_id"})) is first
    assert "answered_by" in str(calls._attempt_update(frozenset({"answered_by"})).compile(dialect=_DIALECTS[0]))
