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
from collections.abc import Callable
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
from service.config import Settings
from service.db import Appointment, Database, Reminder, ReminderStatus
from service.db.models import new_id
from service.providers.generic.client import OutcomeKind

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
    own_labels = {m._name: set(m._labelnames) for m in _service_metrics()}
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


# --- the dashboard -------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict[str, Any]]:
    panels = []
    for panel in _dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


def _queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard."""
    return [(p["title"], t["expr"]) for p in _panels() for t in p.get("targets", [])]


@pytest.mark.parametrize("panel", _panels(), ids=lambda p: p["title"])
def test_every_panel_query_names_an_exported_metric(panel: dict[str, Any]) -> None:
    targets = panel.get("targets", [])
    assert targets, f"panel {panel['title']!r} has no query"
    for target in targets:
        assert _check_query(target["expr"]) == [], target["expr"]
        assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_shows_every_service_metric() -> None:
    """Each metric of service/metrics.py has a panel (the issue's list, and the call outcomes and
    keypad answers of the outcomes issue)."""
    used = {name for _, expr in _queries() for name, _ in _selectors(expr)}
    for metric in _service_metrics():
        samples = {n for n in EXPORTED if n.startswith(metric._name)}
        assert used & samples, f"no panel shows {metric._name}"


def test_dashboard_layout() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "reminders-overview"  # links and provisioning refer to it
    panels = _panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule): a typo fails here, not in Grafana."""
    promtool = _tool("promtool")
    rules = []
    for index, (_, expr) in enumerate(_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- the alert rules -----------------------------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _alert_expr(name: str) -> str:
    return next(rule["expr"] for rule in _rules() if rule.get("alert") == name)


def test_the_issue_s_alerts_are_there() -> None:
    assert {rule["alert"] for rule in _rules()} == {
        "RemindersNoLeader", "RemindersSeveralLeaders", "RemindersDispatchLagHigh",
        "RemindersStuckDispatching", "RemindersKeepaliveFailures", "RemindersFailedCallsRatio",
        "RemindersWebhookSignatureFailures",  # issue 24
        "RemindersEventsUndelivered", "RemindersEventsEndpointGone",
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
    assert result.returncode == 0 and "SUCCESS: 9 rules found" in result.stdout, result.stdout + result.stderr


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


# --- the manifests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    """`kubectl kustomize k8s/monitoring/`: the objects as they would be applied."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if IN_CI:
            pytest.fail("kubectl not installed", pytrace=False)
        pytest.skip("kubectl not installed")
    result = _run([kubectl, "kustomize", str(MONITORING)])
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_monitoring_renders_the_dashboard_rule_and_pod_monitor(rendered: list[dict[str, Any]]) -> None:
    assert sorted(o["kind"] for o in rendered) == ["ConfigMap", "PodMonitor", "PrometheusRule"]
    config_map = _one(rendered, "ConfigMap")
    assert config_map["metadata"]["name"] == "reminders-dashboard"  # stable: no hash suffix
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"  # Grafana's sidecar picks it up
    assert json.loads(config_map["data"]["reminders.json"]) == _dashboard()
    assert _one(rendered, "PrometheusRule")["spec"] == yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]
    # Its own kustomization: the base stays appliable on a cluster without the operator's CRDs.
    base = yaml.safe_load((ROOT / "k8s" / "kustomization.yaml").read_text())
    assert not [r for r in base.get("resources", []) if "monitoring" in r]


def test_manifests_each_go_to_the_validator_that_can_check_them(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The ConfigMap: kubernetes-validate --strict. The PrometheusRule and PodMonitor are CRDs
    kubernetes-validate has no schema for (it says so, and exits 0): the rule's groups go to
    promtool, the PodMonitor's selector and port are checked against the app's Deployment."""
    tool = BIN / "kubernetes-validate"
    assert tool.exists(), f"{tool} missing: make install (dev extra)"
    paths = {}
    for obj in rendered:
        paths[obj["kind"]] = tmp_path / f"{obj['kind']}.yaml"
        paths[obj["kind"]].write_text(yaml.safe_dump(obj))
    result = _run([str(tool), "--strict", *map(str, paths.values())])
    report = result.stdout + result.stderr
    assert f"INFO {paths['ConfigMap']} passed for resource configmap/reminders-dashboard" in report, report
    for crd in ("PrometheusRule", "PodMonitor"):
        assert f"Couldn't find schema for kind {crd}" in report, (
            f"kubernetes-validate now knows {crd}: assert that it passes instead\n{report}"
        )

    # The PrometheusRule, as applied, through promtool.
    groups = tmp_path / "prometheus-rule.groups.yml"
    groups.write_text(yaml.safe_dump({"groups": _one(rendered, "PrometheusRule")["spec"]["groups"]}))
    checked = _run([_tool("promtool"), "check", "rules", str(groups)])
    assert checked.returncode == 0 and "SUCCESS: 9 rules found" in checked.stdout, checked.stdout + checked.stderr

    # The PodMonitor selects the app's pods and names the port they serve /metrics on: METRICS_PORT
    # (the ConfigMap's, else the default), not the API's.
    monitor = _one(rendered, "PodMonitor")["spec"]
    app = next(
        d for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "app.yaml").read_text())
        if d and d["kind"] == "Deployment" and d["metadata"]["name"] == "reminders"
    )
    config = next(d for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "config.yaml").read_text()) if d)["data"]
    metrics_port = int(config.get("METRICS_PORT", Settings.model_fields["metrics_port"].default))
    pod_labels = app["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"]: p["containerPort"] for c in app["spec"]["template"]["spec"]["containers"]
             for p in c.get("ports", [])}
    for endpoint in monitor["podMetricsEndpoints"]:
        assert ports.get(endpoint["port"]) == metrics_port and endpoint["path"] == "/metrics"


# --- the backlog gauges --------------------------------------------------------------------------


def _gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)



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


# --- a real Prometheus ---------------------------------------------------------------------------


class Prometheus:
    """`prometheus` scraping the cluster's replicas every second, with the alert rules loaded."""

    def __init__(self, binary: str, cluster: Cluster) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="prometheus-"))
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": "reminders",
                # `pod` as the PodMonitor would set it: the dashboard and the alerts read it.
                "static_configs": [
                    {"targets": [f"127.0.0.1:{r.metrics_port}"], "labels": {"pod": r.name}} for r in cluster.replicas
                ],
            }],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(self.workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={self.workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=5.0)

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_for_port(self.port, timeout=timeout)
        wait_for(lambda: self.http.get("/-/ready").status_code == 200, timeout=timeout, what="prometheus ready")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector `expr` evaluates to now (an error fails the test)."""
        answer = self.http.get("/api/v1/query", params={"query": expr}).json()
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def value(self, expr: str) -> str | None:
        """The value of the first series `expr` returns (None for none), as Prometheus prints it."""
        result = self.query(expr)
        return result[0]["value"][1] if result else None

    def close(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def prometheus_binary() -> str:
    return _tool("prometheus")


def _until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    return wait_for(check, timeout=timeout, what=what, interval=0.25)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_prometheus_sees_no_leader_when_the_leader_dies_and_the_others_are_cut_off(
    etcd_endpoint: str, postgres_url: str, prometheus_binary: str
) -> None:
    no_leader = _alert_expr("RemindersNoLeader")
    # Inside the test, not a fixture: a failure inside `with` prints every replica's last log lines.
    with Cluster(3, database_url=postgres_url, etcd_endpoint=etcd_endpoint, lease_ttl=2) as cluster:
        prometheus = Prometheus(prometheus_binary, cluster)
        try:
            _no_leader_scenario(cluster, prometheus, no_leader)
        except BaseException:
            print(f"===== prometheus log =====\n{(prometheus.workdir / 'prometheus.log').read_text()[-3000:]}")
            raise
        finally:
            prometheus.close()


def _no_leader_scenario(cluster: Cluster, prometheus: Prometheus, no_leader: str) -> None:
    prometheus.wait_ready()
    _until(lambda: len(prometheus.query('up{job="reminders"} == 1')) == 3, "all three replicas scraped")
    leader = cluster.leader()
    _until(lambda: prometheus.value("sum(reminders_is_leader)") == "1", "one leader seen by Prometheus")
    assert prometheus.query(no_leader) == []
    # Every dashboard query and alert expression runs on the real thing.
    for _, expr in _queries():
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        prometheus.query(expr)
    for rule in _rules():
        prometheus.query(rule["expr"])

    # Cut the followers from etcd first (none can take over), then SIGKILL the leader.
    followers = [r for r in cluster.replicas if r.name != leader]
    for replica in followers:
        replica.proxy.stall()
    cluster.replica(leader).kill()
    _until(lambda: prometheus.query(no_leader), "the no-leader query true")
    # Reminders pile up meanwhile, and the followers' backlog gauge shows them.
    cluster.seed_due_reminders(5)
    _until(lambda: prometheus.query("max(reminders_due) >= 5"), "due reminders counted", timeout=45)

    for replica in followers:
        replica.proxy.pass_through()
    successor = cluster.leader(exclude=[leader])
    _until(lambda: prometheus.query(no_leader) == [], "the no-leader query false again")
    assert prometheus.value(f'reminders_is_leader{{pod="{successor}"}}') == "1"
    _until(lambda: cluster.reminder_statuses() == {"sent": 5}, "the piled-up reminders sent")
    _until(lambda: prometheus.query("max(reminders_due) == 0"), "due count back to 0", timeout=45)

    # No replica left to report: once every series is gone, sum() is empty and only absent()
    # keeps the query true. (Until the last one goes, a follower's 0 makes sum() == 0 true.)
    for replica in followers:
        replica.kill()
    _until(lambda: prometheus.query("absent(reminders_is_leader)"), "no replica reporting")
    assert prometheus.query("sum(reminders_is_leader)") == []
    assert prometheus.query(no_leader)
