"""Election settings and their timing invariants.

The timings follow client-go's leader election reasoning, expressed with an etcd lease:

* the lease has ``lease_ttl`` seconds on the server, renewed every ``keepalive_interval``
  (= (ttl - margin)/3) seconds, so three keepalives fit in the locally valid time;
* locally a replica trusts its lease only until ``send time of the last acknowledged keepalive
  + ttl - margin`` (monotonic clock). The server cannot expire the lease before ``send time +
  ttl``, so the replica stops acting at least ``margin`` seconds before anyone else can be
  elected — provided the local clock's rate is sane and the process is not paused longer than
  the margin between its validity check and the action it guards (the fencing token covers
  that case);
* the margin must leave time to act and to renew: ``ttl - margin >= 1`` second.

Invalid combinations raise ``ValueError`` naming the field, so a bad deployment stops at start.
"""

from __future__ import annotations

import os
from dataclasses import KW_ONLY, dataclass, field
from urllib.parse import urlsplit

from .errors import ElectionError

MIN_TTL = 2  # etcd rounds smaller TTLs up to its minimum lease TTL (2 s with default timings)


class ConfigError(ElectionError, ValueError):
    """An invalid ElectionConfig value; `field` names the field, `message` says what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _fail(field: str, message: str) -> None:
    raise ConfigError(field, message)


@dataclass(frozen=True)
class ElectionConfig:
    """Where to elect and how long a lease lives.

    ``endpoints`` may also be given as a comma-separated string or a list; it is normalised to
    a tuple of ``http(s)://host:port`` URLs (``host:port`` without a scheme means ``http``).
    """

    endpoints: tuple[str, ...]
    _: KW_ONLY
    name: str
    prefix: str = "/reminders/leader"
    lease_ttl: int = 10
    margin: float | None = None
    max_term: float | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    request_timeout: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", self._normalise_endpoints(self.endpoints))
        if not isinstance(self.name, str) or not self.name.strip():
            _fail("name", "must be a non-empty string (the POD_NAME written to the election key)")
        if not isinstance(self.prefix, str) or not self.prefix or self.prefix.endswith("/"):
            _fail("prefix", f"must be a non-empty key prefix without a trailing '/' (got {self.prefix!r})")

        ttl = self.lease_ttl
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < MIN_TTL:
            _fail("lease_ttl", f"must be an integer number of seconds >= {MIN_TTL} (got {ttl!r})")

        floor = max(1.0, 0.2 * ttl)
        ceiling = ttl - 1.0
        if self.margin is not None:
            if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)):
                _fail("margin", f"must be a number of seconds (got {self.margin!r})")
            if self.margin < floor:
                _fail("margin", f"must be >= max(1, 0.2 * lease_ttl) = {floor:g} s (got {self.margin:g})")
        if self.effective_margin > ceiling:
            _fail(
                "margin",
                f"{self.effective_margin:g} s leaves no time to act and renew: it must be <= lease_ttl - 1 "
                f"= {ceiling:g} s (raise lease_ttl)",
            )

        if self.max_term is not None:
            if isinstance(self.max_term, bool) or not isinstance(self.max_term, (int, float)) or self.max_term <= 0:
                _fail("max_term", f"must be a positive number of seconds or None (got {self.max_term!r})")

        timeout = self.request_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            _fail("request_timeout", f"must be a positive number of seconds (got {timeout!r})")
        if timeout > ttl:
            _fail("request_timeout",
                  f"must not exceed lease_ttl ({ttl} s): a slower answer is useless (got {timeout:g})")

        if (self.username is None) != (self.password is None):
            _fail("username" if self.username is None else "password", "username and password go together")
        if (self.cert is None) != (self.key is None):
            _fail("cert" if self.cert is None else "key", "a client certificate needs its key and vice versa")
        https = self.endpoints[0].startswith("https://")
        for name in ("ca_cert", "cert", "key"):
            path = getattr(self, name)
            if path is None:
                continue
            if not https:
                _fail(name, "TLS files need https:// endpoints")
            if not os.path.isfile(path):
                _fail(name, f"file not found: {path}")

    @staticmethod
    def _normalise_endpoints(endpoints: object) -> tuple[str, ...]:
        if isinstance(endpoints, str):
            endpoints = [part for part in endpoints.split(",")]
        if not isinstance(endpoints, (list, tuple)):
            _fail("endpoints", f"must be a list of URLs (got {endpoints!r})")
        urls = []
        for raw in endpoints:
            text = str(raw).strip()
            if not text:
                continue
            if "://" not in text:
                text = "http://" + text
            parts = urlsplit(text)
            try:
                port = parts.port
            except ValueError:
                port = None
            if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
                _fail("endpoints", f"{raw!r} is not http(s)://host:port")
            if parts.path not in ("", "/") or parts.query or parts.username:
                _fail("endpoints", f"{raw!r}: only scheme, host and port are allowed")
            urls.append(f"{parts.scheme}://{parts.netloc}")
        if not urls:
            _fail("endpoints", "at least one etcd endpoint is required")
        if len({url.split("://")[0] for url in urls}) > 1:
            _fail("endpoints", "mixes http and https")
        return tuple(urls)

    @property
    def keepalive_interval(self) -> float:
        """Seconds between lease keepalives: a third of the locally valid part of the TTL
        (TTL − margin), so that three keepalives fit before the local deadline; with TTL 2 s
        and a 1 s margin, a third of the TTL would leave a slow reply 0.33 s."""
        return (self.lease_ttl - self.effective_margin) / 3

    @property
    def effective_margin(self) -> float:
        """The margin in use: the configured one or max(1 s, 20 % of the TTL)."""
        if self.margin is not None:
            return float(self.margin)
        return max(1.0, 0.2 * self.lease_ttl)

    @property
    def tls(self) -> bool:
        return self.endpoints[0].startswith("https://")
