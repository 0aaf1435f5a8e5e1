"""The ledger: the only writer of reminders and call attempts (and of an appointment's
`confirmation` and cancellation, and of the do-not-call list), the state the promise rests on.

Every status change goes through the lifecycle table (`service.reminders.lifecycle.require`).
Who calls what:

- the dispatcher: the fence and claims (`fence`, `claims`: `ReminderStore`, `Outcome`), attempts
  of providers without idempotency (`attempts`: `AttemptStore`), the call sweep (`sweep`);
- the provider webhooks: call events, binding, keypad answers (`calls`); customers who call back
  (`callbacks`: the same binding, for an incoming call);
- the appointments service: the create's statement, re-plans and If-Match's check (`plans`), superseding and
  cancellation (`cancellation`: one rule for the API's DELETE, a keypad decline, a re-plan, an
  opt-out and a confirmation);
- the do-not-call API and the keypad's opt-out: the list (`consent`);
- erasure of personal data, on request and by retention (`erasure`);
- the events for the booking system: inserted by each writer above in its own transaction
  (`events`), numbered, delivered and pruned for the leader's relay, read by the feed (`outbox`).

Nothing else in `service/` inserts, updates or deletes those rows (tests/test_ledger.py).
"""

from service.ledger import callbacks, calls, consent, erasure, events, outbox
from service.ledger.attempts import AttemptStore
from service.ledger.cancellation import (
    CANCELLED_BY_API,
    DECLINED_BY_CUSTOMER,
    REPLANNED,
    Superseded,
    cancel_appointment,
    supersede,
)
from service.ledger.claims import Claim, ReminderStore, is_data_error
from service.ledger.fence import FENCE_ROW, LedgerError, StaleTerm
from service.ledger.outcome import Outcome
from service.ledger.plans import Replanned, change_appointment, hold_version, insert_appointment, insert_plan
from service.ledger.sweep import RELEASED, SweepStore, SweepTimes

__all__ = [
    "callbacks",
    "CANCELLED_BY_API",
    "DECLINED_BY_CUSTOMER",
    "FENCE_ROW",
    "RELEASED",
    "REPLANNED",
    "AttemptStore",
    "Claim",
    "LedgerError",
    "Outcome",
    "ReminderStore",
    "Replanned",
    "Superseded",
    "SweepStore",
    "SweepTimes",
    "StaleTerm",
    "calls",
    "consent",
    "erasure",
    "events",
    "outbox",
    "change_appointment",
    "cancel_appointment",
    "hold_version",
    "supersede",
    "insert_appointment",
    "insert_plan",
    "is_data_error",
]
