"""The lines `shop new subscriber` adds to pyproject.toml, docker-compose.yml and
deploy/prometheus.yml: lines added, nothing else changed.

Each edit works on the text, so comments, order and spacing stay as they are, then parses
the result: it must be the file before plus what was added, or the edit is refused.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from common.kit import discovery

PYPROJECT = Path("pyproject.toml")
COMPOSE = Path("docker-compose.yml")
PROMETHEUS = Path("deploy/prometheus.yml")
ENTRY_POINTS = f'[project.entry-points."{discovery.GROUP}"]'


class RefusedError(ValueError):
    """The service cannot be made as asked; the message says why. Nothing was written."""


def add_entry_point(text: str, name: str) -> str:
    """`name = "name_service.service:service"` at the end of the `shop.services` entry
    points."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == ENTRY_POINTS), None)
    if start is None:
        raise RefusedError(f"{PYPROJECT} has no {ENTRY_POINTS} table: run the command from "
                           "the repository's root")
    at = start + 1
    for i in range(start + 1, len(lines)):
        if lines[i].lstrip().startswith("["):
            break
        if re.match(r"\s*[\w.-]+\s*=", lines[i]):
            at = i + 1
    value = f"{name}_service.service:service"
    new = _insert(lines, at, [f'{name} = "{value}"\n'])
    found = tomllib.loads(new)
    ours = found["project"]["entry-points"][discovery.GROUP].pop(name, None)
    _same(ours == value and found == tomllib.loads(text), PYPROJECT)
    return new


def add_to_compose(text: str, name: str, metrics_port: int) -> str:
    """The service, after the last one run from a package (`python -m x_service`) and in
    its shape; its broker password for `broker-setup`; its volume."""
    lines = text.splitlines(keepends=True)
    blocks = _service_blocks(lines)
    packaged = [key for key, (start, end) in blocks.items()
                if any(re.search(r'command: \["python", "-m", "\w+_service"\]', line)
                       for line in lines[start:end])]
    if (not packaged or "broker-setup" not in blocks
            or not {"&service", "&shared-env"} <= set(text.split())):
        raise RefusedError(f"{COMPOSE} is not laid out as expected (services run with "
                           "`python -m x_service` from the &service and &shared-env anchors, "
                           "a broker-setup job): add the service by hand")
    model_start, model_end = blocks[packaged[-1]]
    passwords = [i for i in range(*blocks["broker-setup"]) if "_BROKER_PASSWORD: ${" in lines[i]]
    if not passwords:
        raise RefusedError(f"{COMPOSE}: broker-setup is given no service's password")
    model = lines[passwords[-1]]
    indent = model[:len(model) - len(model.lstrip())]
    variable = f"{name.upper()}_BROKER_PASSWORD"
    # `${VARIABLE:?message}` with the message the other passwords give.
    required = re.sub(r"\$\{\w+:\?", "${" + variable + ":?", model.split(": ", 1)[1]).rstrip()
    volume = f"{name}-data"
    service = [
        "\n", f"  {name}:\n", "    <<: *service\n",
        f'    command: ["python", "-m", "{name}_service"]\n',
        "    environment:\n", "      <<: *shared-env\n",
        f"      {variable}: {required}\n",
        f"      {name.upper()}_DATABASE_URL: sqlite+aiosqlite:////app/data/{name}.db\n",
        "    expose:\n",
        f'      - "{metrics_port}"  # /metrics ({name.upper()}_METRICS_PORT)\n',
        "    volumes:\n", f"      - {volume}:/app/data\n"]
    volumes = _top_level(lines, "volumes")
    after = volumes[1]
    for line in lines[model_start:model_end]:
        if match := re.match(r"\s+- ([\w-]+):/", line):
            after = next((i + 1 for i in range(*volumes)
                          if lines[i].strip() == f"{match[1]}:"), after)
    # From the end of the file up, so that each index still points where it did.
    for at, added in sorted([(passwords[-1] + 1, [f"{indent}{variable}: {required}\n"]),
                             (model_end, service), (after, [f"  {volume}:\n"])], reverse=True):
        lines = _insert(lines, at, added).splitlines(keepends=True)
    new = "".join(lines)
    found = parse_yaml(new, COMPOSE)
    ours = found["services"].pop(name)
    _same(found["services"]["broker-setup"]["environment"].pop(variable, None) == required
          and found["volumes"].pop(volume, "missing") is None
          and found == parse_yaml(text, COMPOSE)
          and ours["command"] == ["python", "-m", f"{name}_service"]
          and ours["environment"][variable] == required, COMPOSE)
    return new


