"""The webhooks' edges (issue 24), before anything is trusted: a deadline on the reading of a
webhook's body (`DeadlineMiddleware`; one test against a real uvicorn and a raw socket that
trickles the body), headers that cannot make a route raise (Telnyx's and Twilio's, each odd value
a 403 with its reason counted), refused signatures counted and warned of at most once a minute,
and Telnyx events of another connection acknowledged and ignored (decision 0242)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client import REGISTRY
from pydantic import ValidationError
from starlette.datastructures import FormData

from harness.ports import free_port
from reminders_fakes.telnyx import TEST_PUBLIC_KEY, TEST_SIGNING_SEED, sign
from service.api.deadlines import Deadline, DeadlineMiddleware
from service.api.limits import BodyLimitMiddleware
from service.app import create_app
from service.config import Settings, setting_error_line
from service.db import Database
from service.providers import PROVIDERS
from service.providers.common import WEBHOOK_PROVIDERS, SignatureRefusals
from service.providers.telnyx.rest import EVENTS_PATH
from service.providers.telnyx.signature import TelnyxSignature
from service.providers.twilio.webhooks import _call_sid, _sequence
from service.telephony.provider import Stamp
from service.telephony.webhook import SignatureFailure, one_header
from tests.support.providers import PHONE, TelnyxRig, provider_settings, rig_on
from tests.support.rows import attempt_row, reminder_row
from tests.support.waiting import eventually, poll_until

pytestmark = pytest.mark.anyio

STATUS_PATH = "/telephony/twilio/status"


def _failures(provider: str, reason: str) -> float:
    return REGISTRY.get_sample_value("reminders_webhook_signature_failures_total",
                                     {"provider": provider, "reason": reason}) or 0.0


def _foreign_events() -> float:
    return REGISTRY.get_sample_value("reminders_telnyx_foreign_events_total") or 0.0


# --- the deadline, in ASGI -------------------------------------------------------------------------


async def _body_then_answer(scope: dict, receive: Any, send: Any, *, work: float = 0.0) -> None:
    """An app that reads the whole body, works `work` seconds (a database, say), then answers 200."""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more = message.get("more_body", False)
    await asyncio.sleep(work)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _serve(app: Any, path: str, chunks: list[bytes], *, method: str = "POST", length: int | None = 10,
                 within: float = 5.0) -> tuple[list[dict], float]:
    """One request to `app` whose client sends `chunks` (each but the last `more_body`) and then
    stalls, never finishing its body; the messages sent back and the seconds until the first."""
    queue = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1 or length is not None}
             for i, chunk in enumerate(chunks)]
    stalled = asyncio.Event()

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        await stalled.wait()  # never set: the client sends nothing more
        return {"type": "http.disconnect"}

    sent: list[dict] = []
    first: list[float] = []

    async def send(message: dict) -> None:
        if not sent:
            first.append(time.monotonic())
        sent.append(message)

    headers = [(b"content-length", str(length).encode())] if length is not None else []
    scope = {"type": "http", "method": method, "path": path, "headers": headers, "query_string": b""}
    started = time.monotonic()
    await asyncio.wait_for(app(scope, receive, send), within)
    return sent, (first[0] - started) if first else float("inf")


WEBHOOKS = Deadline(("/telephony",), body=0.2)
API = Deadline(("/appointments",), answer=0.2)


async def test_a_webhook_body_not_in_by_the_deadline_is_a_408_and_the_connection_closes() -> None:
    app = DeadlineMiddleware(_body_then_answer, deadlines=(API, WEBHOOKS))
    for chunks in ([b"{"], []):  # a trickle that stops; headers and then nothing at all
        sent, after = await _serve(app, "/telephony/telnyx/events", chunks)
        assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
        assert json.loads(sent[1]["body"]) == {"detail": "request body not received within 0.2 s"}
        assert 0.15 < after < 1.0


async def test_the_body_deadline_bounds_the_body_only_and_only_under_its_prefixes() -> None:
    async def slow_handler(scope: dict, receive: Any, send: Any) -> None:
        await _body_then_answer(scope, receive, send, work=0.4)  # longer than the body deadline

    app = DeadlineMiddleware(slow_handler, deadlines=(API, WEBHOOKS))
    sent, _ = await _serve(app, "/telephony/twilio/status", [b"0123456789"], length=None)
    assert sent[0]["status"] == 200  # the body came in time; the handler's own budgets apply after
    with pytest.raises(TimeoutError):  # another path: nobody cuts the stalled body
        await _serve(app, "/telephonyx", [b"{"], within=0.5)
    assert Deadline(("/telephony",)).covers("/telephony") and not Deadline(("/telephony",)).covers("/telephonyx")


async def test_the_api_deadline_is_503_for_no_answer_and_408_for_a_body_still_coming() -> None:
    async def hangs(scope: dict, receive: Any, send: Any) -> None:
        await _body_then_answer(scope, receive, send, work=3600)  # a database that never answers

    app = DeadlineMiddleware(hangs, deadlines=(API, WEBHOOKS))
    sent, after = await _serve(app, "/appointments", [], method="GET", length=None)
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"] and after < 1.0
    sent, _ = await _serve(app, "/appointments", [b"{"])
    assert sent[0]["status"] == 408


async def test_a_content_length_of_unicode_digits_is_not_read_as_a_number() -> None:
    for declared in (b"\xb2", b"\xd9\xa3", b"9" * 40):  # `²`, an Arabic-Indic 3 in UTF-8, 40 digits
        app = BodyLimitMiddleware(_body_then_answer)
        scope = {"type": "http", "method": "POST", "path": "/x", "headers": [(b"content-length", declared)]}
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict, into: list = sent) -> None:
            into.append(message)

        await app(scope, receive, send)
        assert sent[0]["status"] == 200, declared


# --- the deadline on a real server -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def _uvicorn(app: Any) -> AsyncIterator[int]:
    """`app` served by uvicorn (its default HTTP implementation) on a free loopback port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        await poll_until(lambda: server.started or serving.done(), 10, "uvicorn listening")
        assert server.started
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


