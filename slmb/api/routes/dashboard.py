"""The dashboard at ``/`` of ``slmb serve``: static files shipped in the package (``slmb/api/static``, no build
step, nothing fetched from elsewhere), and the JSON it reads beside the other routes under ``/api/v1``.

The page itself and its scripts need no token (they hold no data); every JSON route below is behind the bearer
token as the other ``/api`` routes are, and the page sends the token its user enters (kept in the browser's
session storage). Nothing here returns an absolute server path (:mod:`slmb.api.trust`).
"""

from __future__ import annotations

import json
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from slmb.api import redis_events as rev
from slmb.api.trust import check_name, redact, store_relative

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_PREFIX = "/dashboard"
# The page runs only its own scripts and talks only to this server: an injected string could do nothing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
                "Referrer-Policy": "no-referrer"}

page = APIRouter(include_in_schema=False)
router = APIRouter(tags=["dashboard"])


@page.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


def mount(app: FastAPI) -> None:
    """``GET /`` (the page) and ``/dashboard/*`` (its scripts and styles), both without a token."""
    app.include_router(page)
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="dashboard")


# ---------------------------------------------------------------------------------------------------- runs

RUN_FIELDS = ("task_id", "model_name", "state", "celery_state", "step", "created", "message", "mlflow_url")


def _runs(conn: Any) -> list[dict[str, Any]]:
    runs = [{k: task.get(k) for k in RUN_FIELDS} for task in rev.list_tasks(conn)]
    return redact(sorted(runs, key=lambda t: t["created"] or 0, reverse=True))


@router.get("/runs", summary="The training tasks the service knows (until they expire), newest first")
async def runs(request: Request) -> dict:
    """Each task's ``state``: queued, running, finished, stopped or error; ``created`` is a Unix time."""
    return {"runs": await run_in_threadpool(_runs, request.app.state.redis)}


# ---------------------------------------------------------------------------------------------------- models

_details: dict[tuple[str, tuple], dict[str, Any]] = {}  # (name, files' stamp) -> the model's description
_details_lock = threading.Lock()


def _summary(structure: Any) -> dict[str, Any]:
    """The node table of ``slmb validate`` for a stored request (a build on the meta device: no memory)."""
    from slmb.core.validate import validate

    report = validate(structure, build=True)
    if report.summary is None:
        return {"nodes": [], "summary_errors": [e.to_dict() for e in report.errors]}
    s = report.summary
    return {"nodes": [{"path": r.path, "type": r.type, "name": r.name, "output_shape": r.output_shape,
                       "parameters": r.parameters, "depth": r.depth, "repeat": r.repeat, "note": r.note}
                      for r in s.rows],
            "total_parameters": s.total_parameters, "trainable_parameters": s.trainable_parameters,
            "vocab_size": s.vocab_size, "context_length": s.context_length}


def model_detail(name: str) -> dict[str, Any]:
    """A completed model: its listing entry, node table, parameter count and final losses. Raises StoreError
    (unknown) or BrokenModelError."""
    from slmb.api.model_cache import local_or_fetched

    entry = local_or_fetched(name)
    key = (name, entry.stamp)
    with _details_lock:
        cached = _details.get(key)
    if cached is not None:
        return cached
    meta = entry.metadata
    detail: dict[str, Any] = {"model": store_relative([entry.to_dict()], ("path", "structure_file"))[0]}
    if entry.error:
        detail.update(nodes=[], summary_errors=[])
    else:
        try:
            structure = json.loads(entry.structure_file.read_text())
        except (OSError, ValueError) as exc:
            structure, detail["summary_errors"] = None, [{"path": "", "message": f"structure.json: {exc}"}]
        if structure is not None:
            detail.update(_summary(structure))
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    detail.update(model_name=name, parameters=meta.get("parameters") or detail.get("total_parameters"),
                  steps=meta.get("steps"), final_losses={k: metrics.get(k) for k in (
                      "train_loss", "val_loss", "best_val_loss", "last_step_loss", "loss_ema")})
    detail = redact(detail)
    with _details_lock:
        if len(_details) > 64:
            _details.clear()
        _details[key] = detail
    return detail


@router.get("/completed-models/{name}", summary="A completed model: node table, parameters, final losses",
            responses={404: {"description": "no completed model of that name"},
                       409: {"description": "the model's files are broken"}})
async def completed_model(name: str) -> dict:
    from slmb.core.store import BrokenModelError, StoreError

    try:
        check_name(name)
    except ValueError as exc:
        raise HTTPException(422, f"model name {json.dumps(name)[:80]}: {exc}") from None
    try:
        return await run_in_threadpool(model_detail, name)
    except BrokenModelError as exc:
        raise HTTPException(409, str(redact(str(exc)))) from None
    except StoreError:
        raise HTTPException(404, f"no completed model named {name!r}") from None


# ---------------------------------------------------------------------------------------------------- examples


def examples() -> list[dict[str, Any]]:
    """The reference requests shipped with the package (``slmb/examples``), by file name."""
    out = []
    for item in sorted(resources.files("slmb").joinpath("examples").iterdir(), key=lambda p: p.name):
        if item.name.endswith(".json"):
            body = json.loads(item.read_text())
            out.append({"name": item.name.removesuffix(".json"), "file": f"examples/{item.name}",
                        "model_name": body.get("modelName"), "request": body})
    return out


@router.get("/examples", summary="The example requests shipped with slmb (the canvas's format)")
async def example_requests() -> dict:
    return {"examples": await run_in_threadpool(examples)}
