"""What every provider's webhooks share at the edge, before any of them is trusted: where they are
served, what a signature check can find wrong (the `reason` of the failure metric), and reading a
header so that nothing in it can raise. Knows no database."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

__all__ = ["WEBHOOK_PREFIX", "SignatureFailure", "one_header"]

# Every provider's webhook routes are under this path (the Ingress exposes it and nothing else).
WEBHOOK_PREFIX = "/telephony"


class SignatureFailure(StrEnum):
    """Why a webhook's signature was refused."""

    MISSING = "missing"  # no signature (or, Telnyx, no timestamp) header
    MALFORMED = "malformed"  # repeated, not printable ASCII, too long, or not the scheme's shape
    STALE = "stale"  # Telnyx: a timestamp more than the tolerance away from now
    MISMATCH = "mismatch"  # well formed, and it does not verify


def one_header(values: Sequence[str], max_length: int) -> str | SignatureFailure:
    """The one value of a header given as all its `values` (Starlette's `getlist`: bytes read as
    Latin-1), or why there is none usable: absent or empty → MISSING; repeated, longer than
    `max_length`, or other than printable ASCII → MALFORMED."""
    if not values or (len(values) == 1 and not values[0].strip()):
        return SignatureFailure.MISSING
    value = values[0].strip()
    if len(values) > 1 or len(value) > max_length or not (value.isascii() and value.isprintable()):
        return SignatureFailure.MALFORMED
    return value
