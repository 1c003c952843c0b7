"""docker-compose.yml checked against the code, since no Docker engine runs where the tests do."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import prometheus_client
import pytest
import yaml
from pydantic import AliasChoices, AliasPath, TypeAdapter

from common.settings import ServiceSettings
from common.telemetry import start_metrics_server
from order_service.settings import OrderSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
BROKER = "rabbitmq"
PROMETHEUS = "prometheus"
EXPECTED_SERVICES = ("order", "inventory", "logistics", "seller")
SQLITE_URL_PREFIX = "sqlite+aiosqlite:///"


@cache
def compose() -> dict[str, Any]:
    """The parsed compose file (anchors and merge keys resolved by YAML itself)."""
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def services() -> dict[str, Any]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


# Every service in the file but the broker and Prometheus: a subscriber added later is
# checked too.
APP_SERVICES = sorted(name for name in services() if name not in (BROKER, PROMETHEUS))


def environment(service: str) -> dict[str, str]:
    """A service's environment, whichever of compose's two spellings it uses."""
    env = services()[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(name): str(value) for name, value in env.items()}


def settings_class(service: str) -> type[ServiceSettings]:
    """The one ServiceSettings subclass defined in `<service>_service/settings.py`."""
    module = importlib.import_module(f"{service}_service.settings")
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, ServiceSettings)
        and value.__module__ == module.__name__
    ]
    assert len(found) == 1, f"{module.__name__} should define one settings class, not {found}"
    return found[0]


def env_names(cls: type[ServiceSettings]) -> dict[str, str]:
    """Variable name -> field name, as pydantic-settings reads them.

    A field with a validation alias is read from the alias (each choice; for a path, its first
    element), with no prefix; any other field from `env_prefix` + its name. This is the
    documented name of each setting; the compose file must use exactly those.
    """
    prefix = str(cls.model_config.get("env_prefix", ""))
    names: dict[str, str] = {}
    for field_name, field in cls.model_fields.items():
        alias = field.validation_alias
        choices: list[str | AliasPath] = []
        if alias is None:
            choices = [prefix + field_name]
        elif isinstance(alias, AliasChoices):
            choices = list(alias.choices)
        else:
            choices = [alias]
        for choice in choices:
            name = choice if isinstance(choice, str) else str(choice.path[0])
            names[name.upper()] = field_name
    return names


def container_ports(service: str) -> list[int]:
    """Container-side ports a service publishes (short "host:container" or long syntax)."""
    ports: list[int] = []
    for entry in services()[service].get("ports", []):
        if isinstance(entry, dict):
            ports.append(int(entry["target"]))
        else:
            ports.append(int(str(entry).split(":")[-1].split("/")[0]))
    return ports


def test_every_service_and_the_broker_are_defined() -> None:
    """The compose file runs RabbitMQ and the four services."""
    assert BROKER in services()
    missing = set(EXPECTED_SERVICES) - set(services())
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


def test_broker_image_is_pinned_management_image_with_health_check() -> None:
    """RabbitMQ runs a pinned version of the management image and reports its health."""
    broker = services()[BROKER]
    image = str(broker["image"])
    name, _, tag = image.partition(":")
    assert name == "rabbitmq"
    assert tag, f"{image} has no tag: pin a version"
    assert tag != "latest"
    assert tag[0].isdigit(), f"{image}: the tag should start with a version"
    assert "management" in tag, f"{image}: the management image serves `shop queues`"
    healthcheck = broker.get("healthcheck") or {}
    assert healthcheck.get("test"), "rabbitmq needs a healthcheck for depends_on to wait on"
    assert not healthcheck.get("disable", False)
    assert {5672, 15672} <= set(container_ports(BROKER)), "publish AMQP and the management UI"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_service_runs_its_own_package(service: str) -> None:
    """Each service's command is `python -m <service>_service`, a package that exists."""
    command = services()[service].get("command")
    package = f"{service}_service"
    assert command == ["python", "-m", package]
    assert importlib.util.find_spec(package) is not None, f"no package {package}"
    assert (ROOT / package / "__main__.py").is_file(), f"{package} has no __main__.py"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_service_is_built_from_the_dockerfile(service: str) -> None:
    """Every service is built from the repository's one Dockerfile."""
    build = services()[service].get("build")
    context = build if isinstance(build, str) else (build or {}).get("context")
    assert context == "."
    assert (ROOT / "Dockerfile").is_file()


@pytest.mark.parametrize("service", APP_SERVICES)
def test_service_waits_for_a_healthy_broker(service: str) -> None:
    """A service starts only once RabbitMQ answers its health check."""
    depends_on = services()[service].get("depends_on")
    assert isinstance(depends_on, dict), "use the long form of depends_on, with a condition"
    assert depends_on.get(BROKER, {}).get("condition") == "service_healthy"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_environment_names_are_read_by_the_settings_class(service: str) -> None:
    """Every variable set for a service is one its settings class reads.

    A renamed setting (or a typo in the compose file) would otherwise be ignored silently,
    since the settings classes ignore unknown variables.
    """
    accepted = env_names(settings_class(service))
    unknown = sorted(name for name in environment(service) if name.upper() not in accepted)
    assert not unknown, (
        f"{service}: {unknown} are not read by {settings_class(service).__name__}; "
        f"it reads {sorted(accepted)}"
    )


