"""Monitoring (k8s/monitoring/, RUNBOOK.md, service/backlog.py), checked offline and against a real Prometheus.

* the Grafana dashboard: every panel's query names a metric the service's registry exports,
  with labels and label values the service uses, and parses as PromQL (promtool);
* the alert rules: `promtool check rules` on the plain rules file and on the PrometheusRule's
  spec (the two hold the same groups), `promtool test rules` fires and quiets every alert, each
  alert links a RUNBOOK.md section;
* the manifests: the dashboard's ConfigMap passes `kubernetes-validate --strict`; the
  PrometheusRule and PodMonitor are Prometheus Operator CRDs that kubernetes-validate has no
  schema for, so the rule goes to promtool and the PodMonitor's selector to a structure check;
* the backlog gauges count what they say, on SQLite and PostgreSQL;
* one real Prometheus scrapes three replicas: the no-leader alert's query turns true when the
  leader is SIGKILLed and the others are cut from etcd, false once they are healed, and true
  again (through absent()) when no replica is left to report.

promtool and prometheus come from Debian's `prometheus` package: missing, these tests skip
locally and fail under CI=true.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import service.metrics
from harness.cluster import Cluster, wait_for
from harness.ports import free_port, wait_for_port
from service.backlog import STUCK_AFTER, refresh_backlog, watch_backlog
from service.db import Appointment, Database, Reminder, ReminderStatus
from service.db.models import new_id
from service.telephony import OutcomeKind

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "k8s" / "monitoring"
DASHBOARD = MONITORING / "dashboards" / "reminders.json"
RULES = MONITORING / "alerts.rules.yml"
RULE_TESTS = MONITORING / "alerts.test.yml"
PROMETHEUS_RULE = MONITORING / "prometheus-rule.yaml"
POD_MONITOR = MONITORING / "podmonitor.yaml"
RUNBOOK = ROOT / "RUNBOOK.md"
BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI", "").lower() == "true"

# Labels a scrape adds to every series (the PodMonitor gives pod and namespace).
TARGET_LABELS = {"pod", "namespace", "instance", "job"}
# The values the service gives its labels, from the enums that produce them.
LABEL_VALUES = {"outcome": {k.value for k in OutcomeKind}, "status": {s.value for s in ReminderStatus}}
# Grafana's interval variables, as a Prometheus would see them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def _tool(name: str) -> str:
    """Path of a Debian `prometheus` package binary; fail under CI, skip locally when missing."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        message = f"{name} not installed (Debian package `prometheus`)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kwargs)


# --- what the service exports ----------------------------------------------------------------------


def _service_metrics() -> list[MetricWrapperBase]:
    return [m for m in vars(service.metrics).values() if isinstance(m, MetricWrapperBase)]


def _exported_series() -> dict[str, set[str]]:
    """Every series name the default registry exports (the service's and the process's), with the
    label names its samples may carry."""
    own_labels = {m._name: set(m._labelnames) for m in _service_metrics()}  # noqa: SLF001 - no public accessor
    series: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        labels = own_labels.get(family.name, set()) | {label for s in family.samples for label in s.labels}
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("", "_count", "_sum", "_created"),
        }.get(family.type, ("",))
        for suffix in suffixes:
            series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


EXPORTED = _exported_series()


# --- reading PromQL (enough of it for the names in our own queries) --------------------------------

_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "inf", "nan"}


def _selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, op, value)]) of every series selector in `expr`."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    found = [(name, _MATCHER.findall(body)) for name, body in _SELECTOR.findall(expr)]
    rest = _GROUPING.sub(" ", _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", expr))
    rest = re.sub(r'"[^"]*"|\[[^\]]*\]', " ", rest)
    named = {name for name, _ in found}
    for name in _IDENTIFIER.findall(rest):
        if name.lower() not in _KEYWORDS and name not in named:
            found.append((name, []))
    return found


def _check_query(expr: str) -> list[str]:
    """What is wrong with `expr` against the service's metrics (empty when nothing)."""
    problems = []
    selectors = _selectors(expr)
    if not selectors:
        problems.append(f"{expr!r} names no metric")
    for name, matchers in selectors:
        if name not in EXPORTED:
            problems.append(f"{name} is not exported by the service")
            continue
        for label, op, value in matchers:
            if label not in EXPORTED[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {label}")
            elif label in LABEL_VALUES and op in ("=", "=~"):
                unknown = set(value.split("|") if op == "=~" else [value]) - LABEL_VALUES[label]
                if unknown:
                    problems.append(f"{name}{{{label}}} never takes {sorted(unknown)}")
    return problems


def test_query_check_catches_unknown_names_labels_and_values() -> None:
    assert _check_query('sum by (outcome) (rate(reminders_call_attempts_total{outcome="sent"}[5m]))') == []
    assert _check_query("rate(reminders_calls_total[5m])") == ["reminders_calls_total is not exported by the service"]
    assert _check_query('reminders_is_leader{role="x"}') == ["reminders_is_leader has no label role"]
    assert _check_query('reminders_completed_total{status=~"sent|done"}') == [
        "reminders_completed_total{status} never takes ['done']"
    ]


# --- the alert rules -----------------------------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _alert_expr(name: str) -> str:
    return next(rule["expr"] for rule in _rules() if rule.get("alert") == name)


def test_the_issue_s_alerts_are_there() -> None:
    assert {rule["alert"] for rule in _rules()} == {
        "RemindersNoLeader", "RemindersSeveralLeaders", "RemindersDispatchLagHigh",
        "RemindersStuckDispatching", "RemindersKeepaliveFailures", "RemindersFailedCallsRatio",
    }
    assert "absent(reminders_is_leader)" in _alert_expr("RemindersNoLeader")


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: r["alert"])
def test_alert_names_exported_metrics_and_links_the_runbook(rule: dict[str, Any]) -> None:
    assert _check_query(rule["expr"]) == []
    annotations = rule["annotations"]
    assert annotations["summary"].strip() and annotations["description"].strip()
    assert rule["labels"]["severity"] in {"critical", "warning"}
    page, _, anchor = annotations["runbook_url"].partition("#")
    assert page == RUNBOOK.name and anchor in _runbook_anchors(), f"RUNBOOK.md has no section #{anchor}"


def _runbook_anchors() -> set[str]:
    """GitHub's anchors of RUNBOOK.md's headings."""
    anchors = set()
    for line in RUNBOOK.read_text().splitlines():
        if match := re.match(r"#+\s+(.*)", line):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def test_prometheus_rule_holds_the_rules_file_s_groups() -> None:
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], (
        "prometheus-rule.yaml's spec.groups differ from alerts.rules.yml: copy the groups across"
    )


