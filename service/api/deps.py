"""Dependencies shared by the routers: settings, the bearer scheme of the OpenAPI, 422 helper."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBearer

from service.config import Settings

__all__ = ["SettingsDep", "bearer_scheme", "invalid"]


# Dependencies are `async def` on purpose: FastAPI runs plain `def` ones in a worker thread,
# a thread hop per request for what is a dictionary lookup.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]

# Documents the bearer scheme in the OpenAPI; BearerAuthMiddleware (service/api/auth.py) enforces
# API_TOKEN before the body is read, so the routes need no dependency that checks it again: one
# dependency fewer to solve on every request (docs/decisions/0161).
bearer_scheme = HTTPBearer(auto_error=False, description="Required when API_TOKEN is set.")


def invalid(loc: tuple[str | int, ...], message: str, value: object = None) -> RequestValidationError:
    """A 422 naming the field at `loc` (e.g. ("body", "remind_at", 0))."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": message, "input": value}])
