"""Telephony provider: the client interface the dispatcher uses and its HTTP implementation."""

from .client import (
    CallOutcome,
    CallRequest,
    HttpTelephonyClient,
    OutcomeKind,
    TelephonyClient,
    parse_retry_after,
)

__all__ = [
    "CallOutcome",
    "CallRequest",
    "HttpTelephonyClient",
    "OutcomeKind",
    "TelephonyClient",
    "parse_retry_after",
]
