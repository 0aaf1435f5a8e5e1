"""Dependencies shared by the routers: settings, and the 422 helper."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError

from service.config import Settings

__all__ = ["SettingsDep", "invalid"]


# Dependencies are `async def` on purpose: FastAPI runs plain `def` ones in a worker thread,
# a thread hop per request for what is a dictionary lookup.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def invalid(loc: tuple[str | int, ...], message: str, value: object = None) -> RequestValidationError:
    """A 422 naming the field at `loc` (e.g. ("body", "remind_at", 0))."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": message, "input": value}])