async def test_a_body_sent_one_byte_every_2_s_gets_a_408_at_the_deadline_from_uvicorn(tmp_path: Path) -> None:
    app = _app("telnyx", tmp_path, webhook_body_timeout="1")
    head = (f"POST {EVENTS_PATH} HTTP/1.1\r\nHost: reminders\r\nContent-Type: application/json\r\n"
            "Content-Length: {length}\r\n\r\n")
    async with _uvicorn(app) as port:
        # a body sent at once: through the deadline to the route (unsigned: 403)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head.format(length=2).encode() + b"{}")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 403")
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(head.format(length=100).encode())

        async def trickle() -> None:  # the client under test: one byte every 2 s
            with contextlib.suppress(ConnectionError):
                for _ in range(100):
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(2)

        trickling = asyncio.create_task(trickle())
        try:
            status = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
            answered = time.monotonic() - started
            rest = await asyncio.wait_for(reader.read(), 5)  # and the server closes the connection
        finally:
            trickling.cancel()
            writer.close()
    assert status.startswith(b"HTTP/1.1 408"), status
    assert 0.9 < answered < 2.5, answered  # at the deadline (1 s), not when the client finishes (200 s)
    assert b"connection: close" in rest.lower() and rest.endswith(b'"request body not received within 1 s"}')


def test_webhook_body_timeout_is_checked_at_start() -> None:
    assert Settings().webhook_body_timeout == 10.0
    assert Settings(webhook_body_timeout="2.5").webhook_body_timeout == 2.5
    for bad in ("0", "-1", "nan", "inf", "61", "ten"):
        with pytest.raises(ValidationError) as error:
            Settings(webhook_body_timeout=bad)
        assert setting_error_line(error.value).startswith("invalid setting WEBHOOK_BODY_TIMEOUT: "), bad


# --- headers that cannot raise ---------------------------------------------------------------------


def _app(provider: str, tmp_path: Path, **overrides: str) -> Any:
    """The service's app in `provider`'s mode (closed: a token and the countries called); no
    lifespan: a refusal happens before any database is needed."""
    return create_app(provider_settings(provider, api_token="t0ken", allowed_countries="US",
                                        database_url=f"sqlite+aiosqlite:///{tmp_path}/a.db", **overrides))


def _telnyx_app(tmp_path: Path) -> Any:
    """Telnyx mode, verifying with the fake's key (its API loopback, where that key is accepted)."""
    return _app("telnyx", tmp_path, telnyx_public_key=TEST_PUBLIC_KEY, telnyx_api_url="http://127.0.0.1:8092")


