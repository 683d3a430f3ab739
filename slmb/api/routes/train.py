"""``POST /api/v1/train-complete-model``: validate a canvas request, record it, queue its training."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from slmb.api.app import API_PREFIX, error_detail
from slmb.api.trust import request_issues

log = logging.getLogger("slmb.api")
router = APIRouter(tags=["training"])
MLFLOW_TIMEOUT_S = 10.0


async def read_json_body(request: Request) -> Any:
    """The parsed JSON body (:class:`~slmb.api.app.BodyGuard` has checked its type and size); 400 when it is not
    JSON."""
    body = await request.body()
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise HTTPException(400, f"the body is not valid JSON: {exc}") from None


def structure_id(request: dict[str, Any]) -> str:
    """A content hash of the architecture and config: equal canvases get equal ids."""
    canonical = json.dumps({"config": request.get("config"), "model": request.get("model")}, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _mlflow_run(task_id: str, request: dict[str, Any]) -> tuple[str, str]:
    """Create the task's MLflow run now, so the response can link to it; the trainer finds it by task id."""
    from slmb.core import tracking

    return tracking.start_run(task_id, request)


async def mlflow_links(task_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """The run's MLflow page as ``mlflow_url`` (``mlflow_run_id`` beside it); if MLflow is slow or down, the
    experiment list (training does not wait for it). With no UI on the store (``slmb serve --no-mlflow``, or the
    API alone, without $SLMB_MLFLOW_UI) no dead link: ``mlflow_url`` is null, ``mlflow_ui_command`` the command that
    opens one (``mlflow ui --backend-store-uri sqlite:///$SLMB_HOME/mlflow.db``, paths as placeholders) and
    ``mlflow_run_path`` the run's place in it."""
    from slmb.api.trust import redact
    from slmb.core import tracking

    base = tracking.mlflow_ui_base()
    try:
        experiment_id, run_id = await asyncio.wait_for(run_in_threadpool(_mlflow_run, task_id, request),
                                                       MLFLOW_TIMEOUT_S)
    except Exception as exc:
        log.warning("task %s: no MLflow run yet (%s: %s)", task_id, type(exc).__name__, exc)
        experiment_id = run_id = None
    links: dict[str, Any] = {"mlflow_url": None, "mlflow_run_id": run_id}
    path = tracking.mlflow_run_path(run_id, experiment_id) if run_id else "#/experiments"
    if base:
        links["mlflow_url"] = f"{base}/{path}"
    else:
        links.update(mlflow_ui_command=redact(tracking.mlflow_ui_command()), mlflow_run_path=path)
    return links


def _close_mlflow_run(task_id: str) -> None:
    """The task never reached the queue: its MLflow run must not stay RUNNING."""
    from slmb.core import tracking

    try:
        tracking.end_run(task_id, "error")
    except Exception as exc:
        log.warning("task %s: could not close its MLflow run: %s", task_id, exc)


def _submit(app: FastAPI, request: dict[str, Any], task_id: str, mlflow_url: str | None = None) -> int:
    """Queue the run; returns how many workers are alive on its queue."""
    from slmb.api.routes.health import alive_workers
    from slmb.api.worker import submit
    from slmb.core.store import create_run

    settings = app.state.settings
    alive = alive_workers(app.state.redis, settings.queue)  # before: a queued run is never failed here
    # The run directory says where the task's state lives, so `slmb list` here never reports a worker's run (in
    # another SLMB_HOME, or on another machine) as forever queued. Never the password: it stays in the environment.
    url = urlsplit(settings.redis_url)
    if url.password:
        url = url._replace(netloc=f"{url.username or ''}:***@{url.hostname}" + (f":{url.port}" if url.port else ""))
    create_run(request, task_id, service={"redis_url": urlunsplit(url), "queue": settings.queue})
    submit(app.state.redis, request, task_id=task_id, queue=settings.queue)
    if mlflow_url:  # the dashboard's run view links to it (GET /api/v1/runs)
        from slmb.api.redis_events import task_key

        app.state.redis.hset(task_key(task_id), "mlflow_url", mlflow_url)
    return alive


def worker_world_size() -> int:
    """The processes (devices) a worker trains each run on: ``slmb serve --nproc-per-node`` sets
    $SLMB_NPROC_PER_NODE (default 1). Admission then judges one device's share, and batch_size must split."""
    from slmb.api.worker import nproc_per_node

    return nproc_per_node() or 1


def no_worker_warning(queue: str) -> dict[str, Any]:
    """With no worker alive the run is still queued, not refused: the queue is kept in Redis (persistent under
    ``slmb serve``), whose supervisor restarts dead workers, so it runs when one is back. The client is told."""
    from slmb.core.validate import Issue

    return Issue(path="", message=f"no worker is alive on queue {queue!r}: the run stays queued until one is",
                 hint="GET /healthz shows the workers; start one with `slmb worker`", check="workers",
                 severity="warning").to_dict()


@router.post("/train-complete-model", summary="Validate a model request and queue its training",
             responses={422: {"description": "invalid request: `errors` lists every error with its JSON pointer, "
                                             "`detail` is the first one as a line"}},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/TrainRequest"}}}}})
async def train_complete_model(request: Request) -> Any:
    from slmb.core import tracking
    from slmb.core.store import new_task_id
    from slmb.core.validate import validate

    settings = request.app.state.settings
    body = await read_json_body(request)
    report = await run_in_threadpool(validate, body, admit=True, memory_limit=settings.worker_memory_bytes,
                                     world_size=worker_world_size())
    if report.request is not None:  # every error at once: what the caller may not name, beside the rest
        report.errors.extend(await run_in_threadpool(request_issues, report.request, settings.data_dir))
    if not report.ok:  # detail: the first error, for a client that shows nothing else (the canvas)
        errors = [e.to_dict() for e in report.errors]
        return JSONResponse(status_code=422, content={
            "detail": error_detail(errors), "errors": errors, "warnings": [w.to_dict() for w in report.warnings]})
    task_id = new_task_id()
    spec, summary = report.request, report.summary
    if not spec.model_name:  # every run needs a name: it names the completed model's files
        body["modelName"] = f"model-{task_id[:8]}"
    model_name = body.get("modelName") or body.get("model_name")
    links = await mlflow_links(task_id, body)
    try:
        workers_alive = await run_in_threadpool(_submit, request.app, body, task_id, links.get("mlflow_url"))
    except Exception:
        await run_in_threadpool(_close_mlflow_run, task_id)
        raise
    base = (settings.public_url or str(request.base_url)).rstrip("/")
    sse_url = f"{API_PREFIX}/events/{task_id}"
    return {
        "status": "success", "task_id": task_id, "sse_url": sse_url, "sse_url_abs": base + sse_url,
        "stop_url_abs": f"{base}{API_PREFIX}/stop-training", **links,
        "message": f"training of {model_name} queued as task {task_id}",
        "model_name": model_name, "experiment_name": tracking.experiment_name(),
        "structure_id": structure_id(body),
        "model_info": {"total_parameters": summary.total_parameters,
                       "trainable_parameters": summary.trainable_parameters,
                       "config": spec.config.model_dump(mode="json", exclude_none=True), "dataset": spec.dataset},
        "training_config": {"dataset": spec.dataset, "dataset_config": spec.dataset_config,
                            "epochs": spec.config.epochs},
        "warnings": [w.to_dict() for w in report.warnings] + ([] if workers_alive else [
            no_worker_warning(settings.queue)]),
        "workers_alive": workers_alive,
    }


def document_request_body(app: FastAPI) -> None:
    """Put the request's JSON Schema into the OpenAPI document (the route reads the raw body, so that
    validation reports JSON pointers rather than FastAPI's own error format)."""
    from slmb.core.spec import TrainRequest

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default_openapi()
            request_schema = TrainRequest.model_json_schema(by_alias=True,
                                                            ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(request_schema.pop("$defs", {}))
            components["TrainRequest"] = request_schema
        return app.openapi_schema

    app.openapi = openapi
