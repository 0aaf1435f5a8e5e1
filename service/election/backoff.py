"""Capped exponential backoff with jitter, for retrying etcd calls."""

from __future__ import annotations

import random


class Backoff:
    """Delays ``base * 2**n`` capped at ``cap``, each drawn from [d/2, d] ("equal jitter") so
    that replicas failing together do not retry in lockstep."""

    def __init__(self, base: float = 0.1, cap: float = 2.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2 ** self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        self.attempt = 0
