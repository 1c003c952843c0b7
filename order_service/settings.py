"""The order service's configuration, from the environment."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Self

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from common.kit.settings import ServiceSettings
from common.ops.credentials import API_TOKEN_VAR, OPERATOR_TOKEN_VAR, blank_is_unset

#: The shortest token the service accepts: a guessable one protects nothing.
MIN_TOKEN_LENGTH = 16
#: What a bearer token may hold: visible ASCII, so it travels unchanged in a header.
_TOKEN = re.compile(r"[\x21-\x7e]+")
_MAKE_ONE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def is_loopback(host: str) -> bool:
    """Whether an address to listen on (or a Host) is this machine's loopback only."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OrderSettings(ServiceSettings):
    """The order service's own settings (ORDER_*): its HTTP API and who may use it."""

    http_host: str = Field("127.0.0.1", description="Where the HTTP API listens.")
    http_port: int = Field(8000, ge=1, le=65535, description="The HTTP API's port.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest accepted request body.")
    late_after: float = Field(
        30.0, gt=0, description="Seconds an expected subscriber has to answer an order before "
                                "it is reported late (ORDER_LATE_AFTER).")

    api_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices(API_TOKEN_VAR),
        description="Bearer token every API endpoint but /healthz, the page and the docs "
                    "then asks for; required to listen beyond loopback.")
    operator_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices(OPERATOR_TOKEN_VAR),
        description="Bearer token of operator actions (retiring a subscriber); without it "
                    "they are off.")
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        ("localhost", "127.0.0.1", "::1"),
        description="Host header values served (comma-separated names or addresses; `*`: "
                    "any); others get 400, so a page on another site cannot reach the API "
                    "by rebinding its own name to this machine.")

    max_header_bytes: int = Field(
        16 * 1024, ge=1024, le=1024 * 1024,
        description="Largest request head (request line and headers); larger gets 431.")
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a connection has to send a request's head, from "
                                "its first byte (a new connection: from when it opened).")
    body_timeout: float = Field(
        30.0, gt=0, description="Seconds a request has to send its body after its head.")
    keepalive_timeout: float = Field(
        5.0, gt=0, description="Seconds an idle connection is kept open between requests.")
    max_connections: int = Field(
        256, ge=1, description="Open connections at most; one more is answered 503 and closed.")

    _blank = field_validator("api_token", "operator_token", mode="before")(blank_is_unset)

    @field_validator("api_token", "operator_token")
    @classmethod
    def _strong_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        token = value.get_secret_value()
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"the token is {len(token)} characters long: it needs at least "
                             f"{MIN_TOKEN_LENGTH} (make one with {_MAKE_ONE})")
        if not _TOKEN.fullmatch(token):
            raise ValueError("the token may hold only visible ASCII characters, no spaces "
                             f"(make one with {_MAKE_ONE})")
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            return tuple(str(h).strip().strip("[]").lower().rstrip(".") for h in value
                         if str(h).strip())
        return value

    @model_validator(mode="after")
    def _public_needs_a_token(self) -> Self:
        if self.api_token is None and not is_loopback(self.http_host):
            raise ValueError(
                f"ORDER_HTTP_HOST={self.http_host} listens beyond this machine, and "
                f"{API_TOKEN_VAR} is not set: anyone who reaches the port could place orders. "
                f"Set {API_TOKEN_VAR} (at least {MIN_TOKEN_LENGTH} characters; make one "
                f"with {_MAKE_ONE}) or listen on 127.0.0.1")
        return self

