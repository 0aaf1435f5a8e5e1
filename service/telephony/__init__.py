"""The telephony provider interface the dispatcher and the webhooks use (`provider.py`) and the
HTTP plumbing every adapter shares (`http.py`). The adapters live in `service.providers`, one
package per provider. Knows no database."""

from .provider import (
    LIVE_STATUSES,
    CallSpec,
    CreateKind,
    CreateResult,
    LiveCall,
    Provider,
    ProviderUnavailable,
    SpeechCommands,
    Stamp,
    TelephonyError,
)

__all__ = [
    "LIVE_STATUSES",
    "CallSpec",
    "CreateKind",
    "CreateResult",
    "LiveCall",
    "Provider",
    "ProviderUnavailable",
    "SpeechCommands",
    "Stamp",
    "TelephonyError",
]
