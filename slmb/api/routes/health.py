"""``GET /healthz``: is Redis up, is any worker listening, is MLflow reachable (and its UI, where one is named);
under ``slmb serve``, the processes it supervises (restarts, last exit): redis, worker-N, mlflow."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from slmb.api.trust import public_url, redact, store_kind

router = APIRouter(tags=["health"])
CHECK_TIMEOUT_S = 5.0


def _workers(conn: Any, queue: str) -> list[dict[str, Any]]:
    """The workers registered on ``queue``, each with the age of its last heartbeat and whether that is recent.

    slmb's workers heartbeat every ``SLMB_HEARTBEAT_S`` seconds, idle or busy (``run_worker``); RQ keeps a dead
    worker's registration for a minute or more, so "alive" is judged by the heartbeat's age, not by presence."""
    from rq import Worker
    from rq.utils import now

    from slmb.api.worker import HEARTBEAT_MISSES, get_queue, heartbeat_s

    stale_after = heartbeat_s() * HEARTBEAT_MISSES + 1
    out = []
    for w in Worker.all(connection=conn, queue=get_queue(conn, queue)):
        age = (now() - w.last_heartbeat).total_seconds() if w.last_heartbeat else None
        out.append({"name": w.name, "state": w.get_state(), "current_job": w.get_current_job_id(),
                    "last_heartbeat_s": None if age is None else round(age, 1),
                    "alive": age is not None and age <= stale_after})
    return out


def alive_workers(conn: Any, queue: str) -> int:
    return sum(w["alive"] for w in _workers(conn, queue))


def _mlflow() -> dict[str, Any]:
    from slmb.core import tracking

    tracking.client().search_experiments(max_results=1)
    # The store's kind, not its URI: a sqlite or file URI is a path on this machine (and this route is open).
    out: dict[str, Any] = {"ok": True, "tracking": store_kind(tracking.tracking_uri())}
    base = tracking.mlflow_ui_base()
    if base:  # the UI the links point at, and whether it answers now (`slmb serve`'s takes seconds to start)
        out.update(ui=public_url(base), ui_answers=tracking.ui_answers(base, 2.0))
    else:  # no UI: the command that opens one (redacted with the rest of the body)
        out.update(ui=None, ui_command=tracking.mlflow_ui_command())
    return out


async def _check(fn, *args: Any) -> dict[str, Any]:
    try:
        out = await asyncio.wait_for(run_in_threadpool(fn, *args), CHECK_TIMEOUT_S)
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return out if isinstance(out, dict) else {"ok": True, "workers": out}


def _nproc_per_node() -> int | None:
    """The processes each run trains on, as the API admits runs (``SLMB_NPROC_PER_NODE``); None if malformed."""
    from slmb.api.routes.train import worker_world_size

    try:
        return worker_world_size()
    except ValueError:
        return None


@router.get("/healthz", summary="Redis, workers and MLflow")
async def healthz(request: Request) -> JSONResponse:
    app = request.app
    try:
        await asyncio.wait_for(app.state.aredis.ping(), CHECK_TIMEOUT_S)
        redis_check: dict[str, Any] = {"ok": True}
    except Exception as exc:
        redis_check = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    workers = await _check(_workers, app.state.redis, app.state.settings.queue) if redis_check["ok"] else {
        "ok": False, "error": "Redis is down"}
    if workers.get("ok"):
        workers["count"] = sum(w["alive"] for w in workers["workers"])  # registered but silent ones don't count
        workers["ok"] = workers["count"] > 0
    mlflow = await _check(_mlflow)
    ok = redis_check["ok"] and workers["ok"] and mlflow["ok"]
    body = {"status": "ok" if ok else "degraded", "redis": redis_check, "workers": workers, "mlflow": mlflow,
            "queue": app.state.settings.queue, "nproc_per_node": _nproc_per_node()}
    supervisor = getattr(app.state, "supervisor", None)
    if supervisor is not None:  # under `slmb serve`: the processes it started and restarts (names, no paths)
        body["processes"] = supervisor.state()
    return JSONResponse(redact(body), status_code=200 if redis_check["ok"] else 503)
