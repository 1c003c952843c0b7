"""Which services exist: each installed package's `Service`, found by entry point.

A service package declares itself in pyproject.toml, one line (what `shop new subscriber`
adds):

    [project.entry-points."shop.services"]
    loyalty = "loyalty_service.service:service"

`shop up`, `shop run`, the doctor, `GET /system`, `shop broker setup` and the rest ask here;
nothing in the kit lists services by name.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from common.kit.declare import Service

GROUP = "shop.services"


class UnknownServiceError(LookupError):
    """No installed service has that name."""


def services() -> dict[str, Service[Any]]:
    """Every installed service, by name, sorted by name."""
    return {point.name: _load(point)
            for point in sorted(entry_points(group=GROUP), key=lambda p: p.name)}


def service(name: str) -> Service[Any]:
    """The installed service called `name` (importing it alone), or UnknownServiceError
    saying which exist."""
    for point in entry_points(group=GROUP, name=name):
        return _load(point)
    raise UnknownServiceError(
        f"no service {name!r} is installed (installed: {', '.join(names()) or 'none'}); a "
        f"service package declares itself under [project.entry-points.\"{GROUP}\"] in "
        "pyproject.toml, and `make install` (pip install -e .) registers it")


def _load(point: EntryPoint) -> Service[Any]:
    service = point.load()
    if not isinstance(service, Service):
        raise TypeError(f"entry point {point.name} = {point.value!r} in {GROUP!r} is a "
                        f"{type(service).__name__}, not a Service")
    if service.name != point.name:
        raise ValueError(f"entry point {point.name!r} in {GROUP!r} names the service "
                         f"{service.name!r}: the two must be the same")
    return service


def names() -> list[str]:
    """The installed services' names, without importing them (for completion and help)."""
    return sorted(point.name for point in entry_points(group=GROUP))
