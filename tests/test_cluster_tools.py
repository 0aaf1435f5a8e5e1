"""The parts of harness/cluster.py that need no replica process: the leader watch (leader terms
learnt from GET /leader, here of stand-in replicas) and the seeding of reminders through the
domain's planning, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from harness.cluster import Cluster, LeaderWatch, wait_for
from service.db import Database
from service.reminders import Wording


@dataclass
class StandIn:
    """What the watch reads of a replica: its name, URL, whether it runs, and since when."""

    name: str
    alive: bool = True
    paused: bool = False
    started_at: float = field(default_factory=time.time)

    @property
    def url(self) -> str:
        return f"http://{self.name}"


class Views:
    """GET /leader of every stand-in: which one leads, under which token."""

    def __init__(self) -> None:
        self.leading: dict[str, int] = {}
        self.asked: set[str] = set()

    def handle(self, request: httpx.Request) -> httpx.Response:
        name = request.url.host
        self.asked.add(name)
        token = self.leading.get(name)
        return httpx.Response(200, json={"instance": name, "is_leader": token is not None, "leader": None,
                                         "fencing_token": token, "lease_ttl": 2})


def test_the_watch_learns_each_term_from_leader_answers() -> None:
    replicas = [StandIn("replica-0"), StandIn("replica-1"), StandIn("replica-2")]
    views = Views()
    watch = LeaderWatch(lambda: replicas, interval=0.01, transport=httpx.MockTransport(views.handle)).start()
    try:
        views.leading = {"replica-0": 5}
        wait_for(lambda: [t.token for t in watch.terms()] == [5], timeout=5, what="term 5 seen")
        handed_over = time.time()
        views.leading = {"replica-1": 7}  # replica-0 stepped down, replica-1 leads
        wait_for(lambda: [t.token for t in watch.terms()] == [5, 7], timeout=5, what="term 7 seen")
        replicas[1].alive = False  # SIGKILLed: it never shows the end of its term
        replicas[2].paused = True  # SIGSTOPped: not asked
        asked_before = set(views.asked)
        views.asked.clear()
        views.leading = {"replica-2": 9}
        wait_for(lambda: "replica-0" in views.asked, timeout=5, what="replica-0 asked again")
        assert not views.asked & {"replica-1", "replica-2"} and asked_before == {r.name for r in replicas}
        replicas[2].paused = False
        wait_for(lambda: [t.token for t in watch.terms()] == [5, 7, 9], timeout=5, what="term 9 seen")
    finally:
        watch.stop()
    first, second, third = watch.terms()
    assert (first.replica, second.replica, third.replica) == ("replica-0", "replica-1", "replica-2")
    assert first.ended is not None and first.ended >= handed_over  # its first answer without the term
    assert second.ended is None and third.ended is None  # killed unseen; still leading
    assert second.started <= handed_over  # the earliest it can have begun: nothing of it comes before
    assert all(term.started <= term.seen for term in (first, second, third))
    assert not watch.running


def test_reminders_are_seeded_as_the_service_plans_them(database_url: str) -> None:
    asyncio.run(_migrated(database_url))
    cluster = Cluster(1, database_url=database_url)
    try:
        before = datetime.now(UTC)
        ids = cluster.seed_due_reminders(3, due_in_seconds=0.0, spread_seconds=3.0,
                                         phone=lambda index: f"+1415555{index:04d}")
        rows = {row["id"]: row for row in cluster.reminders()}
        assert set(rows) == set(ids)
        for index, reminder_id in enumerate(ids):
            row = rows[reminder_id]
            due = row["due_at"] if row["due_at"].tzinfo else row["due_at"].replace(tzinfo=UTC)
            assert before <= due <= before + timedelta(seconds=index + 1)  # due now (planned, not refused) and on
            assert row["status"] == "pending" and row["idempotency_key"] == f"reminder-{reminder_id}"
            wording = Wording.from_json(row["wording"])  # the words production stores when it plans
            assert wording.language == "en-US" and wording.message.startswith(f"Hello Customer {index}, ")
        with pytest.raises(ValueError, match="would be refused"):
            cluster.seed_due_reminders(1, phone="+15551234567")  # a fictional number: the API says 422
    finally:
        cluster.close()


async def _migrated(url: str) -> None:
    database = Database(url)
    try:
        await database.upgrade()
    finally:
        await database.dispose()
