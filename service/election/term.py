"""A term: one continuous period of leadership, handed to whoever acts as leader.

Guarantee: while `valid()` is true this replica's election key exists in etcd with
`fencing_token` as its create revision, and the lease behind it cannot have expired on the
server (see `LeaseSession`). `fencing_token` strictly increases from one term to the next across
all replicas (etcd revisions only grow), so a store that remembers the largest token it has seen
can refuse a deposed leader's late writes.

Limits: `valid()` is a local belief. Check it immediately before each action, and still send
the fencing token with the action: a pause between the check and the action is not covered.
Once `ended` is set the term never becomes valid again; a new term has a new token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import LeaseSession

log = logging.getLogger(__name__)


class Term:
    """Leadership evidence: `fencing_token`, `key`, `valid()`, `ended`, `reason`."""

    def __init__(self, *, key: str, fencing_token: int, session: LeaseSession) -> None:
        self.key = key
        self.fencing_token = fencing_token
        self.ended = asyncio.Event()
        self.reason: str | None = None
        self._session = session
        session.add_lost_callback(lambda why: self._end(f"lease lost: {why}"))

    def valid(self) -> bool:
        """True while the term has not ended and the lease's local deadline has not passed."""
        return not self.ended.is_set() and self._session.valid()

    def remaining(self) -> float:
        """Seconds left before the local lease deadline (0 when the term is not valid)."""
        if self.ended.is_set():
            return 0.0
        return max(0.0, self._session.deadline - time.monotonic())

    async def wait_ended(self) -> str | None:
        """Return once the term has ended, with its `reason`."""
        await self.ended.wait()
        return self.reason

    # package-internal ---------------------------------------------------------------------------

    def _end(self, reason: str) -> None:
        """End the term (first reason wins). Synchronous, so nothing can act in between."""
        if self.ended.is_set():
            return
        self.reason = reason
        self.ended.set()
        log.info("term %d (%s) ended: %s", self.fencing_token, self.key, reason)

    @property
    def _lease_session(self) -> LeaseSession:
        return self._session

    def __repr__(self) -> str:
        state = "valid" if self.valid() else f"ended ({self.reason})" if self.ended.is_set() else "expired"
        return f"Term(token={self.fencing_token}, key={self.key!r}, {state})"
