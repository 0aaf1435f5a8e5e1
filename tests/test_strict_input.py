"""Strict input (issue 24), on SQLite and PostgreSQL: times are ISO 8601 with an offset and nothing
else, zones come from the zone database's list (not from files on the host), integers in query
strings are plain digits, names have something visible to say and nothing that reorders or
controls it; the OpenAPI documents the range and its examples are accepted. Each refusal is a 422
naming the field in `loc`, and stores nothing."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from importlib import resources

import pytest
from pydantic import TypeAdapter, ValidationError

from service.api.schemas import IANA_ZONES, CustomerName, Notes
from service.config import Settings
from tests.support.appclient import body, future, make_settings, running_app

pytestmark = pytest.mark.anyio

UNIX_TIME = "1798765432"  # 2027-01-01 as a Unix timestamp: pydantic alone reads it as a time


@pytest.fixture
async def api(database_url: str, etcd_endpoint: str):
    async with running_app(make_settings(database_url, etcd_endpoint)) as client:
        yield client


def _locs(response) -> list[list]:
    return [item["loc"] for item in response.json()["detail"]]


# (loc, the body's change)
BAD_BODIES = [
    (["body", "starts_at"], {"starts_at": UNIX_TIME}),
    (["body", "starts_at"], {"starts_at": 1798765432}),
    (["body", "starts_at"], {"starts_at": 1798765432.5}),
    (["body", "starts_at"], {"starts_at": "2031-01-01T10:00:00"}),  # naive
    (["body", "starts_at"], {"starts_at": "2031-01-01 10:00:00Z"}),  # a space for T
    (["body", "starts_at"], {"starts_at": "2031-01-01T10:00:00+0100"}),  # basic-format offset
    (["body", "starts_at"], {"starts_at": "2031-01-01T10:00:00,5Z"}),
    (["body", "starts_at"], {"starts_at": "2031-01-01"}),
    (["body", "starts_at"], {"starts_at": "２０３１-01-01T10:00:00Z"}),  # fullwidth digits
    (["body", "starts_at"], {"starts_at": "2031-01-01T10:00:00Z\n"}),
    (["body", "remind_at", 0], {"remind_at": [UNIX_TIME]}),
    (["body", "remind_at", 1], {"remind_at": [future(days=1), "1798765432"]}),
    (["body", "timezone"], {"timezone": "localtime"}),
    (["body", "timezone"], {"timezone": "posixrules"}),
    (["body", "timezone"], {"timezone": "Factory"}),
    (["body", "timezone"], {"timezone": "right/UTC"}),
    (["body", "timezone"], {"timezone": "posix/Europe/Berlin"}),
    (["body", "timezone"], {"timezone": "europe/berlin"}),
    (["body", "customer_name"], {"customer_name": "   "}),
    (["body", "customer_name"], {"customer_name": "\u3000\u00a0\u200b\ufeff"}),  # spaces and zero widths
    (["body", "customer_name"], {"customer_name": "\u3164"}),  # a Hangul filler
    (["body", "customer_name"], {"customer_name": "Ada\x07"}),
    (["body", "customer_name"], {"customer_name": "Ada\x1b[2J"}),
    (["body", "customer_name"], {"customer_name": "Ada\nLovelace"}),
    (["body", "customer_name"], {"customer_name": "Ada\u2028Lovelace"}),
    (["body", "customer_name"], {"customer_name": "Ada\x85"}),  # C1
    (["body", "customer_name"], {"customer_name": "Ada \u202eecalevoL"}),  # right-to-left override
    (["body", "customer_name"], {"customer_name": "\u2067Ada\u2069"}),  # isolate
    (["body", "customer_name"], {"customer_name": "Ada\u200f"}),  # RLM
    (["body", "customer_name"], {"customer_name": "Ada\u061c"}),  # Arabic letter mark
    (["body", "notes"], {"notes": "door code \x1b[31m4711"}),
    (["body", "notes"], {"notes": "\u202egnp.exe"}),
    (["body", "notes"], {"notes": "a\x00b"}),
]


async def test_a_bad_value_is_a_422_on_its_field_and_stores_nothing(api) -> None:
    for loc, change in BAD_BODIES:
        response = await api.post("/appointments", json=body(**change))
        assert response.status_code == 422, (change, response.text)
        assert _locs(response) == [loc], change
    assert (await api.get("/appointments")).json()["items"] == []


async def test_patch_takes_the_same_rules(api) -> None:
    created = (await api.post("/appointments", json=body())).json()
    path = f"/appointments/{created['id']}"
    before = (await api.get(path)).json()
    for change, loc in [({"starts_at": UNIX_TIME}, ["body", "starts_at"]),
                        ({"remind_at": [UNIX_TIME]}, ["body", "remind_at", 0]),
                        ({"timezone": "localtime"}, ["body", "timezone"]),
                        ({"customer_name": " \t"}, ["body", "customer_name"]),
                        ({"customer_name": "A\u202dB"}, ["body", "customer_name"]),
                        ({"notes": "\x08"}, ["body", "notes"])]:
        response = await api.patch(path, json=change)
        assert response.status_code == 422, (change, response.text)
        assert _locs(response) == [loc], change
    assert (await api.get(path)).json() == before


BAD_QUERIES = [
    ({"starts_after": UNIX_TIME}, ["query", "starts_after"]),
    ({"starts_before": "2030-01-01T00:00:00"}, ["query", "starts_before"]),
    ({"starts_after": "2030-01-01T00:00:00+0000"}, ["query", "starts_after"]),
    *(({"limit": text}, ["query", "limit"])
      for text in ("5_0", "+5", " 5", "5 ", "5.0", "0x10", "\u0665", "", "9" * 5000)),  # \u0665: an Arabic-Indic 5
]


async def test_query_values_are_plain(api) -> None:
    for params, loc in BAD_QUERIES:
        response = await api.get("/appointments", params=params)
        assert response.status_code == 422, (params, response.text)
        assert _locs(response) == [loc], params


async def test_what_the_rules_keep_accepting(api) -> None:
    names = ["Zoë Ñandú", "محمد عبد الله", "李小龍", "O'Brien-Smith", "👩\u200d⚕️ Dr. Ana", "Ada  Lovelace ", "x"]
    for name in names:
        response = await api.post("/appointments", json=body(customer_name=name))
        assert response.status_code == 201, (name, response.text)
        assert response.json()["customer_name"] == name
    day = (datetime.now(UTC) + timedelta(days=30)).date().isoformat()
    for starts_at, zone in [(f"{day}T15:00+01:00", "Europe/Berlin"), (f"{day}t15:00:00z", "UTC"),
                            (f"{day}T15:00:00.123456789-03:00", "America/Argentina/Buenos_Aires"),
                            (f"{day}T15:00:00+05:30", "Asia/Kolkata"), (f"{day}T15:00:00-00:00", "Etc/GMT+5"),
                            (f"{day}T15:00:00Z", "US/Eastern")]:
        response = await api.post("/appointments", json=body(starts_at=starts_at, timezone=zone,
                                                             notes="line one\nline two\r\n\ttabbed\u2028"))
        assert response.status_code == 201, (starts_at, zone, response.text)
    page = await api.get("/appointments", params={"limit": "005", "starts_after": f"{day}T00:00:00Z"})
    assert page.status_code == 200 and len(page.json()["items"]) == 5


async def test_the_date_range_is_enforced_and_documented(api) -> None:
    assert (await api.post("/appointments", json=body(starts_at=future(days=3650)))).status_code == 201
    beyond = await api.post("/appointments", json=body(starts_at=future(days=3661)))
    assert beyond.status_code == 422 and _locs(beyond) == [["body", "starts_at"]]
    assert "3,660 days" in beyond.json()["detail"][0]["msg"]
    past = await api.get("/appointments", params={"starts_after": "1970-12-31T23:59:59Z"})
    assert past.status_code == 422 and _locs(past) == [["query", "starts_after"]]
    schema = api.app.openapi()  # API_DOCS is off by default: the document without its route
    create = schema["components"]["schemas"]["AppointmentCreate"]["properties"]
    items = create["remind_at"]["anyOf"][0]["items"]
    params = {p["name"]: p for p in schema["paths"]["/appointments"]["get"]["parameters"]}
    for documented in (create["starts_at"], items, params["starts_after"], params["starts_before"]):
        assert "1971-01-01 to 3,660 days (10 years) from now" in documented["description"]
    assert "Plain digits" in params["limit"]["description"]
    assert params["limit"]["schema"]["minimum"] == 1 and params["limit"]["schema"]["maximum"] == 500


async def test_the_documents_examples_are_accepted_by_the_default_configuration(database_url: str,
                                                                                etcd_endpoint: str) -> None:
    default_window = Settings.model_fields["call_window"].default  # the test settings call all day
    async with running_app(make_settings(database_url, etcd_endpoint, call_window=default_window)) as api:
        await _post_the_examples(api)


async def _post_the_examples(api) -> None:
    schema = api.app.openapi()  # API_DOCS is off by default: the document without its route
    create = schema["components"]["schemas"]["AppointmentCreate"]["properties"]

    def example(prop: dict) -> object:
        return (prop.get("examples") or next(a for a in prop["anyOf"] if "examples" in a)["examples"])[0]

    sample = {name: example(create[name]) for name in ("customer_name", "phone", "starts_at", "timezone", "language")}
    sample["remind_at"] = [create["remind_at"]["anyOf"][0]["items"]["examples"][0]]
    assert datetime.fromisoformat(sample["starts_at"]) > datetime.now(UTC) + timedelta(days=365)
    response = await api.post("/appointments", json=sample)
    assert response.status_code == 201, (sample, response.text)
    assert [r["status"] for r in response.json()["reminders"]] == ["pending"]


def test_the_zones_are_the_zone_databases_list_on_every_host() -> None:
    listed = set(resources.files("tzdata").joinpath("zones").read_text().split())
    assert IANA_ZONES == listed - {"Factory"}
    assert {"Europe/Berlin", "UTC", "America/Argentina/Buenos_Aires", "US/Eastern"} <= IANA_ZONES
    assert not {"localtime", "posixrules", "Factory", "right/UTC", "posix/UTC"} & IANA_ZONES


@pytest.mark.parametrize("rule", [CustomerName, Notes], ids=["customer_name", "notes"])
def test_the_documents_pattern_is_the_rule(rule) -> None:
    """What the OpenAPI's pattern allows, the validator accepts, and the reverse (decision 0113):
    every BMP character alone, after a visible one and between spaces."""
    adapter = TypeAdapter(rule)
    published = adapter.json_schema()["pattern"]
    assert published.endswith("$")
    pattern = re.compile(published[:-1] + r"\Z")  # JSON Schema's (ECMA 262) `$`: the end, not before a final \n

    def accepted(text: str) -> bool:
        try:
            adapter.validate_python(text)
        except ValidationError:
            return False
        return True

    for code in range(0x10000):
        if 0xD800 <= code <= 0xDFFF:
            continue  # not text: JSON with a lone surrogate is refused before any rule (string_unicode)
        for text in (chr(code), "Ab" + chr(code), " " + chr(code) + " "):
            assert bool(pattern.search(text)) == accepted(text), (hex(code), text)
