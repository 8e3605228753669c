"""The docker compose deployment, checked without a Docker engine.

`docker-compose config` validates and normalises the file; promtool validates the scrape config
and the alert rules it loads. The rest checks that the pieces agree: the ports servegate
publishes are the ones it listens on by default, Prometheus scrapes the servegate service on its
admin port, every file Compose mounts is in the repo (the alert rules beside the scrape config
that names them), servegate's upstream is the model service, and Grafana's data source, dashboard
provider and dashboard point at each other and at the Prometheus service.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from yarl import URL

from proxy.cli import _parser as servegate_parser
from proxy.config import Settings, split_address

pytestmark = pytest.mark.slow  # docker-compose and promtool, as processes

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
PROMETHEUS_FILE = REPO / "config" / "prometheus" / "prometheus.yml"
PROMETHEUS_MOUNT = "/etc/prometheus/prometheus.yml"
GRAFANA = REPO / "config" / "grafana"
GRAFANA_PROVISIONING_MOUNT = "/etc/grafana/provisioning"  # the image's default provisioning dir


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not on PATH; install it with `make system-deps` "
            "(Debian packages docker-compose and prometheus)"
        )
    return path


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def _compose_config() -> dict[str, Any]:
    """The compose file as docker-compose normalises it (absolute paths, long-form ports)."""
    result = _run(_tool("docker-compose"), "-f", str(COMPOSE_FILE), "config")
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def _service(name: str) -> dict[str, Any]:
    services = _compose_config()["services"]
    assert name in services, f"no service {name!r} in {COMPOSE_FILE.name}: {sorted(services)}"
    return services[name]


def _argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def _servegate_args() -> Any:
    argv = _argv(_service("servegate"))
    assert argv[:2] == ["servegate", "run"], f"servegate service runs {argv}"
    try:
        return servegate_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"servegate rejects the compose command: {shlex.join(argv)}")


def _published_ports(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(published, target) pairs from either the long or the short port syntax."""
    pairs = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            pairs.append((int(port["published"]), int(port["target"])))
        else:
            *_, published, target = str(port).split("/")[0].split(":")
            pairs.append((int(published), int(target)))
    return pairs