@pytest.mark.parametrize("service", APP_SERVICES)
def test_settings_take_the_compose_values(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built from the compose environment, a service's settings hold exactly those values."""
    cls = settings_class(service)
    names = env_names(cls)
    env = environment(service)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = cls()
    for name, value in env.items():
        field = names[name.upper()]
        annotation = cls.model_fields[field].annotation
        assert annotation is not None
        expected = TypeAdapter(annotation).validate_python(value)
        assert getattr(settings, field) == expected, f"{service}: {name} was not taken"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_services_reach_the_broker_service(service: str) -> None:
    """The broker URLs point at the rabbitmq service, on the ports it listens on."""
    env = environment(service)
    amqp = urlsplit(env["AMQP_URL"])
    assert (amqp.hostname, amqp.port or 5672) == (BROKER, 5672)
    if "RABBITMQ_MANAGEMENT_URL" in env:
        management = urlsplit(env["RABBITMQ_MANAGEMENT_URL"])
        assert (management.hostname, management.port) == (BROKER, 15672)


@pytest.mark.parametrize("service", APP_SERVICES)
def test_each_service_keeps_its_database_on_its_own_volume(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service's SQLite file lies on a named volume that no other service mounts."""
    for name, value in environment(service).items():
        monkeypatch.setenv(name, value)
    url = settings_class(service)().db_url()
    assert url.startswith(SQLITE_URL_PREFIX), f"{service}: expected an SQLite URL, got {url}"
    folder = str(PurePosixPath(url.removeprefix(SQLITE_URL_PREFIX)).parent)
    assert folder.startswith("/"), f"{service}: {url} should be an absolute path in the container"

    mounts = {}
    for volume in services()[service].get("volumes", []):
        source, target = str(volume).split(":")[:2]
        mounts[target] = source
    assert folder in mounts, f"{service}: nothing is mounted at {folder}, its data would be lost"
    volume_name = mounts[folder]
    assert volume_name in (compose().get("volumes") or {}), f"{volume_name} is not a named volume"
    sharing = [
        other
        for other in APP_SERVICES
        if other != service
        and any(str(v).split(":")[0] == volume_name for v in services()[other].get("volumes", []))
    ]
    assert not sharing, f"{volume_name} is shared with {sharing}: each service owns its data"


def test_order_api_port_matches_its_settings() -> None:
    """The order service publishes the port its API listens on, and checks its health there."""
    env = environment("order")
    port = int(env.get("ORDER_HTTP_PORT", OrderSettings.model_fields["http_port"].default))
    assert port in container_ports("order")
    # compared, not bound: the container must listen beyond its own loopback
    assert env.get("ORDER_HTTP_HOST") == "0.0.0.0"  # noqa: S104
    healthcheck = " ".join(map(str, services()["order"]["healthcheck"]["test"]))
    assert f":{port}/healthz" in healthcheck


def metrics_port(service: str) -> int:
    """The port a service serves /metrics on in compose: its environment, else its default."""
    cls = settings_class(service)
    names = env_names(cls)
    for name, value in environment(service).items():
        if names.get(name.upper()) == "metrics_port":
            return int(value)
    return int(cls.model_fields["metrics_port"].default)


def scrape_targets() -> dict[str, set[str]]:
    """Prometheus's static targets in the file compose mounts, by job."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text(encoding="utf-8"))
    return {job["job_name"]: {t for static in job.get("static_configs", [])
                              for t in static["targets"]}
            for job in config["scrape_configs"]}


def test_prometheus_is_optional_pinned_and_reads_the_repository_config() -> None:
    """Prometheus starts only with the `observability` profile, from a pinned image, with
    deploy/prometheus.yml as its configuration."""
    prometheus = services()[PROMETHEUS]
    assert prometheus.get("profiles") == ["observability"], "plain `up` must not start it"
    name, _, tag = str(prometheus["image"]).partition(":")
    assert name == "prom/prometheus"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), f"pin a release like v3.1.0, not {tag!r}"
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in prometheus["volumes"]}
    assert mounts.get("/etc/prometheus/prometheus.yml") == "./deploy/prometheus.yml"
    assert 9090 in container_ports(PROMETHEUS)


@pytest.mark.parametrize("service", APP_SERVICES)
def test_prometheus_scrapes_each_service_on_its_metrics_port(service: str) -> None:
    """Every service has a scrape target at its compose host name and the port its settings
    serve /metrics on, and exposes that port."""
    port = metrics_port(service)
    assert port > 0, f"{service}: metrics are off (port 0), so Prometheus would scrape nothing"
    targets = set().union(*scrape_targets().values())
    assert f"{service}:{port}" in targets, f"deploy/prometheus.yml does not scrape {service}"
    exposed = {int(str(p).split("/")[0]) for p in services()[service].get("expose", [])}
    assert port in exposed, f"{service}: expose its metrics port {port}"


def test_every_scrape_target_is_a_compose_service() -> None:
    """No scrape target points at a host the compose file does not define."""
    hosts = {target.split(":")[0] for targets in scrape_targets().values() for target in targets}
    assert hosts <= set(services()), f"unknown hosts: {sorted(hosts - set(services()))}"


def test_metrics_listen_on_every_interface() -> None:
    """The metrics server binds all interfaces, so Prometheus reaches it in another container."""
    default = inspect.signature(prometheus_client.start_http_server).parameters["addr"].default
    with mock.patch("prometheus_client.start_http_server") as start:
        start_metrics_server(9100, "order")
    start.assert_called_once()
    assert start.call_args.kwargs.get("addr", default) in ("0.0.0.0", "::", "")  # noqa: S104
