"""Phone numbers out of logs: the one pattern, the mask, the log filter (messages and tracebacks)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from service.logs import JsonFormatter, MaskPhoneNumbers
from service.privacy import E164, mask_phone, scrub

PHONE = "+4915112345678"


def _logger(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(MaskPhoneNumbers())
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test.privacy.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


@pytest.mark.parametrize("formatter", [logging.Formatter("%(message)s"), JsonFormatter()], ids=["text", "json"])
def test_numbers_without_plus_are_masked(formatter: logging.Formatter) -> None:
    logger, stream = _logger(formatter)
    logger.info("dialled %s and %s", PHONE[1:], "0049 151 1234")  # no "+": still a number
    assert PHONE[1:] not in stream.getvalue()
    assert mask_phone(PHONE[1:]) in stream.getvalue()


@pytest.mark.parametrize("formatter", [logging.Formatter("%(message)s"), JsonFormatter()], ids=["text", "json"])
def test_tracebacks_are_scrubbed(formatter: logging.Formatter) -> None:
    logger, stream = _logger(formatter)
    try:
        raise ValueError(f"provider refused {PHONE}")
    except ValueError:
        logger.exception("call failed")
    text = stream.getvalue()
    assert "Traceback" in text and "ValueError" in text
    assert PHONE not in text and PHONE[1:] not in text
    if isinstance(formatter, JsonFormatter):
        assert mask_phone(PHONE) in json.loads(text)["exception"]


def test_stack_info_is_scrubbed() -> None:
    logger, stream = _logger(logging.Formatter("%(message)s"))
    logger.info("where", stack_info=True)  # the stack quotes this source line: +4915112345678
    text = stream.getvalue()
    assert "Stack (most recent call last)" in text and PHONE not in text


def test_one_pattern_for_valid_numbers() -> None:
    assert E164.fullmatch("+14155552671") and E164.fullmatch(PHONE)
    assert not E164.fullmatch("14155552671") and not E164.fullmatch("+0123456789") and not E164.fullmatch("+12")


def test_scrub_masks_given_numbers_and_anything_phone_like() -> None:
    text = scrub(f"to {PHONE}, ref 4155552671, port 8080", "+1 415")
    assert PHONE not in text and "4155552671" not in text and "8080" in text


def test_ids_stay_readable() -> None:
    reminder_id = "123e4567-e89b-12d3-a456-426614174000"
    assert scrub(f"reminder {reminder_id} to 4155552671") == f"reminder {reminder_id} to {mask_phone('4155552671')}"
