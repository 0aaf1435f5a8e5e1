"""`advances_clause`, the SQL form of `advances` that applies a call event in one UPDATE, agrees
with `advances` for every pair of states and orders, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import BigInteger, String, literal, select

from service.reminders.outcomes import FINAL_CALL_STATES, LIVE_CALL_STATES, advances, advances_clause

STATES = [None, "bogus", "answered", *sorted(LIVE_CALL_STATES), *sorted(FINAL_CALL_STATES)]
ORDERS = [None, 1, 2]

pytestmark = pytest.mark.anyio


async def test_the_sql_rule_is_the_python_rule(db) -> None:
    currents = list(itertools.product(STATES, ORDERS))
    checked = 0
    for new, new_order in itertools.product(STATES[1:], ORDERS):
        clauses = [advances_clause(literal(current, String), literal(order, BigInteger), new,
                                   literal(new_order, BigInteger)).label(f"c{index}")
                   for index, (current, order) in enumerate(currents)]
        row = await db.read(lambda connection, clauses=clauses: connection.execute(select(*clauses)).one())
        for index, (current, order) in enumerate(currents):
            expected = advances(current, order, new, new_order)
            assert bool(row[index]) is expected, (current, order, new, new_order)
            checked += 1
    assert checked == (len(STATES) - 1) * len(ORDERS) * len(currents)
