"""ETags and If-Match (RFC 9110 sections 8.8.3 and 13.1.1) for one appointment.

An appointment's ETag is its version (`appointments.version`, raised by every UPDATE of its row),
strong, e.g. `"3"`. `If-Match` is `*` or a list of entity tags; a weak tag never matches (If-Match
compares strongly); a tag this service never issued matches nothing. Why a version and why If-Match
is optional: docs/decisions/0241-strict-input-and-etags.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fastapi.exceptions import RequestValidationError

from service.api.deps import invalid

__all__ = ["ETAG_DOC", "IF_MATCH_DOC", "IF_MATCH_MAX_LENGTH", "IF_MATCH_PATTERN", "etag", "expected_versions"]

# RFC 9110's grammar: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, etagc = %x21 / %x23-7E / obs-text;
# If-Match = "*" / #entity-tag, a list that may hold empty elements (section 5.6.1.2).
_ENTITY_TAG = r'(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"'
IF_MATCH_PATTERN = (rf"^[ \t]*(?:\*|(?:,[ \t]*)*{_ENTITY_TAG}(?:[ \t]*,(?:[ \t]*{_ENTITY_TAG})?)*)[ \t]*$")
IF_MATCH_MAX_LENGTH = 1024
_IF_MATCH = re.compile(IF_MATCH_PATTERN)
_TAGS = re.compile(r'(W/)?"([^"]*)"')
# The versions an ETag of this service can name: the column is a 32-bit integer.
_VERSION = re.compile(r"[1-9][0-9]{0,9}")
_MAX_VERSION = 2**31 - 1
_LOC = ("header", "If-Match")  # as FastAPI names a header parameter

ETAG_DOC = "The appointment's version, a strong entity tag: send it back in `If-Match` to change it safely."
IF_MATCH_DOC = ("Change only if the appointment is still at this version: `*` or a list of ETags (weak ones never "
                "match). A stale one is a 412 and changes nothing; absent, the last writer wins.")


def etag(version: int) -> str:
    """The ETag of an appointment at `version`."""
    return f'"{version}"'


def expected_versions(values: Sequence[str]) -> frozenset[int] | None:
    """The versions the If-Match header lines `values` allow a write to apply to: None when there is
    no If-Match, or it is `*` (any current version: the appointment exists, else the route's 404
    comes first); an empty set when no strong tag of this service is listed (nothing matches).
    RequestValidationError (a 422 naming the header) when it is not RFC 9110's If-Match."""
    if not values:
        return None
    joined = ", ".join(values)
    if len(joined) > IF_MATCH_MAX_LENGTH or not all(_IF_MATCH.fullmatch(value) for value in values):
        raise _malformed()
    if any(value.strip(" \t") == "*" for value in values):
        if len(values) > 1:  # "*" is the whole field value or nothing
            raise _malformed()
        return None
    return frozenset(int(tag) for weak, tag in _TAGS.findall(joined)
                     if not weak and _VERSION.fullmatch(tag) and int(tag) <= _MAX_VERSION)


def _malformed() -> RequestValidationError:
    return invalid(_LOC, f'must be * or a list of entity tags such as "3" (RFC 9110), at most '
                         f"{IF_MATCH_MAX_LENGTH} characters")
