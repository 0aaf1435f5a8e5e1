"""`python -m bench webhooks` (bench/webhooks.py, bench/bare_webhooks.py): the pre-signed requests
verify with the service's own signature classes, the ids the SQL seeding computes are those the
requests name, the floor's SQL is compiled once; and a tiny run of the part end to end (one replica
per provider, its floor, wrk) in which every route answers 2xx, changes its rows and sends the SQL
the floor sends. Timings are never asserted."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from urllib.parse import parse_qsl, urlsplit

import pytest
from starlette.datastructures import FormData

from bench.bare_webhooks import ROUTES, FloorSQL
from bench.webhooks import (
    Signed,
    call_id,
    call_webhooks,
    get_request,
    row_id,
    telnyx_request,
    twilio_request,
)
from service.providers.telnyx.events import parse_event
from service.providers.telnyx.signature import TelnyxSignature
from service.providers.twilio.signature import SIGNATURE_HEADER, TwilioSignature
from service.telephony.provider import Stamp

PUBLIC_URL = "http://127.0.0.1:41234/edge"


def _fields(signed: Signed) -> tuple[str, str, dict[str, str]]:
    """What the wrk script sends, read back from the line it reads (a POST: the webhooks)."""
    fields = signed.line().split("\t")
    assert fields[0] == "POST"
    return fields[1], fields[2], dict(zip(fields[3::2], fields[4::2], strict=True))


def test_the_get_reads_a_seeded_appointment_without_a_body() -> None:
    assert get_request(5).line() == f"GET\t/appointments/{row_id('wa', 5)}\t"


def test_a_call_s_webhooks_are_counted_in_gets_of_their_own_side() -> None:
    routes = {"twilio/status": {"replica_cpu_ms_per_request": 1.0, "floor_cpu_ms_per_request": 0.5},
              "twilio/voice": {"replica_cpu_ms_per_request": 2.0, "floor_cpu_ms_per_request": 1.0},
              "twilio/gather": {"replica_cpu_ms_per_request": 3.0, "floor_cpu_ms_per_request": 1.5}}
    get = {"replica_cpu_ms_per_request": 0.5, "floor_cpu_ms_per_request": 0.25}
    call = call_webhooks("twilio", routes, get)
    assert call is not None and (call["webhooks_per_call"], call["budget_in_gets"]) == (6, 8)
    assert call["replica"] == {"webhooks_cpu_ms": 9.0, "get_cpu_ms": 0.5, "in_gets": 18.0}
    assert call["floor"] == {"webhooks_cpu_ms": 4.5, "get_cpu_ms": 0.25, "in_gets": 18.0}
    assert call_webhooks("telnyx", routes, get) is None  # only `call.initiated` has a floor


@pytest.mark.parametrize("route", ["twilio/status", "twilio/voice", "twilio/gather"])
def test_a_twilio_request_verifies_with_the_service_signature(route: str) -> None:
    path, body, headers = _fields(twilio_request(route, 7, PUBLIC_URL, "token", "AC" + "5" * 32))
    parts = urlsplit(path)
    form = FormData(parse_qsl(body, keep_blank_values=True))
    check = TwilioSignature("token", PUBLIC_URL)
    assert check.valid(parts.path, parts.query, form, headers[SIGNATURE_HEADER])
    assert not TwilioSignature("other", PUBLIC_URL).valid(parts.path, parts.query, form, headers[SIGNATURE_HEADER])
    assert not check.valid(parts.path, parts.query + "&x=1", form, headers[SIGNATURE_HEADER])
    assert Stamp.from_query(dict(parse_qsl(parts.query))) == Stamp(row_id("wr", 7), row_id("wc", 7))
    assert form["CallSid"] == call_id("twilio", 7)
    expected = {"twilio/status": ("CallStatus", "ringing"), "twilio/voice": ("AnsweredBy", "human"),
                "twilio/gather": ("Digits", "1")}[route]
    assert form[expected[0]] == expected[1]


def test_a_telnyx_request_verifies_with_the_service_signature() -> None:
    from reminders_fakes.telnyx import TEST_PUBLIC_KEY, TEST_SIGNING_SEED

    path, body, headers = _fields(telnyx_request(9, TEST_SIGNING_SEED, "1494404757140276705", time.time()))
    assert path == "/telephony/telnyx/events"
    check = TelnyxSignature(TEST_PUBLIC_KEY)
    assert check.valid(body.encode(), headers["telnyx-signature-ed25519"], headers["telnyx-timestamp"])
    assert not check.valid(body.encode() + b" ", headers["telnyx-signature-ed25519"], headers["telnyx-timestamp"])
    event = parse_event(body.encode())
    assert event is not None and event.event_type == "call.initiated"
    assert event.stamp == Stamp(row_id("wr", 9), row_id("wc", 9)) and event.call_id == call_id("telnyx", 9)
    assert event.event_id and event.connection_id == "1494404757140276705"
    assert json.loads(body)["data"]["id"] == row_id("we", 9)


def test_the_ids_are_postgresql_md5_as_uuid() -> None:
    # SQL seeds md5('wr' || i)::uuid::text: the hex digest in the 8-4-4-4-12 form
    digest = hashlib.md5(b"wr12").hexdigest()
    assert row_id("wr", 12) == str(uuid.UUID(digest)) == (
        f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:]}")
    assert call_id("twilio", 3) == "CA" + hashlib.md5(b"ws3").hexdigest()


def test_the_floor_compiles_every_route_once() -> None:
    sql = FloorSQL()
    for route in ROUTES:
        statements = sql.sequence(route)
        assert statements and all("$1" in s for s in statements)
        assert not any("POSTCOMPILE" in s for s in statements)
    assert sql.bind.generated  # reminders.updated_at: the model's Python onupdate, called per request


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_a_tiny_run_does_every_route_s_work_with_the_ledger_s_sql() -> None:
    from bench.webhooks import run

    result = run(quick=True, duration=1, rows=400)
    assert set(result["routes"]) == set(ROUTES)
    assert result["errors"] == 0 and result["non_2xx"] == 0
    for route, figures in result["routes"].items():
        assert figures["sql"]["same_as_floor"], (route, figures["sql"])
        assert figures["answers"]["same"] and figures["answers"]["status"] < 300, (route, figures["answers"])
        assert figures["rows"]["rows_done"] > 0, route
        assert figures["replica_rps"] > 0 and figures["floor"]["rps"] > 0
    for mode in ("twilio", "telnyx"):
        get = result[mode]["get"]
        assert get["answers"]["same"] and get["answers"]["status"] == 200, get["answers"]
        assert get["non_2xx"] == 0 and get["replica_rps"] > 0 and get["floor"]["rps"] > 0
    assert result["twilio"]["call"]["floor"]["in_gets"] > 0 and result["twilio"]["call"]["replica"]["in_gets"] > 0
