"""Leader election on a real etcd: config rules, agreement, hand-over, the no-herd wait."""

from __future__ import annotations

import asyncio

import pytest

from service.election import (
    Election,
    ElectionConfig,
    LeaseSession,
    NotLeader,
    Term,
    connect,
)
from tests.support.election import (  # the autouse fixture is imported to activate it
    TTL,
    Recorder,
    grpc_events_of_closed_loops_ignored,  # noqa: F401
    keys_under,
    make_elector,
    poll_until,
    running,
    single_leader,
    unique_prefix,
)

# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"lease_ttl": 1}, "lease_ttl"),
        ({"lease_ttl": 2.5}, "lease_ttl"),
        ({"lease_ttl": 10, "margin": 1.0}, "margin"),  # below 20 % of the TTL
        ({"lease_ttl": 3, "margin": 0.5}, "margin"),  # below 1 s
        ({"lease_ttl": 3, "margin": 2.5}, "margin"),  # under 1 s left to act and renew
        ({"max_term": 0}, "max_term"),
        ({"request_timeout": 0}, "request_timeout"),
        ({"request_timeout": 30}, "request_timeout"),
        ({"name": ""}, "name"),
        ({"prefix": "/x/"}, "prefix"),
        ({"endpoints": ()}, "endpoints"),
        ({"endpoints": ("ftp://h:1",)}, "endpoints"),
        ({"endpoints": ("http://h",)}, "endpoints"),
        ({"endpoints": ("http://a:1", "https://b:2")}, "endpoints"),
        ({"username": "root"}, "password"),
        ({"ca_cert": "/nonexistent.pem"}, "ca_cert"),
    ],
)
def test_config_rejects_bad_settings_naming_the_field(settings: dict, field: str) -> None:
    base = {"endpoints": ("http://127.0.0.1:2379",), "name": "pod-0"}
    base.update(settings)
    endpoints = base.pop("endpoints")
    with pytest.raises(ValueError, match=rf"^{field}:"):
        ElectionConfig(endpoints, **base)


def test_config_defaults_and_normalisation() -> None:
    config = ElectionConfig("10.0.0.1:2379,10.0.0.2:2379", name="pod-0", password="s3cret", username="u")
    assert config.endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert config.lease_ttl == 10 and config.effective_margin == 2.0
    assert config.keepalive_interval == pytest.approx(8 / 3)
    assert "s3cret" not in repr(config)
    assert ElectionConfig(("http://h:1",), name="a", lease_ttl=2).effective_margin == 1.0


# --- several electors ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_three_electors_agree_on_one_leader(etcd_endpoint: str) -> None:
    prefix = unique_prefix()
    electors = [make_elector(etcd_endpoint, prefix, f"pod-{i}") for i in range(3)]
    async with running(*electors):
        leader = await poll_until(lambda: single_leader(electors), 10, "one leader all agree on")
        # a follower observes the leader before its own key need be written
        await poll_until(lambda: _count(etcd_endpoint, prefix, 3), 10, "all three queued")
        keys = await keys_under(etcd_endpoint, prefix)
        oldest_key, oldest_value, oldest_revision = keys[0]
        assert oldest_value == leader.instance
        assert leader.fencing_token == oldest_revision == leader.term.fencing_token
        assert leader.term.key == oldest_key
        assert oldest_key == f"{prefix}/{int(oldest_key.rsplit('/', 1)[1], 16):x}"  # Go's %x layout
        assert sorted(value for _, value, _ in keys) == ["pod-0", "pod-1", "pod-2"]
        assert [e.fencing_token for e in electors if e is not leader] == [None, None]
        assert await leader.etcd_healthy(1.0)


@pytest.mark.anyio
async def test_shutdown_hands_over_to_the_next_with_a_larger_token(etcd_endpoint: str) -> None:
    prefix = unique_prefix()
    recorder = Recorder()
    electors = [make_elector(etcd_endpoint, prefix, f"pod-{i}", recorder) for i in range(3)]
    async with running(*electors):
        first = await poll_until(lambda: single_leader(electors), 10, "a first leader")
        first_token = first.fencing_token
        await poll_until(lambda: _count(etcd_endpoint, prefix, 3), 10, "all three queued")

        await first.shutdown(drain_timeout=2.0)
        assert not first.is_leader and first.state == "stopped"
        rest = [e for e in electors if e is not first]
        second = await poll_until(lambda: single_leader(rest), 10, "a successor")
        assert second.fencing_token > first_token
        # the first term ended (and its work drained) before the successor started
        ended, reason = await recorder.wait_for(first.instance, "ended")
        started, _ = await recorder.wait_for(second.instance, "started")
        assert ended < started and reason == "shutdown"
        names = [value for _, value, _ in await keys_under(etcd_endpoint, prefix)]
        assert first.instance not in names  # resigned and revoked: nothing left behind


