"""Who may use the order API: the Host it is addressed by, and bearer tokens.

Both are checked before a route runs (and before a body is read): a request from a page on
another site that rebound its own name to this machine carries that name as its Host; a
caller without the token learns nothing but that it needs one.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection
from typing import Annotated, Any

from fastapi import HTTPException, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from common.ops.credentials import API_TOKEN_VAR, OPERATOR_TOKEN_VAR
from order_service.api.dependencies import Settings

#: Names of the bearer schemes in the OpenAPI document.
API_SCHEME = "ApiToken"
OPERATOR_SCHEME = "OperatorToken"
#: What a health probe asks: a load balancer or an orchestrator addresses the service by its
#: own address, so this one answers whatever the Host (it tells nothing worth rebinding for).
PROBE = "/healthz"
_READS = ("GET", "HEAD")


def _challenge(error: str | None = None) -> dict[str, str]:
    """The WWW-Authenticate header of a 401 or 403 (RFC 6750)."""
    value = 'Bearer realm="order service"'
    if error is not None:
        value += f', error="{error}"'
    return {"WWW-Authenticate": value}


def _bearer(headers: Headers) -> str | None:
    """The token of an `Authorization: Bearer ...` header, if there is one."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def matches(given: str | None, expected: SecretStr | None) -> bool:
    """Whether a token given is the one expected, in time that does not depend on where
    they differ."""
    if given is None or expected is None:
        return False
    return hmac.compare_digest(given.encode(), expected.get_secret_value().encode())


def host_name(value: str) -> str | None:
    """The host of a Host header (`name`, `name:port`, `[v6]`, `[v6]:port`), lower-cased,
    or None when it is malformed or missing."""
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 literal: its colons are not a port's
        name, bracket, port = value[1:].partition("]")
        if not bracket or not name or (port and not (port[:1] == ":" and port[1:].isdigit())):
            return None
        return name
    name, colon, port = value.partition(":")
    if not name or (colon and not port.isdigit()):
        return None
    return name.rstrip(".")


class HostCheck:
    """Answer 400 to a request whose Host header is not one this service is served as."""

    def __init__(self, app: ASGIApp, allowed: Collection[str]) -> None:
        self.app = app
        self.any = "*" in allowed
        self.allowed = frozenset(allowed)
        self.listed = ", ".join(sorted(self.allowed))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any or (
                scope["method"] in _READS and scope["path"] == PROBE):
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("host", "")
        if host_name(given) in self.allowed:
            await self.app(scope, receive, send)
            return
        shown = repr(given[:100]) if given else "(no Host header)"
        response = JSONResponse(
            {"detail": f"this service does not answer to the Host {shown}: it answers to "
                       f"{self.listed} (set ORDER_ALLOWED_HOSTS to the names clients use)"},
            status_code=400, headers={"Connection": "close"})
        await response(scope, receive, send)


class ApiToken:
    """With an API token configured, answer 401 to a request without it (or the operator
    token) except on the open paths: the health probe, the page and the docs."""

    def __init__(self, app: ASGIApp, *, api: SecretStr | None, operator: SecretStr | None,
                 open_paths: Collection[str]) -> None:
        self.app = app
        self.api = api
        self.operator = operator
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or self.api is None
                or (scope["method"] in _READS and scope["path"] in self.open_paths)):
            await self.app(scope, receive, send)
            return
        token = _bearer(Headers(scope=scope))
        if matches(token, self.api) or matches(token, self.operator):
            await self.app(scope, receive, send)
            return
        if token is None:
            detail = f"this API needs a token: send Authorization: Bearer <{API_TOKEN_VAR}>"
            headers = _challenge()
        else:
            detail = f"the bearer token is not valid here: send the service's {API_TOKEN_VAR}"
            headers = _challenge("invalid_token")
        response = JSONResponse({"detail": detail}, status_code=401, headers=headers)
        await response(scope, receive, send)


_operator_scheme = HTTPBearer(
    auto_error=False, scheme_name=OPERATOR_SCHEME,
    description=f"{OPERATOR_TOKEN_VAR}: operator actions (off while the service has none).")
Operator = Annotated[HTTPAuthorizationCredentials | None, Security(_operator_scheme)]


async def operator_only(credentials: Operator, settings: Settings) -> None:
    """A route dependency: the request carries the operator token (403 while the service
    has none, saying how to turn operator actions on)."""
    operator, api = settings.operator_token, settings.api_token
    if operator is None:
        raise HTTPException(403, "operator actions are off: start the order service with "
                                 f"{OPERATOR_TOKEN_VAR} set (at least 16 characters) and "
                                 "send it as Authorization: Bearer <token>")
    given = credentials.credentials if credentials is not None else None
    if matches(given, operator):
        return
    if matches(given, api):
        raise HTTPException(403, f"this is an operator action: it needs "
                                 f"{OPERATOR_TOKEN_VAR}, not {API_TOKEN_VAR}",
                            headers=_challenge("insufficient_scope"))
    raise HTTPException(401, f"this is an operator action: send Authorization: Bearer "
                             f"<{OPERATOR_TOKEN_VAR}>",
                        headers=_challenge(None if given is None else "invalid_token"))


def declare_api_token(schema: dict[str, Any], open_paths: Collection[str]) -> None:
    """Mark in an OpenAPI document every operation the API token guards: all but the open
    paths; an operation that declares its own scheme (the operator's) keeps it."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[API_SCHEME] = {"type": "http", "scheme": "bearer",
                           "description": f"{API_TOKEN_VAR} ({OPERATOR_TOKEN_VAR} is accepted "
                                          "too)."}
    unauthorized = {"description": "No token, or not a valid one.",
                    "content": {"application/json": {"schema": {
                        "$ref": "#/components/schemas/Problem"}}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if method.upper() in _READS and path in open_paths:
                continue
            operation.setdefault("security", [{API_SCHEME: []}, {OPERATOR_SCHEME: []}])
            operation.setdefault("responses", {}).setdefault("401", unauthorized)
