"""The docker compose deployment, checked without a Docker engine.

`docker-compose config` validates and normalises the file; promtool validates the scrape config.
The rest checks that the pieces agree: the ports servegate publishes are the ones it listens on
by default, Prometheus scrapes the servegate service on its admin port, the file Compose mounts
into Prometheus is the one in the repo, and servegate's upstream is the model service.
"""

from __future__ import annotations

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

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
PROMETHEUS_FILE = REPO / "config" / "prometheus" / "prometheus.yml"
PROMETHEUS_MOUNT = "/etc/prometheus/prometheus.yml"


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


def _scrape_targets(job: str) -> list[str]:
    scrape = yaml.safe_load(PROMETHEUS_FILE.read_text(encoding="utf-8"))
    jobs = {entry["job_name"]: entry for entry in scrape["scrape_configs"]}
    assert job in jobs, f"no scrape job {job!r} in {PROMETHEUS_FILE.name}: {sorted(jobs)}"
    assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
    return [target for static in jobs[job]["static_configs"] for target in static["targets"]]


def test_compose_file_is_accepted_by_docker_compose() -> None:
    config = _compose_config()

    assert {"model", "servegate", "prometheus"} <= set(config["services"])


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
    volumes = [str(volume) for volume in _service("prometheus").get("volumes", [])]
    mounts = {volume.split(":")[1]: volume.split(":") for volume in volumes}
    assert PROMETHEUS_MOUNT in mounts, f"{PROMETHEUS_MOUNT} is not mounted: {volumes}"
    source, _, *options = mounts[PROMETHEUS_MOUNT]

    # A missing source would make Docker create an empty directory in its place.
    assert Path(source).is_file(), f"{source} does not exist"
    assert Path(source).resolve() == PROMETHEUS_FILE.resolve()
    assert "ro" in options


def test_prometheus_config_is_accepted_by_promtool() -> None:
    result = _run(_tool("promtool"), "check", "config", str(PROMETHEUS_FILE))

    assert result.returncode == 0, f"promtool rejected the config:\n{result.stdout}{result.stderr}"


def test_servegate_forwards_to_the_model_service_on_its_bind_port() -> None:
    upstream = URL(_servegate_args().upstream)
    model_argv = _argv(_service("model"))
    binds = [arg.removeprefix("--bind=") for arg in model_argv if arg.startswith("--bind=")]

    assert len(binds) == 1, f"the model service should bind once with --bind=: {model_argv}"
    assert (upstream.host, upstream.port) == ("model", split_address(binds[0])[1])
