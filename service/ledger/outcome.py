"""What a leader's claim of a reminder ends in: a typed `Outcome`, made by its constructors only.

An outcome is the reminder's new status (from `dispatching`, checked against the lifecycle table
when it is written) and the columns that go with it. A field left None keeps the stored value;
`last_error` is cleared where a constructor says so (a call placed after earlier failures).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.reminders.lifecycle import ReminderStatus

__all__ = ["Outcome"]

_S = ReminderStatus


@dataclass(frozen=True, slots=True)
class Outcome:
    status: ReminderStatus
    attempts: int | None = None  # the create requests spent so far (None: unchanged)
    next_attempt_at: datetime | None = None  # `pending`: when the reminder may be claimed again
    provider_call_id: str | None = None
    sent_at: datetime | None = None
    last_error: str | None = None
    clears_error: bool = False  # write `last_error` even when it is None
    skip_reason: str | None = None

    @classmethod
    def sent(cls, call_id: str | None, at: datetime, *, attempts: int | None = None,
             error: str | None = None) -> Outcome:
        """The provider has the call (`error`: what was refused of its answer, e.g. an unusable id)."""
        return cls(_S.SENT, attempts=attempts, provider_call_id=call_id, sent_at=at, last_error=error,
                   clears_error=True)

    @classmethod
    def retry(cls, at: datetime, error: str | None, *, attempts: int | None = None) -> Outcome:
        """`pending` again, claimed at `at`: a transient failure, or an attempt in doubt looked at again."""
        return cls(_S.PENDING, attempts=attempts, next_attempt_at=at, last_error=error, clears_error=error is None)

    @classmethod
    def wait(cls, until: datetime, reason: str | None = None) -> Outcome:
        """`pending` until `until` (the call window opens, a cap per number allows a call),
        nothing spent; `reason` is shown as its `last_error` (none: an earlier one is cleared)."""
        return cls(_S.PENDING, next_attempt_at=until, last_error=reason, clears_error=True)

    @classmethod
    def failed(cls, error: str | None, *, attempts: int | None = None) -> Outcome:
        return cls(_S.FAILED, attempts=attempts, last_error=error)

    @classmethod
    def skipped(cls, reason: str) -> Outcome:
        return cls(_S.SKIPPED, skip_reason=reason)

    @classmethod
    def cancelled(cls, reason: str) -> Outcome:
        return cls(_S.CANCELLED, skip_reason=reason)

    def columns(self) -> dict[str, object]:
        """The reminder's columns this outcome writes (the status first)."""
        values: dict[str, object] = {"status": self.status}
        for name in ("attempts", "next_attempt_at", "provider_call_id", "sent_at", "skip_reason"):
            value = getattr(self, name)
            if value is not None:
                values[name] = value
        if self.last_error is not None or self.clears_error:
            values["last_error"] = self.last_error
        return values
