"""``POST /api/v1/stop-training``: stop a queued or running task, cooperatively or by force."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, field_validator
from starlette.concurrency import run_in_threadpool

from slmb.api import redis_events as rev
from slmb.api.trust import check_name
from slmb.core.store import StoreError

router = APIRouter(tags=["training"])


class StopBody(BaseModel):
    task_id: str
    force_kill: bool = False

    @field_validator("task_id")
    @classmethod
    def _task_id(cls, v: str) -> str:
        return check_name(v)


@router.post("/stop-training", summary="Stop a task: cooperative (checkpoint, then stop) or force_kill")
async def stop_training(body: StopBody, request: Request) -> dict:
    app = request.app
    control = rev.RedisControl(app.state.redis)
    try:
        result = await run_in_threadpool(control.request_stop, body.task_id, body.force_kill)
    except StoreError:
        raise HTTPException(404, f"no task {body.task_id!r}") from None
    state = result["celery_state"]
    if body.force_kill and state == "STARTED":
        # The kill is asynchronous (the worker gets the command over pub/sub): wait a little for it, so the
        # answer usually says how it ended.
        deadline = time.monotonic() + app.state.settings.stop_wait_s
        while state == "STARTED" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            state = await run_in_threadpool(rev.celery_state, app.state.redis, body.task_id)
    return {"status": "ok", "task_id": body.task_id, "celery_state": state, "mode": result["mode"],
            "message": result["message"]}
