"""Real providers (no idempotency key): the states of a call attempt, a reminder's outcome, and the
rule that reconciles an attempt in doubt (docs/decisions/0132-reconciling-attempts-in-doubt.md).

An attempt is one create request, recorded before it is sent. Its result is known (`created`,
`not_created`) or not (`creating` while its sender lives or after it died, `in_doubt` after a
timeout or 5xx). An attempt in doubt is never repeated blindly: `reconcile` says what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from service.reminders.outcomes import FINAL_CALL_STATES, ReminderOutcome

__all__ = [
    "CLOCK_SKEW",
    "RECHECK",
    "AttemptState",
    "AttemptView",
    "Reconciliation",
    "ReminderOutcome",
    "Step",
    "reconcile",
]

# A provider's clock (Twilio's date_created, to the second) against ours: a live call created up to
# this long before an attempt still counts as possibly that attempt's.
CLOCK_SKEW = timedelta(seconds=60)
# How soon an unresolved attempt is looked at again (its webhooks may settle it meanwhile).
RECHECK = timedelta(seconds=2)


class AttemptState(StrEnum):
    CREATING = "creating"  # recorded, the create request is (or was) on its way
    CREATED = "created"  # the provider accepted it
    NOT_CREATED = "not_created"  # certainly no call: refused, never sent, or reconciled as never made
    IN_DOUBT = "in_doubt"  # the create's result is unknown: reconciled before any new attempt
    # not a create: a call the customer placed to us (a call-back), bound to the reminder it
    # selected (service.ledger.callbacks); never reconciled, never counted against the caps
    INCOMING = "incoming"


@dataclass(frozen=True)
class AttemptView:
    id: str
    state: str
    created_at: datetime
    provider_call_id: str | None
    last_event_at: datetime | None
    call_status: str | None = None

    @property
    def finished(self) -> bool:
        """Its call ended (the reminder was not bound to it: no answer, busy, failed, cancelled)."""
        return self.call_status in FINAL_CALL_STATES

    @property
    def evidenced(self) -> bool:
        """The provider has this call: it said so, or one of its webhooks arrived."""
        return self.state == AttemptState.CREATED or self.provider_call_id is not None or self.last_event_at is not None

    @property
    def unresolved(self) -> bool:
        return self.state in (AttemptState.CREATING, AttemptState.IN_DOUBT) and not self.evidenced


class Step(StrEnum):
    SENT = "sent"  # a call of the reminder exists: nothing more to create
    WAIT = "wait"  # an attempt is in doubt: look again at `wait_until`
    LIST = "list"  # an attempt in doubt is past its grace: ask the provider for live calls
    NEW = "new"  # no call exists or can appear: make a new attempt


@dataclass(frozen=True)
class Reconciliation:
    step: Step
    call_id: str | None = None
    wait_until: datetime | None = None
    abandon: tuple[str, ...] = ()  # attempts now known never to have made a call
    since: datetime | None = None  # for LIST: calls created after this may be the attempt's


def reconcile(
    attempts: Sequence[AttemptView],
    *,
    bound_call_id: str | None,
    now: datetime,
    grace: timedelta,
    live_created: Sequence[datetime | None] | None = None,
) -> Reconciliation:
    """What to do with a claimed reminder, given its attempts and, for LIST, when each of the
    provider's live (queued, ringing, in-progress) calls to the number was created (None: unknown,
    as for a queued call)."""
    if bound_call_id is not None:
        return Reconciliation(Step.SENT, call_id=bound_call_id)
    # A call that ended unbound (nobody answered) is over: a no-answer retry makes a new attempt.
    attempts = [attempt for attempt in attempts if not attempt.finished]
    for attempt in attempts:
        if attempt.evidenced:
            return Reconciliation(Step.SENT, call_id=attempt.provider_call_id)
    unresolved = [a for a in attempts if a.unresolved]
    if not unresolved:
        return Reconciliation(Step.NEW)
    oldest = min(a.created_at for a in unresolved)
    newest = max(a.created_at for a in unresolved)
    if now < newest + grace:
        return Reconciliation(Step.WAIT, wait_until=min(newest + grace, now + RECHECK))
    since = oldest - CLOCK_SKEW
    if live_created is None:
        return Reconciliation(Step.LIST, since=since)
    if any(created is None or created >= since for created in live_created):
        return Reconciliation(Step.WAIT, wait_until=now + RECHECK)
    return Reconciliation(Step.NEW, abandon=tuple(a.id for a in unresolved))