BODY = b'{"data": {"event_type": "call.initiated", "id": "e", "occurred_at": "2030-01-01T00:00:00Z", "payload": {}}}'


def _signed_now() -> tuple[str, bytes]:
    """A timestamp of now and the fake key's signature of BODY with it (made when a test runs: the
    check refuses timestamps over 5 minutes off, and the suite runs longer than that)."""
    now = str(int(time.time()))
    return now, sign(TEST_SIGNING_SEED, now, BODY).encode()


def _telnyx_headers() -> list[tuple[list[tuple[bytes, bytes]], str]]:
    now, good = _signed_now()
    return [
        ([], "missing"),
        ([(b"telnyx-signature-ed25519", good)], "missing"),
        ([(b"telnyx-timestamp", now.encode())], "missing"),
        ([(b"telnyx-timestamp", b""), (b"telnyx-signature-ed25519", good)], "missing"),
        ([(b"telnyx-timestamp", b"\xb2"), (b"telnyx-signature-ed25519", good)], "malformed"),  # `²`, as Latin-1
        ([(b"telnyx-timestamp", b"\xc2\xb2"), (b"telnyx-signature-ed25519", good)], "malformed"),  # `²` in UTF-8
        ([(b"telnyx-timestamp", b"9" * 100_000), (b"telnyx-signature-ed25519", good)], "malformed"),
        ([(b"telnyx-timestamp", b"1" * 13), (b"telnyx-signature-ed25519", good)], "malformed"),
        ([(b"telnyx-timestamp", b"-1"), (b"telnyx-signature-ed25519", good)], "malformed"),
        ([(b"telnyx-timestamp", now.encode()), (b"telnyx-timestamp", now.encode()),
          (b"telnyx-signature-ed25519", good)], "malformed"),  # repeated
        ([(b"telnyx-timestamp", now.encode()), (b"telnyx-signature-ed25519", good),
          (b"telnyx-signature-ed25519", good)], "malformed"),
        ([(b"telnyx-timestamp", now.encode()), (b"telnyx-signature-ed25519", "é".encode() * 40)], "malformed"),
        ([(b"telnyx-timestamp", now.encode()), (b"telnyx-signature-ed25519", b"c2hvcnQ=")], "malformed"),
        ([(b"telnyx-timestamp", now.encode()), (b"telnyx-signature-ed25519", b"%%%%")], "malformed"),
        ([(b"telnyx-timestamp", b"1000"), (b"telnyx-signature-ed25519", good)], "stale"),
        ([(b"telnyx-timestamp", now.encode()),
          (b"telnyx-signature-ed25519", sign(bytes(32), now, BODY).encode())], "mismatch"),  # another key
    ]


async def test_odd_telnyx_headers_are_403_with_their_reason_and_no_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = _telnyx_app(tmp_path)
    now, good = _signed_now()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://replica") as client:
        for headers, reason in _telnyx_headers():
            before = _failures("telnyx", reason)
            with caplog.at_level(logging.INFO):
                # the app raising would raise here (ASGITransport re-raises)
                response = await client.post(EVENTS_PATH, content=BODY, headers=headers)
            assert (response.status_code, response.json()) == (403, {"detail": "invalid signature"}), headers
            assert _failures("telnyx", reason) == before + 1, (headers, reason)
        signed = [(b"telnyx-timestamp", now.encode()), (b"telnyx-signature-ed25519", good)]
        assert (await client.post(EVENTS_PATH, content=BODY, headers=signed)).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


TWILIO_HEADERS: list[tuple[list[tuple[bytes, bytes]], str]] = [
    ([], "missing"),
    ([(b"x-twilio-signature", b"")], "missing"),
    ([(b"x-twilio-signature", b"\xb2")], "malformed"),
    ([(b"x-twilio-signature", "é".encode() * 10)], "malformed"),
    ([(b"x-twilio-signature", b"A" * 100_000)], "malformed"),
    ([(b"x-twilio-signature", b"a\x01b")], "malformed"),
    ([(b"x-twilio-signature", b"abc="), (b"x-twilio-signature", b"abc=")], "malformed"),
    ([(b"x-signalwire-signature", b"\xff\xfe")], "malformed"),
    ([(b"x-twilio-signature", b"bm90IGl0Lg==")], "mismatch"),
]


