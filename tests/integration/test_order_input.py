"""What POST /orders makes of hostile or careless input (SQLite and PostgreSQL), and whether
the API's OpenAPI document says what the API does."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from common import events
from common.ops import system_report
from order_service.api import errors, health, orders
from order_service.api.app import create_app
from order_service.api.errors import json_safe
from order_service.domain import fanout, order, timeline, views
from order_service.settings import OrderSettings
from tests.integration.support import FakeRuntime, order_body

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path: Path) -> OrderSettings:
    # Tokens given as None, so a developer's own SHOP_*_TOKEN does not change the tests.
    return OrderSettings(data_dir=tmp_path, api_token=None, operator_token=None)


@pytest.fixture
async def client(runtime: FakeRuntime, settings: OrderSettings
                 ) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(runtime, settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://localhost") as client:
        yield client


def as_json(body: dict[str, Any]) -> str:
    """The body as JSON text, with ASCII escapes, so a test can splice raw tokens into it."""
    return json.dumps(body)


def with_line(**changes: Any) -> dict[str, Any]:
    line = {"sku": "SKU-BOOK-1", "quantity": 2, "unit_price": "19.99", "seller_id": "books"}
    return order_body(lines=[{**line, **changes}])


def with_address(**changes: Any) -> dict[str, Any]:
    address = order_body()["shipping_address"]
    return order_body(shipping_address={**address, **changes})


#: The lines of a huge order: more than Money can hold once added up.
HUGE = [{"sku": "SKU-GOLD", "quantity": 10_000, "unit_price": "999999999999.99",
         "seller_id": "bank"}]

BAD_INPUT = [
    # A total Money cannot hold, computed from valid lines; then non-finite JSON tokens.
    pytest.param(as_json(order_body(lines=HUGE)), "total", "999999999999.99", id="huge-total"),
    pytest.param(as_json(order_body(total="0")).replace('"0"', "NaN"), "total", "finite",
                 id="nan-total"),
    pytest.param(as_json(with_line(quantity=0)).replace(": 0", ": Infinity"),
                 "lines.0.quantity", "integer", id="infinite-quantity"),
    pytest.param(as_json(with_line(unit_price=0)).replace(": 0", ": -Infinity"),
                 "lines.0.unit_price", "finite", id="negative-infinite-price"),
    pytest.param(as_json(order_body(customer_id=0)).replace(": 0", ": NaN"), "customer_id",
                 "string", id="nan-customer"),
    # Text no order holds: a lone surrogate, NUL (PostgreSQL cannot store it), a terminal's
    # escape sequence, C1, bidirectional override and isolate, tab, newline, line separator.
    pytest.param(as_json(order_body(customer_id="c\ud800")), "customer_id", "U+D800",
                 id="lone-surrogate"),
    pytest.param(as_json(order_body(customer_id="c\x00")), "customer_id", "U+0000",
                 id="nul-customer"),
    pytest.param(as_json(with_address(street="1 Row\x00")), "shipping_address.street",
                 "U+0000 (a control character) at position 6", id="nul-street"),
    pytest.param(as_json(with_address(name="Ada\x1b]8;;https://evil\x07")),
                 "shipping_address.name", "U+001B (a control character) at position 4",
                 id="osc-escape"),
    pytest.param(as_json(with_address(city="Ber\x9blin")), "shipping_address.city", "U+009B",
                 id="c1-control"),
    pytest.param(as_json(with_address(name="Ada \u202egnp.exe")), "shipping_address.name",
                 "U+202E (right-to-left override) at position 5", id="bidi-override"),
    pytest.param(as_json(with_address(name="\u2066Ada")), "shipping_address.name",
                 "U+2066", id="bidi-isolate"),
    pytest.param(as_json(with_address(name="Ada\tL")), "shipping_address.name", "U+0009",
                 id="tab"),
    pytest.param(as_json(with_address(street="1 Row\nDrop")), "shipping_address.street",
                 "U+000A", id="newline"),
    pytest.param(as_json(with_address(city="Berlin\u2028")), "shipping_address.city",
                 "U+2028", id="line-separator"),
    pytest.param(as_json(with_line(sku="SKU\x00")), "lines.0.sku", "U+0000", id="nul-sku"),
    # Unknown fields at every level, and coercions.
    pytest.param(as_json(with_line(qty=5)), "lines.0.qty", "Extra", id="unknown-in-line"),
    pytest.param(as_json(with_address(floor=3)), "shipping_address.floor", "Extra",
                 id="unknown-in-address"),
    pytest.param(as_json(with_line(quantity="2")), "lines.0.quantity", "integer",
                 id="quantity-as-text"),
    pytest.param(as_json(with_line(quantity=True)), "lines.0.quantity", "integer",
                 id="quantity-as-bool"),
    pytest.param(as_json(with_line(quantity=2.0)), "lines.0.quantity", "integer",
                 id="quantity-as-float"),
    pytest.param(as_json(with_line(unit_price="2e1")), "lines.0.unit_price", "19.99",
                 id="price-in-exponent-form"),
]


def field_errors(response: httpx.Response) -> dict[str, str]:
    return {".".join(map(str, e["loc"][1:])): e["msg"] for e in response.json()["detail"]}


@pytest.mark.parametrize(("body", "field", "says"), BAD_INPUT)
async def test_bad_input_is_a_field_error_and_places_nothing(
        client: httpx.AsyncClient, runtime: FakeRuntime, body: str, field: str,
        says: str) -> None:
    """Each of these is a 422 naming the field at fault and why, never a server error;
    nothing is stored or published."""
    response = await client.post("/orders", content=body,
                                 headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    errors = field_errors(response)
    assert field in errors, errors
    assert says in errors[field]
    assert runtime.published == []
    assert (await client.get("/orders")).json() == []


async def test_the_echo_of_unserialisable_input_is_escaped(client: httpx.AsyncClient) -> None:
    """The 422 echoes what was sent in a form JSON carries: NaN as its token, a lone
    surrogate as an escape."""
    body = as_json(order_body(customer_id="c\ud800", total="0")).replace('"0"', "NaN")
    response = await client.post("/orders", content=body,
                                 headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    inputs = {e["loc"][-1]: e["input"] for e in response.json()["detail"]}
    assert inputs == {"customer_id": "c\\ud800", "total": "NaN"}


def test_the_echo_carries_anything_a_validator_can_hold() -> None:
    """Non-finite floats, decimals, bytes that are not UTF-8, lone surrogates, any object, and
    nesting past the echo's depth all become JSON that encodes as UTF-8."""
    deep: list[Any] = []
    for _ in range(50):
        deep = [deep]
    echoed = json_safe({"nan": math.nan, "inf": math.inf, "price": Decimal("1.10"),
                        "raw": b"\xffok", "text": "c\ud800", "error": ValueError("no"),
                        "deep": deep})
    json.dumps(echoed, allow_nan=False).encode("utf-8")
    assert {k: v for k, v in echoed.items() if k != "deep"} == {
        "nan": "NaN", "inf": "Infinity", "price": "1.10", "raw": "\\xffok",
        "text": "c\\ud800", "error": "no"}
    assert "..." in json.dumps(echoed["deep"])


