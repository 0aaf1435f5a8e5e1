"""Multi-process scenarios: 3 `reminders serve` replicas on real etcd and PostgreSQL, the fake provider.

Each test starts its own cluster (harness.cluster.Cluster): its own database, election prefix,
provider and replica processes. Nothing here asserts a timing; every wait has a deadline.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable
from functools import partial

import pytest

from harness.cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

REMINDERS = 200
# At LEASE_TTL=2 a keepalive must be acknowledged within ttl - ttl/3 - margin(1 s) = 0.33 s of
# being due, or the leader (correctly) ends its term: on a loaded 2-core box that happens every
# few seconds. 5 s makes a change of leader mid-burst rare; the burst test does not assume there
# was none: it reads which terms recorded outcomes and asserts what holds in that case.
BURST_LEASE_TTL = 5


@pytest.fixture
def make_cluster(etcd_endpoint: str, postgres_url: str) -> Callable[..., Cluster]:
    """`with make_cluster(**options) as cluster:` — the `with` tears it down and, when the test
    fails inside it, prints the tail of every replica's log."""
    return partial(Cluster, 3, database_url=postgres_url, etcd_endpoint=etcd_endpoint, lease_ttl=2)


def test_three_replicas_elect_exactly_one_leader(make_cluster) -> None:
    with make_cluster() as cluster:
        leader, views = cluster.leader_views()  # one poll in which all three agree
        assert set(views) == {"replica-0", "replica-1", "replica-2"}
        assert [name for name, view in views.items() if view["is_leader"]] == [leader]
        assert {view["leader"] for view in views.values()} == {leader}
        token = views[leader]["fencing_token"]
        assert isinstance(token, int) and not isinstance(token, bool)
        assert all(view["fencing_token"] is None for name, view in views.items() if name != leader)


def test_sigkill_leader_successor_has_larger_token(make_cluster) -> None:
    with make_cluster() as cluster:
        first, views = cluster.leader_views()
        first_token = views[first]["fencing_token"]

        cluster.replica(first).kill()
        successor, views = cluster.leader_views()  # after the dead leader's lease expires
        assert successor != first
        assert views[successor]["fencing_token"] > first_token
        assert set(views) == {r.name for r in cluster.replicas} - {first}

        # The killed replica comes back (same name and port) and joins as a follower.
        cluster.replica(first).restart()
        leader, views = cluster.leader_views()
        assert first in views  # it answers and agrees on the leader
        assert views[leader]["fencing_token"] > first_token


def test_sigterm_leader_resigns_to_a_successor(make_cluster) -> None:
    with make_cluster() as cluster:
        first, views = cluster.leader_views()
        first_token = views[first]["fencing_token"]

        replica = cluster.replica(first)
        # uvicorn re-raises the captured signal once it has shut down cleanly: -SIGTERM, or 0.
        assert replica.terminate(timeout=20) in (0, -signal.SIGTERM)
        log = replica.log_text()
        assert "Traceback" not in log
        assert "ended: shutdown" in log and f"replica {first} stopped" in log
        successor, views = cluster.leader_views()
        assert successor != first
        assert views[successor]["fencing_token"] > first_token


def provider_summary(cluster: Cluster) -> tuple[list[dict], list[dict], Counter]:
    calls = cluster.provider.client.calls()
    posts = cluster.provider.client.requests()
    return calls, posts, Counter(call["idempotency_key"] for call in calls)


