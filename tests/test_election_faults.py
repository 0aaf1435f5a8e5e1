"""Faults: a leader cut off from etcd (TCP proxy black hole), an etcd crash/restart, a paused etcd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import aetcd.exceptions
import pytest

from harness.proxy import TcpProxy
from service.election import ElectionConfig, Elector, LeaseSession, connect
from service.election.aio import close_quietly
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


async def _keys_or_none(endpoint: str, prefix: str) -> list[tuple[str, str, int]] | None:
    try:
        return await keys_under(endpoint, prefix)
    except Exception:  # noqa: BLE001 - EtcdError / aetcd errors while etcd is down
        return None


@pytest.fixture
def proxy(etcd_server):
    with TcpProxy("127.0.0.1", etcd_server.port) as proxy:
        yield proxy


@pytest.mark.anyio
async def test_proxy_modes(proxy: TcpProxy) -> None:
    client = connect(ElectionConfig((proxy.endpoint,), name="probe", lease_ttl=TTL, request_timeout=0.5))
    try:
        await client.put(b"/test/proxy", b"1")
        proxy.stall()
        with pytest.raises(aetcd.exceptions.ConnectionTimeoutError, match="(?i)deadline|timeout"):
            await client.get(b"/test/proxy")
        proxy.reset()
        # a reset connection: UNAVAILABLE, or a timeout while gRPC reconnects, both fine
        with pytest.raises((aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError)):
            await client.get(b"/test/proxy")
        proxy.pass_through()
        got = await poll_until(lambda: _get_or_none(client), 10, "traffic again after pass_through")
        assert got.value == b"1"
    finally:
        await client.close()


async def _get_or_none(client):
    try:
        return await client.get(b"/test/proxy")
    except Exception:  # noqa: BLE001
        return None


@pytest.mark.anyio
async def test_session_lost_locally_while_etcd_still_holds_the_lease(proxy: TcpProxy, etcd_endpoint: str) -> None:
    """Cut off, the session gives up at the deadline it computed from the last acknowledged
    keepalive's *send* time: TTL - margin after it. etcd counts the TTL from when it received that
    keepalive, later, so the lease outlives the local deadline by at least the margin. Checked on
    the values the session computed, not on how fast this machine asks etcd afterwards."""
    cut = connect(ElectionConfig((proxy.endpoint,), name="cut", lease_ttl=TTL))
    direct = connect(ElectionConfig((etcd_endpoint,), name="direct", lease_ttl=TTL))
    acks: list[tuple[float, float]] = []  # (monotonic time of the hook, round trip): sent <= time - rtt
    session = await LeaseSession.grant(
        cut, ttl=TTL, margin=1.0, on_keepalive=lambda rtt: acks.append((time.monotonic(), rtt))
    )
    try:
        await poll_until(lambda: acks, TTL, "a first acknowledged keepalive")
        assert session.valid()
        info = await direct.get_lease_info(session.lease_id, keys=False)
        assert info.grantedTTL == TTL  # etcd counts with the TTL the session counts with
        proxy.stall()
        await poll_until(lambda: session.lost.is_set(), TTL + 10, "the cut-off session gives up")
        assert not session.valid() and "deadline" in session.lost_reason
        at, rtt = acks[-1]  # the last acknowledged keepalive (none can arrive through the stall)
        assert session.deadline <= (at - rtt) + TTL - 1.0
        assert session.deadline > at - rtt  # and it was that keepalive that set it
    finally:
        proxy.pass_through()
        await session.revoke()
        await cut.close()
        await direct.close()


@pytest.mark.anyio
async def test_cut_off_leader_steps_down_before_successor_leads(proxy: TcpProxy, etcd_endpoint: str) -> None:
    prefix = unique_prefix()
    recorder = Recorder()
    cut = make_elector(proxy.endpoint, prefix, "cut", recorder)
    direct = make_elector(etcd_endpoint, prefix, "direct", recorder)
    async with running(cut):
        await poll_until(lambda: cut.is_leader, 10, "the proxied replica leads")
        async with running(direct):
            await poll_until(lambda: _queued(etcd_endpoint, prefix, {"cut", "direct"}), 10, "direct queued")
            proxy.stall()
            await poll_until(lambda: direct.is_leader, 15, "the directly connected replica takes over")
            ended, reason = await recorder.wait_for("cut", "ended")
            started, _ = await recorder.wait_for("direct", "started")
            assert ended < started, recorder.events
            assert reason.startswith("lease lost"), reason
            assert not cut.is_leader

            proxy.pass_through()
            # not stuck: the cut replica campaigns again and queues behind the new leader
            await poll_until(lambda: _queued(etcd_endpoint, prefix, {"cut", "direct"}, exact=True), 20,
                             "cut queued again")
            await poll_until(lambda: single_leader([cut, direct]) is direct, 10, "both agree on direct")


async def _queued(endpoint: str, prefix: str, names: set[str], exact: bool = False) -> bool:
    keys = await _keys_or_none(endpoint, prefix)
    if keys is None:
        return False
    values = [value for _, value, _ in keys]
    if exact:
        return sorted(values) == sorted(names)
    return names <= set(values)


@pytest.mark.anyio
async def test_etcd_restart_ends_with_exactly_one_leader(private_etcd) -> None:
    prefix = unique_prefix()
    electors = [make_elector(private_etcd.endpoint, prefix, f"pod-{i}") for i in range(3)]
    names = {e.instance for e in electors}
    async with running(*electors):
        before = await poll_until(lambda: single_leader(electors), 10, "a leader before the crash")
        await poll_until(lambda: _queued(private_etcd.endpoint, prefix, names, exact=True), 10, "all queued")
        token = before.fencing_token

        private_etcd.kill()
        await poll_until(lambda: not any(e.is_leader for e in electors), TTL + 3, "nobody leads without etcd")
        private_etcd.start()

        after = await poll_until(lambda: single_leader(electors), 20, "exactly one leader after the restart")
        assert after.fencing_token > token
        # none stuck: every replica is in the queue again, stale keys of old leases are gone
        await poll_until(lambda: _queued(private_etcd.endpoint, prefix, names, exact=True), 20, "all queued again")
        keys = await keys_under(private_etcd.endpoint, prefix)
        assert keys[0][1] == after.instance and keys[0][2] == after.fencing_token
        assert single_leader(electors) is after


@pytest.mark.anyio
async def test_session_survives_one_stalled_endpoint_of_two(proxy: TcpProxy, etcd_endpoint: str) -> None:
    """Round robin sends every other keepalive into the black hole: each stuck attempt times out
    within half the remaining validity and the retry goes to the healthy endpoint. Checked as the
    order of events (a failed keepalive, then an acknowledged one), not as acks in a given time."""
    client = connect(ElectionConfig((proxy.endpoint, etcd_endpoint), name="rr", lease_ttl=TTL))
    events: list[str] = []
    session = await LeaseSession.grant(
        client, ttl=TTL, margin=1.0,
        on_keepalive=lambda _rtt: events.append("ack"), on_keepalive_failure=lambda: events.append("failure"),
    )
    try:
        await poll_until(lambda: "ack" in events, TTL, "a first keepalive")
        proxy.stall()
        stalled_at = len(events)

        def failure_then_ack() -> bool:
            after = events[stalled_at:]
            return "failure" in after and "ack" in after[after.index("failure"):] or session.lost.is_set()

        await poll_until(failure_then_ack, 30, "a keepalive lost in the black hole, then one acknowledged")
        assert not session.lost.is_set(), session.lost_reason
        assert session.valid()
    finally:
        proxy.pass_through()
        await session.revoke()
        await client.close()


@pytest.mark.anyio
async def test_a_failed_revoke_retries_as_soon_as_etcd_grants_a_lease(etcd_endpoint: str) -> None:
    """After an outage every candidate's stale key must go before anyone is elected: a revoke that
    failed while etcd was down is retried when etcd next grants this elector a lease, not only at
    its next backoff tick (here an hour away, so only the wake-up can retry it). The old lease is
    the one of a term ended by `max_term`: the elector revokes it in the background."""
    attempts: list[int] = []

    async def revoke_failing_once(_client: object, lease_id: int, _timeout: float) -> bool:
        attempts.append(lease_id)
        return len(attempts) > 1

    prefix = unique_prefix()
    recorder = Recorder()
    elector = Elector(
        ElectionConfig((etcd_endpoint,), name="a", prefix=prefix, lease_ttl=TTL, max_term=1.0),
        **recorder.callbacks("a"),
        revoke=revoke_failing_once,
        revoke_backoff=(3600.0, 3600.0),
    )
    async with running(elector):
        await poll_until(lambda: elector.is_leader, 10, "a leads")
        first_lease = int(elector.term.key.rsplit("/", 1)[1], 16)
        _, reason = await recorder.wait_for("a", "ended")
        assert reason == "max_term reached"
        await poll_until(lambda: len(attempts) >= 2, 10, "the failed revoke retried once etcd granted a new lease")
        assert attempts[:2] == [first_lease, first_lease]
        await poll_until(lambda: elector.is_leader, 10, "a leads again on its new lease")


async def _a_new_watch_sees_its_own_key_only(client: aetcd.Client, prefix: bytes, abandoned: bytes) -> None:
    """A watch created now reports a write to its own key, not one to the `abandoned` creation's key."""
    async with asyncio.timeout(10):  # a restarted etcd is found again within ~2 s
        watch = await client.watch(prefix + b"/third")
        await client.put(abandoned, b"not watched")
        await client.put(prefix + b"/third", b"watched")
        async for event in watch:
            assert (event.kv.key, event.kv.value) == (prefix + b"/third", b"watched")
            break


