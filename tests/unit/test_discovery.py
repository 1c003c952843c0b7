"""Services are found, never listed: by entry point, and the kit imports none of them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.kit import discovery
from common.kit.__main__ import main as run_by_name
from common.kit.declare import Service
from common.ops import cli

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
#: The services of this repository (tests may name them; the kit may not).
OURS = {"order", "inventory", "logistics", "seller"}


def service_imports(path: Path) -> list[str]:
    """What `path` imports from a `*_service` package: import statements, and the names
    given to importlib.import_module or __import__ (a literal, or an f-string's text)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        elif isinstance(node, ast.Call) and _imports(node.func) and node.args:
            names = [_text(node.args[0])]
        found += [f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}: {name}"
                  for name in names if "_service" in name.split(".")[0]]
    return found


def _imports(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))


def _text(node: ast.expr) -> str:
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(value) for value in node.values)
    return ""


def test_the_kit_imports_no_service() -> None:
    """No module under common/ imports a `*_service` package, directly or by importlib:
    the ground floor does not depend on the rooms above it."""
    offending = [hit for path in sorted((ROOT / "common").rglob("*.py"))
                 for hit in service_imports(path)]
    assert not offending, "the kit imports a service:\n" + "\n".join(offending)


def test_every_service_of_the_repository_is_found_by_its_entry_point() -> None:
    """`make install` registers each service: discovery finds its Service, under its name,
    and names() agrees without importing them."""
    found = discovery.services()
    assert set(found) >= OURS
    assert all(isinstance(s, Service) and s.name == name for name, s in found.items())
    assert discovery.names() == sorted(found)
    assert discovery.service("inventory") is found["inventory"]


def test_an_unknown_service_is_refused_with_the_installed_ones_named() -> None:
    """`shop run NAME` for a name nobody installed: exit 1, and the message lists the
    services there are and how one is declared."""
    result = CliRunner().invoke(cli.app, ["run", "loyalty"])
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "no service 'loyalty' is installed (installed: inventory, logistics, order, seller" \
        in message
    assert 'project.entry-points."shop.services"' in message


def test_the_kit_refuses_to_run_an_unknown_service() -> None:
    """`python -m common.kit NAME` (what `shop up` starts) says which names exist when the
    one given is not installed."""
    with pytest.raises(SystemExit) as exited:
        run_by_name(["loyalty"])
    assert "no service 'loyalty' is installed (installed: inventory, logistics, order, " \
        "seller" in str(exited.value.code)


def test_each_service_with_commands_has_them_under_its_name_in_shop() -> None:
    """A service's own Typer app (`Service(cli=...)`) is mounted as `shop NAME`."""
    for name, service in discovery.services().items():
        if service.cli is None:
            continue
        result = CliRunner().invoke(cli.app, [name, "--help"], env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        assert f" {name} [OPTIONS] COMMAND" in result.output
        assert " ".join(service.commands().info.help.split()) in " ".join(result.output.split())
