"""The outcome domain (pure): call states applied by state, the keypad answer, machine answers, the
no-answer retry time, reconciliation after a finished call, and the wording per language."""

from __future__ import annotations

import json
from datetime import UTC, datetime, time, timedelta

import pytest

from service.reminders import (
    Answerer,
    Confirmation,
    MessageTemplates,
    NoAnswerPolicy,
    ReminderError,
    ReminderOutcome,
    Wording,
    advances,
    answerer,
    keypad_answer,
    normalize_language,
    outcome_of_final,
    reconcile,
    retry_time,
)
from service.reminders.attempts import AttemptView, Step
from service.reminders.rules import CallWindow

NOW = datetime(2030, 1, 7, 10, 0, tzinfo=UTC)  # a Monday


@pytest.mark.parametrize(
    ("current", "current_order", "new", "new_order", "applies"),
    [
        (None, None, "initiated", 0, True),
        ("initiated", 0, "ringing", 1, True),
        ("ringing", 1, "initiated", 0, False),  # out of order: never back
        ("completed", 3, "ringing", 1, False),
        ("completed", 3, "completed", 3, False),  # duplicate
        ("ringing", 1, "ringing", 1, False),
        ("in-progress", 2, "no-answer", None, True),  # a final state without an order still ends it
        ("no-answer", 2, "completed", 9, False),  # a final state is never replaced
        ("ringing", None, "bogus", 5, False),
        ("queued", None, "in-progress", None, True),
    ],
)
def test_events_apply_by_state_never_backwards(current, current_order, new, new_order, applies) -> None:
    assert advances(current, current_order, new, new_order) is applies


def test_keypad_and_machine_and_final_outcomes() -> None:
    assert keypad_answer("1") is Confirmation.CONFIRMED and keypad_answer(" 2") is Confirmation.DECLINED
    assert [keypad_answer(d) for d in (None, "", "3", "12", "#", "*")] == [None] * 6
    # every documented answer of Twilio's AnsweredBy and Telnyx's detection results
    for machine in ("machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other", "machine"):
        assert answerer(machine) is Answerer.MACHINE
    for fax in ("fax", "fax_detected"):
        assert answerer(fax) is Answerer.FAX  # a fax is not a voicemail
    for person in ("human", "unknown", "not_sure", "human_residence", "human_business", "silence", None, ""):
        assert answerer(person) is Answerer.PERSON
    assert outcome_of_final("no-answer") is ReminderOutcome.NO_ANSWER
    assert outcome_of_final("busy") is ReminderOutcome.BUSY
    assert outcome_of_final("failed") is ReminderOutcome.FAILED
    assert outcome_of_final("ringing") is None


def test_retry_time_is_after_the_delay_inside_the_window_before_the_appointment() -> None:
    window = CallWindow(time(8, 0), time(21, 0))
    policy = NoAnswerPolicy(retries=1, delay=timedelta(minutes=30), window=window)
    starts = NOW + timedelta(days=1)
    kwargs = {"now": NOW, "starts_at": starts, "timezone": "UTC"}
    first = retry_time(policy, outcome=ReminderOutcome.NO_ANSWER, retries_used=0, **kwargs)
    assert first == NOW + timedelta(minutes=30)
    assert retry_time(policy, outcome=ReminderOutcome.BUSY, retries_used=0, **kwargs) == NOW + timedelta(minutes=30)
    assert retry_time(policy, outcome=ReminderOutcome.NO_ANSWER, retries_used=1, **kwargs) is None
    for outcome in (ReminderOutcome.VOICEMAIL, ReminderOutcome.FAILED, ReminderOutcome.ANSWERED):
        assert retry_time(policy, outcome=outcome, retries_used=0, **kwargs) is None
    late = NOW.replace(hour=20, minute=45)  # 21:15 is outside: the window's next opening
    assert retry_time(policy, outcome=ReminderOutcome.NO_ANSWER, retries_used=0, now=late, starts_at=starts,
                      timezone="UTC") == datetime(2030, 1, 8, 8, 0, tzinfo=UTC)
    soon = NOW + timedelta(minutes=20)  # the appointment comes before the delay is over
    assert retry_time(policy, outcome=ReminderOutcome.NO_ANSWER, retries_used=0, now=NOW, starts_at=soon,
                      timezone="UTC") is None
    assert retry_time(policy, outcome=ReminderOutcome.NO_ANSWER, retries_used=0, now=late,
                      starts_at=datetime(2030, 1, 8, 7, 0, tzinfo=UTC), timezone="UTC") is None


