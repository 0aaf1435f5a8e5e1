"""Dependencies shared by the routers: settings, DB session, bearer auth, 422 helper."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from service.api.auth import api_tokens, token_accepted
from service.config import Settings

__all__ = ["ReadSessionDep", "SessionDep", "SettingsDep", "invalid", "require_token"]


# Dependencies are `async def` on purpose: FastAPI runs plain `def` ones in a worker thread,
# a thread hop per request for what is a dictionary lookup.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.db.session() as session:
        yield session


async def get_read_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.db.read_session() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
# For a route whose whole read is one SELECT (Database.read_session)
ReadSessionDep = Annotated[AsyncSession, Depends(get_read_session)]

_bearer = HTTPBearer(auto_error=False, description="Required when API_TOKEN is set.")


async def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 unless API_TOKEN is unset or the request carries it as a bearer token."""
    if settings.api_token is None:
        return
    given = credentials.credentials.encode() if credentials else b""
    if not token_accepted(given, api_tokens(settings.api_token)):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


def invalid(loc: tuple[str | int, ...], message: str, value: object = None) -> RequestValidationError:
    """A 422 naming the field at `loc` (e.g. ("body", "remind_at", 0))."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": message, "input": value}])
