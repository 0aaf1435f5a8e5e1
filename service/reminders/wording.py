"""The words of a reminder call, per language: the operator's templates (`MESSAGE_TEMPLATES`), and
the wording rendered from them when a reminder is planned (stored on it, so every call of one
reminder says the same).

A language's template has six phrases: `message` (what a person hears, then the keypad `prompt`),
`voicemail` (what a machine gets: no prompt), `prompt` (the keypad question, asked at most twice),
`confirmed` / `declined` (the answer to 1 / 2) and `goodbye` (no usable digit). `message` and
`voicemail` may use `{name}`, `{date}` and `{time}` (the appointment's local date and time, in the
language's own words via Babel's CLDR data); the other phrases take no placeholder.

`MESSAGE_TEMPLATES` is inline JSON or the path of a JSON file: `{"de-DE": "Hallo {name}, …"}` (a
string is the `message`; the voicemail is then the message itself and the other phrases come from
the built-in ones of that language, where there are some) or `{"de-DE": {"message": …, "prompt":
…, …}}` (any phrase not given comes from the built-ins; a language without built-ins must give
all but `voicemail`). Built-in phrases: en, de, fr, es. Languages are BCP 47 tags (`en-US`,
`de-DE`); an appointment's language finds its template by BCP 47 lookup (`de-AT` falls back to
`de`, never to another language).
"""

from __future__ import annotations

import functools
import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.dates import DateTimePattern

from service.reminders.errors import ReminderError

__all__ = [
    "DEFAULT_LANGUAGE", "PHRASES", "PLACEHOLDERS", "MessageTemplates", "Template", "Wording", "normalize_language",
]

DEFAULT_LANGUAGE = "en-US"
PLACEHOLDERS = ("name", "date", "time")
PHRASES = ("message", "voicemail", "prompt", "confirmed", "declined", "goodbye")
_TEMPLATED = ("message", "voicemail")
_MAX_PHRASE = 1000
_TAG = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*")

_BUILT_IN: dict[str, dict[str, str]] = {
    "en": {
        "message": "Hello {name}, this is a reminder of your appointment on {date} at {time}.",
        "prompt": "Press 1 to confirm, press 2 to cancel.",
        "confirmed": "Thank you, your appointment is confirmed. Goodbye.",
        "declined": "Your appointment has been cancelled. Thank you, goodbye.",
        "goodbye": "Thank you. Goodbye.",
    },
    "de": {
        "message": "Hallo {name}, wir erinnern Sie an Ihren Termin am {date} um {time}.",
        "prompt": "Drücken Sie 1, um zu bestätigen, oder 2, um abzusagen.",
        "confirmed": "Vielen Dank, Ihr Termin ist bestätigt. Auf Wiederhören.",
        "declined": "Ihr Termin wurde abgesagt. Vielen Dank, auf Wiederhören.",
        "goodbye": "Vielen Dank. Auf Wiederhören.",
    },
    "fr": {
        "message": "Bonjour {name}, nous vous rappelons votre rendez-vous du {date} à {time}.",
        "prompt": "Appuyez sur 1 pour confirmer, sur 2 pour annuler.",
        "confirmed": "Merci, votre rendez-vous est confirmé. Au revoir.",
        "declined": "Votre rendez-vous a été annulé. Merci, au revoir.",
        "goodbye": "Merci. Au revoir.",
    },
    "es": {
        "message": "Hola {name}, le recordamos su cita del {date} a las {time}.",
        "prompt": "Pulse 1 para confirmar, pulse 2 para cancelar.",
        "confirmed": "Gracias, su cita está confirmada. Adiós.",
        "declined": "Su cita ha sido cancelada. Gracias, adiós.",
        "goodbye": "Gracias. Adiós.",
    },
}


