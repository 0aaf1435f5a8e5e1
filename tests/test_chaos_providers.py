"""Chaos in the real-provider modes, short form, over real processes (harness/chaos_providers.py),
one cluster per provider at a time: the faults that hit creates in flight, and a small run of each
of the providers' own faults (late and lost events, answers lost, redeliveries, a re-plan while
calls ring, clocks off), one mode each, alternating. Callees are persons, answering machines and a
fax. Measures: messages heard at most once per reminder and exactly once for a person, a machine's
voicemail once and after its beep, nothing from a superseded reminder, extra calls silent and
bounded by the attempts nobody settled. `python -m harness.chaos_providers` runs all scenarios, in
both modes, larger. The checks themselves are shown to fail on records that break the promise."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from harness.chaos import ChaosConfig, Result, keep_other_sections
from harness.chaos_providers import (
    CAP_PER_DAY,
    CAP_PER_WEEK,
    FAX,
    LEASE_TTL,
    MACHINE,
    MODES,
    PERSON,
    ProviderClusterPool,
    ProviderFaults,
    ProviderRun,
    judge,
    judge_caps,
    number,
    write_section,
)
from harness.cluster import faketime_library
from tests.support.providers import PROVIDERS
from tests.support.requirements import unavailable

# the faults that hit creates in flight: 100 reminders a run (about half of them in flight at the fault)
CONFIG = replace(ChaosConfig(), reminders=100, lease_ttl=LEASE_TTL)
# the providers' own faults: a small run each, their times shortened (Telnyx's windows × 0.15, its
# 2 s webhook timeout kept); a machine every 7 numbers (greetings of 0.5-2 s), a fax at 25; caps: one
# leader kill. The short form shortens the load, not the time a reminder has to be heard: the same
# 120 s as `python -m harness.chaos_providers` (a person whose detection events are lost on three
# calls in a row hears the fourth, about 80 s after its due time: README, known limits)
SHORT = replace(CONFIG, reminders=30, spread=3.0, settle_timeout=120.0)
FAULTS = replace(ProviderFaults(), loss_rate=0.1, late_ms=(1_000.0, 4_000.0), answer_stall_ms=3_000.0,
                 telnyx_time_scale=0.15, twilio_redeliver_ms=4_000.0, long_speak_ms=1_500.0,
                 ring_ms=(1_500.0, 4_000.0), greeting_ms=(500.0, 2_000.0), cap_kills=(0.3,))

# Twilio's leader-sigstop is left to `python -m harness.chaos_providers` (make chaos): under the
# whole suite's load the pause stretches to 9-14 s, and a voice request held by the frozen replica
# for longer than the provider waits (15 s) loses that call's message (a Twilio timeout, not a
# double message); in 4 runs on an idle machine it passed every time, in 2 of 4 under `make test`
# it missed 1-4 of 150. Telnyx's speech is a command the sweep repeats: it runs here.
RUNS = [("twilio", "leader-sigkill"), ("twilio", "provider-outage"), ("twilio", "late-events"),
        ("twilio", "lost-answers"), ("twilio", "replan-while-ringing"),
        ("twilio", "caps"),  # last of its cluster: its replicas restart with the caps on
        ("telnyx", "leader-sigkill"), ("telnyx", "leader-sigstop"), ("telnyx", "provider-outage"),
        ("telnyx", "lost-events"), ("telnyx", "redeliveries"), ("telnyx", "clock-skew")]  # skewed clocks last
NEW = {"late-events", "lost-answers", "replan-while-ringing", "lost-events", "redeliveries", "clock-skew", "caps"}
# Runs known to fail, with the reason (none now: the misses lost-events found are fixed,
# tests/test_call_protocol.py "12").
KNOWN: dict[tuple[str, str], str] = {}


class Pools:
    """One real-provider cluster at a time: a run of another provider closes the current one (the
    runs are listed by provider, so each cluster starts once)."""

    def __init__(self) -> None:
        self.pool: ProviderClusterPool | None = None

    def get(self, provider: str) -> ProviderClusterPool:
        if self.pool is not None and self.pool.mode.provider != provider:
            self.close()
        if self.pool is None:
            pool = ProviderClusterPool(CONFIG, MODES[provider])
            try:
                pool.get()
            except (FileNotFoundError, RuntimeError, TimeoutError) as error:
                pool.discard()
                unavailable(f"{provider} chaos cluster", error)
            self.pool = pool
        return self.pool

    def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()


@pytest.fixture(scope="module")
def pools() -> Iterator[Pools]:
    pools = Pools()
    yield pools
    pools.close()


def _param(provider: str, scenario: str) -> Any:
    known = KNOWN.get((provider, scenario))
    return pytest.param(provider, scenario, marks=[pytest.mark.xfail(reason=known, strict=False)] if known else [])


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(("provider", "scenario"), [_param(*run) for run in RUNS])
def test_every_message_heard_at_most_once_and_once_by_a_person_under(pools: Pools, provider: str,
                                                                     scenario: str) -> None:
    if scenario == "clock-skew" and faketime_library() is None:
        unavailable("libfaketime", "clock-skew starts replicas with LD_PRELOAD=libfaketime: apt-get install faketime")
    pool = pools.get(provider)
    config = SHORT if scenario in NEW else CONFIG
    result = pool.run(scenario, config=config, faults=FAULTS)
    print(f"\n[{provider}] {result.line()}")
    assert result.ok, "\n".join(["", *result.violations, "", result.evidence])
    if scenario == "caps":
        assert result.figures["over_day"] == result.figures["over_week"] == 0 and result.misses == 0
        assert result.figures["most_in_day"] <= CAP_PER_DAY and result.figures["capped_skipped"] > 0
        return
    assert result.duplicates == 0 and result.misses == 0 and result.figures["before_beep"] == 0
    assert result.figures["superseded_heard"] == 0
    assert result.figures["voicemails"] == result.figures["machines"] > 0 and result.figures["faxes"] > 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_mode_section_is_replaced_in_place_beside_the_others(provider: str, tmp_path: Path) -> None:
    mode, (other,) = MODES[provider], [m for name, m in MODES.items() if name != provider]
    report = tmp_path / "RELIABILITY.md"
    report.write_text("# Reliability\n\n## Result\n\ngeneric table\n\n## Bad values\n\nanother author's\n")
    runs = [Result(scenario="leader-sigkill", reminders=5, posts=5, calls=5)]
    write_section(report, mode, "first run", CONFIG, 1, runs)
    write_section(report, other, "the other mode's run", CONFIG, 1, runs)
    write_section(report, mode, "second run", CONFIG, 1, runs)
    text = report.read_text()
    assert text.count(mode.heading) == 1 and "second run" in text and "first run" not in text
    assert other.heading in text and "the other mode's run" in text
    assert "another author's" in text and "generic table" in text
    rewritten = keep_other_sections("# Reliability\n\n## Result\n\nnew generic table\n", text)
    assert mode.heading in rewritten and other.heading in rewritten and "second run" in rewritten
    assert "new generic table" in rewritten


# -- the checks can fail ------------------------------------------------------------------------------


def _wording(index: int) -> dict[str, str]:
    from service.reminders import MessageTemplates

    templates = MessageTemplates.parse(None)
    return templates.render(templates.default_language, f"Customer {index}", datetime(2030, 3, 12, 15, tzinfo=UTC),
                            "UTC").to_json()


class Record:
    """A run's records made by hand: a person (0), a machine (3) and a fax (25), one reminder and
    one call each, every one as the promise wants it; a test then breaks one thing."""

    def __init__(self) -> None:
        self.run = ProviderRun(MODES["twilio"], ProviderFaults(), scenario="leader-sigkill")
        self.rows: list[dict[str, Any]] = []
        self.appointments: dict[str, dict[str, Any]] = {}
        self.calls: list[dict[str, Any]] = []
        self.attempts: list[dict[str, Any]] = []
        for index, kind in ((0, PERSON), (3, MACHINE), (25, FAX)):
            self.run.kinds[number(index)] = kind
            self.add(index, kind)

    def add(self, index: int, kind: str, **row: Any) -> dict[str, Any]:
        wording = _wording(index)
        rid, aid, sid = f"r{index}-{len(self.rows)}", f"a{index}", f"CA{index}-{len(self.calls)}"
        self.appointments[aid] = {"id": aid, "phone": number(index), "status": "scheduled", "plan": 0}
        said = {PERSON: [f"{wording['message']} {wording['prompt']} {wording['opt_out']}", wording["confirmed"]],
                MACHINE: [wording["voicemail"]], FAX: []}[kind]
        reminder = {"id": rid, "appointment_id": aid, "status": "sent", "skip_reason": None, "attempts": 1,
                    "last_error": None, "wording": wording, "bound_call_id": sid if kind != FAX else None,
                    "outcome": {PERSON: "answered", MACHINE: "voicemail", FAX: "failed"}[kind], **row}
        self.rows.append(reminder)
        self.call(reminder, sid, said, kind)
        self.attempts.append({"reminder_id": rid, "state": "created", "error": None})
        return reminder

    def call(self, reminder: dict[str, Any], sid: str, said: list[str], kind: str) -> dict[str, Any]:
        call = {"sid": sid, "to": self.appointments[reminder["appointment_id"]]["phone"], "status": "completed",
                "stamp": {"r": reminder["id"]}, "heard": list(said), "person_heard": said if kind == PERSON else [],
                "voicemail": said if kind == MACHINE else [], "lost": [], "deliveries": [], "command_log": []}
        self.calls.append(call)
        return call

    def judge(self) -> Result:
        return judge("leader-sigkill", self.rows, self.appointments, self.calls, self.attempts, self.run)


def test_a_record_that_keeps_the_promise_passes() -> None:
    result = Record().judge()
    assert result.ok, result.violations
    assert (result.figures["persons"], result.figures["machines"], result.figures["faxes"]) == (1, 1, 1)
    assert result.figures["voicemails"] == 1 and result.duplicates == result.misses == 0


def test_a_message_heard_on_a_second_call_is_heard_twice_and_an_extra_call_that_spoke() -> None:
    record = Record()
    person = record.rows[0]
    record.call(person, "CA-extra", list(record.calls[0]["heard"]), PERSON)
    record.attempts.append({"reminder_id": person["id"], "state": "in_doubt", "error": "timeout"})
    result = record.judge()
    assert result.duplicates == 1
    assert any("heard more than once" in v for v in result.violations)
    assert any("extra call(s) spoke" in v for v in result.violations)


def test_a_person_who_heard_nothing_is_a_miss() -> None:
    record = Record()
    record.calls[0]["heard"], record.calls[0]["person_heard"] = [], []
    result = record.judge()
    assert result.misses == 1 and any("misses" in v for v in result.violations)
    assert any("bound to a call that did not speak" in v for v in result.violations)


def test_a_voicemail_spoken_over_the_greeting_is_before_the_beep() -> None:
    record = Record()
    machine = record.calls[1]
    machine["lost"], machine["voicemail"] = ["Hello Customer"], [machine["heard"][0].removeprefix("Hello Customer ")]
    result = record.judge()
    assert result.figures["before_beep"] == 1 and result.figures["voicemails"] == 0
    assert any("before the beep" in v for v in result.violations)


def test_a_superseded_reminder_that_spoke_is_counted() -> None:
    record = Record()
    old = record.add(40, PERSON, status="cancelled", skip_reason="re-planned", outcome=None, bound_call_id=None)
    record.run.kinds[number(40)] = PERSON
    record.rows.append({**old, "id": "r40-new", "status": "sent", "skip_reason": None, "bound_call_id": "CA40-new",
                        "outcome": "answered"})
    record.call(record.rows[-1], "CA40-new", list(record.calls[-1]["heard"]), PERSON)
    result = record.judge()
    assert result.figures["superseded_heard"] == 1 and result.duplicates == 1
    assert any("superseded reminder spoke" in v for v in result.violations)


def test_an_extra_call_per_attempt_in_doubt_is_allowed_if_silent() -> None:
    record = Record()
    fax = record.rows[2]
    record.call(fax, "CA-again", [], FAX)
    record.attempts[2].update(state="in_doubt", error="timeout: TimeoutError")  # its first create's answer lost
    record.attempts.append({"reminder_id": fax["id"], "state": "created", "error": None})
    result = record.judge()
    assert result.ok, result.violations
    assert result.redundant == 1 and result.figures["extra_in_doubt"] == 1 and result.figures["in_doubt"] == 1


def test_a_call_made_again_after_an_answered_call_said_nothing_is_counted_apart() -> None:
    record = Record()
    person = record.rows[0]
    silent = record.call(person, "CA-silent", [], PERSON)
    record.calls.remove(silent)
    record.calls.insert(0, silent)  # the first call: answered, nothing said, ended
    record.attempts[0]["error"] = "released: answered, but it ended before any event of its answer came"
    record.attempts.append({"reminder_id": person["id"], "state": "created", "error": None})
    result = record.judge()
    assert result.ok, result.violations
    assert result.redundant == 1 and result.figures["called_again"] == 1 and result.figures["extra_in_doubt"] == 0


def test_an_extra_call_of_a_reminder_re_claimed_with_nothing_in_doubt_is_over_the_budget() -> None:
    record = Record()
    fax = record.rows[2]
    record.call(fax, "CA-again", [], FAX)
    record.attempts[2]["fencing_token"] = 2  # created and recorded: a successor has nothing to doubt
    record.attempts.append({"reminder_id": fax["id"], "state": "created", "error": None, "fencing_token": 3})
    result = record.judge()
    assert any("more extra calls than attempts in doubt" in v for v in result.violations)


def test_an_extra_call_beyond_the_attempts_in_doubt_and_words_of_another_reminder() -> None:
    record = Record()
    person = record.rows[0]
    record.call(person, "CA-silent", [], PERSON)
    record.calls[0]["heard"].append("words of another reminder")
    result = record.judge()
    assert result.redundant == 1 and result.figures["in_doubt"] == 0
    assert any("more extra calls than attempts in doubt" in v for v in result.violations)
    assert any("words not of their reminder" in v for v in result.violations)


# -- the caps check can fail --------------------------------------------------------------------------


class CapRecord:
    """A caps run's records made by hand: number 0 (a person) shared by three appointments, two
    called (a call each, heard), the third skipped by the day's cap; a test then breaks one thing."""

    def __init__(self) -> None:
        self.run = ProviderRun(MODES["telnyx"], ProviderFaults(), scenario="caps", caps=(CAP_PER_DAY, CAP_PER_WEEK))
        self.run.kinds[number(0)] = PERSON
        self.rows: list[dict[str, Any]] = []
        self.appointments: dict[str, dict[str, Any]] = {}
        self.calls: list[dict[str, Any]] = []
        self.attempts: list[dict[str, Any]] = []
        self.now = datetime.now(UTC)
        for k in range(2):
            self.sent(k, self.now - timedelta(hours=k))
        self.held(2, "skipped", skip_reason="call cap: 2 call(s) per day to this number; the next allowed time is "
                                             "not before the appointment")

    def reminder(self, k: int, **row: Any) -> dict[str, Any]:
        aid = f"a{k}"
        self.appointments[aid] = {"id": aid, "phone": number(0), "status": "scheduled", "plan": 0}
        reminder = {"id": f"r{k}", "appointment_id": aid, "status": "sent", "skip_reason": None, "attempts": 1,
                    "last_error": None, "wording": _wording(k), "bound_call_id": None, "outcome": None,
                    "next_attempt_at": self.now, **row}
        self.rows.append(reminder)
        return reminder

    def sent(self, k: int, at: datetime) -> dict[str, Any]:
        wording = _wording(k)
        reminder = self.reminder(k, bound_call_id=f"call-{k}", outcome="answered")
        said = [f"{wording['message']} {wording['prompt']} {wording['opt_out']}"]
        self.calls.append({"sid": f"call-{k}", "to": number(0), "status": "completed", "created": at.isoformat(),
                           "stamp": {"r": reminder["id"]}, "heard": said, "person_heard": said, "voicemail": [],
                           "lost": [], "deliveries": [], "command_log": []})
        self.attempts.append({"reminder_id": reminder["id"], "state": "created", "error": None})
        return reminder

    def held(self, k: int, status: str, **row: Any) -> dict[str, Any]:
        return self.reminder(k, status=status, attempts=0, **row)

    def judge(self) -> Result:
        return judge_caps("caps", self.rows, self.appointments, self.calls, self.attempts, self.run)


