"""The HTTP service (DESIGN.md §5): FastAPI in front of RQ workers, events in Redis streams.

``create_app()`` reads its settings from the environment (see :class:`Settings`); ``slmb serve`` runs it with
uvicorn. Routes live in :mod:`slmb.api.routes`, all under ``/api/v1``; ``/healthz`` and ``/docs`` are outside.
Blocking work (validation, Redis through RQ, MLflow, model loading, generation) runs in the thread pool; the
SSE route reads Redis with the asyncio client, so no handler blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aredis
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from slmb import __version__

log = logging.getLogger("slmb.api")

API_PREFIX = "/api/v1"
# Any port of this machine, over plain http: the canvas's dev server (5173), its `vite preview` (4173), ...
LOCAL_ORIGIN_REGEX = r"http://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?"


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


@dataclass
class Settings:
    """Service settings; :meth:`from_env` reads them from ``SLMB_*`` variables."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    queue: str = "slmb"
    api_token: str | None = None  # when set, every /api route needs "Authorization: Bearer <token>"
    # Browser origins allowed besides any http://localhost:<port> and http://127.0.0.1:<port>; "*": every one,
    # only with api_token set (else any web page the user visits could drive the API).
    cors_origins: list[str] = field(default_factory=list)
    public_url: str | None = None  # base of the absolute URLs in responses; default: the request's own
    sse_keepalive_s: float = 15.0
    reap_interval_s: float = 2.0  # how often dead training processes are looked for
    reconcile_interval_s: float = 30.0  # how often Redis's tasks are squared with RQ and MLflow (and at start-up)
    stop_wait_s: float = 5.0  # a forced stop waits this long for the job to be killed before answering
    max_new_tokens: int = 1024
    max_input_chars: int = 20_000
    max_body_bytes: int = 8 << 20  # every route; a larger body is a 413, with or without Content-Length
    data_dir: Path | None = None  # the data root: files under it may be named as datasets over HTTP (trust.py)
    model_cache_size: int = 4
    worker_memory_bytes: int | None = None  # what a training may use; default: the machine's (core/memory.py)

    def __post_init__(self) -> None:
        if "*" in self.cors_origins and not self.api_token:
            raise RuntimeError("SLMB_CORS_ORIGINS='*' would let every web page the browser opens use this API: "
                               "set SLMB_API_TOKEN as well, or list the front end's origin instead of '*'")

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        from slmb.core.memory import parse_bytes

        env = os.environ
        origins = env.get("SLMB_CORS_ORIGINS")
        values: dict[str, Any] = dict(
            redis_url=env.get("SLMB_REDIS_URL") or cls.redis_url,
            queue=env.get("SLMB_QUEUE") or cls.queue,
            api_token=env.get("SLMB_API_TOKEN") or None,
            cors_origins=[o.strip().rstrip("/") for o in (origins or "").split(",") if o.strip()],
            public_url=env.get("SLMB_PUBLIC_URL") or None,
            sse_keepalive_s=_env_float("SLMB_SSE_KEEPALIVE", cls.sse_keepalive_s),
            reap_interval_s=_env_float("SLMB_REAP_INTERVAL_S", cls.reap_interval_s),
            reconcile_interval_s=_env_float("SLMB_RECONCILE_INTERVAL_S", cls.reconcile_interval_s),
            stop_wait_s=_env_float("SLMB_STOP_WAIT_S", cls.stop_wait_s),
            max_new_tokens=int(env.get("SLMB_MAX_NEW_TOKENS") or cls.max_new_tokens),
            max_input_chars=int(env.get("SLMB_MAX_INPUT_CHARS") or cls.max_input_chars),
            max_body_bytes=int(env.get("SLMB_MAX_BODY_BYTES") or cls.max_body_bytes),
            data_dir=Path(env["SLMB_DATA_DIR"]).expanduser().absolute() if env.get("SLMB_DATA_DIR") else None,
            model_cache_size=int(env.get("SLMB_MODEL_CACHE") or cls.model_cache_size),
            worker_memory_bytes=parse_bytes(env["SLMB_WORKER_MEMORY"]) if env.get("SLMB_WORKER_MEMORY") else None,
        )
        values.update(overrides)
        return cls(**values)


