"""Dependencies shared by the routers: settings, bearer auth, 422 helper."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.auth import api_tokens, token_accepted
from service.config import Settings

__all__ = ["SettingsDep", "invalid", "require_token"]


# Dependencies are `async def` on purpose: FastAPI runs plain `def` ones in a worker thread,
# a thread hop per request for what is a dictionary lookup.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]

_bearer = HTTPBearer(auto_error=False, description="Required when API_TOKEN is set.")


async def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 unless API_TOKEN is unset or the request carries it as a bearer token."""
    # Settings straight from the app, not as a sub-dependency: this runs on every appointment route.
    api_token = request.app.state.settings.api_token
    if api_token is None:
        return
    given = credentials.credentials.encode() if credentials else b""
    if not token_accepted(given, api_tokens(api_token)):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


def invalid(loc: tuple[str | int, ...], message: str, value: object = None) -> RequestValidationError:
    """A 422 naming the field at `loc` (e.g. ("body", "remind_at", 0))."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": message, "input": value}])
