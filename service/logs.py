"""Logging: text or one JSON object per line; phone numbers are masked in every record."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from service.telephony import mask_phone

__all__ = ["configure_logging"]

# E.164-looking digit runs anywhere in a message, whatever the code logged.
_PHONE = re.compile(r"\+\d{7,15}\b")


class MaskPhoneNumbers(logging.Filter):
    """Rewrites each record's message with phone numbers masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = _PHONE.sub(lambda m: mask_phone(m.group(0)), message)
        if masked != message or record.args:
            record.msg, record.args = masked, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(log_format: str = "text", level: str = "info", instance: str | None = None) -> None:
    """Root logger to stderr in `log_format`; uvicorn's loggers go through the same handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(MaskPhoneNumbers())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"[{instance}] " if instance else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
