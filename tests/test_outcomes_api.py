"""The API side of outcomes and confirmation, on SQLite and PostgreSQL: an appointment's language
(a template is required: 422 otherwise), the wording fixed at planning, the `confirmation` filter."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from service.db import Appointment, Reminder
from tests.support.appclient import make_settings, running_app

pytestmark = pytest.mark.anyio

TEMPLATES = json.dumps({"en-US": {}, "de-DE": "Hallo {name}, Ihr Termin ist am {date} um {time}."})


def body(**overrides: object) -> dict:
    starts = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    data = {"customer_name": "Jörg", "phone": "+14155552671", "starts_at": starts.isoformat(),
            "timezone": "Europe/Berlin"}
    data.update(overrides)
    return data


@pytest.fixture
async def api(database_url: str, etcd_endpoint: str):
    async with running_app(make_settings(database_url, etcd_endpoint, message_templates=TEMPLATES)) as client:
        yield client


async def wordings(api, appointment_id: str) -> dict[str, dict]:
    async with api.app.state.db.session() as session:
        rows = await session.execute(select(Reminder.id, Reminder.wording)
                                     .where(Reminder.appointment_id == appointment_id))
        return {row.id: row.wording for row in rows}


async def test_language_defaults_and_the_wording_is_fixed_at_planning(api) -> None:
    english = (await api.post("/appointments", json=body())).json()
    assert english["language"] == "en-US" and english["confirmation"] is None
    german = await api.post("/appointments", json=body(language="de-de"))
    assert german.status_code == 201, german.text
    german = german.json()
    assert german["language"] == "de-DE"
    (wording,) = (await wordings(api, german["id"])).values()
    assert wording["language"] == "de-DE" and wording["message"].startswith("Hallo Jörg, Ihr Termin ist am ")
    assert wording["prompt"].startswith("Drücken Sie 1")
    (english_wording,) = (await wordings(api, english["id"])).values()
    assert english_wording["message"].startswith("Hello Jörg, this is a reminder")


async def test_a_language_without_a_template_is_422_naming_the_field(api) -> None:
    for language in ("fr-FR", "de-AT", "klingon!", "", 7):
        response = await api.post("/appointments", json=body(language=language))
        assert response.status_code == 422, (language, response.text)
        assert any(item["loc"][-1] == "language" for item in response.json()["detail"]), response.text
    created = (await api.post("/appointments", json=body())).json()
    for patch in ({"language": "fr-FR"}, {"language": None}):
        response = await api.patch(f"/appointments/{created['id']}", json=patch)
        assert response.status_code == 422 and "language" in response.text


async def test_changing_the_language_re_plans_with_new_words(api) -> None:
    created = (await api.post("/appointments", json=body())).json()
    (old,) = created["reminders"]
    changed = (await api.patch(f"/appointments/{created['id']}", json={"language": "de-DE"})).json()
    assert changed["language"] == "de-DE"
    by_id = {r["id"]: r for r in changed["reminders"]}
    assert old["id"] not in by_id  # never claimed: pruned by the re-plan (decision 0125)
    (new_id,) = [rid for rid, r in by_id.items() if r["status"] == "pending"]
    assert (await wordings(api, created["id"]))[new_id]["message"].startswith("Hallo")


async def test_list_filters_by_confirmation_and_a_new_time_clears_it(api) -> None:
    ids = [(await api.post("/appointments", json=body())).json()["id"] for _ in range(3)]
    async with api.app.state.db.session() as session:
        for appointment_id, answer in zip(ids, ("confirmed", "declined"), strict=False):
            await session.execute(update(Appointment).where(Appointment.id == appointment_id)
                                  .values(confirmation=answer))
        await session.commit()
    for answer, expected in (("confirmed", [ids[0]]), ("declined", [ids[1]])):
        listed = (await api.get("/appointments", params={"confirmation": answer})).json()["items"]
        assert [a["id"] for a in listed] == expected and listed[0]["confirmation"] == answer
    assert len((await api.get("/appointments")).json()["items"]) == 3
    assert (await api.get("/appointments", params={"confirmation": "maybe"})).status_code == 422
    unchanged = (await api.patch(f"/appointments/{ids[0]}", json={"notes": "parking at the back"})).json()
    assert unchanged["confirmation"] == "confirmed"
    later = (datetime.now(UTC) + timedelta(days=4)).replace(microsecond=0).isoformat()
    moved = (await api.patch(f"/appointments/{ids[0]}", json={"starts_at": later})).json()
    assert moved["confirmation"] is None  # confirmed for the old time, not the new one
