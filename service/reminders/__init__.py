"""The reminder domain: planning, the call decision, the key rule, the wording, the lifecycle,
which numbers may be called; for real providers the attempt states, the outcome and the
reconciliation of attempts in doubt.

The outcome of a real provider's call, the keypad answer, the no-answer retry (`outcomes.py`) and
the words of the call per language (`wording.py`) live here too. Pure: no database session, no
HTTP. The API and the dispatcher both import it; neither owns it.
"""

from service.reminders.attempts import AttemptState, reconcile
from service.reminders.calls import REPLAN_FIELDS, call_message, idempotency_key
from service.reminders.caps import CallCaps, CapHold, cap_hold
from service.reminders.errors import ReminderError
from service.reminders.lifecycle import (
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    ReminderStatus,
    require,
    sources_of,
)
from service.reminders.numbers import NumberPolicy, PhoneNumber, number_refusal, parse_phone
from service.reminders.outcomes import (
    Answerer,
    Confirmation,
    NoAnswerPolicy,
    ReminderOutcome,
    advances,
    answerer,
    keypad_answer,
    opts_out,
    outcome_of_final,
    retry_time,
    round_bit,
)
from service.reminders.planning import (
    CallDecision,
    Plan,
    PlanningConfig,
    Unplanned,
    decide_call,
    fit_call_window,
    plan_reminders,
    too_close,
)
from service.reminders.rules import ALWAYS, CallWindow, ReminderOffset, parse_duration
from service.reminders.wording import (
    DEFAULT_LANGUAGE,
    DEFAULT_OPT_OUT_DIGIT,
    MessageTemplates,
    Wording,
    check_opt_out_digit,
    normalize_language,
)

__all__ = [
    "AttemptState",
    "CallCaps",
    "CapHold",
    "DEFAULT_OPT_OUT_DIGIT",
    "cap_hold",
    "check_opt_out_digit",
    "opts_out",
    "too_close",
    "Confirmation",
    "DEFAULT_LANGUAGE",
    "MessageTemplates",
    "NoAnswerPolicy",
    "ReminderError",
    "ReminderOutcome",
    "Wording",
    "advances",
    "Answerer",
    "answerer",
    "round_bit",
    "keypad_answer",
    "normalize_language",
    "outcome_of_final",
    "reconcile",
    "retry_time",
    "ALWAYS",
    "REPLAN_FIELDS",
    "TERMINAL",
    "TRANSITIONS",
    "CallDecision",
    "CallWindow",
    "IllegalTransition",
    "NumberPolicy",
    "PhoneNumber",
    "Plan",
    "PlanningConfig",
    "ReminderOffset",
    "ReminderStatus",
    "Unplanned",
    "call_message",
    "decide_call",
    "fit_call_window",
    "idempotency_key",
    "number_refusal",
    "parse_phone",
    "parse_duration",
    "plan_reminders",
    "require",
    "sources_of",
]
