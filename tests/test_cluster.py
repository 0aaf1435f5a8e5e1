"""Multi-process scenarios: 3 `reminders serve` replicas on real etcd and PostgreSQL, the fake provider.

Each test starts its own cluster (harness.cluster.Cluster): its own database, election prefix,
provider and replica processes. Nothing here asserts a timing; every wait has a deadline.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial

import pytest

from harness.cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

REMINDERS = 200


@pytest.fixture
def make_cluster(etcd_endpoint: str, postgres_url: str) -> Callable[..., Cluster]:
    """`with make_cluster(**options) as cluster:` — the `with` tears it down and, when the test
    fails inside it, prints the tail of every replica's log."""
    return partial(Cluster, 3, database_url=postgres_url, etcd_endpoint=etcd_endpoint, lease_ttl=2)


def agreed_views(cluster: Cluster, leader: str) -> dict[str, dict]:
    views = cluster.statuses()
    assert set(views) == {r.name for r in cluster.live_replicas()}
    for name, view in views.items():
        assert view is not None
        assert view["leader"] == leader, f"{name} sees {view['leader']}"
        assert view["is_leader"] is (name == leader)
    return views


def test_three_replicas_elect_exactly_one_leader(make_cluster) -> None:
    with make_cluster() as cluster:
        leader = cluster.leader()
        views = agreed_views(cluster, leader)
        token = views[leader]["fencing_token"]
        assert isinstance(token, int) and not isinstance(token, bool)
        assert all(v["fencing_token"] is None for name, v in views.items() if name != leader)


def test_sigkill_leader_successor_has_larger_token(make_cluster) -> None:
    with make_cluster() as cluster:
        first = cluster.leader()
        first_token = cluster.status(first)["fencing_token"]

        cluster.replica(first).kill()
        successor = cluster.leader(exclude=[first])  # after the dead leader's lease expires
        successor_token = cluster.status(successor)["fencing_token"]
        assert successor != first
        assert successor_token > first_token

        # The killed replica comes back as a follower of the successor.
        cluster.replica(first).restart()
        assert cluster.leader() == successor
        agreed_views(cluster, successor)


def test_sigterm_leader_resigns_to_a_successor(make_cluster) -> None:
    with make_cluster() as cluster:
        first = cluster.leader()
        first_token = cluster.status(first)["fencing_token"]

        assert cluster.replica(first).terminate(timeout=20) == 0
        successor = cluster.leader(exclude=[first])
        assert cluster.status(successor)["fencing_token"] > first_token
        agreed_views(cluster, successor)


def provider_summary(cluster: Cluster) -> tuple[list[dict], list[dict], Counter]:
    calls = cluster.provider.client.calls()
    posts = cluster.provider.client.requests()
    return calls, posts, Counter(call["idempotency_key"] for call in calls)


def test_burst_of_200_each_called_once(make_cluster) -> None:
    with make_cluster(provider_latency_ms=0) as cluster:
        leader = cluster.leader()
        cluster.seed_due_reminders(REMINDERS, due_in_seconds=0.5, spread_seconds=2.5)

        cluster.wait_for(lambda: cluster.reminder_statuses()["sent"] == REMINDERS, timeout=40, what="all sent")

        rows = cluster.reminders()
        calls, posts, per_key = provider_summary(cluster)
        print(f"\n[burst, 0 ms] reminders={len(rows)} POSTs={len(posts)} distinct keys={len(per_key)} "
              f"calls={len(calls)} replays={sum(p['replayed'] for p in posts)}")
        assert Counter(r["status"] for r in rows) == Counter(sent=REMINDERS)
        assert len(posts) == REMINDERS
        assert set(per_key) == {r["idempotency_key"] for r in rows}
        assert max(per_key.values()) == 1
        assert {p["placed_by"] for p in posts} == {leader}
        assert {c["placed_by"] for c in calls} == {leader}
        assert {r["provider_call_id"] for r in rows} == {c["id"] for c in calls}


def test_leader_sigkilled_mid_burst_successor_completes_with_same_keys(make_cluster) -> None:
    concurrency = 20
    with make_cluster(provider_latency_ms=300, env={"DISPATCH_CONCURRENCY": str(concurrency)}) as cluster:
        leader = cluster.leader()
        first_token = cluster.status(leader)["fencing_token"]
        cluster.seed_due_reminders(REMINDERS, due_in_seconds=0.5, spread_seconds=2.5)

        def mid_burst() -> list[dict] | None:
            posts = cluster.provider.client.requests()
            created = sum(p["status"] == 201 for p in posts)
            in_flight = [p for p in posts if p["status"] is None]
            return in_flight if created >= 50 and in_flight else None

        in_flight = cluster.wait_for(mid_burst, timeout=30, what="≥ 50 calls placed and some in flight", interval=0.02)
        cluster.replica(leader).kill()
        at_kill = cluster.reminder_statuses()

        successor = cluster.leader(exclude=[leader], timeout=30)
        assert cluster.status(successor)["fencing_token"] > first_token
        cluster.wait_for(lambda: cluster.reminder_statuses()["sent"] == REMINDERS, timeout=40, what="all sent")

        rows = cluster.reminders()
        calls, posts, per_key = provider_summary(cluster)
        replays = sum(p["replayed"] for p in posts)
        by_replica = Counter(c["placed_by"] for c in calls)
        print(f"\n[burst, 300 ms, leader {leader} SIGKILLed] reminders={len(rows)} POSTs={len(posts)} "
              f"distinct keys={len(per_key)} calls={len(calls)} replays={replays} "
              f"redundant POSTs={len(posts) - len(per_key)} in flight at kill={len(in_flight)} "
              f"DB at kill={dict(at_kill)} placed by={dict(by_replica)} statuses={dict(Counter(p['status'] for p in posts))}")

        assert Counter(r["status"] for r in rows) == Counter(sent=REMINDERS)  # none lost, none left dispatching
        assert set(per_key) == {r["idempotency_key"] for r in rows}
        assert max(per_key.values()) == 1  # each key created once at the provider
        assert len(posts) - len(per_key) <= concurrency  # only calls in flight at the kill were sent again
        assert replays <= concurrency
        assert set(by_replica) == {leader, successor}
        assert by_replica[leader] + by_replica[successor] == REMINDERS
        assert {r["provider_call_id"] for r in rows} == {c["id"] for c in calls}
        assert {r["fence_token"] for r in rows if r["claimed_by"] == successor} == {cluster.status(successor)["fencing_token"]}