def normalize_language(tag: str) -> str:
    """A BCP 47 tag in its usual case (`de-de` → `de-DE`); ValueError if it is not one Babel knows."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise ReminderError(f"{tag!r} is not a BCP 47 language tag (e.g. en-US, de-DE)")
    parts = tag.split("-")
    normalized = "-".join([parts[0].lower()] + [p.upper() if len(p) == 2 else p.title() if len(p) == 4 else p
                                                for p in parts[1:]])
    _locale(normalized)
    return normalized


def _locale(tag: str) -> Locale:
    try:
        return Locale.parse(tag, sep="-")
    except (UnknownLocaleError, ValueError) as error:
        raise ReminderError(f"{tag!r}: unknown language ({error})") from None


def _check_phrase(language: str, name: str, text: object) -> str:
    if not isinstance(text, str) or not text.strip() or len(text) > _MAX_PHRASE:
        raise ReminderError(f"{language}.{name}: must be a non-empty string of at most {_MAX_PHRASE} characters")
    allowed = PLACEHOLDERS if name in _TEMPLATED else ()
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as error:
        raise ReminderError(f"{language}.{name}: {error} (write a literal brace as {{{{ or }}}})") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in allowed or spec or conversion:
            known = ", ".join("{" + p + "}" for p in allowed) or "none"
            raise ReminderError(f"{language}.{name}: unknown placeholder {{{field}}} (allowed: {known})")
    return text


@dataclass(frozen=True)
class Wording:
    """The rendered words of one reminder's calls (stored on the reminder as JSON)."""

    language: str
    message: str
    voicemail: str
    prompt: str
    confirmed: str
    declined: str
    goodbye: str

    def to_json(self) -> dict[str, str]:
        # spelled out: dataclasses.asdict deep-copies, a cost on every create
        return {"language": self.language, "message": self.message, "voicemail": self.voicemail, "prompt": self.prompt,
                "confirmed": self.confirmed, "declined": self.declined, "goodbye": self.goodbye}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Wording:
        return cls(**{f.name: str(data[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class Template:
    """One language's phrases, unrendered (validated when built)."""

    language: str
    message: str
    voicemail: str
    prompt: str
    confirmed: str
    declined: str
    goodbye: str

    @classmethod
    def build(cls, language: str, given: str | Mapping[str, object]) -> Template:
        language = normalize_language(language)
        phrases: dict[str, object] = {"message": given} if isinstance(given, str) else dict(given)
        unknown = set(phrases) - set(PHRASES)
        if unknown:
            raise ReminderError(f"{language}: unknown phrase(s) {sorted(unknown)} (known: {', '.join(PHRASES)})")
        built_in = _BUILT_IN.get(language.split("-")[0], {})
        merged = {**built_in, **phrases}
        merged.setdefault("voicemail", merged.get("message", ""))
        missing = [name for name in PHRASES if name not in merged]
        if missing:
            raise ReminderError(f"{language}: no built-in phrases for this language; give {', '.join(missing)}")
        return cls(language=language, **{name: _check_phrase(language, name, merged[name]) for name in PHRASES})

    @functools.cached_property
    def _calendar(self) -> tuple[Locale, DateTimePattern, DateTimePattern]:
        """The language's locale with its full date and short time patterns, looked up once."""
        locale = _locale(self.language)
        return locale, locale.date_formats["full"], locale.time_formats["short"]

    def render(self, name: str, starts_at: datetime, timezone: str) -> Wording:
        """The words for a customer and an appointment time (shown in `timezone`)."""
        local = starts_at.astimezone(ZoneInfo(timezone))
        locale, date_pattern, time_pattern = self._calendar
        # what babel's format_date(format="full") and format_time(format="short") write, without
        # their locale and pattern lookups on every call
        day = local.date()
        values = {"name": name, "date": date_pattern.apply(day, locale),
                  # CLDR puts a narrow no-break space before AM/PM: plain text for the speech engines
                  "time": time_pattern.apply(local.timetz(), locale, reference_date=day).replace("\u202f", " ")}
        return Wording(
            language=self.language,
            message=self.message.format(**values),
            voicemail=self.voicemail.format(**values),
            prompt=self.prompt,
            confirmed=self.confirmed,
            declined=self.declined,
            goodbye=self.goodbye,
        )


class MessageTemplates:
    """The templates the service speaks, by language, and its default language."""

    def __init__(self, templates: Mapping[str, Template], default_language: str = DEFAULT_LANGUAGE) -> None:
        self._templates = {language.lower(): template for language, template in templates.items()}
        self.default_language = normalize_language(default_language)
        if self.find(self.default_language) is None:
            raise ReminderError(f"DEFAULT_LANGUAGE {self.default_language} has no template in MESSAGE_TEMPLATES")

    @classmethod
    def parse(cls, setting: str | None, default_language: str = DEFAULT_LANGUAGE) -> MessageTemplates:
        """From MESSAGE_TEMPLATES (inline JSON or a file path; None: the built-in English only)."""
        if setting is None or not setting.strip():
            return cls({DEFAULT_LANGUAGE: Template.build(DEFAULT_LANGUAGE, {})}, default_language)
        text = setting.strip()
        if not text.startswith(("{", "[")):
            try:
                text = Path(text).read_text(encoding="utf-8")
            except OSError as error:
                raise ReminderError(f"cannot read the templates file {setting!r}: {error.strerror}") from None
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ReminderError(f"not valid JSON: {error}") from None
        if not isinstance(data, dict) or not data:
            raise ReminderError('must be a JSON object of language → template, e.g. {"en-US": "Hello {name}, …"}')
        templates: dict[str, Template] = {}
        for language, given in data.items():
            if not isinstance(given, str | dict):
                raise ReminderError(f"{language}: a template is a string or an object of phrases")
            template = Template.build(language, given)
            templates[template.language] = template
        return cls(templates, default_language)

    @property
    def languages(self) -> list[str]:
        return sorted(template.language for template in self._templates.values())

    def find(self, language: str) -> Template | None:
        """The template for `language` by BCP 47 lookup (`de-AT` → `de-AT`, else `de`)."""
        parts = language.lower().split("-")
        while parts:
            template = self._templates.get("-".join(parts))
            if template is not None:
                return template
            parts.pop()
        return None

    def supports(self, language: str) -> bool:
        return self.find(language) is not None

    def render(self, language: str, name: str, starts_at: datetime, timezone: str) -> Wording:
        """The wording for an appointment; LookupError if `language` has no template."""
        template = self.find(language)
        if template is None:
            raise LookupError(f"no message template for language {language}")
        return template.render(name, starts_at, timezone)
