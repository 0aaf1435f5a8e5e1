"""Faults: a leader cut off from etcd (TCP proxy black hole) and an etcd crash/restart."""

from __future__ import annotations

import time

import aetcd.exceptions
import pytest

from harness.proxy import TcpProxy
from service.election import ElectionConfig, Elector, LeaseSession, connect
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