async def _paused(pid: int) -> None:
    """SIGSTOP `pid` and return once all its threads have stopped (kill returns before they do)."""
    os.kill(pid, signal.SIGSTOP)

    def stopped() -> bool:
        tasks = Path(f"/proc/{pid}/task")
        return all((task / "stat").read_text().rpartition(")")[2].split()[0] in "Tt" for task in tasks.iterdir())

    await poll_until(stopped, 5, f"etcd (pid {pid}) stopped")


async def _loop_turns(count: int) -> None:
    """Let every ready task run `count` times: how the test below picks an interleaving."""
    for _ in range(count):
        await asyncio.sleep(0)


@pytest.mark.parametrize("turns", range(8))
@pytest.mark.anyio
async def test_a_watch_creation_cancelled_twice_leaves_the_stream_usable(private_etcd, turns: int) -> None:
    """A watch being created while another task holds the stream's lock, cancelled twice (as
    `cancel_and_wait` does), must leave only with the lock back in hand: else it releases the
    other task's hold and the stream can stay locked for good (aetcd 1.0 on Python 3.11). And
    etcd's late answer to it must not be taken for the next creation's."""
    client = connect(ElectionConfig((private_etcd.endpoint,), name="probe", lease_ttl=TTL))
    pid = private_etcd.process.pid
    try:
        await client.watch(b"/paused/first")  # the stream is open
        stream = client._watcher  # the client's watch stream: its lock is what this test is about
        await _paused(pid)  # the next creation waits for its answer
        try:
            creation = asyncio.create_task(client.watch(b"/paused/second"))
            await poll_until(
                lambda: stream._new_callback is not None and not stream._lock.locked(), 5, "the creation waiting"
            )
            release = asyncio.Event()
            holding = asyncio.Event()

            async def other_holder() -> None:  # as aetcd's response handler holds it to cancel a watch
                async with stream._lock:
                    holding.set()
                    await release.wait()

            holder = asyncio.create_task(other_holder())
            await holding.wait()
            creation.cancel()
            await _loop_turns(5)
            creation.cancel()
            await _loop_turns(turns)
            assert not creation.done(), "a cancelled creation left while another task held the lock"
            release.set()
            await asyncio.wait({holder, creation}, timeout=5)
            assert holder.done() and holder.exception() is None
            assert creation.cancelled()
            assert not stream._lock.locked()
        finally:
            os.kill(pid, signal.SIGCONT)
        await _a_new_watch_sees_its_own_key_only(client, b"/paused", abandoned=b"/paused/second")
    finally:
        await close_quietly(client)


@pytest.mark.parametrize("then", ["resumed", "restarted"])
@pytest.mark.anyio
async def test_a_late_answer_to_a_timed_out_watch_creation_goes_to_no_one_else(private_etcd, then: str) -> None:
    """etcd answers watch creations in order and names no request: the answer to one whose caller
    timed out must be dropped, not taken for the next creation (which would then watch the
    other key, and never its own). If the answer never comes (etcd restarted: the stream
    ended), the next creation must not wait for it."""
    client = connect(ElectionConfig((private_etcd.endpoint,), name="probe", lease_ttl=TTL, request_timeout=0.5))
    pid = private_etcd.process.pid
    try:
        await client.watch(b"/late/first")  # the stream is open
        await _paused(pid)
        try:
            with pytest.raises(aetcd.exceptions.WatchTimeoutError):
                await client.watch(b"/late/second")
            if then == "restarted":
                private_etcd.kill()  # SIGKILL ends a stopped process too
                private_etcd.start()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # resumed, or a no-op for the killed one
        await _a_new_watch_sees_its_own_key_only(client, b"/late", abandoned=b"/late/second")
    finally:
        await close_quietly(client)
