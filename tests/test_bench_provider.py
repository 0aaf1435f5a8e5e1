"""The pure parts of `python -m bench provider` (bench/provider.py): how webhooks are labelled
at the front and in the replicas, how a py-spy profile is summed, how the figures per route and
the ratios to the GET come out of the counts. Timings are never asserted."""

from __future__ import annotations

from collections import Counter

from bench.provider import _ratios, _routes, inclusive
from bench.statements import route_label
from harness.webhook_proxy import ProxyStats, webhook_label


def test_webhooks_are_labelled_by_route_and_kind() -> None:
    assert webhook_label("/telephony/twilio/voice", b"CallSid=CA1&CallStatus=in-progress") == "twilio/voice"
    assert webhook_label("/telephony/twilio/status", b"CallSid=CA1&CallStatus=in-progress&x=1") == \
        "twilio/status:in-progress"
    assert webhook_label("/telephony/twilio/status", b"CallSid=CA1") == "twilio/status"
    assert webhook_label("/telephony/telnyx/events", b'{"data": {"event_type": "call.answered"}}') == \
        "telnyx/events:call.answered"
    assert webhook_label("/telephony/telnyx/events", b"not json") == "telnyx/events"
    assert webhook_label("/telephony/telnyx/events", b'{"data": []}') == "telnyx/events"


def test_a_request_outside_the_webhooks_is_labelled_by_its_path_with_ids() -> None:
    assert route_label("/appointments/3236e5ff-cf92-4154-a172-899f98c98383") == "/appointments/{id}"
    assert route_label("/appointments") == "/appointments"
    assert route_label("/telephony/twilio/voice") == "/telephony/twilio/voice"


def test_the_front_counts_only_while_recording() -> None:
    stats = ProxyStats(recording=True)
    stats.record("twilio/voice", 0.0, 200, "http://a")
    stats.record("twilio/voice", 0.0, 503, "http://b")
    shown = stats.as_json(full=True)
    assert shown["total"] == 2 and shown["counts"] == {"twilio/voice": 2}
    assert shown["statuses"] == {"twilio/voice": {"200": 1, "503": 1}}
    assert shown["upstreams"] == {"http://a": 1, "http://b": 1}
    assert "latencies_ms" not in stats.as_json(full=False)


def test_routes_join_the_front_and_the_replicas_counts() -> None:
    front = {"counts": {"twilio/status:ringing": 4, "twilio/status:completed": 4, "twilio/voice": 4},
             "statuses": {"twilio/status:ringing": {"204": 4}, "twilio/status:completed": {"204": 3, "502": 1},
                          "twilio/voice": {"200": 4}},
             "latencies_ms": {"twilio/status:ringing": [1.0, 2.0, 3.0, 4.0],
                              "twilio/status:completed": [5.0, 6.0, 7.0, 8.0], "twilio/voice": [9.0] * 4}}
    counts = {"requests": Counter({"twilio/status:ringing": 4, "twilio/status:completed": 4, "twilio/voice": 4}),
              "statements": Counter({"twilio/status:ringing": 12, "twilio/status:completed": 20, "twilio/voice": 24,
                                     "background:leading-N": 7}),
              "transactions": Counter({"twilio/status:ringing": 4, "twilio/status:completed": 4, "twilio/voice": 4})}
    routes = _routes(front, counts, calls=4)
    assert routes["twilio/status (all)"]["webhooks"] == 8 and routes["twilio/status (all)"]["per_call"] == 2.0
    assert routes["twilio/status (all)"]["statements_per_request"] == 4.0
    assert routes["twilio/status (all)"]["non_2xx"] == 1
    assert routes["twilio/status:ringing"]["p50_ms"] == 2.0 and routes["twilio/status:ringing"]["max_ms"] == 4.0
    assert routes["twilio/voice"]["statements_per_request"] == 6.0
    assert "background:leading-N" not in routes


