"""Events across replicas (docs/decisions/0251): the leader SIGKILLed while a delivery is in
flight loses nothing — its successor sends every event, the one in flight again with the same id,
in order per appointment, to a receiver that verifies each with `standardwebhooks` — and the feed
(`GET /events`) pages through the same ids."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from harness.cluster import Cluster
from harness.events_receiver import Receiver
from harness.ports import free_port

pytestmark = pytest.mark.slow

T = TypeVar("T")
SECRET = "whsec_" + base64.b64encode(b"cluster-events-secret-0123456789").decode()
APPOINTMENTS = 4


class ThreadedReceiver:
    """A `Receiver` served from a thread's event loop (the cluster's tooling is synchronous)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="receiver", daemon=True)
        self.thread.start()
        self.receiver = Receiver(SECRET, free_port())
        self.run(self.receiver.start())

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def close(self) -> None:
        self.run(self.receiver.stop())
        self.run(_cancel_the_rest())  # a request its sender abandoned may still hang
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _cancel_the_rest() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    threaded = ThreadedReceiver()
    yield threaded.receiver
    threaded.close()


def _feed(cluster: Cluster, replica: str) -> list[dict[str, Any]]:
    """Every event of the feed, a page of 3 at a time."""
    events, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"after": cursor} if cursor else {})}
        page = cluster.replica(replica).get("/events", params=params).json()
        events += page["events"]
        if not page["events"]:
            return events
        cursor = page["next_cursor"]


def test_a_leader_sigkilled_mid_delivery_loses_no_event(etcd_endpoint: str, postgres_url: str,
                                                          receiver: Receiver) -> None:
    receiver.hang = 5.0  # the first try is still in flight when its sender dies
    env = {"EVENTS_URL": receiver.url, "EVENTS_SECRET": SECRET}
    with Cluster(2, database_url=postgres_url, etcd_endpoint=etcd_endpoint, lease_ttl=2, env=env) as cluster:
        leader, _ = cluster.leader_views()
        follower = next(r.name for r in cluster.replicas if r.name != leader)
        starts = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0).isoformat()
        for index in range(APPOINTMENTS):  # each DELETE: appointment.cancelled, then reminder.finished
            created = cluster.replica(follower).post("/appointments", json={
                "customer_name": f"Customer {index}", "phone": "+14155552671", "starts_at": starts})
            assert created.status_code == 201, created.text
            assert cluster.replica(follower).delete(f"/appointments/{created.json()['id']}").status_code == 200
        cluster.wait_for(lambda: receiver.arrivals, timeout=30, what="a delivery under way")
        cluster.replica(leader).kill()
        receiver.hang = 0.0
        successor, _ = cluster.leader_views(exclude=[leader], timeout=30)
        feed = cluster.wait_for(lambda: (events := _feed(cluster, successor)) and len(events) == 2 * APPOINTMENTS
                                and events, timeout=30, what="every event numbered")
        ids = [event["id"] for event in feed]
        cluster.wait_for(lambda: set(ids) <= set(receiver.ids()), timeout=60, what="every event delivered")
    assert receiver.refused == 0 and receiver.arrivals.count(receiver.arrivals[0]) >= 2  # the one in flight, again
    first_arrival: dict[str, int] = {}
    for position, event_id in enumerate(receiver.arrivals):
        first_arrival.setdefault(event_id, position)
    by_appointment: dict[str, list[dict[str, Any]]] = {}
    for event in feed:
        by_appointment.setdefault(event["data"]["appointment_id"], []).append(event)
    assert len(by_appointment) == APPOINTMENTS
    for events in by_appointment.values():
        assert [e["type"] for e in events] == ["appointment.cancelled", "reminder.finished"]
        assert first_arrival[events[0]["id"]] < first_arrival[events[1]["id"]]  # in order per appointment
