"""The words of a reminder call, per language: the operator's templates (`MESSAGE_TEMPLATES`), and
the wording rendered from them when a reminder is planned (stored on it, so every call of one
reminder says the same).

A language's template has eight phrases: `message` (what a person hears, then the keypad
question), `voicemail` (what a machine gets: no question), `prompt` (the keypad question, asked at
most twice) followed by `opt_out` (the offer to be called no more, with `{digit}`, the key
OPT_OUT_DIGIT), `confirmed` / `declined` / `opted_out` (the answer to 1 / 2 / the opt-out key)
and `goodbye` (no usable key). `message` and `voicemail` may use `{name}`, `{date}` and `{time}`
(the appointment's local date and time, in the language's own words via Babel's CLDR data);
`opt_out` must use `{digit}`; the other phrases take no placeholder.

`MESSAGE_TEMPLATES` is inline JSON or the path of a JSON file: `{"de-DE": "Hallo {name}, …"}` (a
string is the `message`; the voicemail is then the message itself and the other phrases come from
the built-in ones of that language, where there are some) or `{"de-DE": {"message": …, "prompt":
…, …}}` (any phrase not given comes from the built-ins; a language without built-ins must give
all but `voicemail`). Built-in phrases: en, de, fr, es. Languages are BCP 47 tags (`en-US`,
`de-DE`); an appointment's language finds its template by BCP 47 lookup (`de-AT` falls back to
`de`, never to another language).

The opt-out key announced is stored with the wording and is the one honoured. A wording stored
before the opt-out existed takes the built-in offer of its language (English where there is none)
with the key `9`.
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
    "DEFAULT_LANGUAGE", "DEFAULT_OPT_OUT_DIGIT", "OPT_OUT_DIGITS", "PHRASES", "PLACEHOLDERS", "MessageTemplates",
    "Template", "Wording", "check_opt_out_digit", "normalize_language",
]

DEFAULT_LANGUAGE = "en-US"
PLACEHOLDERS = ("name", "date", "time")
PHRASES = ("message", "voicemail", "prompt", "opt_out", "confirmed", "declined", "opted_out", "goodbye")
_TEMPLATED = ("message", "voicemail")
# The keys an opt-out may use: one digit, never 1 or 2 (confirm, decline); `*` and `#` end a
# provider's gather on some keypads.
OPT_OUT_DIGITS = "03456789"
DEFAULT_OPT_OUT_DIGIT = "9"
_DIGIT = "digit"
_MAX_PHRASE = 1000
_TAG = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*")

_BUILT_IN: dict[str, dict[str, str]] = {
    "en": {
        "message": "Hello {name}, this is a reminder of your appointment on {date} at {time}.",
        "prompt": "Press 1 to confirm, press 2 to cancel.",
        "opt_out": "To receive no more reminder calls, press {digit}.",
        "confirmed": "Thank you, your appointment is confirmed. Goodbye.",
        "declined": "Your appointment has been cancelled. Thank you, goodbye.",
        "opted_out": "You will receive no more reminder calls from us. Goodbye.",
        "goodbye": "Thank you. Goodbye.",
    },
    "de": {
        "message": "Hallo {name}, wir erinnern Sie an Ihren Termin am {date} um {time}.",
        "prompt": "Drücken Sie 1, um zu bestätigen, oder 2, um abzusagen.",
        "opt_out": "Wenn Sie keine Erinnerungsanrufe mehr wünschen, drücken Sie {digit}.",
        "confirmed": "Vielen Dank, Ihr Termin ist bestätigt. Auf Wiederhören.",
        "declined": "Ihr Termin wurde abgesagt. Vielen Dank, auf Wiederhören.",
        "opted_out": "Sie erhalten keine Erinnerungsanrufe mehr von uns. Auf Wiederhören.",
        "goodbye": "Vielen Dank. Auf Wiederhören.",
    },
    "fr": {
        "message": "Bonjour {name}, nous vous rappelons votre rendez-vous du {date} à {time}.",
        "prompt": "Appuyez sur 1 pour confirmer, sur 2 pour annuler.",
        "opt_out": "Pour ne plus recevoir d'appels de rappel, appuyez sur {digit}.",
        "confirmed": "Merci, votre rendez-vous est confirmé. Au revoir.",
        "declined": "Votre rendez-vous a été annulé. Merci, au revoir.",
        "opted_out": "Vous ne recevrez plus d'appels de rappel de notre part. Au revoir.",
        "goodbye": "Merci. Au revoir.",
    },
    "es": {
        "message": "Hola {name}, le recordamos su cita del {date} a las {time}.",
        "prompt": "Pulse 1 para confirmar, pulse 2 para cancelar.",
        "opt_out": "Para no recibir más llamadas de recordatorio, pulse {digit}.",
        "confirmed": "Gracias, su cita está confirmada. Adiós.",
        "declined": "Su cita ha sido cancelada. Gracias, adiós.",
        "opted_out": "No recibirá más llamadas de recordatorio de nuestra parte. Adiós.",
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


def check_opt_out_digit(digit: str) -> str:
    """OPT_OUT_DIGIT: one key of OPT_OUT_DIGITS (never 1 or 2)."""
    if not isinstance(digit, str) or len(digit) != 1 or digit not in OPT_OUT_DIGITS:
        raise ReminderError(f"must be one digit of {', '.join(OPT_OUT_DIGITS)} (1 confirms, 2 declines)")
    return digit


def _check_phrase(language: str, name: str, text: object) -> str:
    if not isinstance(text, str) or not text.strip() or len(text) > _MAX_PHRASE:
        raise ReminderError(f"{language}.{name}: must be a non-empty string of at most {_MAX_PHRASE} characters")
    allowed = PLACEHOLDERS if name in _TEMPLATED else (_DIGIT,) if name == "opt_out" else ()
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
    if name == "opt_out" and not any(field == _DIGIT for _, field, _, _ in parsed):
        raise ReminderError(f"{language}.opt_out: must say the key with {{{_DIGIT}}}")
    return text


@dataclass(frozen=True)
class Wording:
    """The rendered words of one reminder's calls (stored on the reminder as JSON), with the
    opt-out key its offer announces."""

    language: str
    message: str
    voicemail: str
    prompt: str
    confirmed: str
    declined: str
    goodbye: str
    opt_out: str
    opted_out: str
    opt_out_digit: str

    @property
    def question(self) -> str:
        """The keypad question: 1 or 2, and the opt-out offer."""
        return f"{self.prompt} {self.opt_out}"

    def to_json(self) -> dict[str, str]:
        # spelled out: dataclasses.asdict deep-copies, a cost on every create
        return {"language": self.language, "message": self.message, "voicemail": self.voicemail, "prompt": self.prompt,
                "confirmed": self.confirmed, "declined": self.declined, "goodbye": self.goodbye,
                "opt_out": self.opt_out, "opted_out": self.opted_out, "opt_out_digit": self.opt_out_digit}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Wording:
        """A stored wording; one stored before the opt-out existed gets the built-in offer of its
        language (English where there is none) with DEFAULT_OPT_OUT_DIGIT."""
        if "opt_out_digit" not in data:
            built_in = _BUILT_IN.get(str(data["language"]).split("-")[0].lower(), _BUILT_IN["en"])
            data = {**data, "opt_out": built_in["opt_out"].format(digit=DEFAULT_OPT_OUT_DIGIT),
                    "opted_out": built_in["opted_out"], "opt_out_digit": DEFAULT_OPT_OUT_DIGIT}
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
    opt_out: str
    opted_out: str

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

    def render(self, name: str, starts_at: datetime, timezone: str, *,
               opt_out_digit: str = DEFAULT_OPT_OUT_DIGIT) -> Wording:
        """The words for a customer and an appointment time (shown in `timezone`), offering
        `opt_out_digit` to be called no more."""
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
            opt_out=self.opt_out.format(digit=opt_out_digit),
            opted_out=self.opted_out,
            opt_out_digit=opt_out_digit,
        )


class MessageTemplates:
    """The templates the service speaks, by language, its default language and the opt-out key
    its calls offer (OPT_OUT_DIGIT)."""

    def __init__(self, templates: Mapping[str, Template], default_language: str = DEFAULT_LANGUAGE, *,
                 opt_out_digit: str = DEFAULT_OPT_OUT_DIGIT) -> None:
        self._templates = {language.lower(): template for language, template in templates.items()}
        self.default_language = normalize_language(default_language)
        self.opt_out_digit = check_opt_out_digit(opt_out_digit)
        if self.find(self.default_language) is None:
            raise ReminderError(f"DEFAULT_LANGUAGE {self.default_language} has no template in MESSAGE_TEMPLATES")

    @classmethod
    def parse(cls, setting: str | None, default_language: str = DEFAULT_LANGUAGE, *,
              opt_out_digit: str = DEFAULT_OPT_OUT_DIGIT) -> MessageTemplates:
        """From MESSAGE_TEMPLATES (inline JSON or a file path; None: the built-in English only)."""
        if setting is None or not setting.strip():
            return cls({DEFAULT_LANGUAGE: Template.build(DEFAULT_LANGUAGE, {})}, default_language,
                       opt_out_digit=opt_out_digit)
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
        return cls(templates, default_language, opt_out_digit=opt_out_digit)

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
        return template.render(name, starts_at, timezone, opt_out_digit=self.opt_out_digit)
