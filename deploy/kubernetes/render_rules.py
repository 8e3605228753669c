"""Render prometheusrule.yaml (a Prometheus Operator PrometheusRule) from alerts.yml.

The alert rules exist once, in config/prometheus/alerts.yml, where `promtool test rules` tests
them; the PrometheusRule carries the same groups, byte for byte in meaning. `make k8s-rules`
writes it; `--check` exits 1 when the committed file is not what alerts.yml gives.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parents[1] / "config" / "prometheus" / "alerts.yml"
RULE = HERE / "base" / "prometheusrule.yaml"

HEADER = """\
# Generated from config/prometheus/alerts.yml by deploy/kubernetes/render_rules.py
# (make k8s-rules): edit alerts.yml, not this file; a test fails when the two disagree.
# Your Prometheus object's ruleSelector must match these labels (kube-prometheus-stack selects
# on `release: <its release name>`: add it in an overlay).
"""


class _Dumper(yaml.SafeDumper):
    """Long strings as blocks, to read as alerts.yml does: PromQL keeps its lines, prose folds."""


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    lines = value.rstrip("\n")
    style = "|" if "\n" in lines else ">" if len(lines) > 80 else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def prometheus_rule(alerts: dict[str, Any]) -> dict[str, Any]:
    """The PrometheusRule object whose spec.groups are alerts.yml's groups."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "servegate", "labels": {"app.kubernetes.io/name": "servegate"}},
        "spec": {"groups": alerts["groups"]},
    }


def render(alerts_text: str) -> str:
    """alerts.yml's text -> prometheusrule.yaml's text."""
    rule = prometheus_rule(yaml.safe_load(alerts_text))
    return HEADER + yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=100)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=Path, default=ALERTS, help="the rule file to render")
    parser.add_argument("--output", type=Path, default=RULE, help="the PrometheusRule file")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if --output differs, write nothing"
    )
    args = parser.parse_args(argv)
    rendered = render(args.alerts.read_text(encoding="utf-8"))
    if not args.check:
        args.output.write_text(rendered, encoding="utf-8")
        return 0
    committed = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
    if committed != rendered:
        print(
            f"{args.output} is not what {args.alerts} gives: run `make k8s-rules`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
