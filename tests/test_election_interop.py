"""Interoperability with Go's election through `etcdctl elect` (invariant 5)."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from harness.etcd import find_binary
from tests.support.election import (
    grpc_events_of_closed_loops_ignored,  # noqa: F401
    keys_under,
    make_elector,
    poll_until,
    running,
    unique_prefix,
)

ETCDCTL = find_binary("etcdctl")
pytestmark = pytest.mark.requires("etcdctl")


class Etcdctl:
    """An `etcdctl` child whose output lines are collected with the time they arrived and a
    snapshot of `probe()` taken at that moment."""

    def __init__(self, endpoint: str, *args: str, probe=lambda: None) -> None:
        self.argv = [ETCDCTL, "--endpoints", endpoint, *args]
        self.probe = probe
        self.lines: list[tuple[str, float, object]] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Etcdctl:
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append((raw.decode().rstrip("\n"), time.monotonic(), self.probe()))

    def texts(self) -> list[str]:
        return [line for line, _, _ in self.lines]

    async def interrupt(self) -> int:
        """SIGINT: `etcdctl elect` resigns on it (SIGKILL would leave its key for 60 s)."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            return await self.process.wait()

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.kill()
        async with asyncio.timeout(10):
            await self.process.wait()
        if self._reader is not None:
            async with asyncio.timeout(5):
                await self._reader


@pytest.mark.anyio
async def test_etcdctl_elect_listen_shows_our_leader(etcd_endpoint: str) -> None:
    prefix = unique_prefix()
    ours = make_elector(etcd_endpoint, prefix, "pod-a")
    async with running(ours):
        await poll_until(lambda: ours.is_leader, 10, "ours leads")
        async with Etcdctl(etcd_endpoint, "elect", "-l", prefix) as listener:
            await poll_until(lambda: "pod-a" in listener.texts(), 10, "etcdctl prints our name")
            texts = listener.texts()
            assert texts[texts.index("pod-a") - 1] == ours.term.key


@pytest.mark.anyio
async def test_go_contender_waits_while_we_lead(etcd_endpoint: str) -> None:
    prefix = unique_prefix()
    ours = make_elector(etcd_endpoint, prefix, "pod-a")
    async with running(ours):
        await poll_until(lambda: ours.is_leader, 10, "ours leads")
        async with Etcdctl(etcd_endpoint, "elect", prefix, "go", probe=lambda: ours.is_leader) as go:
            await poll_until(lambda: _names(etcd_endpoint, prefix, ["pod-a", "go"]), 10, "go queued behind us")
            assert ours.is_leader and go.texts() == []  # go campaigns but does not lead

            shutdown_started = time.monotonic()
            await ours.shutdown(drain_timeout=1.0)
            await poll_until(lambda: "go" in go.texts(), 10, "go leads after we resigned")
            line, at, ours_was_leader = go.lines[go.texts().index("go")]
            assert at > shutdown_started and ours_was_leader is False
            assert not ours.is_leader
            assert await go.interrupt() == 0


@pytest.mark.anyio
async def test_we_wait_while_go_leads(etcd_endpoint: str) -> None:
    prefix = unique_prefix()
    ours = make_elector(etcd_endpoint, prefix, "pod-a")
    async with Etcdctl(etcd_endpoint, "elect", prefix, "go") as go:
        await poll_until(lambda: "go" in go.texts(), 10, "go leads")
        go_key, _, go_revision = (await keys_under(etcd_endpoint, prefix))[0]
        assert go.texts()[go.texts().index("go") - 1] == go_key
        async with running(ours):
            await poll_until(lambda: _names(etcd_endpoint, prefix, ["go", "pod-a"]), 10, "ours queued behind go")
            await poll_until(lambda: ours.leader_name == "go", 10, "ours observes go as leader")
            assert not ours.is_leader and ours.fencing_token is None

            assert await go.interrupt() == 0  # resigns
            await poll_until(lambda: ours.is_leader, 10, "ours leads once go resigned")
            assert ours.fencing_token > go_revision
            assert ours.leader_name == "pod-a"


async def _names(endpoint: str, prefix: str, names: list[str]) -> bool:
    return [value for _, value, _ in await keys_under(endpoint, prefix)] == names