def test_a_caps_record_that_keeps_the_caps_passes() -> None:
    record = CapRecord()
    record.held(3, "pending", last_error="call cap per day reached for this number: waiting until 2030-01-01",
                next_attempt_at=record.now + timedelta(hours=20))
    result = record.judge()
    assert result.ok, result.violations
    assert (result.figures["most_in_day"], result.figures["capped_skipped"], result.figures["capped_waiting"]) == (
        2, 1, 1)


def test_a_third_call_to_a_number_in_24_hours_is_over_the_day_cap() -> None:
    record = CapRecord()
    record.rows.pop()  # the third reminder called after all
    record.sent(2, record.now - timedelta(hours=23))
    result = record.judge()
    assert result.figures["over_day"] == 1 and any("more than 2 time(s) in 24 h" in v for v in result.violations)


def test_calls_before_the_run_count_against_the_week_cap() -> None:
    record = CapRecord()
    record.run.history[number(0)] = [(record.now - timedelta(days=days)).timestamp() for days in (2, 3)]
    result = record.judge()
    assert result.figures["over_week"] == 1 and any("in 7 days" in v for v in result.violations)


def test_a_reminder_neither_sent_nor_held_by_a_cap_and_one_held_below_the_cap_fail() -> None:
    record = CapRecord()
    record.rows[-1].update(skip_reason="opted out")
    record.calls.pop()  # and the second never called: the number is below its caps
    record.rows[1].update(status="skipped", skip_reason="call cap: 2 call(s) per day", outcome=None,
                          bound_call_id=None)
    result = record.judge()
    assert any("neither sent nor held by a cap" in v for v in result.violations)
    assert any("held back though its calls were below the caps" in v for v in result.violations)


def test_a_reminder_waiting_without_a_later_time_is_not_held_by_a_cap() -> None:
    record = CapRecord()
    record.held(3, "pending", last_error="call cap per day reached for this number: waiting until now",
                next_attempt_at=record.now)
    result = record.judge()
    assert any("neither sent nor held by a cap" in v for v in result.violations)