async def _count(endpoint: str, prefix: str, n: int) -> bool:
    return len(await keys_under(endpoint, prefix)) == n


@pytest.mark.anyio
async def test_max_term_resigns_and_the_next_leads(etcd_endpoint: str) -> None:
    prefix = unique_prefix()
    recorder = Recorder()
    a = make_elector(etcd_endpoint, prefix, "a", recorder, max_term=1.0)
    b = make_elector(etcd_endpoint, prefix, "b", recorder)
    async with running(a):
        await poll_until(lambda: a.is_leader, 10, "a leads")
        token_a = a.fencing_token
        async with running(b):
            await poll_until(lambda: b.is_leader, 10, "b takes over after a's max_term")
            assert b.fencing_token > token_a
            ended, reason = await recorder.wait_for("a", "ended")
            started, _ = await recorder.wait_for("b", "started")
            assert ended < started and reason == "max_term reached"
            # a campaigns again and queues behind b
            await poll_until(lambda: a.leader_name == "b" and a.state == "campaigning", 10, "a follows b")


@pytest.mark.anyio
async def test_deleting_the_leaders_key_ends_its_term(etcd_endpoint: str) -> None:
    prefix = unique_prefix()
    recorder = Recorder()
    electors = [make_elector(etcd_endpoint, prefix, name, recorder) for name in ("a", "b")]
    async with running(*electors):
        leader = await poll_until(lambda: single_leader(electors), 10, "a leader")
        await poll_until(lambda: _count(etcd_endpoint, prefix, 2), 10, "both queued")
        other = next(e for e in electors if e is not leader)
        client = connect(leader.config)
        try:
            await client.delete(leader.term.key.encode())  # as `etcdctl del` would
        finally:
            await client.close()
        # deleting the key behind the leader's back deposes it without notice: the watch on its
        # own key tells it (a few ms later); meanwhile only the fencing token protects the data
        await poll_until(lambda: other.is_leader, 10, "the other leads")
        await poll_until(lambda: not leader.is_leader, 10, "the deposed leader notices")
        _, reason = await recorder.wait_for(leader.instance, "ended")
        assert reason == "election key deleted"
        # the deposed one is not stuck: it campaigns again behind the new leader
        await poll_until(lambda: _count(etcd_endpoint, prefix, 2), 10, "deposed replica queued again")
        assert not leader.is_leader
        # its view of the leader comes from its observer, which re-reads only after cancelling the
        # deleted key's watch: that view can lag the new key just waited for
        await poll_until(lambda: leader.leader_name == other.instance, 10, "the deposed one observes the new leader")
        assert not leader.is_leader


# --- Election / LeaseSession directly ------------------------------------------------------------