def test_the_ratios_to_the_get() -> None:
    run = {"cpu_ms_per_webhook": 4.0, "cpu_ms_per_call": 24.0, "webhooks_per_call": 6.0}
    assert _ratios(run, {"cpu_ms_per_get": 0.25}) == {"webhook_to_get": 16.0, "call_to_get": 96.0,
                                                     "call_budget_in_gets": 8.0}
    assert _ratios(run, {"cpu_ms_per_get": None}) == {}
    # paced at the webhooks' rate: the like-for-like GET, beside the flat-out one
    paced = _ratios({**run, "followers_cpu_ms_per_webhook": 2.0},
                    {"cpu_ms_per_get": 0.25, "paced": {"cpu_ms_per_get": 1.0}})
    assert paced == {"webhook_to_get": 16.0, "call_to_get": 96.0, "call_budget_in_gets": 8.0,
                     "webhook_to_get_paced": 4.0, "call_to_get_paced": 24.0, "follower_webhook_to_get_paced": 2.0}


MAIN = ("_run_module_as_main (<frozen runpy>:198);<module> (service/cli.py:230);"
        "Runner.run (asyncio/runners.py:118)")
REQUEST = (MAIN + ";RequestResponseCycle.run_asgi (uvicorn/protocols/http/httptools_impl.py:420);"
           "BodyLimitMiddleware.__call__ (service/api/limits.py:40);run_endpoint_function (fastapi/routing.py:300)")
VOICE = "voice (service/providers/twilio/webhooks.py"


def test_a_profile_is_summed_per_function_with_the_wrappers_apart() -> None:
    raw = "\n".join([
        f"{MAIN} 30",  # the event loop's own C code
        f"{REQUEST};{VOICE}:120);_verified (service/providers/twilio/webhooks.py:80) 20",
        f"{REQUEST};{VOICE}:121);Database.write (service/db/engine.py:140) 10",
        "_in_transaction (service/db/engine.py:82);_answer (service/ledger/calls.py:393) 35",
        "_in_transaction (service/db/engine.py:82);_answer (service/ledger/calls.py:397) 5",
        "Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982) 99",  # grpc's poller: left out
    ])
    summary = inclusive(raw)
    assert summary["samples"] == 100
    assert summary["where"] == {"requests": 30.0, "in_routes": 30.0, "greenlets": 40.0, "event_loop_own": 30.0,
                                "other_tasks": 0.0}
    assert "BodyLimitMiddleware.__call__ (service/api/limits.py)" in summary["request_wrappers"]
    top = {name: (share, own) for name, share, own in summary["top_service"]}
    assert top["_answer (service/ledger/calls.py)"] == (40.0, 40.0)  # one entry per function, its lines summed
    assert top["voice (service/providers/twilio/webhooks.py)"] == (30.0, 0.0)
    assert top["_verified (service/providers/twilio/webhooks.py)"] == (20.0, 20.0)
    listed = [name for name, *_ in summary["top_inclusive"]]
    assert not any(name.startswith(("Runner.run", "_run_module_as_main", "BodyLimitMiddleware")) for name in listed)


def test_the_paced_load_sends_at_its_rate(tmp_path) -> None:
    """`run_load(rate=…)`: the aiohttp generator paces its requests (wrk cannot)."""
    import http.server
    import threading

    from bench.loadgen import run_load

    class Quiet(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        load = run_load(f"http://127.0.0.1:{server.server_port}/x", connections=2, duration=2.0, rate=20.0)
    finally:
        server.shutdown()
    assert load["tool"] == "aiohttp" and load["errors"] == 0
    # paced, not flat out: never more than the slots up to the deadline (plus one taken by each
    # connection just before it); a slow machine sends fewer, never more
    assert 1 <= load["requests"] <= 20 * 2 + 2


def test_a_webhook_route_s_own_endpoint_counts_as_under_the_route() -> None:
    # the webhook routes are called by their own endpoint (service/providers/routes.py), not FastAPI's
    webhook = REQUEST.replace("run_endpoint_function (fastapi/routing.py:300)",
                              "_endpoint.<locals>.endpoint (service/providers/routes.py:61)")
    summary = inclusive(f"{webhook};{VOICE}:120) 10\n{MAIN} 10")
    assert summary["where"]["requests"] == summary["where"]["in_routes"] == 50.0
