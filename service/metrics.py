"""Prometheus metrics of the service (one registry, the default), and the values each label takes:
every labelled series exists, at 0, from the start (`LABEL_VALUES`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from service.reminders.caps import CAP_SPANS
from service.reminders.lifecycle import ReminderStatus
from service.reminders.outcomes import Confirmation, ReminderOutcome

IS_LEADER = Gauge("reminders_is_leader", "1 while this replica holds a valid leader term")
LEADER_TRANSITIONS = Counter("reminders_leader_transitions_total", "Times this replica started or stopped leading")
KEEPALIVE_FAILURES = Counter("reminders_lease_keepalive_failures_total", "Failed lease keepalives")
KEEPALIVE_RTT = Histogram(
    "reminders_lease_keepalive_seconds",
    "Round trip of a lease keepalive",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
REMINDERS_DONE = Counter("reminders_completed_total", "Reminders that reached a final state", ["status"])
CALL_ATTEMPTS = Counter("reminders_call_attempts_total", "Provider calls attempted", ["outcome"])
IN_FLIGHT = Gauge("reminders_calls_in_flight", "Provider calls in flight")
DISPATCH_LAG = Histogram(
    "reminders_dispatch_lag_seconds",
    "sent_at − due_at of sent reminders",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
)
ETCD_AUTH_FAILURES = Counter(
    "reminders_etcd_auth_failures_total", "Times etcd refused this replica's credentials (a configuration error)"
)
# Refreshed by service.backlog on every replica (a count query every BACKLOG_INTERVAL seconds), so
# they keep reporting while no replica leads: read them with max(), not sum().
REMINDERS_DUE = Gauge("reminders_due", "Pending reminders whose time has come (not yet claimed)")
REMINDERS_STUCK_DISPATCHING = Gauge(
    "reminders_stuck_dispatching",
    "Reminders left `dispatching` longer than service.backlog.STUCK_AFTER (no term completed them)",
)
CALL_OUTCOMES = Counter(
    "reminders_call_outcomes_total",
    "What real providers' reminder calls achieved (answered, voicemail, no_answer, busy, failed), one per call "
    "round of a reminder",
    ["outcome"],
)
CONFIRMATIONS = Counter(
    "reminders_confirmations_total", "Keypad answers recorded on appointments (confirmed, declined)", ["answer"]
)
OPT_OUTS = Counter(
    "reminders_opt_outs_total", "Numbers put on the do-not-call list, by how (keypad, api)", ["source"]
)
CAPPED = Counter(
    "reminders_capped_total",
    "Reminders a cap per number held back, by cap (day, week) and what followed (deferred, skipped)",
    ["cap", "action"],
)
SKIPPED_BY_CONSENT = Counter(
    "reminders_skipped_by_consent_total",
    "Reminders skipped because their number opted out or their appointment was confirmed",
    ["reason"],
)
PERSONAL_DATA_ERASED = Counter(
    "reminders_personal_data_erased_total",
    "Appointments whose personal data was erased, by how (request: DELETE ?erase=true; retention)",
    ["how"],
)
WEBHOOK_SIGNATURE_FAILURES = Counter(
    "reminders_webhook_signature_failures_total",
    "Webhook requests refused (403) for their signature, by provider (twilio, telnyx) and reason (missing, "
    "malformed, stale, mismatch)",
    ["provider", "reason"],
)
TELNYX_FOREIGN_EVENTS = Counter(
    "reminders_telnyx_foreign_events_total",
    "Validly signed Telnyx events of another Call Control connection of the account (payload.connection_id "
    "is not TELNYX_CONNECTION_ID): acknowledged and ignored",
)
# Calls customers placed to the reminders' number (docs/decisions/0252), by what became of them:
# identified (an attested caller whose number selected a reminder: it heard the message),
# unattested (a caller ID without STIR/SHAKEN attestation A: the neutral message), withheld (no
# usable caller ID), unknown (no reminder of that number to answer), error (the database did not
# answer). Every value exports 0 from the start.
INCOMING_RESULTS = ("identified", "unattested", "withheld", "unknown", "error")
INCOMING_CALLS = Counter(
    "reminders_incoming_calls_total",
    "Calls customers placed to the reminders' number (call-backs), by result (identified, unattested, withheld, "
    "unknown, error); an identified one heard its reminder's message on its own call (not counted in "
    "reminders_call_outcomes_total)",
    ["provider", "result"],
)
# The events for the booking system (docs/decisions/0251). The gauges are refreshed by every
# replica (service.backlog), 0 while EVENTS_URL is unset: read them with max().
EVENTS_OUTBOX_DEPTH = Gauge(
    "reminders_events_outbox_depth", "Events not yet delivered to EVENTS_URL nor given up (0 while it is unset)"
)
EVENTS_OLDEST_UNDELIVERED = Gauge(
    "reminders_events_oldest_undelivered_seconds", "Age of the oldest event not yet delivered nor given up"
)
EVENTS_ENDPOINT_GONE = Gauge(
    "reminders_events_endpoint_gone", "1 while delivery is stopped because EVENTS_URL answered 410 Gone"
)
EVENT_DELIVERIES = Counter(
    "reminders_events_deliveries_total",
    "Tries to deliver an event, by result (delivered; failed: tried again later; given_up: EVENTS_MAX_AGE "
    "passed; gone: the endpoint answered 410)",
    ["result"],
)

# reminders_call_attempts_total's `outcome`: a create that failed and may be retried (refused
# with 429, or in doubt) is `transient`; `not_sent`: the term ended before it left
CALL_ATTEMPT_OUTCOMES = ("sent", "transient", "permanent", "not_sent")
# reminders_completed_total's `status`: what the dispatcher finishes a claim with
COMPLETED_STATUSES = (ReminderStatus.SENT.value, ReminderStatus.FAILED.value, ReminderStatus.SKIPPED.value)
OPT_OUT_SOURCES = ("keypad", "api")  # service.ledger.consent.ListingSource
CONSENT_SKIP_REASONS = ("opted_out", "confirmed")
ERASED_HOW = ("request", "retention")
DELIVERY_RESULTS = ("delivered", "failed", "given_up", "gone")
# service.telephony.webhook.SignatureFailure's values and the providers with webhooks
# (tests/test_metrics.py keeps both equal to the code that counts them)
SIGNATURE_FAILURE_REASONS = ("missing", "malformed", "stale", "mismatch")
WEBHOOK_PROVIDERS = ("twilio", "telnyx")

# Every value of every label, in one place: each series is made now, so a fresh replica exports
# zeros rather than nothing (a rate() or an alert over a series that does not exist yet is empty).
LABEL_VALUES: dict[MetricWrapperBase, list[tuple[str, ...]]] = {
    REMINDERS_DONE: [(status,) for status in COMPLETED_STATUSES],
    CALL_ATTEMPTS: [(outcome,) for outcome in CALL_ATTEMPT_OUTCOMES],
    CALL_OUTCOMES: [(outcome.value,) for outcome in ReminderOutcome],
    CONFIRMATIONS: [(answer.value,) for answer in Confirmation],
    OPT_OUTS: [(source,) for source in OPT_OUT_SOURCES],
    CAPPED: [(cap, action) for cap in CAP_SPANS for action in ("deferred", "skipped")],
    SKIPPED_BY_CONSENT: [(reason,) for reason in CONSENT_SKIP_REASONS],
    PERSONAL_DATA_ERASED: [(how,) for how in ERASED_HOW],
    EVENT_DELIVERIES: [(result,) for result in DELIVERY_RESULTS],
    INCOMING_CALLS: [(provider, result) for provider in WEBHOOK_PROVIDERS for result in INCOMING_RESULTS],
    WEBHOOK_SIGNATURE_FAILURES: [(provider, reason) for provider in WEBHOOK_PROVIDERS
                                 for reason in SIGNATURE_FAILURE_REASONS],
}
for _metric, _values in LABEL_VALUES.items():
    for _labels in _values:
        _metric.labels(*_labels)