def _check_token(request: Request, allow_query: bool) -> None:
    token = request.app.state.settings.api_token
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if (scheme.lower() != "bearer" or not given) and allow_query:
        scheme, given = "bearer", request.query_params.get("token", "")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def require_token(request: Request) -> None:
    """With ``SLMB_API_TOKEN`` set, a route needs ``Authorization: Bearer <token>``."""
    _check_token(request, allow_query=False)


def require_token_or_query(request: Request) -> None:
    """As :func:`require_token`, or ``?token=``: a browser's EventSource cannot set headers."""
    _check_token(request, allow_query=True)


async def _reap_forever(app: FastAPI) -> None:
    """End the runs whose process is gone, often; reconcile every task at start-up and now and then."""
    from slmb.api.worker import reap_dead_tasks, reconcile

    settings: Settings = app.state.settings
    next_reconcile = 0.0
    while True:
        now = asyncio.get_running_loop().time()
        try:
            await run_in_threadpool(reap_dead_tasks, app.state.redis)
            if now >= next_reconcile:
                await run_in_threadpool(reconcile, app.state.redis)
                next_reconcile = now + settings.reconcile_interval_s
        except Exception as exc:  # Redis or MLflow away for a moment: try again next time
            log.warning("reaping or reconciling tasks failed: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(settings.reap_interval_s)


async def _warm_tracking() -> None:
    """Import MLflow and open its store now, not in the first request that needs them."""
    from slmb.core import tracking

    try:
        await run_in_threadpool(lambda: tracking.client().get_experiment_by_name(tracking.experiment_name()))
    except Exception as exc:
        log.warning("MLflow at %s is not reachable yet: %s", tracking.tracking_uri(), exc)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    from slmb.api.model_cache import ModelCache
    from slmb.api.redis_events import connect

    settings: Settings = app.state.settings
    app.state.redis = connect(settings.redis_url)
    # The SSE route blocks in XREAD for up to the keep-alive interval: the read timeout must be longer.
    app.state.aredis = aredis.Redis.from_url(settings.redis_url, socket_timeout=settings.sse_keepalive_s + 10)
    app.state.models = ModelCache(settings.model_cache_size)
    background = [asyncio.create_task(_reap_forever(app)), asyncio.create_task(_warm_tracking())]
    try:
        yield
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await app.state.aredis.aclose()
        app.state.redis.close()


JSON_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _TooLarge(Exception):
    pass


class BodyGuard:
    """ASGI middleware in front of every route: a JSON route (any POST, PUT or PATCH) needs ``Content-Type:
    application/json`` (415 otherwise, so no web page can send one without a CORS preflight), and no body may
    pass ``limit`` bytes (413). The limit is checked on the declared Content-Length before anything is read, and
    on the bytes as they arrive, so a chunked body is refused after ``limit`` bytes and never held in memory."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["method"] in JSON_METHODS and not _is_json(headers.get(b"content-type", b"")):
            return await _refuse(send, 415, "the body must be JSON, sent with Content-Type: application/json")
        length = headers.get(b"content-length", b"")  # the server has checked that it is a number
        if length.isdigit() and int(length) > self.limit:
            return await _refuse(send, 413, f"the body is larger than {self.limit} bytes")
        seen, over, started = 0, False, False

        async def limited_receive() -> dict:
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                over = True
                raise _TooLarge
            return message

        async def send_unless_over(message: dict) -> None:
            nonlocal started
            if not over:  # else it is the app's answer to a body it could not read: the 413 goes instead
                started = True
                await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, limited_receive, send_unless_over)
        if over and not started:
            await _refuse(send, 413, f"the body is larger than {self.limit} bytes")


def _is_json(content_type: bytes) -> bool:
    media, *params = (p.strip().lower() for p in content_type.decode("latin-1").split(";"))
    return media == "application/json" and all(p in ("charset=utf-8", 'charset="utf-8"') for p in params)


async def _refuse(send: Any, status: int, detail: str) -> None:
    await JSONResponse({"detail": detail}, status_code=status)({"type": "http"}, None, send)


def error_detail(errors: list[dict[str, Any]]) -> str:
    """The one line a client that shows only ``detail`` needs: the first error with its JSON pointer, and how many
    more ``errors`` lists (``/model/2/data/numHeads: ... (and 2 more errors)``)."""
    if not errors:
        return "invalid request"
    first, more = errors[0], len(errors) - 1
    text = f"{first['path']}: {first['message']}" if first.get("path") else first["message"]
    return text + (f" (and {more} more error{'s' if more > 1 else ''})" if more else "")


def _request_issue(err: dict[str, Any]) -> dict[str, Any]:
    """One of FastAPI's validation errors as the training route reports its own: path (a JSON pointer into the
    body), message, expected, found, hint. A query or header parameter is named in the message instead."""
    from slmb.core.validate import Issue, schema_issue

    where, *loc = err.get("loc") or ("body",)
    # A union's failed branches are in the location (``stop``, ``list[str]``, 1): the request has no such keys.
    loc = [p for p in loc if p not in ("str", "int", "float", "bool") and "[" not in str(p)]
    if err.get("type") == "json_invalid":
        problem = (err.get("ctx") or {}).get("error", "")
        return Issue("", f"the body is not valid JSON: {problem} (at character {loc[-1] if loc else 0})").to_dict()
    issue = schema_issue({**err, "loc": loc})
    if where != "body":
        issue.message = f"{where} parameter {'.'.join(map(str, loc))!r}: {issue.message}"
        issue.path = ""
    return issue.to_dict()


async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 in the training route's shape: ``detail`` one readable line with the first error's JSON
    pointer, ``errors`` every error; the caller's input made printable (a NaN or a lone surrogate echoed back as
    it came would make the response itself fail). Under /v1, OpenAI's 400 shape instead (slmb.api.routes.openai)."""
    from slmb.api.routes import openai
    from slmb.api.trust import printable

    if openai.is_openai_path(request.url.path):
        return await openai.invalid_request(request, exc)
    errors = printable(jsonable_encoder([_request_issue(e) for e in exc.errors()]))
    return JSONResponse({"detail": error_detail(errors), "errors": errors}, status_code=422)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A 500 says nothing about its cause to the client; the log has it, under the request id."""
    request_id = uuid.uuid4().hex[:16]
    log.error("request %s: %s %s failed", request_id, request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error", "request_id": request_id}, status_code=500)


async def _redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    request_id = uuid.uuid4().hex[:16]
    log.error("request %s: %s %s: Redis is unavailable: %s", request_id, request.method, request.url.path, exc)
    return JSONResponse({"detail": "Redis is unavailable; try again shortly", "request_id": request_id},
                        status_code=503)


def create_app(settings: Settings | None = None) -> FastAPI:
    from slmb.api.routes import events, generate, health, models, openai, stop, train

    app = FastAPI(title="slmb", version=__version__, lifespan=_lifespan,
                  description="Train small language models described as JSON; follow them; generate text.")
    app.state.settings = settings or Settings.from_env()
    origins = app.state.settings.cors_origins
    # Added first, so it runs inside CORS: its 413 and 415 answers carry the CORS headers a browser needs to read.
    app.add_middleware(BodyGuard, limit=app.state.settings.max_body_bytes)
    # No credentials (cookies): the token travels in the Authorization header, which a foreign page cannot know.
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_origin_regex=LOCAL_ORIGIN_REGEX,
                       allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["Authorization", "Content-Type", "Last-Event-ID"])
    app.add_exception_handler(Exception, _internal_error)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    for exc_type in (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        app.add_exception_handler(exc_type, _redis_unavailable)
    app.include_router(events.router, prefix=API_PREFIX, dependencies=[Depends(require_token_or_query)])
    for module in (train, stop, models, generate):
        app.include_router(module.router, prefix=API_PREFIX, dependencies=[Depends(require_token)])
    app.add_exception_handler(openai.OpenAIError, openai.openai_error)
    app.include_router(openai.router, prefix=openai.OPENAI_PREFIX)  # OpenAI's paths; its own token check
    app.include_router(health.router)
    from slmb.api.routes import export  # GET /api/v1/models/{name}/export
    app.include_router(export.router, prefix=API_PREFIX, dependencies=[Depends(require_token)])
    from slmb.api.routes import dashboard  # the page at / (no token) and the JSON it reads under /api/v1
    app.include_router(dashboard.router, prefix=API_PREFIX, dependencies=[Depends(require_token)])
    dashboard.mount(app)
    train.document_request_body(app)
    return app
