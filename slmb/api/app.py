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
from typing import Any

import redis
import redis.asyncio as aredis
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from slmb import __version__

log = logging.getLogger("slmb.api")

API_PREFIX = "/api/v1"
DEV_ORIGINS = ("http://localhost:5173", "http://127.0.0.1:5173", "http://localhost:3000", "http://127.0.0.1:3000")


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


@dataclass
class Settings:
    """Service settings; :meth:`from_env` reads them from ``SLMB_*`` variables."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    queue: str = "slmb"
    api_token: str | None = None  # when set, every /api route needs "Authorization: Bearer <token>"
    cors_origins: list[str] = field(default_factory=lambda: list(DEV_ORIGINS))
    public_url: str | None = None  # base of the absolute URLs in responses; default: the request's own
    sse_keepalive_s: float = 15.0
    reap_interval_s: float = 2.0  # how often dead training processes are looked for
    stop_wait_s: float = 5.0  # a forced stop waits this long for the job to be killed before answering
    max_new_tokens: int = 1024
    max_input_chars: int = 20_000
    max_body_bytes: int = 8 << 20
    model_cache_size: int = 4

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        env = os.environ
        origins = env.get("SLMB_CORS_ORIGINS")
        values: dict[str, Any] = dict(
            redis_url=env.get("SLMB_REDIS_URL") or cls.redis_url,
            queue=env.get("SLMB_QUEUE") or cls.queue,
            api_token=env.get("SLMB_API_TOKEN") or None,
            cors_origins=[o.strip() for o in origins.split(",") if o.strip()] if origins else list(DEV_ORIGINS),
            public_url=env.get("SLMB_PUBLIC_URL") or None,
            sse_keepalive_s=_env_float("SLMB_SSE_KEEPALIVE", cls.sse_keepalive_s),
            reap_interval_s=_env_float("SLMB_REAP_INTERVAL_S", cls.reap_interval_s),
            stop_wait_s=_env_float("SLMB_STOP_WAIT_S", cls.stop_wait_s),
            max_new_tokens=int(env.get("SLMB_MAX_NEW_TOKENS") or cls.max_new_tokens),
            max_input_chars=int(env.get("SLMB_MAX_INPUT_CHARS") or cls.max_input_chars),
            max_body_bytes=int(env.get("SLMB_MAX_BODY_BYTES") or cls.max_body_bytes),
            model_cache_size=int(env.get("SLMB_MODEL_CACHE") or cls.model_cache_size),
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
    from slmb.api.worker import reap_dead_tasks

    while True:
        await asyncio.sleep(app.state.settings.reap_interval_s)
        try:
            await run_in_threadpool(reap_dead_tasks, app.state.redis)
        except Exception as exc:  # Redis away for a moment: try again next time
            log.warning("looking for dead training processes failed: %s: %s", type(exc).__name__, exc)


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
    from slmb.api.routes import events, generate, health, models, stop, train

    app = FastAPI(title="slmb", version=__version__, lifespan=_lifespan,
                  description="Train small language models described as JSON; follow them; generate text.")
    app.state.settings = settings or Settings.from_env()
    origins = app.state.settings.cors_origins
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["Authorization", "Content-Type", "Last-Event-ID"])
    app.add_exception_handler(Exception, _internal_error)
    for exc_type in (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        app.add_exception_handler(exc_type, _redis_unavailable)
    app.include_router(events.router, prefix=API_PREFIX, dependencies=[Depends(require_token_or_query)])
    for module in (train, stop, models, generate):
        app.include_router(module.router, prefix=API_PREFIX, dependencies=[Depends(require_token)])
    app.include_router(health.router)
    train.document_request_body(app)
    return app