def test_rules_file_passes_promtool_check() -> None:
    result = _run([_tool("promtool"), "check", "rules", str(RULES)])
    assert result.returncode == 0 and "SUCCESS: 6 rules found" in result.stdout, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = _run([_tool("promtool"), "test", "rules", str(RULE_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _rules()}
    assert alerts - fires == set(), "alerts no unit test fires"
    assert alerts - quiet == set(), "alerts no unit test keeps quiet"


def test_no_leader_unit_tests_need_absent(tmp_path: Path) -> None:
    """The unit tests would catch a no-leader rule that only sums: with no replica reporting,
    sum() is empty, not 0."""
    promtool = _tool("promtool")
    mutated = RULES.read_text().replace(" or absent(reminders_is_leader)", "")
    assert mutated != RULES.read_text()
    (tmp_path / RULES.name).write_text(mutated)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = _run([promtool, "test", "rules", str(tmp_path / RULE_TESTS.name)])
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "no replica reports at all" in output, output


# --- the backlog gauges --------------------------------------------------------------------------


def _gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


@pytest.fixture
async def db(database_url: str) -> Any:
    database = Database(database_url)
    await database.upgrade()
    yield database
    await database.dispose()


@pytest.mark.anyio
async def test_backlog_gauges_count_due_and_stuck_reminders(db: Database) -> None:
    now = datetime.now(UTC)
    long_ago = now - STUCK_AFTER - timedelta(minutes=1)
    rows = [  # (status, next_attempt_at, claimed_at)
        (ReminderStatus.PENDING, now - timedelta(minutes=1), None),  # due
        (ReminderStatus.PENDING, now - timedelta(hours=2), None),  # due, long overdue
        (ReminderStatus.PENDING, now + timedelta(hours=1), None),  # not yet
        (ReminderStatus.DISPATCHING, now - timedelta(hours=1), long_ago),  # stuck
        (ReminderStatus.DISPATCHING, now, now - timedelta(seconds=5)),  # a call in flight
        (ReminderStatus.SENT, now - timedelta(hours=1), long_ago),
    ]
    async with db.session() as session:
        appointment = Appointment(
            id=new_id(), customer_name="A", phone="+14155552671", starts_at=now + timedelta(hours=3),
            timezone="UTC", status="scheduled",
        )
        appointment.reminders = [
            Reminder(id=(rid := new_id()), due_at=due, next_attempt_at=due, status=status, attempts=0,
                     idempotency_key=f"reminder-{rid}", claimed_at=claimed, fence_token=1 if claimed else None)
            for status, due, claimed in rows
        ]
        session.add(appointment)
        await session.commit()

    await refresh_backlog(db)
    assert (_gauge("reminders_due"), _gauge("reminders_stuck_dispatching")) == (2, 1)


@pytest.mark.anyio
async def test_backlog_gauges_keep_their_value_when_the_database_does_not_answer(tmp_path: Path) -> None:
    service.metrics.REMINDERS_DUE.set(7)
    service.metrics.REMINDERS_STUCK_DISPATCHING.set(3)
    unreachable = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none")
    try:
        await refresh_backlog(unreachable, timeout=5)  # logs, does not raise
    finally:
        await unreachable.dispose()
    assert (_gauge("reminders_due"), _gauge("reminders_stuck_dispatching")) == (7, 3)


@pytest.mark.anyio
async def test_backlog_watch_ends_whenever_it_is_cancelled(tmp_path: Path) -> None:
    """The app's shutdown cancels the watch and waits for it: a cancellation must never be lost,
    even one that arrives as a count completes (asyncio.wait_for on 3.11 loses those)."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'reminders.db'}")
    await db.upgrade()
    moments = random.Random(17)
    try:
        for _ in range(600):
            watch = asyncio.create_task(watch_backlog(db, interval=0))
            await asyncio.sleep(moments.uniform(0, 0.01))  # cancel at an arbitrary point of its loop
            watch.cancel()
            done, _ = await asyncio.wait({watch}, timeout=10)
            if not done:
                watch.cancel()  # once more, so that the failure does not leave it running
            assert done, "watch_backlog kept running after it was cancelled"
            assert watch.cancelled()
    finally:
        await db.dispose()
