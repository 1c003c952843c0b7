"""docker-compose.yml checked against the code, since no Docker engine runs where the tests do."""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import AliasChoices, AliasPath

from common.kit import discovery
from common.kit.settings import ServiceSettings
from order_service.settings import OrderSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
BROKER = "rabbitmq"
PROMETHEUS = "prometheus"
#: Runs once before the services and exits: broker users and permissions.
SETUP = "broker-setup"
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


# Every service in the file but the broker, Prometheus and the set-up job: a subscriber
# added later is checked too.
APP_SERVICES = sorted(name for name in services() if name not in (BROKER, PROMETHEUS, SETUP))

#: `${NAME}`, `${NAME:-default}`, `${NAME:?error}` (and without the colon), as compose reads them.
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<colon>:?)(?P<op>[-?])"
                       r"(?P<arg>[^}]*))?\}")


class MissingVariableError(Exception):
    """What compose refuses to start without."""


def interpolate(value: str, env: dict[str, str]) -> str:
    """`value` with its variables replaced from `env`, as `docker compose` does (no Docker
    engine runs where the tests do, and the compose plugin is not installed either)."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        found = env.get(name)
        unset = found is None or (match["colon"] == ":" and found == "")
        if unset and op == "-":
            return str(arg)
        if unset and op == "?":
            raise MissingVariableError(f"required variable {name} is missing a value: {arg}")
        return found or ""

    return _VARIABLE.sub(one, value)


def resolved(env: dict[str, str]) -> Any:
    """The whole compose file with its variables replaced from `env`."""

    def walk(data: Any) -> Any:
        if isinstance(data, dict):
            return {k: walk(v) for k, v in data.items()}
        if isinstance(data, list):
            return [walk(v) for v in data]
        return interpolate(data, env) if isinstance(data, str) else data

    return walk(compose())


@cache
def dot_env(tmp: Path) -> dict[str, str]:
    """The variables `scripts/new-env` writes, as compose would read them from .env."""
    target = tmp / ".env"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "new-env"), str(target)],
                   check=True, capture_output=True)
    lines = target.read_text(encoding="utf-8").splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def environment(service: str, data: dict[str, Any] | None = None) -> dict[str, str]:
    """A service's environment, whichever of compose's two spellings it uses."""
    env = (data or services())[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(name): str(value) for name, value in env.items()}


def settings_class(service: str) -> type[ServiceSettings]:
    """The settings class of the installed service `service`, as it reads its environment."""
    return discovery.service(service).settings_class


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


def container_ports(service: str, data: dict[str, Any] | None = None) -> list[int]:
    """Container-side ports a service publishes (short "host:container" or long syntax)."""
    ports: list[int] = []
    for entry in (data or services())[service].get("ports", []):
        if isinstance(entry, dict):
            ports.append(int(entry["target"]))
        else:
            ports.append(int(str(entry).split(":")[-1].split("/")[0]))
    return ports


def test_every_service_and_the_broker_are_defined() -> None:
    """The compose file runs RabbitMQ and every installed service."""
    assert BROKER in services()
    missing = set(discovery.names()) - set(services())
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
    assert 5672 in container_ports(BROKER), "publish AMQP, for the shop CLI on the host"


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
def test_settings_take_the_compose_values(service: str, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    """Built from the compose environment (with a .env from scripts/new-env), a service's
    settings hold exactly those values; the broker URLs carry the service's own user."""
    cls = settings_class(service)
    names = env_names(cls)
    env = environment(service, resolved(dot_env(tmp_path))["services"])
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = cls()
    for name, value in env.items():
        field = names[name.upper()]
        # Validated as the class validates it on its own (comma-separated lists included).
        expected = getattr(cls.model_validate({field: value}), field)
        if field in ("amqp_url", "management_url"):
            assert urlsplit(getattr(settings, field)).username == settings.broker_user
            continue
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
    service: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A service's SQLite file lies on a named volume that no other service mounts."""
    for name, value in environment(service, resolved(dot_env(tmp_path))["services"]).items():
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


@pytest.mark.parametrize("service", APP_SERVICES)
def test_metrics_listen_beyond_loopback_only_inside_the_compose_network(service: str) -> None:
    """In compose a service serves /metrics on every interface of its container, for
    Prometheus in another, but the port is exposed to that network and never published."""
    assert environment(service).get("SHOP_METRICS_HOST") == "0.0.0.0"  # noqa: S104
    assert metrics_port(service) not in container_ports(service)


