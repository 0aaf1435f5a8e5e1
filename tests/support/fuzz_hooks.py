"""Schemathesis hooks: half the schema-valid appointment bodies get a real phone number and a
future start, so that fuzzing reaches past validation (JSON Schema cannot say "a valid number"
or "in the future") and the stateful phase has appointments to read, change and cancel.
Cases generated to be invalid are left alone."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import schemathesis

PHONES = ["+14155552671", "+4930901820", "+442071838750", "+33142685300"]


def _later(**delta: int) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


@schemathesis.hook
def map_case(context, case):  # noqa: ANN001, ANN201 - schemathesis hook signature
    meta = getattr(case, "_meta", None)
    negative = meta is not None and meta.generation.mode.is_negative
    body = case.body
    if negative or case.method.upper() not in ("POST", "PATCH") or not isinstance(body, dict) or random.random() < 0.5:
        return case
    body = dict(body)
    if case.method.upper() == "POST" or "phone" in body:
        body["phone"] = random.choice(PHONES)
    if case.method.upper() == "POST" or "starts_at" in body:
        body["starts_at"] = _later(days=random.randint(2, 300), minutes=random.randint(0, 1440))
    if body.get("remind_at"):
        body["remind_at"] = [_later(hours=random.randint(1, 40))]
    case.body = body
    return case
