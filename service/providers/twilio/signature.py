"""Twilio's webhook signature: `X-Twilio-Signature`, base64 HMAC-SHA1 with the auth token over the
full URL (PUBLIC_URL + path + query) followed by the POST parameters sorted by name. The `twilio`
library's `RequestValidator` computes it (ports, repeated parameters). Knows no database."""

from __future__ import annotations

from typing import Any

from twilio.request_validator import RequestValidator

__all__ = ["SIGNATURE_HEADER", "TwilioSignature"]


SIGNATURE_HEADER = "X-Twilio-Signature"


class TwilioSignature:
    """Checks `X-Twilio-Signature` against PUBLIC_URL + path + query, not the URL the request
    arrived at (a proxy in front may have stripped a path prefix or changed host and scheme)."""

    def __init__(self, auth_token: str, public_url: str) -> None:
        self._validator = RequestValidator(auth_token)
        self._public_url = public_url.rstrip("/")

    def signed_url(self, path: str, query: str) -> str:
        return f"{self._public_url}{path}" + (f"?{query}" if query else "")

    def valid(self, path: str, query: str, params: Any, signature: str | None) -> bool:
        """`params`: the POST form (a multi-dict with `getlist`, or a plain mapping)."""
        if not signature:
            return False
        return bool(self._validator.validate(self.signed_url(path, query), params, signature))

    def sign(self, url: str, params: Any) -> str:
        """The signature Twilio would send for `url` and `params` (the fake and tests use it)."""
        return self._validator.compute_signature(url, params)
