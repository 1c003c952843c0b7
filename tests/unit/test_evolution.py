"""Evolution guard: the events match their committed wire schemas, and the guard names each
change that would break a message already sent, or a consumer not yet upgraded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
from pydantic import BaseModel, Field

from common import contracts, evolution
from common.events import Event
from common.kit import discovery

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_every_event_is_compatible_with_its_committed_snapshot() -> None:
    """Each event of common.events (and any an installed service declares) has a snapshot of
    its schema_version in docs/events/, and no change to it breaks a message on the wire.

    When this fails: make the change additive (a new optional field), or give the event a
    new schema_version; then `shop events snapshot` writes its snapshot.
    """
    problems = [problem
                for event in contracts.all_events(discovery.services().values())
                for problem in evolution.check(event, ROOT / evolution.SNAPSHOTS)]
    assert problems == []


# --- the guard itself, on small models ----------------------------------------------------

class Part(BaseModel):
    code: str = Field(max_length=16)


class Thing(BaseModel):
    """The snapshot: what messages on the wire were made to."""

    sku: str = Field(min_length=1, max_length=64, description="The SKU.")
    quantity: int = Field(ge=1)
    note: str | None = None
    kind: Literal["a", "b", "c"] = "a"
    part: Part
    parts: list[Part] = []


def changes(new: type[BaseModel]) -> list[str]:
    return evolution.breaking_changes(Thing.model_json_schema(), new.model_json_schema(),
                                      "Thing")


def test_an_optional_field_added_and_new_words_pass() -> None:
    """Additive: a new optional field (top level or nested), a new description or example;
    a required field given a default (producers still write it)."""

    class PartV2(BaseModel):
        code: str = Field(max_length=16, description="Now described.")
        colour: str | None = None

    class ThingV2(BaseModel):
        sku: str = Field(min_length=1, max_length=64, description="Reworded.",
                         examples=["SKU-1"])
        quantity: int = Field(1, ge=1)
        note: str | None = None
        kind: Literal["a", "b", "c"] = "a"
        part: PartV2
        parts: list[PartV2] = []
        gift_wrap: bool | None = None

    assert changes(ThingV2) == []


def test_a_removed_field_is_named() -> None:
    """A field gone, even an optional one: readers on the snapshot need it."""

    class ThingV2(BaseModel):
        sku: str = Field(min_length=1, max_length=64)
        quantity: int = Field(ge=1)
        kind: Literal["a", "b", "c"] = "a"
        part: Part
        parts: list[Part] = []

    assert [c.split(":")[0] for c in changes(ThingV2)] == ["Thing.note"]
    assert "removed" in changes(ThingV2)[0]


def test_a_changed_type_is_named() -> None:
    """integer to string; a type that now takes null (old readers refuse it)."""

    class ThingV2(BaseModel):
        sku: str | None = Field(None, min_length=1, max_length=64)
        quantity: str
        note: str | None = None
        kind: Literal["a", "b", "c"] = "a"
        part: Part
        parts: list[Part] = []

    assert changes(ThingV2) == [
        "Thing.sku: type changed from string to string | null",
        "Thing.quantity: type changed from integer to string",
    ]


def test_a_new_required_field_is_named() -> None:
    """Messages already sent lack it: refused by a reader that needs it; so is a field
    that was optional and is now required."""

    class ThingV2(BaseModel):
        sku: str = Field(min_length=1, max_length=64)
        quantity: int = Field(ge=1)
        note: str | None
        kind: Literal["a", "b", "c"] = "a"
        part: Part
        parts: list[Part] = []
        carrier: str

    found = changes(ThingV2)
    assert [c.split(":")[0] for c in found] == ["Thing.note", "Thing.carrier"]
    assert "now required" in found[0]
    assert "new required field" in found[1]


def test_a_narrowed_constraint_is_named_deep_in_the_message() -> None:
    """A shorter maximum, a higher minimum, fewer allowed values, at the top, in a nested
    model and in a list's items."""

    class PartV2(BaseModel):
        code: str = Field(max_length=8)

    class ThingV2(BaseModel):
        sku: str = Field(min_length=1, max_length=32)
        quantity: int = Field(ge=2)
        note: str | None = None
        kind: Literal["a", "b"] = "a"
        part: PartV2
        parts: list[PartV2] = []

    found = changes(ThingV2)
    assert [c.split(":")[0] for c in found] == [
        "Thing.sku", "Thing.quantity", "Thing.kind", "Thing.part.code", "Thing.parts[].code"]
    assert all("narrowed" in c for c in found), found
    assert "maxLength narrowed from 64 to 32" in found[0]


