"""Issue 13's acceptance scenario over real processes: 3 replicas in Twilio mode, the Twilio-shaped
fake (300 ms per REST request, calls queued by its CPS, every callee answering), webhooks through a
proxy that strips PUBLIC_URL's path prefix, the leader SIGKILLed with creations in flight."""

from __future__ import annotations

from collections import Counter
from urllib.parse import urlencode

import pytest

from harness.cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

REMINDERS = 40
MAX_EXTRA_CALLS = 10


def number(index: int) -> str:
    return f"+1415555{index:04d}"


def test_leader_sigkilled_mid_creation_every_message_heard_once(etcd_endpoint: str, postgres_url: str) -> None:
    with Cluster(
        3, database_url=postgres_url, etcd_endpoint=etcd_endpoint, lease_ttl=5, provider_latency_ms=300,
        telephony_provider="twilio", twilio_calls_per_second=5, twilio_ring_ms=200,
        env={"DISPATCH_CONCURRENCY": "10", "RECONCILE_GRACE": "6s"},
    ) as cluster:
        leader, views = cluster.leader_views()
        first_token = views[leader]["fencing_token"]
        fake = cluster.provider.client
        ids = cluster.seed_due_reminders(REMINDERS, due_in_seconds=0.5, spread_seconds=2.0, phone=number)

        def mid_creation() -> list[dict] | None:
            requests = fake.requests()
            in_flight = [r for r in requests if r["status"] is None]
            return in_flight if sum(r["status"] == 201 for r in requests) >= 10 and in_flight else None

        in_flight = cluster.wait_for(mid_creation, timeout=40, what="≥ 10 calls created, creates in flight",
                                     interval=0.02)
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
        heard = Counter(c["stamp"]["r"] for c in calls if c["heard"])
        extra = len(calls) - REMINDERS
        print(f"\n[twilio, leader {leader} SIGKILLed] reminders={REMINDERS} creates={len(fake.requests())} "
              f"calls={len(calls)} extra calls={extra} in flight at kill={len(in_flight)} "
              f"statuses={dict(Counter(c['status'] for c in calls))}")
        assert heard == Counter({reminder_id: 1 for reminder_id in ids})  # every message heard, once
        assert sum(1 for c in calls if c["heard"]) == REMINDERS  # no extra call heard a word
        assert 0 <= extra <= MAX_EXTRA_CALLS
        rows = {r["id"]: r for r in cluster.reminders()}
        by_sid = {c["sid"]: c for c in calls}
        for reminder_id, row in rows.items():
            bound = by_sid[row["bound_call_id"]]
            assert bound["heard"] and bound["stamp"]["r"] == reminder_id
        attempts = cluster.call_attempts()
        assert {a["fencing_token"] for a in attempts} <= {first_token, views[successor]["fencing_token"]}
        # The dead leader's creates in flight were never settled by it: the successor reconciled them.
        assert any(a["state"] == "creating" and a["fencing_token"] == first_token for a in attempts)

        # A forged webhook through the ingress: 403, nothing changes.
        some = next(iter(rows.values()))
        query = urlencode({"r": some["id"], "a": some["bound_attempt_id"]})
        before = (cluster.reminders(), cluster.call_attempts())
        for route in ("voice", "status", "gather"):
            forged = cluster.webhook_proxy.post(
                f"/telephony/twilio/{route}?{query}",
                data={"CallSid": "CA" + "0" * 32, "CallStatus": "in-progress", "SequenceNumber": "99"},
                headers={"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"},
            )
            assert forged.status_code == 403
        assert (cluster.reminders(), cluster.call_attempts()) == before
