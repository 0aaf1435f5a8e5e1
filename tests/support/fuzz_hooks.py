"""Schemathesis hooks: every schema-valid (positive) case is made valid for what JSON Schema cannot
say, so that tests/schemathesis.toml can demand a 2xx for it (404 only for an unknown id, 409 only
for changing a cancelled appointment, 412 only for an If-Match naming a version the appointment is
not at).

What JSON Schema cannot express, and the API checks: a phone number that is a real number
(phonenumbers; in a body, and in the do-not-call list's path), an IANA time zone, a language with a
message template (the default en-US only), a start in the future and at most 10 years ahead,
explicit reminders before the start, no NUL in text, a cursor that a previous page handed out
(the appointments' list, the events' feed).
Cases generated to be invalid (negative) are left alone.

Seeded: every choice is drawn from a generator seeded with FUZZ_SEED and the case itself, and
times count from the start of the current UTC day, so a seed gives the same requests all day
whatever order the cases come in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import schemathesis
from schemathesis.core.parameters import ParameterLocation

from service.api.conditional import IF_MATCH_PATTERN

PHONES = ["+14155552671", "+4930901820", "+442071838750", "+33142685300"]
LANGUAGES = ["en-US", "en-us", "EN-US"]  # the built-in template, tags in any case
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]
# Days ahead of today's start for a start time: always in the future, far from the 10-year bound.
START_DAYS = (2, 300)
SEED = os.environ.get("FUZZ_SEED", "1")
DAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
TEXT_FIELDS = ("customer_name", "notes")
IF_MATCH = re.compile(IF_MATCH_PATTERN[:-1] + r"\Z")  # the document's pattern, `$` read as JSON Schema does


def _rng(case: Any) -> random.Random:
    """A generator that depends on the seed and on what was generated, nothing else."""
    material = json.dumps(
        [SEED, case.method, case.path, case.path_parameters, case.query, case.body], sort_keys=True, default=str
    )
    return random.Random(hashlib.sha256(material.encode()).digest())


def _later(**delta: float) -> str:
    return (DAY + timedelta(**delta)).isoformat()


def _positive(case: Any, location: ParameterLocation) -> bool:
    """Whether the part at `location` was generated valid. Per part: a case made invalid elsewhere
    (say, without its Authorization header, which the run's -H then adds back) is judged valid in
    the end, and its body must then be valid too."""
    meta = getattr(case, "_meta", None)
    return meta is None or not meta.is_negative_at(location)


def _judged_positive(case: Any) -> bool:
    """Whether schemathesis will judge the case as a whole valid (positive_data_acceptance)."""
    meta = getattr(case, "_meta", None)
    return meta is None or meta.generation.mode.is_positive


def _valid_body(body: dict[str, Any], method: str, rng: random.Random) -> dict[str, Any]:
    body = dict(body)
    creating = method == "POST"
    if creating or "phone" in body:
        body["phone"] = rng.choice(PHONES)
    if creating or "starts_at" in body:
        body["starts_at"] = _later(days=rng.randint(*START_DAYS), minutes=rng.randint(0, 1439))
    if "timezone" in body:
        body["timezone"] = rng.choice(ZONES)
    if "language" in body:
        body["language"] = rng.choice(LANGUAGES)
    if body.get("remind_at"):  # before any start the hooks give (>= 2 days ahead), in the future
        body["remind_at"] = [_later(days=1, hours=rng.randint(1, 23))]
    for name in TEXT_FIELDS:
        if isinstance(body.get(name), str):
            body[name] = body[name].replace("\x00", "") or ("x" if name == "customer_name" else "")
    return body


def _valid_query(query: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    query = dict(query)
    for name in ("starts_after", "starts_before"):
        if name in query:
            query[name] = _later(days=rng.randint(-400, 400))
    if "cursor" in query:  # as a previous page would hand it out
        raw = json.dumps([_later(days=rng.randint(0, 400)), f"appointment-{rng.randint(0, 999)}"]).encode()
        query["cursor"] = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    if "after" in query:  # the events feed's: what its first page hands out while nothing was pruned
        query["after"] = base64.urlsafe_b64encode(b"p0").decode().rstrip("=")
    return query


@schemathesis.hook
def map_case(context, case):
    return _made_valid(case)


@schemathesis.hook
def before_add_examples(context, examples):
    examples[:] = [_made_valid(case) for case in examples]


def _made_valid(case: Any) -> Any:
    rng = _rng(case)
    method = case.method.upper()
    if method in ("POST", "PATCH") and isinstance(case.body, dict) and _positive(case, ParameterLocation.BODY):
        case.body = _valid_body(case.body, method, rng)
    if method == "GET" and case.query and _positive(case, ParameterLocation.QUERY):
        case.query = _valid_query(case.query, rng)
    if case.headers and "If-Match" in case.headers and _judged_positive(case):
        # schemathesis' coverage phase (4.32) keeps a header drawn invalid (`If-Match: 0`) in a case
        # it judges valid, for a mutation elsewhere; a value the pattern allows stays, to meet its 412
        if not IF_MATCH.search(str(case.headers["If-Match"])):
            case.headers["If-Match"] = "*"
    if case.path.startswith("/do-not-call/") and case.path_parameters and _positive(case, ParameterLocation.PATH):
        case.path_parameters = {**case.path_parameters, "phone": rng.choice(PHONES)}
    return case