@pytest.mark.anyio
async def test_fifty_candidates_one_leader_and_only_the_successor_wakes(etcd_endpoint: str) -> None:
    prefix = unique_prefix()
    config = ElectionConfig((etcd_endpoint,), name="x", prefix=prefix, lease_ttl=TTL)
    client = connect(config)
    sessions: list[LeaseSession] = []
    tasks: list[asyncio.Task[Term]] = []
    try:
        for _ in range(50):
            sessions.append(await LeaseSession.grant(client, ttl=TTL, margin=1.0))
        elections = [Election(client, prefix) for _ in sessions]
        tasks = [asyncio.create_task(e.campaign(s, f"c{i}"))
                 for i, (e, s) in enumerate(zip(elections, sessions, strict=True))]

        def settled() -> bool:
            waiting = [e for e, t in zip(elections, tasks, strict=True) if not t.done() and e.waiting_for]
            return sum(t.done() for t in tasks) == 1 and len(waiting) == 49

        await poll_until(settled, 15, "one leader and 49 waiting candidates")
        keys = await keys_under(etcd_endpoint, prefix)
        assert len(keys) == 50
        order = [key for key, _, _ in keys]  # by create revision
        by_key = {e.key_for(s): i for i, (e, s) in enumerate(zip(elections, sessions, strict=True))}
        leader_index = by_key[order[0]]
        assert tasks[leader_index].done()
        leader_term = tasks[leader_index].result()
        assert leader_term.valid() and leader_term.fencing_token == keys[0][2]
        assert (await elections[0].leader()).name == f"c{leader_index}"
        # each waiter watches exactly its immediate predecessor: a chain, no herd
        for position in range(1, 50):
            assert elections[by_key[order[position]]].waiting_for == order[position - 1]

        assert await elections[leader_index].resign(leader_term)
        assert leader_term.ended.is_set() and leader_term.reason == "resigned" and not leader_term.valid()
        successor_index = by_key[order[1]]
        await poll_until(lambda: tasks[successor_index].done(), 10, "the successor wakes")
        woke = [i for i, t in enumerate(tasks) if t.done() and i != leader_index]
        assert woke == [successor_index]
        successor_term = tasks[successor_index].result()
        assert successor_term.fencing_token == keys[1][2] > leader_term.fencing_token
        for position in range(2, 50):
            assert elections[by_key[order[position]]].waiting_for == order[position - 1]
        # guarded operations refuse a term that is over
        with pytest.raises(NotLeader):
            await elections[leader_index].proclaim(leader_term, "late")
        assert not await elections[leader_index].resign(leader_term)
        await elections[successor_index].proclaim(successor_term, "renamed")
        assert (await elections[0].leader()).name == "renamed"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.revoke() for s in sessions))
        await client.close()
    assert await keys_under(etcd_endpoint, prefix) == []


@pytest.mark.anyio
async def test_observe_follows_leader_changes(etcd_endpoint: str) -> None:
    prefix = unique_prefix()
    client = connect(ElectionConfig((etcd_endpoint,), name="x", prefix=prefix, lease_ttl=TTL))
    election = Election(client, prefix)
    seen: list[str | None] = []

    async def observe() -> None:
        async for info in election.observe():
            seen.append(info.name if info else None)

    observer = asyncio.create_task(observe())
    sessions = []
    try:
        await poll_until(lambda: seen == [None], 5, "no leader at first")
        sessions = [await LeaseSession.grant(client, ttl=TTL, margin=1.0) for _ in range(2)]
        first = await Election(client, prefix).campaign(sessions[0], "one")
        await poll_until(lambda: seen[-1:] == ["one"], 5, "first leader observed")
        contender = Election(client, prefix)
        waiting = asyncio.create_task(contender.campaign(sessions[1], "two"))
        # resign only once "two" is queued behind "one": else "no leader" in between is right
        await poll_until(lambda: contender.waiting_for is not None, 5, "second candidate queued")
        await Election(client, prefix).resign(first)
        second = await waiting
        await poll_until(lambda: seen[-1:] == ["two"], 5, "second leader observed")
        await sessions[1].revoke()
        assert second.ended.is_set() and second.reason.startswith("lease lost")
        await poll_until(lambda: seen[-1:] == [None], 5, "no leader observed again")
        assert seen == [None, "one", "two", None]
    finally:
        observer.cancel()
        await asyncio.gather(observer, return_exceptions=True)
        await asyncio.gather(*(s.revoke() for s in sessions))
        await client.close()


@pytest.mark.anyio
async def test_waiting_on_a_key_survives_compacted_history(etcd_endpoint: str) -> None:
    prefix = unique_prefix()
    client = connect(ElectionConfig((etcd_endpoint,), name="x", prefix=prefix, lease_ttl=TTL))
    election = Election(client, prefix)
    try:
        gone = (await client.put(f"{prefix}/gone".encode(), b"v")).header.revision
        kept = (await client.put(f"{prefix}/kept".encode(), b"v")).header.revision
        await client.delete(f"{prefix}/gone".encode())
        latest = (await client.put(f"{prefix}-other".encode(), b"v")).header.revision
        await client.compact(latest)
        # the watch from create revision + 1 is compacted: the key is re-read instead
        async with asyncio.timeout(5):
            await election.wait_deleted(f"{prefix}/gone", gone)
        waiter = asyncio.create_task(election.wait_deleted(f"{prefix}/kept", kept))
        await client.delete(f"{prefix}/kept".encode())
        async with asyncio.timeout(5):
            await waiter
    finally:
        await client.close()
