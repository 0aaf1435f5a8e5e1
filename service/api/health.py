"""Probes and leadership: /healthz, /readyz, /leader."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.deps import SettingsDep
from service.api.schemas import LeaderOut

__all__ = ["router"]

router = APIRouter(tags=["health"])

@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: answers while the process and its event loop work."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "The database does not answer"}})
async def readyz(request: Request) -> JSONResponse:
    """Readiness: the database answers (etcd's state is in the body, it does not decide; answers
    are cached about a second). Followers are ready too."""
    probe = getattr(request.app.state, "readiness", None)
    if probe is not None:
        answer = await probe.check()
        return JSONResponse(answer.body, status_code=200 if answer.ready else 503)
    return JSONResponse({"status": "unavailable", "reasons": ["starting"]}, status_code=503)


@router.get("/leader", response_model=LeaderOut, response_model_exclude_unset=True)
async def leader(request: Request, settings: SettingsDep) -> LeaderOut:
    """This replica's view of the election."""
    elector = request.app.state.elector
    return LeaderOut(
        instance=settings.pod_name,
        is_leader=bool(elector and elector.is_leader),
        leader=elector.leader_name if elector else None,
        fencing_token=elector.fencing_token if elector and elector.is_leader else None,
        lease_ttl=settings.lease_ttl,
        # only while there is one: the DESIGN's five fields stay the whole answer otherwise
        **({"etcd_error": elector.config_error} if elector and elector.config_error else {}),
    )
