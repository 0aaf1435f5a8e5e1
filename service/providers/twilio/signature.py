"""Twilio's webhook signature: `X-Twilio-Signature`, base64 HMAC-SHA1 with the auth token over the
full URL (PUBLIC_URL + path + query; a connection-override fragment is not part of it) followed by
the POST parameters sorted by name. The `twilio` library's `RequestValidator` computes it (ports,
repeated parameters). SignalWire's compatibility API: the same scheme with the project's signing
key (SIGNALWIRE_SIGNING_KEY). Knows no database."""

from __future__ import annotations

from typing import Any

from twilio.request_validator import RequestValidator

from service.telephony.webhook import SignatureFailure

__all__ = ["MAX_SIGNATURE_LENGTH", "SIGNATURE_HEADER", "SIGNATURE_HEADERS", "TwilioSignature"]


SIGNATURE_HEADER = "X-Twilio-Signature"
# SignalWire's compatibility API signs the same way, with the project's signing key, in
# `X-SignalWire-Signature` (`X-Twilio-Signature` is its legacy alias).
SIGNATURE_HEADERS = (SIGNATURE_HEADER, "X-SignalWire-Signature")
# The longest signature header read: an HMAC-SHA1 in base64 is 28 characters (SHA-256: 44).
MAX_SIGNATURE_LENGTH = 128


class TwilioSignature:
    """Checks `X-Twilio-Signature` against PUBLIC_URL + path + query, not the URL the request
    arrived at (a proxy in front may have stripped a path prefix or changed host and scheme)."""

    def __init__(self, key: str, public_url: str) -> None:
        """`key`: the auth token (Twilio) or the project's signing key (SignalWire)."""
        self._validator = RequestValidator(key)
        self._public_url = public_url.rstrip("/")

    def signed_url(self, path: str, query: str) -> str:
        return f"{self._public_url}{path}" + (f"?{query}" if query else "")

    def valid(self, path: str, query: str, params: Any, signature: str | None) -> bool:
        """`params`: the POST form (a multi-dict with `getlist`, or a plain mapping)."""
        return self.failure(path, query, params, signature) is None

    def failure(self, path: str, query: str, params: Any, signature: str | None) -> SignatureFailure | None:
        """Why `signature` does not hold for the request (None when it does)."""
        if not signature:
            return SignatureFailure.MISSING
        if self._validator.validate(self.signed_url(path, query), params, signature):
            return None
        return SignatureFailure.MISMATCH

    def sign(self, url: str, params: Any) -> str:
        """The signature Twilio would send for `url` and `params` (the fake and tests use it)."""
        return self._validator.compute_signature(url, params)