async def test_odd_twilio_headers_are_403_with_their_reason_and_no_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = _app("twilio", tmp_path)
    form = {"CallSid": "CA" + "1" * 32, "CallStatus": "ringing", "SequenceNumber": "²"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://replica") as client:
        for headers, reason in TWILIO_HEADERS:
            before = _failures("twilio", reason)
            with caplog.at_level(logging.INFO):
                response = await client.post(f"{STATUS_PATH}?r=x&a=y", data=form, headers=headers)
            assert (response.status_code, response.json()) == (403, {"detail": "invalid signature"}), headers
            assert _failures("twilio", reason) == before + 1, (headers, reason)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_twilio_form_values_are_read_as_ascii_or_not_at_all() -> None:
    """After the signature: Twilio's own values, read so that none raises."""
    for value, expected in (("12", 12), ("²", None), ("٣", None), ("9" * 40, None), ("", None), ("-1", None)):
        assert _sequence(FormData([("SequenceNumber", value)])) == expected, value
    assert _call_sid(FormData([("CallSid", "CA" + "a" * 32)])) == "CA" + "a" * 32
    for sid in ("CAé", "CA\u0663", "", "x" * 65, "CA 1"):
        assert _call_sid(FormData([("CallSid", sid)])) is None, sid


def test_the_telnyx_check_takes_ascii_digits_only_whoever_calls_it() -> None:
    check = TelnyxSignature(TEST_PUBLIC_KEY)
    now, good = _signed_now()
    for timestamp in ("²", "\u0663" * 10, "1" * 13, "", " 1", "1.5"):  # `٣` passes int() too: refused as well
        assert check.failure(BODY, good.decode(), timestamp) in (SignatureFailure.MALFORMED,
                                                                 SignatureFailure.MISSING), timestamp
    assert check.failure(BODY, good.decode(), now) is None


def test_one_header() -> None:
    assert one_header([" abc "], 10) == "abc"
    assert one_header([], 10) is SignatureFailure.MISSING and one_header(["  "], 10) is SignatureFailure.MISSING
    for values in (["a", "a"], ["x" * 11], ["\xb2"], ["a\tb"], ["é"]):
        assert one_header(values, 10) is SignatureFailure.MALFORMED, values


def test_an_echoed_stamp_nested_too_deep_is_no_stamp() -> None:
    import base64

    deep = base64.b64encode(b"[" * 100_000).decode()
    assert Stamp.decode(deep) is None and Stamp.round_in(deep) == 1


# --- refused signatures: counted, and warned of at most once a minute --------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refusals_are_counted_each_and_warned_of_once_a_minute_per_provider(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    refusals = SignatureRefusals(clock=clock)
    before = _failures("telnyx", "mismatch")
    with caplog.at_level(logging.WARNING, logger="service.providers.common"):
        for _ in range(50):
            refusals.refused("telnyx", SignatureFailure.MISMATCH, "telnyx event refused")
            clock.now += 0.5  # 50 refusals in 25 s
        refusals.refused("twilio", SignatureFailure.MISSING, "twilio webhook refused")  # its own minute
        clock.now = 1059.9
        refusals.refused("telnyx", SignatureFailure.STALE, "telnyx event refused")
        clock.now = 1060.0
        refusals.refused("telnyx", SignatureFailure.MISMATCH, "telnyx event refused")
    assert _failures("telnyx", "mismatch") == before + 51
    assert [r.getMessage() for r in caplog.records] == [
        "telnyx event refused (mismatch)",
        "twilio webhook refused (missing)",
        "telnyx event refused (mismatch); 50 more refused in the 60 s since the last warning",
    ]


async def test_a_flood_of_bad_signatures_logs_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = _telnyx_app(tmp_path)
    before = _failures("telnyx", "mismatch")
    now = _signed_now()[0]
    forged = [(b"telnyx-timestamp", now.encode()), (b"telnyx-signature-ed25519", sign(bytes(32), now, BODY).encode())]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://replica") as client:
        with caplog.at_level(logging.WARNING):
            for _ in range(200):
                assert (await client.post(EVENTS_PATH, content=BODY, headers=forged)).status_code == 403
    assert _failures("telnyx", "mismatch") == before + 200
    warnings = [r.getMessage() for r in caplog.records if r.name == "service.providers.common"]
    assert warnings == ["telnyx event refused: bad, missing or stale signature (mismatch)"]


def test_every_provider_with_webhooks_exports_zeros_for_every_reason() -> None:
    with_routes = {name for name, package in PROVIDERS.items() if package.install is not PROVIDERS["generic"].install}
    assert set(WEBHOOK_PROVIDERS) == with_routes
    for provider in WEBHOOK_PROVIDERS:
        for reason in SignatureFailure:
            assert REGISTRY.get_sample_value("reminders_webhook_signature_failures_total",
                                             {"provider": provider, "reason": reason.value}) is not None


# --- Telnyx: events of another connection -----------------------------------------------------------


@pytest.fixture
async def rig(db: Database) -> AsyncIterator[TelnyxRig]:
    async with rig_on(db, "telnyx") as rig:
        yield rig


def _answered(reminder_id: str, attempt_id: str, event_id: str, connection_id: str | None) -> bytes:
    payload: dict[str, Any] = {"call_control_id": "v3:answered",
                               "client_state": Stamp(reminder_id, attempt_id).encode()}
    if connection_id is not None:
        payload["connection_id"] = connection_id
    return json.dumps({"data": {"record_type": "event", "event_type": "call.answered", "id": event_id,
                                "occurred_at": datetime.now(UTC).isoformat(), "payload": payload}}).encode()


async def test_an_event_of_another_connection_is_acknowledged_and_changes_nothing(db: Database,
                                                                                  rig: TelnyxRig) -> None:
    reminder_id, (attempt_id,) = await rig.seed(PHONE)
    before, foreign = (await reminder_row(db, reminder_id), await attempt_row(db, attempt_id)), _foreign_events()
    async with rig.client() as client:
        body = _answered(reminder_id, attempt_id, "e-1", "2811212257810187875")  # another application's
        assert (await client.post(EVENTS_PATH, content=body, headers=TelnyxRig.signed(body))).status_code == 200
        assert (await reminder_row(db, reminder_id), await attempt_row(db, attempt_id)) == before
        assert _foreign_events() == foreign + 1
        body = _answered(reminder_id, attempt_id, "e-2", TelnyxRig.CONNECTION)  # ours: it binds
        assert (await client.post(EVENTS_PATH, content=body, headers=TelnyxRig.signed(body))).status_code == 200
    assert (await reminder_row(db, reminder_id)).bound_call_id == "v3:answered"
    assert _foreign_events() == foreign + 1


async def test_the_fakes_events_name_its_connection_as_telnyxs_do(db: Database, rig: TelnyxRig) -> None:
    """With another TELNYX_CONNECTION_ID every event of the fake's call is foreign: none binds."""
    rig.app.state.telnyx_connection_id = "another-application"
    reminder_id, (attempt_id,) = await rig.seed(PHONE)
    foreign = _foreign_events()
    call_id = await rig.place(reminder_id, attempt_id, record=False)
    await eventually(lambda: _foreign_events() >= foreign + 2)  # initiated, answered, …
    call = rig.fake.calls[call_id]
    assert "call.answered" in call.events and call.heard == []
    assert (await reminder_row(db, reminder_id)).bound_call_id is None


@pytest.mark.parametrize("provider", ["twilio", "telnyx"])
async def test_webhook_paths_answer_like_the_apis_another_method_405_an_unknown_path_404(
        provider: str, tmp_path: Path) -> None:
    """The webhooks are routes of their own, matched before the API (docs/decisions/0262): a GET is
    a 405 naming POST, an unknown path under the prefix a 404, both as the API answers them; the
    API behind them is still served."""
    app = _app("twilio", tmp_path) if provider == "twilio" else _telnyx_app(tmp_path)
    path = STATUS_PATH if provider == "twilio" else "/telephony/telnyx/events"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://replica") as client:
        refused = await client.get(path)
        assert (refused.status_code, refused.headers.get("allow"), refused.json()) == (
            405, "POST", {"detail": "Method Not Allowed"})
        unknown = await client.post(f"/telephony/{provider}/nothing-here", content=b"x")
        assert (unknown.status_code, unknown.json()) == (404, {"detail": "Not Found"})
        assert (await client.get("/appointments/x")).status_code == 401  # the API, behind its token
        api_refused = await client.delete("/healthz")
        assert (api_refused.status_code, api_refused.headers.get("allow")) == (405, "GET")