def test_a_widened_constraint_is_named_too() -> None:
    """A longer maximum: consumers on the snapshot would refuse the longer values."""

    class ThingV2(BaseModel):
        sku: str = Field(min_length=1, max_length=128)
        quantity: int = Field(ge=1)
        note: str | None = None
        kind: Literal["a", "b", "c"] = "a"
        part: Part
        parts: list[Part] = []

    assert changes(ThingV2) == [
        "Thing.sku: maxLength widened from 64 to 128: consumers on the snapshot would "
        "refuse what it now allows"]


# --- snapshots ------------------------------------------------------------------------------

class Shipped(Event):
    routing: ClassVar[str] = "test.shipped"
    event_type: Literal["Shipped"] = "Shipped"
    carrier: str = Field(max_length=64)


class ShippedWithNote(Event):
    routing: ClassVar[str] = "test.shipped"
    event_type: Literal["Shipped"] = "Shipped"
    carrier: str = Field(max_length=64)
    note: str | None = None


class ShippedRenamed(Event):
    routing: ClassVar[str] = "test.shipped"
    event_type: Literal["Shipped"] = "Shipped"
    company: str = Field(max_length=64)


class ShippedV2(ShippedRenamed):
    schema_version: int = Field(default=2, ge=1)


def read(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def test_snapshots_are_written_then_kept_additive(tmp_path: Path) -> None:
    """A new event gets Shipped.v1.json; an additive change updates it (the new field is
    guarded from then on); a breaking one is refused, naming the field, and leaves the file;
    a new schema_version gets a file of its own."""
    first = evolution.write_snapshots(tmp_path, [Shipped])
    path = tmp_path / "Shipped.v1.json"
    assert first.written == [str(path)]
    assert read(path) == evolution.wire_schema(Shipped)
    assert evolution.write_snapshots(tmp_path, [Shipped]).unchanged == [str(path)]

    assert evolution.write_snapshots(tmp_path, [ShippedWithNote]).written == [str(path)]
    assert "note" in read(path)["properties"]

    refused = evolution.write_snapshots(tmp_path, [ShippedRenamed])
    assert refused.written == []
    assert [r.split(":")[0] for r in refused.refused] == [
        "Shipped.carrier", "Shipped.note", "Shipped.company"]
    assert read(path) == evolution.wire_schema(ShippedWithNote)
    assert evolution.check(ShippedRenamed, tmp_path) == refused.refused

    assert evolution.check(ShippedV2, tmp_path)[0].startswith(
        "Shipped: no snapshot of schema_version 2")
    assert evolution.write_snapshots(tmp_path, [ShippedV2]).written == [
        str(tmp_path / "Shipped.v2.json")]
    assert evolution.check(ShippedV2, tmp_path) == []


def test_shop_events_snapshot_refuses_a_breaking_change(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """The command writes every snapshot, and exits 1 naming the field when a model no
    longer fits the snapshot of its version, leaving that snapshot as it was."""
    from typer.testing import CliRunner

    from common.ops import cli

    monkeypatch.setattr(discovery, "services", dict)
    written = CliRunner().invoke(cli.app, ["events", "snapshot", "--dir", str(tmp_path)])
    assert written.exit_code == 0, written.output
    assert {p.name for p in tmp_path.iterdir()} == {
        p.name for p in (ROOT / evolution.SNAPSHOTS).iterdir()}
    path = tmp_path / "OrderPlaced.v1.json"
    old = read(path)
    del old["properties"]["customer_id"]
    path.write_text(json.dumps(old), encoding="utf-8")

    refused = CliRunner().invoke(cli.app, ["events", "snapshot", "--dir", str(tmp_path)])
    assert refused.exit_code == 1
    assert "OrderPlaced.customer_id: new required field" in refused.stderr
    assert read(path) == old


class Node(BaseModel):
    name: str
    children: list[Node] = []


def test_a_recursive_model_is_compared_to_its_end() -> None:
    """A model that contains itself: the walk ends, and a change deep inside is named."""

    class NodeV2(BaseModel):
        name: str = Field(max_length=10)
        children: list[NodeV2] = []

    assert evolution.breaking_changes(Node.model_json_schema(), NodeV2.model_json_schema(),
                                      "Node") == [
        "Node.name: maxLength 10 added: messages already sent may not meet it"]
