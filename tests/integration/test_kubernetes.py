"""deploy/kubernetes as a cluster would take it, checked offline.

kustomize's own renderer (`kubectl kustomize`) builds the base and the overlay; every core object
is validated against Kubernetes' schemas (kubernetes-validate, strict: an unknown field is an
error, as with `kubectl apply --validate=strict`), the PodMonitor and the PrometheusRule against
the Prometheus Operator's CRD schemas vendored in deploy/kubernetes/schemas; promtool checks the
rule group. The PrometheusRule must say what config/prometheus/alerts.yml says. Then the pod's
numbers must agree with servegate's settings, and servegate must serve in a pod's environment.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from proxy import config
from proxy.metrics import Metrics
from proxy.supervise import STOP_GRACE
from tests.conftest import require_tool
from tests.unit.test_config import SERVICE_LINKS
from tests.upstreams.gunicorn import ROOT, Gunicorn, free_port, wait_for_port

KUBERNETES = ROOT / "deploy" / "kubernetes"
SHAPES = {"sidecar": KUBERNETES, "supervise": KUBERNETES / "overlays" / "supervise"}
SETTINGS_FILE = KUBERNETES / "base" / "servegate.yaml"
RENDER_RULES = KUBERNETES / "render_rules.py"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
# The oldest Kubernetes whose API has every field used (a preStop `sleep`: on by default from
# 1.30), and the newest schema kubernetes-validate ships, where a removed API would show.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-v1.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-v1.yaml",
}
KINDS = {
    "ConfigMap",
    "Deployment",
    "HorizontalPodAutoscaler",
    "PodMonitor",
    "PrometheusRule",
    "Service",
}
GUNICORN_GRACEFUL_TIMEOUT = 30  # Gunicorn's default --graceful-timeout: the model's own stop
MODEL_LOADING = 300  # seconds a startup probe allows: large models take minutes to load


def kubectl() -> str:
    """kubectl on PATH, or the one `make test` installed into the virtualenv."""
    venv_bin = str(Path(sys.executable).parent)
    path = shutil.which("kubectl", path=os.pathsep.join([os.environ.get("PATH", ""), venv_bin]))
    if path is None:
        pytest.fail("kubectl is not installed: `make test` installs it (make system-deps)")
    return path


def render(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def _strict(schema: Any) -> Any:
    """Unknown fields are errors, as the API server's strict field validation (kubectl's default
    --validate=strict) makes them, except where the schema keeps an object open."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in strict
        and "additionalProperties" not in strict
        and not strict.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


@functools.cache
def crd_validator(filename: str) -> jsonschema.Draft202012Validator:
    schema = yaml.safe_load((KUBERNETES / "schemas" / filename).read_text())
    return jsonschema.Draft202012Validator(_strict(schema))


def problems(objects: list[dict[str, Any]]) -> list[str]:
    """One line per schema violation, naming the object and the field."""
    found = []
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        crd = CRD_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
        if crd is not None:
            for error in crd_validator(crd).iter_errors(obj):
                found.append(f"{name}: {error.json_path}: {error.message}")
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(str(part) for part in error.path)
                found.append(f"{name} (Kubernetes {version}): {where}: {error.message}")
    return found


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [obj for obj in objects if obj["kind"] == kind]
    return found


def containers(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    return {container["name"]: container for container in pod["containers"]}


def prestop_sleep(container: dict[str, Any]) -> int:
    return int(container["lifecycle"]["preStop"]["sleep"]["seconds"])


@pytest.mark.parametrize("shape", SHAPES)
def test_every_rendered_object_validates_against_its_schema(shape: str) -> None:
    objects = render(SHAPES[shape])
    assert {obj["kind"] for obj in objects} == KINDS
    assert problems(objects) == []


# A mistake in each kind of manifest: (file in base/, text, its broken form, what the report says)
BREAKAGES = {
    "misspelled probe": (
        "deployment.yaml", "readinessProbe:", "readynessProbe:", "'readynessProbe' was unexpected"
    ),
    "port as a word": (
        "service.yaml", "port: 8080", "port: eighty", "'eighty' is not of type 'integer'"
    ),
    "misspelled PodMonitor field": (
        "podmonitor.yaml", "podMetricsEndpoints:", "podMetricEndpoints:",
        "'podMetricEndpoints' was unexpected",
    ),
    "malformed duration": (
        "prometheusrule.yaml", "for: 2m", "for: two minutes", "'two minutes' does not match"
    ),
}  # fmt: skip


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_manifest_fails_validation(breakage: str, tmp_path: Path) -> None:
    filename, good, bad, reported = BREAKAGES[breakage]
    copied = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copied)
    manifest = copied / "base" / filename
    text = manifest.read_text()
    assert good in text
    manifest.write_text(text.replace(good, bad, 1))
    for shape in (copied, copied / "overlays" / "supervise"):
        found = problems(render(shape))
        assert any(reported in line for line in found), found


