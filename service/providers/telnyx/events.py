"""Telnyx's event envelope (`data.event_type`, `data.id`, `data.occurred_at`, `data.payload`) and
what a `call.hangup`'s cause means for the call (the call states use Twilio's names)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from service.telephony.provider import Stamp

__all__ = ["HANGUP_STATUS", "TelnyxEvent", "hangup_status", "parse_event"]


@dataclass(frozen=True)
class TelnyxEvent:
    """One webhook's envelope: `data.event_type`, `data.id`, `data.occurred_at`, `data.payload`;
    `connection_id` is the payload's (the Call Control application the call belongs to), None
    when the event names none."""

    event_type: str
    event_id: str
    occurred_at: datetime
    call_id: str | None
    stamp: Stamp | None
    payload: Mapping[str, Any] = field(default_factory=dict)
    connection_id: str | None = None

    @property
    def order(self) -> int:
        """`occurred_at` in microseconds: events carry no sequence number, this orders them."""
        return int(self.occurred_at.timestamp() * 1_000_000)


def parse_event(body: bytes) -> TelnyxEvent | None:
    """The event in a (verified) webhook body; None if it is not a call event we can read."""
    try:
        envelope = json.loads(body)
        data = envelope["data"]
        event_type, payload = data["event_type"], data.get("payload") or {}
        occurred = datetime.fromisoformat(str(data["occurred_at"]).replace("Z", "+00:00"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(event_type, str) or not isinstance(payload, dict) or len(event_type) > 64:
        return None
    if occurred.tzinfo is None:
        occurred = occurred.replace(tzinfo=UTC)
    call_id = payload.get("call_control_id")
    if not isinstance(call_id, str) or not 0 < len(call_id) <= 128:
        call_id = None
    state = payload.get("client_state")
    connection = payload.get("connection_id")
    return TelnyxEvent(
        event_type=event_type,
        event_id=str(data.get("id") or ""),
        occurred_at=occurred,
        call_id=call_id,
        stamp=Stamp.decode(state) if isinstance(state, str) else None,
        payload=payload,
        connection_id=None if connection is None else str(connection),
    )


# Telnyx's hangup causes → the call status the attempts record (Twilio's vocabulary).
# Every `hangup_cause` Telnyx documents for `call.hangup` → the final call status the attempts record
# (Twilio's vocabulary, docs/DESIGN.md "Telnyx"). Nobody picked up: `timeout` (the Dial's
# `timeout_secs` passed) and `no_answer`; the callee declined: `call_rejected` (Twilio counts a
# rejected call as no-answer too); busy: `user_busy`; the number cannot be reached: `not_found`;
# we ended it before an answer: `originator_cancel`; a call that ran and ended: `normal_clearing`,
# `time_limit`; `unspecified` and any cause not documented: `completed` — unbound, that is the
# outcome `failed`, never retried.
HANGUP_STATUS = {
    "timeout": "no-answer",
    "no_answer": "no-answer",
    "call_rejected": "no-answer",
    "user_busy": "busy",
    "not_found": "failed",
    "originator_cancel": "canceled",
    "normal_clearing": "completed",
    "time_limit": "completed",
    "unspecified": "completed",
}


def hangup_status(payload: Any) -> str:
    """The final status of a call from its `call.hangup` payload's `hangup_cause`."""
    return HANGUP_STATUS.get(str(payload.get("hangup_cause")), "completed")
