"""Issue 14's acceptance scenario over real processes: issue 13's scenario in Telnyx mode — 3
replicas, the Telnyx-shaped fake (300 ms per REST request, Dials over its rate refused with 429
90103, every callee answering), events through a proxy that strips PUBLIC_URL's path prefix, the
leader SIGKILLed with Dials in flight; then a forged and a stale event through the ingress."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from harness.cluster import Cluster
from reminders_fakes.telnyx import TEST_SIGNING_SEED, sign
from service.telephony.provider import Stamp

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

REMINDERS = 40
MAX_EXTRA_CALLS = 10


def number(index: int) -> str:
    return f"+1415556{index:04d}"


def test_leader_sigkilled_mid_dial_every_message_spoken_once(etcd_endpoint: str, postgres_url: str) -> None:
    with Cluster(
        3, database_url=postgres_url, etcd_endpoint=etcd_endpoint, lease_ttl=5, provider_latency_ms=300,
        telephony_provider="telnyx", twilio_calls_per_second=8, twilio_ring_ms=200,
        env={"DISPATCH_CONCURRENCY": "10", "RECONCILE_GRACE": "6s", "DISPATCH_MAX_ATTEMPTS": "30"},
    ) as cluster:
        leader, views = cluster.leader_views()
        first_token = views[leader]["fencing_token"]
        fake = cluster.provider.client
        ids = cluster.seed_due_reminders(REMINDERS, due_in_seconds=0.5, spread_seconds=2.0, phone=number)

        def mid_dial() -> list[dict] | None:
            requests = fake.requests()
            in_flight = [r for r in requests if r["status"] is None]
            return in_flight if sum(r["status"] == 200 for r in requests) >= 10 and in_flight else None

        in_flight = cluster.wait_for(mid_dial, timeout=40, what="≥ 10 calls dialled, Dials in flight", interval=0.02)
        cluster.replica(leader).kill()
        successor, views = cluster.leader_views(exclude=[leader], timeout=40)
        assert views[successor]["fencing_token"] > first_token

        def all_answered() -> bool:
            rows = cluster.reminders()
            return len(rows) == REMINDERS and all(r["status"] == "sent" and r["outcome"] == "answered" for r in rows)

        cluster.wait_for(all_answered, timeout=120, what="every reminder sent and answered")
        cluster.wait_for(lambda: all(c["status"] in ("completed", "canceled", "no-answer", "busy")
                                     for c in fake.calls()), timeout=60, what="every call over")

        calls = fake.calls()
        requests = fake.requests()
        heard = Counter(c["stamp"]["r"] for c in calls if c["heard"])
        extra = len(calls) - REMINDERS
        print(f"\n[telnyx, leader {leader} SIGKILLed] reminders={REMINDERS} dials={len(requests)} "
              f"429={sum(r['status'] == 429 for r in requests)} calls={len(calls)} extra calls={extra} "
              f"in flight at kill={len(in_flight)} statuses={dict(Counter(c['status'] for c in calls))}")
        assert heard == Counter({reminder_id: 1 for reminder_id in ids})  # every message spoken, once
        # the message once at most per call (then the keypad question again and goodbye: nobody presses)
        assert all(sum(words.startswith("Hello") for words in c["heard"]) <= 1 for c in calls)
        assert sum(1 for c in calls if c["heard"]) == REMINDERS  # no extra call heard a word
        assert 0 <= extra <= MAX_EXTRA_CALLS
        rows = {r["id"]: r for r in cluster.reminders()}
        by_id = {c["sid"]: c for c in calls}
        for reminder_id, row in rows.items():
            bound = by_id[row["bound_call_id"]]
            assert bound["heard"] and bound["stamp"]["r"] == reminder_id
        attempts = cluster.call_attempts()
        assert {a["fencing_token"] for a in attempts} <= {first_token, views[successor]["fencing_token"]}
        # The dead leader's Dials in flight were never settled by it: the successor reconciled them.
        assert any(a["state"] == "creating" and a["fencing_token"] == first_token for a in attempts)

        # A forged and a stale event through the ingress: 403, nothing changes.
        some = next(iter(rows.values()))
        body = json.dumps({"data": {"event_type": "call.answered", "id": "forged", "occurred_at": "2026-11-30T12:00:00Z",
                                    "payload": {"call_control_id": "v3:forged",
                                                "client_state": Stamp(some["id"], some["bound_attempt_id"]).encode()}}})
        now, stale = str(int(time.time())), str(int(time.time()) - 600)
        before = (cluster.reminders(), cluster.call_attempts())
        for timestamp, seed in ((now, bytes(32)), (stale, TEST_SIGNING_SEED)):
            response = cluster.webhook_proxy.post(
                "/telephony/telnyx/events", content=body.encode(),
                headers={"content-type": "application/json", "telnyx-timestamp": timestamp,
                         "telnyx-signature-ed25519": sign(seed, timestamp, body.encode())},
            )
            assert response.status_code == 403
        assert (cluster.reminders(), cluster.call_attempts()) == before
