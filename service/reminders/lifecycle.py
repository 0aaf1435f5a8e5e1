"""The reminder lifecycle: its states and the one table of allowed transitions.

Every write that changes a reminder's status checks it here (`require`) or selects its rows with
`sources_of` (`UPDATE … WHERE status IN sources_of(target)`), so a transition missing from the
table is refused instead of written.
"""

from __future__ import annotations

from enum import StrEnum

from service.reminders.errors import ReminderError

__all__ = ["TERMINAL", "TRANSITIONS", "IllegalTransition", "ReminderStatus", "require", "sources_of"]


class ReminderStatus(StrEnum):
    PENDING = "pending"
    DISPATCHING = "dispatching"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


_S = ReminderStatus

# source -> the statuses it may become. A reminder is created `pending`.
# A newer term taking over an orphaned `dispatching` claim keeps the status (only the fence
# token changes): that is a re-claim, not a transition.
TRANSITIONS: dict[ReminderStatus, frozenset[ReminderStatus]] = {
    # claimed by the leader; cancelled by DELETE or a re-planning PATCH; skipped by an opt-out or
    # a confirmation (docs/decisions/0231)
    _S.PENDING: frozenset({_S.DISPATCHING, _S.CANCELLED, _S.SKIPPED}),
    # the call's outcome: placed, given up, skipped (misfire, appointment started), the appointment
    # was cancelled meanwhile; or back to pending for a retry or to wait for the call window
    _S.DISPATCHING: frozenset({_S.SENT, _S.FAILED, _S.SKIPPED, _S.CANCELLED, _S.PENDING}),
    # real providers: nobody answered (no_answer / busy) and a retry is due (NO_ANSWER_RETRIES), or
    # the bound call ended before its message began; or a re-plan or cancellation supersedes a
    # reminder whose call is still unanswered (docs/decisions/0221), or an opt-out or a
    # confirmation skips it (docs/decisions/0231)
    _S.SENT: frozenset({_S.PENDING, _S.CANCELLED, _S.SKIPPED}),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
    _S.SKIPPED: frozenset(),
}

# Final: nothing more happens to the reminder. `sent` is final except while a real provider's call
# is unanswered: a no-answer retry makes it `pending` again, a re-plan `cancelled`, an opt-out or a
# confirmation `skipped`.
TERMINAL = frozenset({_S.SENT, _S.FAILED, _S.CANCELLED, _S.SKIPPED})


class IllegalTransition(ReminderError):
    """A write asked for a status change the lifecycle table does not allow: a bug, never input."""


def sources_of(target: ReminderStatus) -> frozenset[ReminderStatus]:
    """The statuses from which a reminder may become `target`."""
    return frozenset(source for source, targets in TRANSITIONS.items() if target in targets)


def require(source: ReminderStatus | str, target: ReminderStatus | str) -> None:
    """Raise IllegalTransition unless `source` → `target` is in the table."""
    try:
        allowed = ReminderStatus(target) in TRANSITIONS[ReminderStatus(source)]
    except ValueError:
        allowed = False
    if not allowed:
        raise IllegalTransition(f"reminder status {source!s} -> {target!s} is not an allowed transition")
