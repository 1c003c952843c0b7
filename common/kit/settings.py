"""Configuration from the environment: one settings class per service, built at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL


def _shared(name: str) -> AliasChoices:
    """Read a setting every service shares from its un-prefixed variable."""
    return AliasChoices(name)


class ServiceSettings(BaseSettings):
    """What every service needs; `common.kit.declare.Service` derives each service's class
    from it (or from the service's own subclass), with its name and its env prefix.

    Shared settings (broker, prefix, logs) come from un-prefixed variables; what a service
    owns alone (its database, its prefetch) from `<SERVICE>_...`, so `shop up` can hand
    one environment to every process.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)
    service_name: ClassVar[str] = "service"

    amqp_url: str = Field("amqp://guest:guest@localhost:5672/",
                          validation_alias=_shared("AMQP_URL"), description="RabbitMQ URL.")
    management_url: str = Field("http://guest:guest@localhost:15672/",
                                validation_alias=_shared("RABBITMQ_MANAGEMENT_URL"),
                                description="RabbitMQ management HTTP API, for `shop queues`.")
    name_prefix: str = Field("", validation_alias=_shared("SHOP_NAME_PREFIX"),
                             description="Prefix for every exchange and queue name.")
    data_dir: Path = Field(Path("data"), validation_alias=_shared("SHOP_DATA_DIR"),
                           description="Where the default SQLite databases live.")
    log_level: str = Field("INFO", validation_alias=_shared("LOG_LEVEL"))
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", validation_alias=_shared("LOG_FORMAT"),
        description="auto: readable on a terminal, JSON otherwise.")
    announce_interval: float = Field(
        60.0, gt=0, validation_alias=_shared("SHOP_ANNOUNCE_INTERVAL"),
        description="Seconds between a subscriber's re-announcements.")

    retry_delays: Annotated[tuple[float, ...], NoDecode] = Field(
        (1.0, 10.0, 60.0), validation_alias=_shared("SHOP_RETRY_DELAYS"),
        description="Seconds before each retry of a failing delivery, comma-separated; "
                    "after the last one it is dead-lettered.")
    delivery_limit: int = Field(
        10, ge=2, le=1000, validation_alias=_shared("SHOP_DELIVERY_LIMIT"),
        description="Deliveries of one message (consumer crashes, lost connections) before "
                    "the broker dead-letters it (quorum x-delivery-limit).")
    retention_hours: float = Field(
        168.0, gt=0, validation_alias=_shared("SHOP_RETENTION_HOURS"),
        description="Sent outbox rows and handled-event records are kept this long.")
    shutdown_timeout: float = Field(
        10.0, gt=0, validation_alias=_shared("SHOP_SHUTDOWN_TIMEOUT"),
        description="Seconds in-flight handlers get to finish on SIGTERM.")
    consumer_check_interval: float = Field(
        5.0, gt=0, validation_alias=_shared("SHOP_CONSUMER_CHECK_INTERVAL"),
        description="Seconds between checks that every queue still has our consumer.")

    max_message_bytes: int = Field(
        1_048_576, ge=524_288, validation_alias=_shared("SHOP_MAX_MESSAGE_BYTES"),
        description="Largest body a subscriber reads; a larger delivery is dead-lettered at "
                    "once, before it is parsed. The kit's own messages stay far below it (an "
                    "OrderPlaced of 100 lines is about 20 KB, a receipts message at most "
                    "256 KiB), hence the floor; a hostile body is refused before pydantic "
                    "builds objects for it.")

    history: bool = Field(
        True, validation_alias=_shared("SHOP_HISTORY"),
        description="Keep a bounded history of every business event on the broker (a stream "
                    "bound to its exchange, declared by its producers), which `shop catch-up` "
                    "replays to a subscriber added later.")
    history_hours: float = Field(
        168.0, gt=0, validation_alias=_shared("SHOP_HISTORY_HOURS"),
        description="Hours of each event's history kept (the stream's x-max-age).")
    history_max_bytes: int = Field(
        1 << 30, ge=1_048_576, validation_alias=_shared("SHOP_HISTORY_MAX_BYTES"),
        description="Bytes of each event's history kept (the stream's x-max-length-bytes).")

    otel_traces_exporter: str | None = Field(
        None, validation_alias=_shared("OTEL_TRACES_EXPORTER"),
        description="otlp or console to export traces (OTEL_EXPORTER_OTLP_* configure otlp); "
                    "off when unset.")
    metrics_port: int = Field(0, ge=0, le=65535,
                              description="Port of the Prometheus /metrics endpoint; 0: off.")
    metrics_host: str = Field(
        "127.0.0.1", validation_alias=_shared("SHOP_METRICS_HOST"),
        description="Where /metrics listens: loopback unless told otherwise (0.0.0.0 in a "
                    "container that Prometheus scrapes from another).")
    broker_password: SecretStr | None = Field(
        None, description="This service's own broker user's password (<SERVICE>_BROKER_PASSWORD). "
                          "When set, the service connects as its own user, named after it "
                          "(`broker_user`), whatever AMQP_URL says, and the producer of each "
                          "event it receives is the one the broker authenticated.")

    database_url: str | None = Field(
        None, description="SQLAlchemy async URL; default an SQLite file in the data folder.")
    prefetch: int = Field(
        256, ge=1, le=10_000,
        description="Unacked deliveries per consumer; up to half of them share a transaction.")

    batch_linger_ms: float = Field(
        5.0, ge=0, le=1000, validation_alias=_shared("SHOP_BATCH_LINGER_MS"),
        description="Milliseconds a delivery waits for others to share its transaction "
                    "(0: only those already read off the socket).")

    @model_validator(mode="after")
    def _own_broker_user(self) -> ServiceSettings:
        # One place swaps the credentials, so nothing that connects can forget to.
        if self.broker_password is not None:
            password = self.broker_password.get_secret_value()
            self.amqp_url = _with_login(self.amqp_url, self.broker_user, password)
            self.management_url = _with_login(self.management_url, self.broker_user, password)
        return self

    @property
    def broker_user(self) -> str:
        """The broker user of this service in a deployment with a user per service: its name
        under the deployment's prefix (`common.ops.access` grants it its permissions)."""
        return f"{self.name_prefix}{self.service_name}"

    @property
    def authenticated(self) -> bool:
        """Whether this service connects as its own broker user, so that every service does
        and the broker's validated `user_id` of a message names its producer."""
        return self.broker_password is not None

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _split_delays(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return tuple(float(part) for part in value.split(",") if part.strip())
            except ValueError as exc:
                raise ValueError(f"SHOP_RETRY_DELAYS must be seconds separated by commas, "
                                 f"like 1,10,60; got {value!r}") from exc
        return value

    @field_validator("retry_delays")
    @classmethod
    def _positive_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay <= 0 for delay in value):
            raise ValueError("every retry delay must be more than 0 seconds")
        return value

    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / (self.service_name + '.db')}"


def _with_login(url: str, user: str, password: str) -> str:
    return str(URL(url).with_user(user).with_password(password))


def refusal(exc: ValidationError, cls: type[BaseSettings]) -> str:
    """Why `cls` refused the environment, one line per variable, without the values given
    (a token refused for being short is still a secret)."""
    prefix = cls.model_config.get("env_prefix") or ""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        name = str(error["loc"][0]) if error["loc"] else ""
        field = cls.model_fields.get(name)
        if field is None:  # read through its alias (an un-prefixed variable), or the model's
            lines.append(f"{name}: {message}" if name else message)
            continue
        alias = field.validation_alias
        variable = (str(alias.choices[0]) if isinstance(alias, AliasChoices)
                    else f"{prefix}{name}".upper())
        lines.append(f"{variable}: {message}")
    return "\n".join(lines)
