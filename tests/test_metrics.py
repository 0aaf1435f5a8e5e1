"""Every labelled metric exists from the start, at 0, for each value its labels take
(service.metrics.LABEL_VALUES): a fresh replica's /metrics already holds the series panels and
alert rules read, so a rate() or an alert over them is 0, not empty."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

import service.metrics
from service.dispatch.dispatcher import _ATTEMPT_LABEL
from service.ledger.consent import ListingSource
from service.metrics import CALL_ATTEMPT_OUTCOMES, LABEL_VALUES, OPT_OUT_SOURCES

ROOT = Path(__file__).resolve().parents[1]

# A fresh process: the app built as `reminders serve` builds it, its /metrics read once.
# (what METRICS_PORT serves: the default registry as prometheus_client renders it)
FRESH = """
from prometheus_client import generate_latest
from service.app import create_app
from service.config import Settings

create_app(Settings(database_url="sqlite+aiosqlite:///:memory:"))
print(generate_latest().decode())
"""


def _labelled() -> list[MetricWrapperBase]:
    return [m for m in vars(service.metrics).values() if isinstance(m, MetricWrapperBase) and m._labelnames]


def test_every_labelled_metric_lists_its_label_values() -> None:
    assert {m._name for m in _labelled()} == {m._name for m in LABEL_VALUES}
    for metric, values in LABEL_VALUES.items():
        assert values and all(len(labels) == len(metric._labelnames) for labels in values), metric._name


def test_a_fresh_replica_exports_a_zero_series_for_every_label_value() -> None:
    result = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            check=False)
    assert result.returncode == 0, result.stderr
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(result.stdout) for s in family.samples}
    for metric, values in LABEL_VALUES.items():
        suffix = "_total" if metric._type == "counter" else ""
        for labels in values:
            key = (metric._name + suffix, tuple(sorted(zip(metric._labelnames, labels, strict=True))))
            assert samples.get(key) == 0.0, key


def test_label_values_are_the_ones_the_code_counts() -> None:
    from service.providers import PROVIDERS
    from service.telephony.webhook import SignatureFailure

    assert {reason.value for reason in SignatureFailure} == set(service.metrics.SIGNATURE_FAILURE_REASONS)
    assert set(service.metrics.WEBHOOK_PROVIDERS) == set(PROVIDERS) - {"generic"}
    assert set(_ATTEMPT_LABEL.values()) == set(CALL_ATTEMPT_OUTCOMES)
    assert {source.value for source in ListingSource} == set(OPT_OUT_SOURCES)
