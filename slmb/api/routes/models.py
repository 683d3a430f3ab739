"""``GET /api/v1/completed-models``: the models that can generate text."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from slmb.api import model_cache
from slmb.api.trust import store_relative

router = APIRouter(tags=["models"])


@router.get("/completed-models", summary="Completed models, local and in MLflow")
async def completed_models() -> dict:
    """Each model's ``path`` and ``structure_file`` are relative to the store (``$SLMB_HOME``)."""
    return {"models": store_relative(await run_in_threadpool(model_cache.list_models), ("path", "structure_file"))}
