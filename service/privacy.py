"""Personal data out of logs and error texts: the one phone pattern, `mask_phone`, the scrubber,
`strip_control` for text that is stored or spoken, and the character classes the API's text rules
are made of (service/api/schemas.py).

Used by the logs, the API's schemas, the provider client and the fake providers; nothing else
defines what a phone number looks like.
"""

from __future__ import annotations

import re

__all__ = [
    "BIDI_CONTROLS", "CONTROL_CHARACTERS", "E164", "E164_PATTERN", "INVISIBLE", "mask_phone", "scrub", "strip_control",
]

# A phone number in E.164: "+", a country code (never 0), 7 to 15 digits in all.
E164_PATTERN = r"\+[1-9][0-9]{6,14}"
E164 = re.compile(E164_PATTERN)
# A number inside free text: 7 or more digits, with or without "+" (longer runs too: a number
# glued to others), standing alone: not part of a word or a hyphenated id, so the digit groups
# of a UUID (a reminder's id in a log line) stay readable.
_NUMBER_IN_TEXT = re.compile(r"(?<![\w-])\+?[0-9]{7,}(?![\w-])")
# Character classes (the inside of a regex `[...]`, BMP escapes only, so that the same text is a
# JSON Schema pattern):
# C0/C1 control characters (NUL included, which PostgreSQL text refuses) and Unicode line breaks.
CONTROL_CHARACTERS = r"\x00-\x1f\x7f-\x9f\u2028\u2029"
# Bidirectional formatting: the Arabic letter mark, LRM/RLM, embeddings and overrides, isolates.
# They reorder what is shown and read aloud ("Trojan Source").
BIDI_CONTROLS = r"\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
# What shows nothing: the BMP's separators, controls and format characters (Unicode 14 categories
# Zs, Zl, Zp, Cc, Cf) and the Hangul fillers. Format characters beyond the BMP (tags, …) are
# not listed: JSON Schema's patterns escape only the BMP.
INVISIBLE = (r"\x00-\x20\x7f-\xa0\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u115f\u1160\u1680"
             r"\u180e\u2000-\u200f\u2028-\u202f\u205f-\u2064\u2066-\u206f\u3000\u3164\ufeff\uffa0\ufff9-\ufffb")
_CONTROL = re.compile(f"[{CONTROL_CHARACTERS}]+")


def mask_phone(number: str) -> str:
    """Return `number` with its middle digits hidden, e.g. "+15551234567" -> "+1555*****67".

    At least one character (three whenever the number is long enough) is always hidden, so the
    result never equals the full number.
    """
    sign = "+" if number.startswith("+") else ""
    body = number[len(sign) :]
    n = len(body)
    if n == 0:
        return sign
    tail = 2 if n >= 6 else 0
    head = max(0, min(4, n - tail - 3))
    hidden = n - head - tail
    return f"{sign}{body[:head]}{'*' * hidden}{body[n - tail :] if tail else ''}"


def scrub(text: str, *numbers: str) -> str:
    """`text` with the given numbers (whatever their form) and anything phone-like masked."""
    for number in numbers:
        if number:
            text = text.replace(number, mask_phone(number))
    return _NUMBER_IN_TEXT.sub(lambda m: mask_phone(m.group(0)), text)


def strip_control(text: str) -> str:
    """`text` with every run of control characters (NUL, escapes, line breaks) replaced by a space."""
    return _CONTROL.sub(" ", text)
