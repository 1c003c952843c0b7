"""How `shop order ...` talks to the order API: options, requests, answers, errors."""

from __future__ import annotations

from typing import Annotated, Any, NoReturn

import httpx
import typer

from common.ops.credentials import ApiCredentials

DEFAULT_API = "http://127.0.0.1:8000"

Api = Annotated[str, typer.Option("--api", envvar="SHOP_API_URL", show_envvar=True,
                                  help="The order service's base URL.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

# Exit codes: 2 for input refused before anything was sent (as for a usage error), 1 for
# anything that went wrong talking to the service or an order not finished in time.
BAD_INPUT = 2
FAILED = 1


def make_client(base_url: str) -> httpx.Client:
    """The HTTP client every command uses (tests swap it for one with a fake transport)."""
    return httpx.Client(base_url=base_url, timeout=10.0)


def fail(message: str, code: int = FAILED) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def validation_lines(errors: list[dict[str, Any]]) -> list[str]:
    """Pydantic/FastAPI errors as `field.path: message` lines (the `body.` prefix dropped)."""
    lines = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        if loc and loc[0] == "body":
            loc = loc[1:]
        msg = str(error.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        lines.append(f"  {'.'.join(loc) or '(order)'}: {msg}")
    return lines


def request(api: str, method: str, path: str, *, attempts: int = 1, operator: bool = False,
             **kwargs: Any) -> httpx.Response:
    """One request, with the token from the environment (the operator's for an `operator`
    action); `attempts` > 1 only for a request the server takes once however often it is
    sent (a lost answer is then asked for again)."""
    credentials = ApiCredentials()
    kwargs["headers"] = {**kwargs.get("headers", {}), **credentials.headers(operator=operator)}
    try:
        with make_client(api) as client:
            for _ in range(attempts - 1):
                try:
                    response = client.request(method, path, **kwargs)
                    break
                except httpx.TransportError:
                    continue
            else:
                response = client.request(method, path, **kwargs)
    except httpx.ConnectError:
        fail(f"cannot reach the order API at {api}: is the order service running? (shop up)")
    except httpx.TimeoutException:
        fail(f"the order API at {api} did not answer in time")
    except httpx.HTTPError as exc:
        fail(f"talking to the order API at {api} failed: {exc}")
    if response.status_code == 401:
        variable = credentials.variable(operator=operator)
        sent = "authorization" in response.request.headers
        fail(f"the order API at {api} refused the token in {variable}: set it to the "
             "service's token" if sent else
             f"the order API at {api} wants a token: set {variable} to the service's token")
    return response


def check(response: httpx.Response) -> Any:
    """The JSON body of a successful answer; otherwise a readable error and exit."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success:
        return body
    detail = body.get("detail") if isinstance(body, dict) else None
    if response.status_code == 422 and isinstance(detail, list):
        fail("the order service refused the request:\n"
             + "\n".join(validation_lines(detail)), BAD_INPUT)
    message = detail if isinstance(detail, str) else response.text.strip() or "no details"
    fail(f"the order service answered {response.status_code}: {message}")


def when(iso: str | None) -> str:
    """An ISO timestamp from the API, shorter for a table (UTC, to the second)."""
    if not iso:
        return ""
    return iso.replace("T", " ")[:19] + " UTC"
