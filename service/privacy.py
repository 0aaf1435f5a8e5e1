"""Personal data out of logs and error texts: the one phone pattern, `mask_phone`, the scrubber,
and `strip_control` for text that is stored or spoken.

Used by the logs, the API's schemas, the provider client and the fake providers; nothing else
defines what a phone number looks like.
"""

from __future__ import annotations

import re

__all__ = ["E164", "E164_PATTERN", "mask_phone", "scrub", "strip_control"]

# A phone number in E.164: "+", a country code (never 0), 7 to 15 digits in all.
E164_PATTERN = r"\+[1-9][0-9]{6,14}"
E164 = re.compile(E164_PATTERN)
# A number inside free text: 7 or more digits, with or without "+" (longer runs too: a number
# glued to others), standing alone: not part of a word or a hyphenated id, so the digit groups
# of a UUID (a reminder's id in a log line) stay readable.
_NUMBER_IN_TEXT = re.compile(r"(?<![\w-])\+?[0-9]{7,}(?![\w-])")
# C0/C1 control characters (NUL included, which PostgreSQL text refuses) and Unicode line breaks.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


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
