"""The order service's settings refuse what would leave its API open or guessable."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from order_service.service import service
from order_service.settings import OrderSettings

pytestmark = pytest.mark.unit

TOKEN = "a-token-of-24-characters"
_VARIABLES = ("SHOP_API_TOKEN", "SHOP_OPERATOR_TOKEN", "ORDER_HTTP_HOST", "ORDER_ALLOWED_HOSTS")


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _VARIABLES:
        monkeypatch.delenv(name, raising=False)


def settings() -> OrderSettings:
    """The order service's settings, read from the environment as the service reads them."""
    found = service.settings()
    assert isinstance(found, OrderSettings)
    return found


def refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            **env: str) -> str:
    """What the service prints when it refuses to start with this environment."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def started(*_args: object) -> None:
        raise AssertionError("the service went on to start")

    monkeypatch.setattr(service, "run", started)
    with pytest.raises(SystemExit) as exited:
        service.main()
    assert exited.value.code not in (0, None)
    return f"{exited.value.code}{capsys.readouterr().err}"


@pytest.mark.parametrize("variable", ["SHOP_API_TOKEN", "SHOP_OPERATOR_TOKEN"])
def test_a_short_token_is_refused_at_start_up_without_showing_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        variable: str) -> None:
    """A token under 16 characters stops the service with a message naming the variable
    and how to make a good one; the refused value is not printed."""
    message = refused(monkeypatch, capsys, **{variable: "guessable-15chr"})
    assert f"{variable}: the token is 15 characters long: it needs at least 16" in message
    assert "secrets.token_urlsafe" in message
    assert "guessable-15chr" not in message


def test_a_token_with_spaces_is_refused(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A header cannot carry every character: only visible ASCII is taken."""
    message = refused(monkeypatch, capsys, SHOP_API_TOKEN="a token with spaces in it")
    assert "SHOP_API_TOKEN: the token may hold only visible ASCII characters" in message


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "shop.example"])  # noqa: S104
def test_listening_beyond_loopback_without_an_api_token_is_refused(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], host: str) -> None:
    """ORDER_HTTP_HOST not a loopback address and no SHOP_API_TOKEN: the service does not
    start, and says what to set; with a token it would."""
    message = refused(monkeypatch, capsys, ORDER_HTTP_HOST=host)
    assert f"ORDER_HTTP_HOST={host} listens beyond this machine" in message
    assert "Set SHOP_API_TOKEN" in message
    assert OrderSettings(http_host=host, api_token=SecretStr(TOKEN)).api_token is not None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_token(host: str) -> None:
    """On loopback only the token is optional."""
    assert OrderSettings(http_host=host).api_token is None


def test_a_blank_token_is_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """`SHOP_API_TOKEN=` (a compose file passing an unset variable) means none; whitespace
    around a token (read from a file) is not part of it."""
    monkeypatch.setenv("SHOP_API_TOKEN", "  ")
    monkeypatch.setenv("SHOP_OPERATOR_TOKEN", f" {TOKEN}\n")
    found = settings()
    assert found.api_token is None
    assert found.operator_token is not None
    assert found.operator_token.get_secret_value() == TOKEN


def test_allowed_hosts_come_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    """ORDER_ALLOWED_HOSTS: names and addresses, IPv6 with or without brackets, any case;
    the default is the loopback names."""
    assert settings().allowed_hosts == ("localhost", "127.0.0.1", "::1")
    monkeypatch.setenv("ORDER_ALLOWED_HOSTS", "Shop.Example., [2001:DB8::1], 10.0.0.7,")
    assert settings().allowed_hosts == ("shop.example", "2001:db8::1", "10.0.0.7")