def test_the_prometheus_rule_carries_exactly_the_alerts_of_alerts_yml() -> None:
    alerts = yaml.safe_load(ALERTS.read_text())
    rule = one(render(KUBERNETES), "PrometheusRule")
    assert rule["spec"]["groups"] == alerts["groups"]
    result = subprocess.run(
        [sys.executable, str(RENDER_RULES), "--check"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_the_check_fails_when_alerts_yml_changed_and_the_rule_was_not_rendered_again(
    tmp_path: Path,
) -> None:
    changed = tmp_path / "alerts.yml"
    changed.write_text(ALERTS.read_text().replace("for: 2m", "for: 3m", 1))
    result = subprocess.run(
        [sys.executable, str(RENDER_RULES), "--alerts", str(changed), "--check"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "make k8s-rules" in result.stderr


def test_promtool_accepts_the_generated_rule_group_and_refuses_a_broken_one(
    tmp_path: Path,
) -> None:
    promtool = require_tool("promtool")
    groups = one(render(KUBERNETES), "PrometheusRule")["spec"]["groups"]
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {sum(len(group['rules']) for group in groups)} rules found" in result.stdout
    broken = copy.deepcopy(groups)
    broken[0]["rules"][0]["expr"] = "sum(servegate_4503_total"
    rules.write_text(yaml.safe_dump({"groups": broken}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0


def test_the_sidecar_pod_outlasts_the_budget_and_its_model_outlasts_servegate() -> None:
    budget = config.load(SETTINGS_FILE, {}).budget.seconds
    objects = render(KUBERNETES)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    model, servegate = containers(objects)["model"], containers(objects)["servegate"]
    # The model keeps serving until servegate has drained: its SIGTERM comes later.
    assert prestop_sleep(model) >= prestop_sleep(servegate) + budget
    assert pod["terminationGracePeriodSeconds"] > prestop_sleep(model) + GUNICORN_GRACEFUL_TIMEOUT
    startup = model["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= MODEL_LOADING
    # servegate forwards to where the model listens.
    assert f"--bind={config.load(SETTINGS_FILE, {}).upstream.origin.authority}" in model["command"]


def test_the_supervised_pod_outlasts_the_budget_and_the_model_servers_stop() -> None:
    budget = config.load(SETTINGS_FILE, {}).budget.seconds
    objects = render(SHAPES["supervise"])
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    [servegate] = containers(objects).values()
    command = servegate["command"]
    assert command[:2] == ["servegate", "run"]
    assert command[command.index("--") + 1] == "gunicorn"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > prestop_sleep(servegate) + budget + STOP_GRACE
    startup = servegate["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= MODEL_LOADING


@pytest.mark.parametrize("shape", SHAPES)
def test_every_pod_is_probed_restricted_sized_and_keeps_service_links(shape: str) -> None:
    objects = render(SHAPES[shape])
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert "enableServiceLinks" not in pod  # the default, true: servegate must start anyway
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in pod["containers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert set(container["resources"]) == {"requests", "limits"}
    servegate = containers(objects)["servegate"]
    ports = {port["name"]: port["containerPort"] for port in servegate["ports"]}
    settings = config.load(SETTINGS_FILE, {})
    assert ports == {
        "http": config.split_address(settings.server.listen)[1],
        "metrics": config.split_address(settings.server.admin_listen)[1],
    }
    assert servegate["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert servegate["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_prometheus_finds_the_pods_under_the_job_the_alerts_name() -> None:
    objects = render(KUBERNETES)
    monitor = one(objects, "PodMonitor")["spec"]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    # ServegateTargetDown selects up{job="servegate"}, as prometheus.yml names the job.
    assert pod_labels[monitor["jobLabel"]] == "servegate"
    assert 'up{job="servegate"}' in ALERTS.read_text()
    assert [endpoint["port"] for endpoint in monitor["podMetricsEndpoints"]] == ["metrics"]
    service_ports = {port["name"] for port in one(objects, "Service")["spec"]["ports"]}
    assert service_ports == {"http", "metrics"}


def test_the_autoscaler_scales_the_deployment_on_a_series_servegate_exports() -> None:
    objects = render(KUBERNETES)
    autoscaler = one(objects, "HorizontalPodAutoscaler")["spec"]
    assert autoscaler["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    registry = CollectorRegistry()
    Metrics(registry, budget_seconds=40)
    exported = {family.name for family in registry.collect()}
    for metric in autoscaler["metrics"]:
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] in exported


@pytest.fixture
def servegate_in_a_pod(tmp_path: Path) -> Iterator[Callable[[str], ServegateProcess]]:
    """servegate run with the shipped pod settings and a pod's service-link environment."""
    started: list[subprocess.Popen[bytes]] = []

    def start(upstream: str) -> ServegateProcess:
        data, admin = free_port(), free_port()
        log = tmp_path / "servegate.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(SETTINGS_FILE),
                 "--upstream", upstream, "--listen", f"127.0.0.1:{data}",
                 "--admin-listen", f"127.0.0.1:{admin}"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **SERVICE_LINKS},
            )  # fmt: skip
        started.append(process)
        wait_for_port(data, process)
        wait_for_port(admin, process)  # bound after the data port
        return ServegateProcess(process, data, admin, log)

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


@dataclass
class ServegateProcess:
    process: subprocess.Popen[bytes]
    data_port: int
    admin_port: int
    log: Path

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line[:1] == "{"]


def get_status(url: str, body: bytes | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.time_limit(60)
def test_servegate_serves_in_a_pod_whose_environment_has_kubernetes_service_links(
    gunicorn: Callable[..., Gunicorn],
    servegate_in_a_pod: Callable[[str], ServegateProcess],
) -> None:
    model = gunicorn()
    gate = servegate_in_a_pod(model.url)
    deadline = time.monotonic() + 15
    while get_status(f"http://127.0.0.1:{gate.admin_port}/readyz") != 200:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.1)
    body = b'{"inputs": [[5.1, 3.5, 1.4, 0.2]]}'
    assert get_status(f"http://127.0.0.1:{gate.data_port}/predict", body) == 200
    os.kill(gate.process.pid, signal.SIGTERM)
    assert gate.process.wait(timeout=15) == 0
    warnings = [line for line in gate.lines() if line["event"] == "config.variable_ignored"]
    # One warning line for each variable, naming it (and never its value).
    assert sorted(line["variable"] for line in warnings) == sorted(SERVICE_LINKS)
    assert {line["level"] for line in warnings} == {"warning"}
    assert "10.96.0.12" not in gate.log.read_text()
