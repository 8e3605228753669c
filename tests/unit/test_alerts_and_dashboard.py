"""The shipped alert rules and Grafana dashboard: there is an alert for every 4503 category,
each is unit-tested firing and silent, and every metric name they use is one servegate really
exports (a renamed metric must not leave a rule or a panel silently empty). promtool's own
checks of the same files are tests/integration/test_promtool.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import Servegate
from proxy.failures import Category
from tests.conftest import make_settings

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "config" / "prometheus"
ALERTS_FILE = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST_FILE = PROMETHEUS_DIR / "alerts_test.yml"
DASHBOARD_FILE = REPO / "config" / "grafana" / "dashboards" / "servegate.json"

# A metric name as it appears in PromQL or prose: not preceded by another name character.
METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:])servegate_[a-z0-9_]+")
# The series names a family of each type puts in Prometheus. prometheus_client declares a
# counter without `_total` and exports it with it; in the text format `_created` is a gauge
# family of its own, but OpenMetrics puts it in the counter's or histogram's family.
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
    "": (),  # not a family servegate exports
}


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS_FILE.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _strings(node: Any) -> Iterator[str]:
    """Every string in a parsed YAML or JSON document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _referenced_names() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Metric names used in the alert rules and the dashboard, with where they occur: in
    PromQL (rule expressions, panel queries, variable queries), and in prose (annotations,
    titles, descriptions), where a histogram is named by its family as DESIGN.md does."""
    queries: dict[str, set[str]] = {}
    prose: dict[str, set[str]] = {}

    def note(found: dict[str, set[str]], text: str, where: str) -> None:
        for name in METRIC_NAME.findall(text):
            found.setdefault(name, set()).add(where)

    for rule in _alert_rules():
        where = f"{ALERTS_FILE.name}: {rule['alert']}"
        note(queries, rule["expr"], where)
        for text in _strings(rule["annotations"]):
            note(prose, text, where)
    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        where = f"{DASHBOARD_FILE.name}: {panel['title']}"
        for target in panel.get("targets", []):
            note(queries, target["expr"], where)
        for key in ("title", "description"):
            note(prose, panel.get(key, ""), where)
    for variable in dashboard["templating"]["list"]:
        for text in _strings(variable.get("query")):
            note(queries, text, f"{DASHBOARD_FILE.name}: ${variable['name']}")
    note(prose, dashboard.get("description", ""), DASHBOARD_FILE.name)
    return queries, prose


def exported_family(name: str, families: dict[str, str]) -> str | None:
    """The family (as declared) that puts series `name` into Prometheus, or None.

    The suffix must suit the family's type: `servegate_4503_total` is the counter
    `servegate_4503`, but `servegate_upstream_up_total` is nothing (a gauge has no `_total`)
    and neither is the bare `servegate_4503` (a counter is only queryable with its suffix).
    """
    for suffix in ("_bucket", "_sum", "_count", "_total", "_created", "_info", ""):
        family = name.removesuffix(suffix) if suffix else name
        if name.endswith(suffix) and suffix in SERIES_SUFFIXES[families.get(family, "")]:
            return family
    return None


def test_exported_family_strips_only_the_suffixes_a_family_of_that_type_has() -> None:
    families = {"x_4503": "counter", "x_up": "gauge", "x_seconds": "histogram"}

    assert exported_family("x_4503_total", families) == "x_4503"
    assert exported_family("x_4503", families) is None
    assert exported_family("x_up", families) == "x_up"
    assert exported_family("x_up_total", families) is None
    assert exported_family("x_seconds_bucket", families) == "x_seconds"
    assert exported_family("x_seconds_count", families) == "x_seconds"
    assert exported_family("x_seconds", families) is None
    assert exported_family("x_seconds_total", families) is None


def test_every_alert_is_unit_tested_firing_and_silent_on_a_look_alike() -> None:
    tests = yaml.safe_load(ALERTS_TEST_FILE.read_text(encoding="utf-8"))["tests"]
    fires: set[str] = set()
    stays_silent: set[str] = set()
    for test in tests:
        instances = {
            match for series in test["input_series"]
            for match in re.findall(r'instance="([^"]+)"', series["series"])
        }  # fmt: skip
        for case in test["alert_rule_test"]:
            expected = {alert["exp_labels"]["instance"] for alert in case.get("exp_alerts", [])}
            if expected:
                fires.add(case["alertname"])
            if instances - expected:  # series that look like it, and must not fire
                stays_silent.add(case["alertname"])

    alerts = {rule["alert"] for rule in _alert_rules()}
    assert fires == alerts
    assert stays_silent == alerts


def test_there_is_an_alert_for_every_4503_category_and_each_says_what_to_do() -> None:
    rules = _alert_rules()
    covered = {
        category for rule in rules for category in Category
        if f'servegate_4503_total{{category="{category}"}}' in rule["expr"]
    }  # fmt: skip

    assert covered == set(Category)
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"].split()) >= 20, rule["alert"]


def test_the_dashboard_has_a_row_per_category_and_the_panels_an_operator_needs() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    rows = [panel["title"].lower() for panel in dashboard["panels"] if panel["type"] == "row"]
    queries = " ".join(
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    )

    for category in Category:
        assert any(title.startswith(category) for title in rows), (category, rows)
        assert f'servegate_4503_total{{category="{category}"' in queries, category
    for needed in (
        "sum by (code) (rate(servegate_requests_total",
        "histogram_quantile(0.99, sum by (le) (rate(servegate_request_duration_seconds_bucket",
        "sum by (outcome) (rate(servegate_retries_total",
        "servegate_upstream_restarts_total",
        "servegate_upstream_crash_loop",
        "servegate_circuit_state",
        "servegate_queue_depth",
        "servegate_inflight_requests",
        "servegate_shed_total",
    ):
        assert needed in queries, needed
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_the_alerts_and_the_dashboard_name_is_exported_by_servegate() -> None:
    # What the admin port's /metrics serves: generate_latest on servegate's registry, on which
    # every series is declared when servegate is built.
    gate = Servegate(make_settings())
    text = generate_latest(gate.registry).decode()
    families = {family.name: family.type for family in text_string_to_metric_families(text)}
    queries, prose = _referenced_names()

    # Not a vacuous pass: the queries name most of what servegate exports.
    assert len(queries) >= 12, sorted(queries)
    unknown = {
        name: sorted(where)
        for name, where in queries.items()
        if exported_family(name, families) is None
    } | {
        name: sorted(where)
        for name, where in prose.items()
        if exported_family(name, families) is None and families.get(name) != "histogram"
    }
    assert not unknown, f"not exported by servegate: {unknown}; exported: {sorted(families)}"
