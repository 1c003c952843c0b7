"""Events evolve by addition: each version's wire schema is kept, and a change that would break
a message already sent, or a consumer not yet upgraded, is named before it ships.

A snapshot, `docs/events/<EventType>.v<schema_version>.json`, is the JSON Schema a consumer
validates the event with. The current model is compared with the snapshot of its version,
both ways, since services deploy one at a time: a consumer built from the model must accept
every message made to the snapshot (some wait in queues and dead-letter queues), and a
consumer still on the snapshot must accept every message the model makes. So a field may be
added when it is optional (old messages lack it; old readers ignore it), and nothing else:
a field removed (old readers need it, and a later field of that name would meet old
messages), a type changed, a field required that old messages may lack, a constraint
narrowed (old messages may break it) or widened (old readers would refuse the new values).
A breaking change is a new `schema_version`, with a snapshot of its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.contracts import event_name, schema_version
from common.events import Event

#: Where the snapshots live, from the repository's root.
SNAPSHOTS = Path("docs") / "events"
JSON_SCHEMA = "https://json-schema.org/draft/2020-12/schema"

#: Keywords that describe a value rather than constrain it: changing them breaks nothing.
#: (`default`: a producer writes every field, defaults included, so no reader relies on it.)
_ANNOTATIONS = frozenset({"title", "description", "examples", "default", "deprecated",
                          "$comment", "$schema", "readOnly", "writeOnly"})
#: Keywords compared by walking into them, or by the field rules, not as values.
_STRUCTURE = frozenset({"properties", "required", "items", "additionalProperties", "anyOf",
                        "oneOf", "allOf", "$defs", "$ref", "type"})
#: A larger value narrows what these accept; a smaller one widens it.
_LOWER_BOUNDS = frozenset({"minimum", "exclusiveMinimum", "minLength", "minItems",
                           "minProperties"})
_UPPER_BOUNDS = frozenset({"maximum", "exclusiveMaximum", "maxLength", "maxItems",
                           "maxProperties"})
_NARROWED = "messages already sent may not meet it"
_WIDENED = "consumers on the snapshot would refuse what it now allows"
_EITHER = "messages already sent, or consumers on the snapshot, may not agree with it"


def wire_schema(event: type[Event]) -> dict[str, Any]:
    """The JSON Schema consumers validate `event` with: what its snapshot records."""
    return {"$schema": JSON_SCHEMA, **event.model_json_schema(mode="validation")}


def snapshot_path(directory: Path, event: type[Event]) -> Path:
    return directory / f"{event_name(event)}.v{schema_version(event)}.json"


def read_snapshot(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def breaking_changes(old: Mapping[str, Any], new: Mapping[str, Any], name: str
                     ) -> list[str]:
    """Each change from schema `old` to `new` that would break a message or a consumer on
    the wire, one line each, naming the field (`OrderPlaced.lines[].sku: ...`)."""
    diff = _Diff(old.get("$defs", {}), new.get("$defs", {}))
    diff.compare(old, new, name)
    return diff.found


def check(event: type[Event], directory: Path) -> list[str]:
    """What is wrong with `event` against its snapshot in `directory`: nothing, the breaking
    changes, or a missing snapshot."""
    path = snapshot_path(directory, event)
    if not path.exists():
        return [f"{event_name(event)}: no snapshot of schema_version "
                f"{schema_version(event)} ({path}); `shop events snapshot` writes it"]
    return breaking_changes(read_snapshot(path), wire_schema(event), event_name(event))


@dataclass
class SnapshotReport:
    """What `write_snapshots` did, and what it refused."""

    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def write_snapshots(directory: Path, events: Iterable[type[Event]]) -> SnapshotReport:
    """Write each event's snapshot: a new one for a new event or version, the current schema
    over an old one only when the change is additive (so the field added is kept from then
    on). A breaking change is refused, its snapshot left as it was."""
    report = SnapshotReport()
    directory.mkdir(parents=True, exist_ok=True)
    for event in events:
        path = snapshot_path(directory, event)
        current = wire_schema(event)
        if path.exists():
            old = read_snapshot(path)
            if old == current:
                report.unchanged.append(str(path))
                continue
            breaks = breaking_changes(old, current, event_name(event))
            if breaks:
                report.refused.extend(breaks)
                continue
        path.write_text(json.dumps(current, indent=2, ensure_ascii=False) + "\n",
                        encoding="utf-8")
        report.written.append(str(path))
    return report


class _Diff:
    """A walk over two schemas side by side, collecting what breaks."""

    def __init__(self, old_defs: Mapping[str, Any], new_defs: Mapping[str, Any]) -> None:
        self.old_defs, self.new_defs = old_defs, new_defs
        self.found: list[str] = []
        #: Pairs of definitions being walked into, so that a recursive model ends the walk.
        self._walking: set[tuple[str, str]] = set()

    def compare(self, old: Mapping[str, Any], new: Mapping[str, Any], path: str) -> None:
        refs = (old.get("$ref", ""), new.get("$ref", ""))
        if not all(refs):
            self._compare(_resolve(old, self.old_defs), _resolve(new, self.new_defs), path)
        elif refs not in self._walking:
            self._walking.add(refs)
            self._compare(_resolve(old, self.old_defs), _resolve(new, self.new_defs), path)
            self._walking.discard(refs)

    def _compare(self, old: Mapping[str, Any], new: Mapping[str, Any], path: str) -> None:
        if _shape(old) != _shape(new):
            self.found.append(f"{path}: type changed from {_kind(old)} to {_kind(new)}")
            return
        for key in ("anyOf", "oneOf", "allOf"):
            branches = old.get(key, []), new.get(key, [])
            if len(branches[0]) != len(branches[1]):
                self.found.append(f"{path}: type changed from {_kind(old)} to {_kind(new)}")
                return
            for a, b in zip(*branches, strict=True):
                self.compare(a, b, path)
        if "properties" in old:
            self._fields(old, new, path)
        for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
            a, b = old.get(key), new.get(key)
            if isinstance(a, Mapping) and isinstance(b, Mapping):
                self.compare(a, b, path + suffix)
            elif a != b:
                self.found.append(f"{path}: {key} changed from {a!r} to {b!r}")
        for key in sorted((old.keys() | new.keys()) - _ANNOTATIONS - _STRUCTURE):
            if old.get(key) != new.get(key):
                self.found.append(f"{path}: {_constraint(key, old.get(key), new.get(key))}")

    def _fields(self, old: Mapping[str, Any], new: Mapping[str, Any], path: str) -> None:
        before, after = old.get("properties", {}), new.get("properties", {})
        required_before, required_after = set(old.get("required", ())), set(
            new.get("required", ()))
        for name in before:
            where = f"{path}.{name}"
            if name not in after:
                self.found.append(f"{where}: removed (consumers on the snapshot need it, and "
                                  "messages already sent carry it)")
                continue
            if name in required_after and name not in required_before:
                self.found.append(f"{where}: now required (messages made without it would "
                                  "be refused)")
            self.compare(before[name], after[name], where)
        for name in after:
            if name not in before and name in required_after:
                self.found.append(f"{path}.{name}: new required field (messages already "
                                  "sent lack it); add it optional, or as a new "
                                  "schema_version")


def _resolve(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    """`schema` with its `$ref` (to `#/$defs/...`) replaced by the definition, keeping any
    keyword written beside the reference."""
    ref = schema.get("$ref")
    if not isinstance(ref, str):
        return schema
    target = defs.get(ref.rsplit("/", 1)[-1])
    if target is None:
        raise ValueError(f"unresolvable reference {ref!r}")
    return {**target, **{k: v for k, v in schema.items() if k != "$ref"}}


def _shape(schema: Mapping[str, Any]) -> object:
    """What kind of value a schema takes, at its top: a type, or a combination of n."""
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return key, len(schema[key])
    kind = schema.get("type")
    return tuple(kind) if isinstance(kind, list) else kind


def _kind(schema: Mapping[str, Any]) -> str:
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " | ".join(_kind(s) for s in schema[key])
    if "const" in schema:
        return json.dumps(schema["const"])
    kind = schema.get("type", "any")
    text = "|".join(kind) if isinstance(kind, list) else str(kind)
    return f"{text} ({schema['format']})" if "format" in schema else text


def _constraint(key: str, old: Any, new: Any) -> str:
    """One constraint's change, and why it breaks."""
    if old is None:
        return f"{key} {new!r} added: {_NARROWED}"
    if new is None:
        return f"{key} {old!r} dropped: {_WIDENED}"
    if key in _LOWER_BOUNDS | _UPPER_BOUNDS and isinstance(old, int | float) \
            and isinstance(new, int | float):
        narrowed = new > old if key in _LOWER_BOUNDS else new < old
        return (f"{key} narrowed from {old!r} to {new!r}: {_NARROWED}" if narrowed
                else f"{key} widened from {old!r} to {new!r}: {_WIDENED}")
    if key == "enum" and isinstance(old, list) and isinstance(new, list):
        if set(map(json.dumps, new)) < set(map(json.dumps, old)):
            return f"enum narrowed from {old!r} to {new!r}: {_NARROWED}"
        if set(map(json.dumps, new)) > set(map(json.dumps, old)):
            return f"enum widened from {old!r} to {new!r}: {_WIDENED}"
    return f"{key} changed from {old!r} to {new!r}: {_EITHER}"