def add_scrape_target(text: str, name: str, metrics_port: int) -> str:
    """`name:port`, labelled with its service, after the last target labelled so."""
    lines = text.splitlines(keepends=True)
    labels = [i for i, line in enumerate(lines) if re.match(r"\s+labels: \{service: ", line)]
    if not labels or not lines[labels[-1] - 1].lstrip().startswith("- targets:"):
        raise RefusedError(f"{PROMETHEUS} has no target labelled with its service: add "
                           f"{name}:{metrics_port} by hand")
    model = lines[labels[-1] - 1]
    indent = model[:len(model) - len(model.lstrip())]
    target = f"{name}:{metrics_port}"
    new = _insert(lines, labels[-1] + 1, [f'{indent}- targets: ["{target}"]\n',
                                          f"{indent}  labels: {{service: {name}}}\n"])
    found = parse_yaml(new, PROMETHEUS)
    ours = [static for job in found["scrape_configs"]
            for static in job.get("static_configs", []) if target in static["targets"]]
    for job in found["scrape_configs"]:
        if "static_configs" in job:
            job["static_configs"] = [s for s in job["static_configs"] if s not in ours]
    _same(ours == [{"targets": [target], "labels": {"service": name}}]
          and found == parse_yaml(text, PROMETHEUS), PROMETHEUS)
    return new


def parse_yaml(text: str, path: Path) -> Any:
    import yaml  # a developer's tool: PyYAML comes with the dev extra (make install)

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RefusedError(f"{path} does not parse: {exc}") from None


def _service_blocks(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Each compose service -> its lines [start, end); the blank and comment lines after
    its last line belong to what follows."""
    start, end = _top_level(lines, "services")
    keys = [i for i in range(start, end) if re.match(r"  [\w.-]+:\s*$", lines[i])]
    blocks = {}
    for n, i in enumerate(keys):
        stop = keys[n + 1] if n + 1 < len(keys) else end
        while stop > i + 1 and not lines[stop - 1].startswith("   "):
            stop -= 1
        blocks[lines[i].strip().rstrip(":")] = (i, stop)
    return blocks


def _top_level(lines: list[str], key: str) -> tuple[int, int]:
    """The lines under a top-level key: [after it, its last non-blank line]."""
    start = next((i + 1 for i, line in enumerate(lines) if line.rstrip() == f"{key}:"), None)
    if start is None:
        raise RefusedError(f"{COMPOSE} has no top-level {key}:")
    end = next((i for i in range(start, len(lines))
                if lines[i].strip() and not lines[i][0].isspace()), len(lines))
    while end > start and not lines[end - 1].strip():
        end -= 1
    return start, end


def _insert(lines: list[str], at: int, added: list[str]) -> str:
    if at and not lines[at - 1].endswith("\n"):  # a last line without its newline
        added = ["\n", *added]
    return "".join([*lines[:at], *added, *lines[at:]])


def _same(ok: bool, path: Path) -> None:
    """The edited file, parsed, is the file before plus what was added, and nothing else."""
    if not ok:
        raise RefusedError(f"adding to {path} would not give what was meant (an unusual "
                           "layout?): nothing was written; add the service to it by hand")