def test_burst_of_200_each_called_once(make_cluster) -> None:
    with make_cluster(provider_latency_ms=0, lease_ttl=BURST_LEASE_TTL) as cluster:
        leader, views = cluster.leader_views()
        token = views[leader]["fencing_token"]
        cluster.seed_due_reminders(REMINDERS, due_in_seconds=0.5, spread_seconds=2.5)

        cluster.wait_for(lambda: cluster.reminder_statuses()["sent"] == REMINDERS, timeout=40, what="all sent")

        rows = cluster.reminders()
        calls, posts, per_key = provider_summary(cluster)
        terms = {r["fence_token"] for r in rows}
        print(f"\n[burst, 0 ms] reminders={len(rows)} POSTs={len(posts)} distinct keys={len(per_key)} "
              f"calls={len(calls)} replays={sum(p['replayed'] for p in posts)} terms={sorted(terms)}")
        assert Counter(r["status"] for r in rows) == Counter(sent=REMINDERS)
        assert set(per_key) == {r["idempotency_key"] for r in rows}
        assert max(per_key.values()) == 1
        assert {r["provider_call_id"] for r in rows} == {c["id"] for c in calls}
        if terms == {token}:
            # One term recorded every outcome, so no successor completed anything: one POST each,
            # all from the leader. (Were it deposed mid-burst, rows would carry the successor's
            # token, and the successor's re-sends of unrecorded claims would be replays.)
            assert len(posts) == REMINDERS
            assert {p["placed_by"] for p in posts} == {leader}
            assert {c["placed_by"] for c in calls} == {leader}
        else:
            assert min(terms) >= token and len(calls) == REMINDERS  # newer terms completed the rest, once


def test_leader_sigkilled_mid_burst_successor_completes_with_same_keys(make_cluster) -> None:
    concurrency = 20
    with make_cluster(
        provider_latency_ms=300, lease_ttl=BURST_LEASE_TTL, env={"DISPATCH_CONCURRENCY": str(concurrency)}
    ) as cluster:
        leader, views = cluster.leader_views()
        first_token = views[leader]["fencing_token"]
        cluster.seed_due_reminders(REMINDERS, due_in_seconds=0.5, spread_seconds=2.5)

        def mid_burst() -> list[dict] | None:
            posts = cluster.provider.client.requests()
            created = sum(p["status"] == 201 for p in posts)
            in_flight = [p for p in posts if p["status"] is None]
            return in_flight if created >= 50 and in_flight else None

        in_flight = cluster.wait_for(mid_burst, timeout=30, what="≥ 50 calls placed and some in flight", interval=0.02)
        cluster.replica(leader).kill()
        at_kill = cluster.reminder_statuses()

        successor, views = cluster.leader_views(exclude=[leader], timeout=30)
        successor_token = views[successor]["fencing_token"]
        assert successor_token > first_token
        cluster.wait_for(lambda: cluster.reminder_statuses()["sent"] == REMINDERS, timeout=40, what="all sent")

        rows = cluster.reminders()
        calls, posts, per_key = provider_summary(cluster)
        replays = sum(p["replayed"] for p in posts)
        by_replica = Counter(c["placed_by"] for c in calls)
        print(f"\n[burst, 300 ms, leader {leader} SIGKILLed] reminders={len(rows)} POSTs={len(posts)} "
              f"distinct keys={len(per_key)} calls={len(calls)} replays={replays} "
              f"redundant POSTs={len(posts) - len(per_key)} provider in flight at kill={len(in_flight)} "
              f"DB at kill={dict(at_kill)} placed by={dict(by_replica)} "
              f"statuses={dict(Counter(p['status'] for p in posts))}")

        assert Counter(r["status"] for r in rows) == Counter(sent=REMINDERS)  # none lost, none left dispatching
        assert set(per_key) == {r["idempotency_key"] for r in rows}
        assert max(per_key.values()) == 1  # each key created once at the provider
        # Only the dead leader's claims without a recorded outcome were sent again: its calls in
        # flight and answered calls whose outcome batch was not written yet (a slot is freed when
        # the provider answers, so `dispatching` may exceed DISPATCH_CONCURRENCY by those).
        assert len(posts) - len(per_key) <= at_kill["dispatching"]
        assert len(in_flight) <= concurrency  # calls in flight at the provider, seen just before the kill
        assert replays <= at_kill["dispatching"]
        assert set(by_replica) == {leader, successor}
        assert by_replica[leader] + by_replica[successor] == REMINDERS
        assert {r["provider_call_id"] for r in rows} == {c["id"] for c in calls}
        assert {r["fence_token"] for r in rows if r["claimed_by"] == successor} == {successor_token}
