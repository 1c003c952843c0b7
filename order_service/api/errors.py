"""The API's answers to a request it cannot take: not JSON, not valid, a method not allowed."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route


class Problem(BaseModel):
    """An error answer."""

    detail: str


#: How deep the 422's echo of the input goes; deeper containers are cut (a nested body can
#: be as deep as the JSON decoder allows, and the answer must not be the one that fails).
ECHO_DEPTH = 8


def json_safe(value: Any, depth: int = ECHO_DEPTH) -> Any:
    """`value` as JSON can carry it, whatever a client sent: NaN and infinities as the tokens
    the client wrote, text UTF-8 cannot encode (lone surrogates) and bytes with backslash
    escapes, any other object as its text."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else json.dumps(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict | list | tuple) and depth <= 0:
        return "..."
    if isinstance(value, dict):
        return {json_safe(str(k)): json_safe(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, depth - 1) for v in value]
    return json_safe(str(value))


def _not_json(why: str) -> JSONResponse:
    return JSONResponse({"detail": f"the body is not valid JSON: {why}"}, status_code=400)


async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
    """A request FastAPI could not validate: 400 when its body is not JSON at all, 415 when it
    was not sent as JSON, else 422 with an error per field (the input echoed safely)."""
    errors = exc.errors()
    for error in errors:
        if error.get("type") == "json_invalid" and isinstance(exc.body, str):
            # A syntax error has no field to name: it is the request that is malformed.
            position = int(error["loc"][-1])
            line = exc.body.count("\n", 0, position) + 1
            column = position - exc.body.rfind("\n", 0, position)
            return _not_json(f"{error.get('ctx', {}).get('error')} at line {line}, "
                             f"column {column}")
    if isinstance(exc.body, bytes):
        # FastAPI reads a body as JSON only when its Content-Type says so.
        sent = request.headers.get("content-type")
        said = f"this request's is {sent!r}" if sent else "this request had none"
        return JSONResponse({"detail": "send the body as JSON, with Content-Type: "
                                       f"application/json ({said})"}, status_code=415)
    return JSONResponse({"detail": json_safe(errors)}, status_code=422)


async def http_problem(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's answer to an HTTPException, with two things put right: a 405's `Allow`
    names every method of the path (not only those of the first route on it), and a body
    FastAPI could not decode says why.

    OPTIONS gets that 405 too, rather than a 204: the API serves no CORS, so all an OPTIONS
    answer could say is what `Allow` says, and every method it answers stays a route of its
    own, with whatever checks the routes have.
    """
    if exc.status_code == 405:
        allowed = {method for route in request.app.state.routes if isinstance(route, Route)
                   and route.matches(request.scope)[0] is not Match.NONE
                   for method in route.methods or ()}
        exc = StarletteHTTPException(405, exc.detail, headers={
            **(exc.headers or {}), "Allow": ", ".join(sorted(allowed))})
    elif exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        cause = exc.__cause__
        return _not_json(f"it is not UTF-8 (byte 0x{cause.object[cause.start]:02x} at "
                         f"offset {cause.start})")
    elif exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
        return _not_json("it is nested too deeply")
    return await http_exception_handler(request, exc)