async def test_ordinary_unicode_text_is_accepted(client: httpx.AsyncClient,
                                                 runtime: FakeRuntime) -> None:
    """Accents, other scripts (right-to-left too) and emoji joined by ZWJ are names."""
    name = "Zoë Ñúñez 李雷 مريم 👩‍👩‍👧"
    response = await client.post("/orders", json=with_address(name=name))
    assert response.status_code == 202, response.text
    order = (await client.get(response.json()["status_url"])).json()["order"]
    assert order["shipping_address"]["name"] == name
    assert len(runtime.published) == 1


@pytest.mark.parametrize(("body", "says"), [
    pytest.param(b"{not json", "line 1, column 2", id="syntax"),
    pytest.param(as_json(order_body()).replace("Ada", "Ad\udcff").encode(
        "utf-8", "surrogateescape"), "not UTF-8 (byte 0xff", id="not-utf8"),
    pytest.param(b"[" * 5000 + b"]" * 5000, "nested too deeply", id="nested"),
])
async def test_a_body_that_is_not_json_is_400_saying_why(
        client: httpx.AsyncClient, runtime: FakeRuntime, body: bytes, says: str) -> None:
    """No field to name: the request is malformed, and the message says how."""
    response = await client.post("/orders", content=body,
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith("the body is not valid JSON: ")
    assert says in response.json()["detail"]
    assert runtime.published == []


@pytest.mark.parametrize("content_type", ["text/plain", None])
async def test_a_body_not_sent_as_json_is_415(client: httpx.AsyncClient, runtime: FakeRuntime,
                                              content_type: str | None) -> None:
    """A JSON order sent as text/plain (or with no Content-Type, as `curl -d` forgets to
    say) is refused with what to send instead."""
    headers = {"content-type": content_type} if content_type else {}
    response = await client.post("/orders", content=as_json(order_body()).encode(),
                                 headers=headers)
    assert response.status_code == 415, response.text
    assert "Content-Type: application/json" in response.json()["detail"]
    assert runtime.published == []


@pytest.mark.parametrize("method", ["OPTIONS", "PUT", "DELETE"])
async def test_a_method_the_path_lacks_is_405_listing_those_it_has(
        client: httpx.AsyncClient, method: str) -> None:
    """/orders has two routes; Allow names the methods of both, not of the first alone."""
    response = await client.request(method, "/orders")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    by_id = await client.request(method, "/orders/5b0c7f9e-3f7a-4e34-9a57-0d8c1c6b2f10")
    assert by_id.headers["allow"] == "GET"


# --- the OpenAPI document ---------------------------------------------------------------

#: Every model the document can name, by name.
MODELS = {name: cls for module in (events, system_report, order, fanout, views, timeline,
                                   orders, health, errors)
          for name, cls in vars(module).items()
          if isinstance(cls, type) and issubclass(cls, BaseModel)}


def adapter(info: FieldInfo) -> TypeAdapter[Any]:
    """A validator for one field or parameter, its constraints included."""
    # Built at run time from the field's parts, which a type checker cannot follow.
    annotated: Any = Annotated
    form: Any = (annotated[(info.annotation, *info.metadata)] if info.metadata
                 else info.annotation)
    return TypeAdapter(form)


def schema_examples(node: Any) -> list[Any]:
    """The JSON Schema examples anywhere in `node` (say, in the branches of an anyOf)."""
    if isinstance(node, list):
        return [e for item in node for e in schema_examples(item)]
    if not isinstance(node, dict):
        return []
    return [*node.get("examples", []), *(e for key, value in node.items()
                                         if key != "examples" for e in schema_examples(value))]


def media_examples(node: dict[str, Any]) -> list[Any]:
    """The examples of an OpenAPI parameter or media type (`example`, `examples` by name)."""
    named = node.get("examples", {})
    return ([node["example"]] if "example" in node else []) + [
        e["value"] for e in named.values()] + schema_examples(node.get("schema", {}))


def count_examples(node: Any) -> int:
    """How many examples the document holds, wherever they are."""
    if isinstance(node, list):
        return sum(count_examples(item) for item in node)
    if not isinstance(node, dict):
        return 0
    return (("example" in node) + len(node.get("examples", ())) +
            sum(count_examples(v) for k, v in node.items() if k not in ("example", "examples")))


@pytest.fixture
def app(settings: OrderSettings) -> FastAPI:
    return create_app(None, settings)


def test_every_example_in_the_document_is_valid(app: FastAPI) -> None:
    """Each example validates against the model, field, parameter or body it illustrates,
    and none is left unchecked."""
    document = app.openapi()
    checked = 0
    for name, schema in document["components"]["schemas"].items():
        if not schema_examples(schema):
            continue
        model = MODELS[name.removesuffix("-Input").removesuffix("-Output")]
        for example in schema.get("examples", []):
            model.model_validate(example)
            checked += 1
        for prop, sub in schema.get("properties", {}).items():
            for example in schema_examples(sub):
                adapter(model.model_fields[prop]).validate_python(example)
                checked += 1
    for route in app.state.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        params = {p.alias: p.field_info for p in (
            route.dependant.path_params + route.dependant.query_params
            + route.dependant.header_params + route.dependant.cookie_params)}
        for method in route.methods or ():
            operation = document["paths"][route.path_format][method.lower()]
            for param in operation.get("parameters", []):
                for example in media_examples(param):
                    adapter(params[param["name"]]).validate_python(example)
                    checked += 1
            for media in operation.get("requestBody", {}).get("content", {}).values():
                for example in media_examples(media):
                    assert route.body_field is not None
                    adapter(route.body_field.field_info).validate_python(example)
                    checked += 1
    assert checked == count_examples(document) > 0


def sample(schema: dict[str, Any], document: dict[str, Any]) -> Any:
    """The value Swagger UI fills in for `schema`: its first example, else one built from
    its properties' (a default, or a placeholder of the type, where none is given)."""
    if "$ref" in schema:
        return sample(document["components"]["schemas"][schema["$ref"].split("/")[-1]],
                      document)
    if schema.get("examples"):
        return schema["examples"][0]
    if "default" in schema:
        return schema["default"]
    if "anyOf" in schema:
        return sample(next(s for s in schema["anyOf"] if s.get("type") != "null"), document)
    if "properties" in schema:
        return {name: sample(sub, document) for name, sub in schema["properties"].items()}
    if schema.get("type") == "array":
        return [sample(schema["items"], document)]
    return {"string": "string", "integer": 0, "number": 0, "boolean": True}[schema["type"]]


async def test_the_order_the_docs_offer_to_send_places(app: FastAPI,
                                                       client: httpx.AsyncClient) -> None:
    """The body /docs fills in for POST /orders is an order the API accepts, total and all
    (built from the fields' own examples, it had a total that did not add up)."""
    document = app.openapi()
    body = document["paths"]["/orders"]["post"]["requestBody"]["content"]["application/json"]
    example = sample(body["schema"], document)
    response = await client.post("/orders", json=example)
    assert response.status_code == 202, response.text
    assert response.json()["order"]["total"] == example["total"]


def test_the_document_states_money_limits_and_every_refusal(app: FastAPI) -> None:
    """Money's bounds and places are in the schema, unknown fields are refused at every
    level, and POST /orders documents 400, 413, 415 and 422."""
    schemas = app.openapi()["components"]["schemas"]
    price = schemas["NewOrderLine"]["properties"]["unit_price"]
    number, text = (next(b for b in price["anyOf"] if b["type"] == t)
                    for t in ("number", "string"))
    assert (number["minimum"], number["maximum"], number["multipleOf"]) == (
        0, 999999999999.99, 0.01)
    assert text["pattern"] == r"^[0-9]{1,12}(\.[0-9]{1,2})?$"
    assert all(schemas[name]["additionalProperties"] is False
               for name in ("NewOrder", "NewOrderLine", "NewAddress"))
    responses = app.openapi()["paths"]["/orders"]["post"]["responses"]
    assert {"400", "413", "415", "422"} <= responses.keys()