def test_metrics_listen_on_loopback_by_default() -> None:
    """Outside compose, /metrics listens on loopback unless told otherwise."""
    assert ServiceSettings.model_fields["metrics_host"].default == "127.0.0.1"


# --- a deployment nobody can walk into ----------------------------------------------------

def test_no_credential_is_written_in_the_compose_file() -> None:
    """Every password and token is a required variable from .env: none has a value or a
    default in the file, and the broker image's guest user is replaced."""
    text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    assert "guest:" not in text, "no default credentials"
    secrets = {name: value
               for service in services()
               for name, value in environment(service).items()
               if any(word in name for word in ("PASSWORD", "PASS", "TOKEN"))}
    assert secrets, "the broker and the services need credentials"
    for name, value in secrets.items():
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), f"{name}: {value!r}"
    assert environment(BROKER)["RABBITMQ_DEFAULT_PASS"].startswith("${RABBITMQ_ADMIN_PASSWORD:?")
    for url in (v for s in services() for n, v in environment(s).items() if n.endswith("URL")):
        password = urlsplit(url).password
        assert password is None or password.startswith("${"), url


def test_without_an_env_file_compose_stops_and_says_what_to_do() -> None:
    """With none of the secrets set, compose refuses to start, naming the variable and the
    script that writes them."""
    with pytest.raises(MissingVariableError) as refused:
        resolved({})
    assert "is missing a value" in str(refused.value)
    assert "scripts/new-env" in str(refused.value)


def test_new_env_writes_every_secret_compose_needs(tmp_path: Path) -> None:
    """scripts/new-env writes every variable compose requires, each a different long random
    value, in a file only its owner reads; it does not overwrite it."""
    env = dot_env(tmp_path)
    resolved(env)  # raises if one is missing
    secrets = [v for k, v in env.items() if k.endswith(("PASSWORD", "TOKEN"))]
    assert len(secrets) == len(set(secrets)) >= 2 + len(APP_SERVICES)
    assert all(len(value) >= 24 for value in secrets)
    assert (tmp_path / ".env").stat().st_mode & 0o077 == 0
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "new-env"),
                            str(tmp_path / ".env")], capture_output=True, text=True, check=False)
    assert again.returncode == 1
    assert "exists" in again.stderr


def published(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(service, host address, container port) of every published port."""
    found = []
    for name, service in data["services"].items():
        for entry in service.get("ports", []):
            parts = str(entry).split(":")
            assert len(parts) == 3, f"{name}: {entry!r} publishes on every interface"
            found.append((name, parts[0], parts[2]))
    return found


def test_ports_are_published_on_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    """Every published port is bound to 127.0.0.1; SHOP_PUBLISH_ADDRESS opens them on purpose."""
    env = dot_env(tmp_path)
    ports = published(resolved(env))
    assert ports
    assert {address for _, address, _ in ports} == {"127.0.0.1"}
    opened = published(resolved({**env, "SHOP_PUBLISH_ADDRESS": "0.0.0.0"}))  # noqa: S104
    assert {address for _, address, _ in opened} == {"0.0.0.0"}  # noqa: S104


def test_the_management_ui_is_published_only_by_its_override_on_loopback(tmp_path: Path) -> None:
    """15672 (which can read and purge every queue) is not published by docker-compose.yml;
    deploy/compose.management.yml publishes it on the host's loopback."""
    assert 15672 not in container_ports(BROKER)
    override = yaml.safe_load((ROOT / "deploy" / "compose.management.yml").read_text("utf-8"))
    assert published(override) == [(BROKER, "127.0.0.1", "15672")]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_each_service_connects_as_its_own_broker_user(service: str) -> None:
    """Each service gets its own broker password (so its own user, least privilege) and
    waits for the set-up job that creates that user; the job gets every service's password."""
    variable = f"{service.upper()}_BROKER_PASSWORD"
    assert variable in environment(service)
    assert env_names(settings_class(service))[variable] == "broker_password"
    assert environment(SETUP)[variable] == environment(service)[variable]
    depends_on = services()[service]["depends_on"]
    assert depends_on[SETUP]["condition"] == "service_completed_successfully"
    assert services()[SETUP]["command"] == ["shop", "broker", "setup"]


def test_the_order_api_needs_its_tokens_in_compose() -> None:
    """Listening beyond its container's loopback, the API is given both tokens."""
    env = environment("order")
    assert {"SHOP_API_TOKEN", "SHOP_OPERATOR_TOKEN"} <= set(env)
