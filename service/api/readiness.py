"""/readyz's probe: the database decides readiness; etcd is reported, never decisive (docs/DESIGN.md).

Answers are cached for `ttl` seconds and only one probe runs at a time, so unauthenticated
callers cannot turn /readyz into database and etcd load.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Readiness", "ReadinessProbe"]

PROBE_TIMEOUT = 2.0


@dataclass(frozen=True)
class Readiness:
    ready: bool
    body: dict[str, Any] = field(default_factory=dict)


class ReadinessProbe:
    """Probes `db` (and reports `elector`) at most once per `ttl` seconds, one probe at a time."""

    def __init__(self, db: Any, elector: Any, *, ttl: float = 1.0, timeout: float = PROBE_TIMEOUT) -> None:
        self.db = db
        self.elector = elector
        self.ttl = ttl
        self.timeout = timeout
        self.probes = 0
        self._lock = asyncio.Lock()
        self._answer: Readiness | None = None
        self._at = 0.0

    async def check(self) -> Readiness:
        if self._fresh():
            return self._answer  # type: ignore[return-value]
        async with self._lock:  # callers arriving during a probe wait for its answer
            if self._fresh():
                return self._answer  # type: ignore[return-value]
            self._answer = await self._probe()
            self._at = time.monotonic()
            return self._answer

    def _fresh(self) -> bool:
        return self._answer is not None and time.monotonic() - self._at < self.ttl

    async def _probe(self) -> Readiness:
        self.probes += 1
        database = "ok"
        try:
            await asyncio.wait_for(self.db.ping(), self.timeout)
        except Exception as error:  # noqa: BLE001 - any failure means not ready
            database = f"unavailable: {type(error).__name__}"
        etcd = "not checked"
        if self.elector is not None:
            if self.elector.config_error:
                etcd = f"configuration error: {self.elector.config_error}"
            else:
                etcd = "ok" if await self.elector.etcd_healthy(self.timeout) else "not reachable"
        ready = database == "ok"
        body: dict[str, Any] = {"status": "ready" if ready else "unavailable", "database": database, "etcd": etcd}
        if not ready:
            body["reasons"] = [f"database: {database}"]
        return Readiness(ready, body)
