"""Telnyx's event signature: Ed25519 over `"{telnyx-timestamp}|{raw body}"` with TELNYX_PUBLIC_KEY,
five minutes' tolerance either way. Knows no database."""

from __future__ import annotations

import base64
import binascii
import re
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from service.telephony.webhook import SignatureFailure

__all__ = [
    "MAX_SIGNATURE_LENGTH", "MAX_TIMESTAMP_LENGTH", "SIGNATURE_HEADER", "SIGNATURE_TOLERANCE", "TIMESTAMP_HEADER",
    "TelnyxSignature", "decode_public_key",
]


SIGNATURE_HEADER = "telnyx-signature-ed25519"


TIMESTAMP_HEADER = "telnyx-timestamp"


# Seconds since the epoch in ASCII digits (`[0-9]`, not `\d`: that takes any script's digits).
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
# The longest header values read: 64 bytes in base64 is 88 characters.
MAX_SIGNATURE_LENGTH = 128
MAX_TIMESTAMP_LENGTH = 32

# Events signed longer ago than this are refused (a replay); Telnyx's own libraries use 5 minutes.
SIGNATURE_TOLERANCE = 300.0


class TelnyxSignature:
    """Ed25519 over `"{telnyx-timestamp}|{raw body}"` with TELNYX_PUBLIC_KEY (base64, 32 bytes);
    timestamps further than `tolerance` seconds from now (either way) are refused."""

    def __init__(self, public_key: str, *, tolerance: float = SIGNATURE_TOLERANCE) -> None:
        self._key = Ed25519PublicKey.from_public_bytes(decode_public_key(public_key))
        self._tolerance = tolerance

    def valid(self, body: bytes, signature: str | None, timestamp: str | None, *, now: float | None = None) -> bool:
        return self.failure(body, signature, timestamp, now=now) is None

    def failure(self, body: bytes, signature: str | None, timestamp: str | None, *,
                now: float | None = None) -> SignatureFailure | None:
        """Why the signature of `body` does not hold (None when it does); never raises, whatever
        the headers hold (`²` passes `isdigit()` and fails `int()`: only ASCII digits count)."""
        if not signature or not timestamp:
            return SignatureFailure.MISSING
        if not _TIMESTAMP.fullmatch(timestamp):
            return SignatureFailure.MALFORMED
        try:
            raw = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            return SignatureFailure.MALFORMED
        if len(raw) != 64:
            return SignatureFailure.MALFORMED
        current = time.time() if now is None else now
        if abs(current - int(timestamp)) > self._tolerance:
            return SignatureFailure.STALE
        try:
            self._key.verify(raw, timestamp.encode() + b"|" + body)
        except InvalidSignature:
            return SignatureFailure.MISMATCH
        return None


def decode_public_key(text: str) -> bytes:
    """The 32 raw bytes of a base64 Ed25519 public key; ValueError if it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes (44 base64 characters)")
    return raw