def test_a_finished_unanswered_call_does_not_make_the_reminder_sent_again() -> None:
    def view(status: str | None) -> AttemptView:
        return AttemptView(id="a1", state="created", created_at=NOW - timedelta(minutes=31),
                           provider_call_id="CA1", last_event_at=NOW, call_status=status)

    grace = timedelta(seconds=60)
    assert reconcile([view("ringing")], bound_call_id=None, now=NOW, grace=grace).step is Step.SENT
    assert reconcile([view("no-answer")], bound_call_id=None, now=NOW, grace=grace).step is Step.NEW
    assert reconcile([view("busy")], bound_call_id="CA1", now=NOW, grace=grace).step is Step.SENT


def test_built_in_wording_and_operator_templates() -> None:
    starts = datetime(2030, 1, 7, 14, 30, tzinfo=UTC)
    english = MessageTemplates.parse(None).render("en-US", "Ann", starts, "Europe/Berlin")
    assert english.message == "Hello Ann, this is a reminder of your appointment on Monday, January 7, 2030 at 3:30 PM."
    assert english.voicemail == english.message and "Press 1" in english.prompt
    templates = MessageTemplates.parse(json.dumps({
        "en-US": {},
        "de-DE": {"message": "Hallo {name}, Ihr Termin ist am {date} um {time}.", "voicemail": "Termin {date}."},
        "it-IT": {"message": "Ciao {name}", "prompt": "Premi 1 o 2.", "confirmed": "Grazie.",
                  "declined": "Annullato.", "goodbye": "Arrivederci.", "opt_out": "Per non ricevere più chiamate, "
                  "premi {digit}.", "opted_out": "Non la chiameremo più."},
    }), default_language="de-de", opt_out_digit="7")
    assert templates.default_language == "de-DE" and templates.languages == ["de-DE", "en-US", "it-IT"]
    german = templates.render("de-DE", "Jörg", starts, "Europe/Berlin")
    assert german.message == "Hallo Jörg, Ihr Termin ist am Montag, 7. Januar 2030 um 15:30."
    assert german.voicemail == "Termin Montag, 7. Januar 2030." and german.prompt.startswith("Drücken Sie 1")
    assert Wording.from_json(json.loads(json.dumps(german.to_json()))) == german
    # the opt-out offer names the key the service honours; a language without built-ins must word it
    assert german.opt_out_digit == "7" and "drücken Sie 7." in german.opt_out and german.question.endswith(
        german.opt_out)
    italian = templates.render("it-IT", "Ann", starts, "Europe/Rome")
    assert italian.opt_out == "Per non ricevere più chiamate, premi 7." and italian.opted_out.startswith("Non")
    with pytest.raises(ReminderError, match="give opt_out, opted_out"):
        MessageTemplates.parse(json.dumps({"en-US": {}, "it-IT": {"message": "Ciao", "prompt": "1 o 2",
                                           "confirmed": "Sì", "declined": "No", "goodbye": "Ciao"}}))
    with pytest.raises(ReminderError, match=r"must say the key with \{digit\}"):
        MessageTemplates.parse(json.dumps({"en-US": {"opt_out": "Press nine to stop."}}))
    # a wording stored before the opt-out existed: the built-in offer of its language, the key 9
    old = {key: value for key, value in german.to_json().items() if key not in ("opt_out", "opted_out",
                                                                                 "opt_out_digit")}
    stored_before = Wording.from_json(old)
    assert stored_before.opt_out_digit == "9" and stored_before.opt_out.endswith("drücken Sie 9.")
    assert Wording.from_json({**old, "language": "it-IT"}).opt_out == "To receive no more reminder calls, press 9."
    assert templates.supports("it-IT") and not templates.supports("de-AT") and not templates.supports("fr-FR")
    assert not MessageTemplates.parse(json.dumps({"de": "Hallo {name}", "en-US": {}})).supports("en-GB")
    assert MessageTemplates.parse(json.dumps({"de": "Hallo {name}", "en-US": {}})).supports("de-AT")  # BCP 47 lookup