def _mounts(service: dict[str, Any]) -> dict[str, tuple[Path, bool]]:
    """Bind mounts by container path: (source on the host, read-only), from either syntax."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume["source"], volume["target"]
            read_only = bool(volume.get("read_only"))
        else:
            source, target, *options = str(volume).split(":")
            read_only = "ro" in ",".join(options).split(",")
        mounts[target] = (Path(source), read_only)
    return mounts


def _mounted_from_repo(service: str, target: str) -> Path:
    """The repo path Compose mounts read-only at `target` in `service`."""
    mounts = _mounts(_service(service))
    assert target in mounts, f"{target} is not mounted into {service}: {sorted(mounts)}"
    source, read_only = mounts[target]
    # A missing source would make Docker create an empty directory in its place.
    assert source.exists(), f"{source} (mounted at {target}) does not exist"
    assert source.resolve().is_relative_to(REPO), f"{source} is not in the repo"
    assert read_only, f"{target} is mounted writable into {service}"
    return source.resolve()


def _scrape_targets(job: str) -> list[str]:
    scrape = yaml.safe_load(PROMETHEUS_FILE.read_text(encoding="utf-8"))
    jobs = {entry["job_name"]: entry for entry in scrape["scrape_configs"]}
    assert job in jobs, f"no scrape job {job!r} in {PROMETHEUS_FILE.name}: {sorted(jobs)}"
    assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
    return [target for static in jobs[job]["static_configs"] for target in static["targets"]]


def test_compose_file_is_accepted_by_docker_compose() -> None:
    config = _compose_config()

    assert {"model", "servegate", "prometheus", "grafana"} <= set(config["services"])


def test_servegate_publishes_its_default_data_and_admin_ports() -> None:
    defaults = Settings().server
    default_ports = {split_address(defaults.listen)[1], split_address(defaults.admin_listen)[1]}
    args = _servegate_args()
    listening = {split_address(args.listen)[1], split_address(args.admin_listen)[1]}

    pairs = _published_ports(_service("servegate"))

    assert default_ports == {8080, 9464}  # DESIGN.md §3
    # Published on the host as the same port servegate listens on inside the container.
    assert sorted(pairs) == sorted((port, port) for port in default_ports)
    assert listening == default_ports


def test_prometheus_scrapes_the_servegate_service_on_its_admin_port() -> None:
    _service("servegate")  # the target host below is this service's name
    admin_port = split_address(_servegate_args().admin_listen)[1]

    assert _scrape_targets("servegate") == [f"servegate:{admin_port}"]


def test_prometheus_config_mounted_by_compose_exists_in_the_repo() -> None:
    assert _mounted_from_repo("prometheus", PROMETHEUS_MOUNT) == PROMETHEUS_FILE.resolve()


def test_the_alert_rules_prometheus_loads_are_mounted_beside_its_config() -> None:
    rule_files = yaml.safe_load(PROMETHEUS_FILE.read_text(encoding="utf-8"))["rule_files"]
    assert "alerts.yml" in rule_files

    for rule_file in rule_files:
        # Prometheus resolves rule_files against its config file's directory, in the container
        # as in the repo, so the relative name must find the same file in both places.
        in_container = Path(PROMETHEUS_MOUNT).parent / rule_file
        in_repo = PROMETHEUS_FILE.parent / rule_file
        assert _mounted_from_repo("prometheus", str(in_container)) == in_repo.resolve()


def test_prometheus_config_is_accepted_by_promtool() -> None:
    result = _run(_tool("promtool"), "check", "config", str(PROMETHEUS_FILE))

    assert result.returncode == 0, f"promtool rejected the config:\n{result.stdout}{result.stderr}"


def test_servegate_forwards_to_the_model_service_on_its_bind_port() -> None:
    upstream = URL(_servegate_args().upstream)
    model_argv = _argv(_service("model"))
    binds = [arg.removeprefix("--bind=") for arg in model_argv if arg.startswith("--bind=")]

    assert len(binds) == 1, f"the model service should bind once with --bind=: {model_argv}"
    assert (upstream.host, upstream.port) == ("model", split_address(binds[0])[1])


def test_grafana_is_pinned_published_and_open_to_anonymous_viewers() -> None:
    grafana = _service("grafana")
    environment = grafana.get("environment", {})

    assert re.fullmatch(r"grafana/grafana(-oss)?:\d+\.\d+\.\d+", grafana["image"]), grafana["image"]
    assert _published_ports(grafana) == [(3000, 3000)]
    assert environment.get("GF_AUTH_ANONYMOUS_ENABLED") == "true"
    assert environment.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer"  # looking, not editing


def test_grafana_provisions_the_prometheus_service_as_its_data_source() -> None:
    provisioning = _mounted_from_repo("grafana", GRAFANA_PROVISIONING_MOUNT)
    assert provisioning == (GRAFANA / "provisioning").resolve()
    datasources = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )["datasources"]
    prometheus_port = [target for _, target in _published_ports(_service("prometheus"))]

    assert len(datasources) == 1
    url = URL(datasources[0]["url"])
    assert datasources[0]["type"] == "prometheus"
    # The compose service name, on the port Prometheus listens on inside its container.
    assert (url.host, [url.port]) == ("prometheus", prometheus_port)


def test_grafana_loads_the_shipped_dashboard_from_its_mounted_directory() -> None:
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "servegate.yml").read_text(encoding="utf-8")
    )["providers"]
    assert [provider["type"] for provider in providers] == ["file"]
    path = providers[0]["options"]["path"]

    dashboards = _mounted_from_repo("grafana", path)

    assert dashboards == (GRAFANA / "dashboards").resolve()
    assert (dashboards / "servegate.json").is_file()
    # Grafana opens on it: the home dashboard is the shipped one, read from the same mount.
    home = Path(_service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(path)
    assert (dashboards / home.name).is_file()


def test_every_dashboard_query_uses_the_provisioned_data_source() -> None:
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )["datasources"]
    dashboard = json.loads((GRAFANA / "dashboards" / "servegate.json").read_text(encoding="utf-8"))
    provisioned = {source["uid"] for source in datasources}

    referred = set()
    for panel in dashboard["panels"]:
        if "datasource" in panel:
            referred.add(panel["datasource"]["uid"])
        for target in panel.get("targets", []):
            referred.add(target["datasource"]["uid"])
    for variable in dashboard["templating"]["list"]:
        if "datasource" in variable:
            referred.add(variable["datasource"]["uid"])

    assert referred == provisioned
