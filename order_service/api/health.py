"""`GET /healthz`: ok only when both the broker and the database answer."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from order_service.api.dependencies import MaybeRunning

router = APIRouter()


class Health(BaseModel):
    """`GET /healthz`: ok only when both the broker and the database answer."""

    status: str = Field(examples=["ok", "unavailable"])
    broker: bool
    database: bool


@router.get("/healthz", response_model=Health,
            responses={503: {"model": Health, "description": "Broker or database down."}},
            summary="Health")
async def healthz(runtime: MaybeRunning) -> JSONResponse:
    """Checks the broker connection and the database."""
    broker = database = False
    if runtime is not None:
        broker = runtime.broker_ok()
        try:
            database = await runtime.db_ok()
        except Exception:
            database = False
    health = Health(status="ok" if broker and database else "unavailable",
                    broker=broker, database=database)
    return JSONResponse(health.model_dump(), status_code=200 if health.status == "ok"
                        else 503)