def test_wording_dates_and_times_are_babels_own() -> None:
    """Templates keep their locale's patterns (looked up once): the words are what Babel's
    format_date(full) / format_time(short) write, in every language, zone and season."""
    from zoneinfo import ZoneInfo

    from babel import Locale
    from babel.dates import format_date, format_time

    languages = ["en-US", "en-GB", "de-DE", "fr-FR", "fr-CA", "es-ES", "es-MX"]
    templates = MessageTemplates.parse(json.dumps({lang: {"message": "{date}|{time}"} for lang in languages}))
    zones = ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe", "America/St_Johns"]
    for n, (language, zone) in enumerate((lang, zone) for lang in languages for zone in zones):
        starts = datetime(2030, 1, 1, tzinfo=UTC) + timedelta(days=37 * n, minutes=61 * n)
        local, locale = starts.astimezone(ZoneInfo(zone)), Locale.parse(language, sep="-")
        expected = f"{format_date(local, 'full', locale)}|{format_time(local, 'short', locale=locale)}"
        assert templates.render(language, "Ann", starts, zone).message == expected.replace("\u202f", " ")


@pytest.mark.parametrize(
    ("setting", "default", "error"),
    [
        ('{"de-DE": "Hallo {name}"}', "en-US", "DEFAULT_LANGUAGE en-US has no template"),
        ('{"en-US": "Hi {nam}"}', "en-US", "unknown placeholder {nam}"),
        ('{"en-US": {"prompt": "Press {name}"}}', "en-US", "unknown placeholder {name}"),
        ('{"en-US": {"greeting": "Hi"}}', "en-US", "unknown phrase"),
        ('{"it-IT": "Ciao {name}"}', "it-IT", "give prompt, opt_out, confirmed, declined, opted_out, goodbye"),
        ('{"xx-QQ": "a"}', "en-US", "unknown language"),
        ('{"en-US": "a {"}', "en-US", "literal brace"),
        ('{"en-US": ""}', "en-US", "non-empty"),
        ("{nope", "en-US", "not valid JSON"),
        ("[]", "en-US", "JSON object"),
        ("/no/such/templates.json", "en-US", "cannot read"),
        (None, "klingon!", "not a BCP 47 language tag"),
    ],
)
def test_bad_templates_are_refused_with_the_reason(setting, default, error) -> None:
    with pytest.raises(ValueError, match=error.replace("{", r"\{").replace("}", r"\}")):
        MessageTemplates.parse(setting, default)


def test_templates_from_a_file(tmp_path) -> None:
    path = tmp_path / "templates.json"
    path.write_text(json.dumps({"en-US": "Hi {name}, see you {date} {time}.", "fr-FR": "Bonjour {name}"}), "utf-8")
    templates = MessageTemplates.parse(str(path))
    assert templates.languages == ["en-US", "fr-FR"]
    assert templates.render("fr-FR", "Zoé", NOW, "UTC").prompt.startswith("Appuyez")
    assert normalize_language("en-us") == "en-US" and normalize_language("zh-hant-tw") == "zh-Hant-TW"
