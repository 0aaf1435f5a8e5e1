"""Leader election on etcd, compatible with Go's ``concurrency.Election`` and ``etcdctl elect``.

Knows nothing of reminders: it hands a `Term` (fencing token + local validity) to whoever leads.

* `ElectionConfig` — settings and timing invariants.
* `connect` — an aetcd client with timeouts, keepalive pings, capped reconnect backoff, TLS/auth,
  and a watch stream (`watcher.py`) whose creations survive cancellation and late answers.
* `LeaseSession` — a kept-alive lease with a local deadline (loss detected without etcd's help).
* `Election` — Go's campaign / resign / proclaim / leader / observe algorithm.
* `Term` — one period of leadership: `fencing_token`, `valid()`, `ended`.
* `Elector` — the run-forever loop the application starts, with shutdown and status.
"""

from .client import connect
from .config import ConfigError, ElectionConfig
from .election import Election, LeaderInfo
from .elector import Elector
from .errors import CompactedError, ElectionError, EtcdError, NotLeader, SessionLost
from .session import LeaseSession
from .term import Term

__all__ = [
    "CompactedError",
    "Election",
    "ConfigError",
    "ElectionConfig",
    "ElectionError",
    "Elector",
    "EtcdError",
    "LeaderInfo",
    "LeaseSession",
    "NotLeader",
    "SessionLost",
    "Term",
    "connect",
]
