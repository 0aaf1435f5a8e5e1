"""Issues 13 and 14's acceptance scenario over real processes, in each real-provider mode: 3
replicas, the provider's fake (300 ms per REST request, every callee answering; Twilio's calls
queued by its CPS, Telnyx's Dials over its rate refused with 429 90103), webhooks through a proxy
that strips PUBLIC_URL's path prefix, the leader SIGKILLed with creates in flight; then forged
webhooks through the ingress (tests/support/providers.py: CLUSTER_MODES)."""

from __future__ import annotations

from collections import Counter

import pytest

from harness.cluster import Cluster
from tests.support.providers import CLUSTER_MODES, PROVIDERS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

REMINDERS = 40
MAX_EXTRA_CALLS = 10


def number(index: int) -> str:
    return f"+1415555{index:04d}"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_leader_sigkilled_mid_creation_every_message_heard_once(provider: str, etcd_endpoint: str,
                                                                postgres_url: str) -> None:
    mode = CLUSTER_MODES[provider]
    options = mode.cluster_options({"DISPATCH_CONCURRENCY": "10", "RECONCILE_GRACE": "6s"})
    with Cluster(3, database_url=postgres_url, etcd_endpoint=etcd_endpoint, lease_ttl=5, provider_latency_ms=300,
                 **options) as cluster:
        leader, views = cluster.leader_views()
        first_token = views[leader]["fencing_token"]
        fake = cluster.provider.client
        ids = cluster.seed_due_reminders(REMINDERS, due_in_seconds=0.5, spread_seconds=2.0, phone=number)

        def mid_creation() -> list[dict] | None:
            requests = fake.requests()
            in_flight = [r for r in requests if r["status"] is None]
            return in_flight if sum(r["status"] == mode.created for r in requests) >= 10 and in_flight else None

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

        calls, requests = fake.calls(), fake.requests()
        heard = Counter(c["stamp"]["r"] for c in calls if c["heard"])
        extra = len(calls) - REMINDERS
        print(f"\n[{provider}, leader {leader} SIGKILLed] reminders={REMINDERS} creates={len(requests)} "
              f"429={sum(r['status'] == 429 for r in requests)} calls={len(calls)} extra calls={extra} "
              f"in flight at kill={len(in_flight)} statuses={dict(Counter(c['status'] for c in calls))}")
        assert heard == Counter({reminder_id: 1 for reminder_id in ids})  # every message heard, once
        # the message once at most per call (then the keypad question again and goodbye: nobody presses)
        assert all(sum(words.startswith("Hello") for words in c["heard"]) <= 1 for c in calls)
        assert sum(1 for c in calls if c["heard"]) == REMINDERS  # no extra call heard a word
        assert 0 <= extra <= MAX_EXTRA_CALLS
        rows = {r["id"]: r for r in cluster.reminders()}
        by_id = {c["sid"]: c for c in calls}
        for reminder_id, row in rows.items():
            bound = by_id[row["bound_call_id"]]
            assert bound["heard"] and bound["stamp"]["r"] == reminder_id
            assert row["wording"] is not None  # planned as production plans: the words fixed then
        attempts = cluster.call_attempts()
        assert {a["fencing_token"] for a in attempts} <= {first_token, views[successor]["fencing_token"]}
        # The dead leader's creates in flight were never settled by it: the successor reconciled them,
        # from the call's events (left `creating`, a call exists) or, when the provider refused the
        # create after the kill (Telnyx's 429 comes after its latency), as never made.
        left = [a for a in attempts if a["fencing_token"] == first_token
                and (a["state"] == "creating" or (a["state"] == "not_created"
                                                  and (a["error"] or "").startswith("reconciled")))]
        assert left, "no create of the dead leader's was left to its successor"
        # left `creating` only with evidence of its call; judged never made only without
        assert all((a["provider_call_id"] is not None or a["last_event_at"] is not None) == (a["state"] == "creating")
                   for a in left)

        # Forged webhooks through the ingress (another key, a bad signature, a replay): 403, nothing changes.
        some = next(iter(rows.values()))
        before = (cluster.reminders(), cluster.call_attempts())
        for path, request in mode.forged(some["id"], some["bound_attempt_id"]):
            assert cluster.webhook_proxy.post(path, **request).status_code == 403, path
        assert (cluster.reminders(), cluster.call_attempts()) == before
