"""``GET /api/v1/events/{task_id}``: a task's events as Server-Sent Events.

Each message is ``id: <Redis stream id>`` and ``data: {"event": ..., "data": {...}}``. The stream starts with
``connected``, replays everything stored (or everything after ``Last-Event-ID``), follows live with a
blocking ``XREAD``, sends a ``: keep-alive`` comment whenever it has been quiet for the keep-alive interval,
and ends after the terminal event. One ``XREAD`` at a time per client, on a pooled connection: when the
client goes away Starlette cancels the generator, and redis-py drops the connection it was blocked on.

Reconnecting: the ids are the stream's, so a client that sends the last id it saw as ``Last-Event-ID`` gets
every later event exactly once. When Redis fails mid-stream the client is kept (keep-alive comments) while the
route retries for ``SLMB_REDIS_WAIT_S``; if Redis is still away it sends a ``retry:`` hint and a ``warning``
without an id (so the client's last id stands) and closes: an EventSource reconnects and resumes. It never
sends a terminal event the stream does not hold.

``?compat=seed``: for the old canvas front end, which knows only ``finished`` and ``error`` and reports any other
end of the stream as a failed connection. A stopped run's terminal ``stopped`` event is sent as ``finished`` with
``"status": "stopped"`` in its data, as the old backend did (see :class:`SeedCompat`). Every other event is as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import redis
from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from slmb.api import redis_events as rev
from slmb.core import events as ev
from slmb.core.spec import MODEL_NAME_RE

router = APIRouter(tags=["training"])
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
RETRY_MS = 2000  # how long an EventSource waits before it reconnects, after a stream that Redis cut


def sse_message(data: str, event_id: str | None = None) -> str:
    return (f"id: {event_id}\n" if event_id is not None else "") + f"data: {data}\n\n"


def _id(stream_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = (stream_id.decode() if isinstance(stream_id, bytes) else stream_id).partition("-")
    return int(ms), int(seq or 0)


async def trimmed_warning(r, task_id: str, after: str) -> str | None:
    """A ``warning`` when the stream was trimmed (``SLMB_STREAM_MAXLEN``) past the event the client saw last."""
    try:
        info = await r.xinfo_stream(rev.events_key(task_id))
    except redis.ResponseError:  # no stream yet
        return None
    first = info.get("first-entry")
    added = info.get("entries-added")  # Redis 7 and later; on older ones nobody is told of a trim
    if not first or added is None or added <= info["length"] or _id(first[0]) <= _id(after):
        return None
    message = (f"this task's stream was trimmed to its last {info['length']} events (SLMB_STREAM_MAXLEN): "
               f"events before {first[0].decode()} are no longer kept; replaying from there")
    return sse_message(ev.Warning(task_id=task_id, message=message, source="events").to_json())


class SeedCompat:
    """Rewrites a stream for the old front end: the terminal ``stopped`` becomes ``finished`` with ``status:
    "stopped"``. Its data keeps the ``stopped`` keys (``step``, ``checkpoint``, ``reason``: ``force`` after a forced
    stop) and adds the ``finished`` keys a client may read: ``model_name`` (from ``started``, else the task's
    record), ``train_loss`` (the last smoothed loss), ``val_loss`` and ``elapsed_s``, None when this client saw no
    progress (it resumed past it). ``path`` stays out: a stopped run published no model."""

    def __init__(self, r: Any, task_id: str):
        self.r, self.task_id = r, task_id
        self.seen: dict[str, Any] = {"model_name": None, "train_loss": None, "val_loss": None, "elapsed_s": None}

    async def message(self, name: str, data: str) -> str:
        if name == "started":
            self.seen["model_name"] = json.loads(data)["data"].get("model_name")
        elif name == "progress":
            progress = json.loads(data)["data"]
            self.seen.update(train_loss=progress.get("loss_ema", progress.get("loss")),
                             elapsed_s=progress.get("elapsed_s"))
            if progress.get("val_loss") is not None:
                self.seen["val_loss"] = progress["val_loss"]
        elif name == "stopped":
            stopped = json.loads(data)["data"]
            if self.seen["model_name"] is None:  # stopped while queued, or this client resumed past `started`
                with contextlib.suppress(redis.RedisError, OSError):  # the name is a courtesy: never lose the end
                    name_field = await self.r.hget(rev.task_key(self.task_id), "model_name")
                    self.seen["model_name"] = name_field.decode() if name_field else None
            return json.dumps({"event": "finished", "data": {**self.seen, **stopped, "status": "stopped"}},
                              separators=(",", ":"))
        return data


async def follow(r, task_id: str, after: str, keepalive_s: float, wait_s: float, known: bool = True,
                 compat: SeedCompat | None = None) -> AsyncIterator[str]:
    """The stream's messages; ``known``: the task is known to exist (else it is checked once Redis answers);
    ``compat``: rewrites each message for an old client."""
    yield sse_message(ev.Connected(task_id=task_id).to_json(), after)
    try:
        warning = await trimmed_warning(r, task_id, after)
    except (redis.RedisError, OSError):  # the loop below rides out Redis faults; this is only a notice
        warning = None
    if warning:
        yield warning
    key, cursor, down_since = rev.events_key(task_id), after, None
    while True:
        try:
            if not known:
                if not await r.exists(rev.task_key(task_id)):  # the reconnection gets the 404
                    yield f"retry: {RETRY_MS}\n\n"
                    return
                known = True
            # A stalled Redis never answers: bound the wait so the client still gets its keep-alive.
            reply = await asyncio.wait_for(r.xread({key: cursor}, count=500, block=max(1, int(keepalive_s * 1000))),
                                           keepalive_s + 5)
            # Quiet. A task that has ended (and whose end this client has already seen) has nothing more.
            ended = not reply and await r.hexists(rev.task_key(task_id), "terminal") and not await r.xread(
                {key: cursor}, count=1)
        except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:  # asyncio's is not an OSError before 3.11
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since >= wait_s:
                message = (f"the event store (Redis) has been unreachable for {wait_s:g} s "
                           f"({type(exc).__name__}); no event is lost: reconnect with Last-Event-ID {cursor}")
                yield f"retry: {RETRY_MS}\n" + sse_message(
                    ev.Warning(task_id=task_id, message=message, source="events").to_json())
                return
            yield ": event store unreachable, retrying\n\n"
            await asyncio.sleep(min(1.0, keepalive_s))
            continue
        down_since = None
        if ended:
            return
        if not reply:
            yield ": keep-alive\n\n"
            continue
        for eid, fields in reply[0][1]:
            cursor, name, data = eid.decode(), fields[b"event"].decode(), fields[b"json"].decode()
            yield sse_message(await compat.message(name, data) if compat else data, cursor)
            if name in ev.TERMINAL:
                return


@router.get("/events/{task_id}", summary="Follow a task's events (Server-Sent Events)",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}, 404: {"description": "unknown task"},
                       400: {"description": "malformed Last-Event-ID"}})
async def events(task_id: str, request: Request,
                 last_event_id: str | None = Header(None, description="resume after this stream id"),
                 compat: Literal["seed"] | None = Query(None, description=(
                     "seed: for the old canvas front end, which knows only `finished` and `error`: a stopped run "
                     "ends with `finished` and `\"status\": \"stopped\"` in its data instead of `stopped`"))
                 ) -> StreamingResponse:
    r = request.app.state.aredis
    known: bool | None = False
    if MODEL_NAME_RE.match(task_id):
        try:
            known = bool(await r.exists(rev.task_key(task_id)))
        except (redis.RedisError, OSError):
            # Redis is away: answer 200 and wait for it in the stream, as a client already connected would (an
            # EventSource gives up for good on an error status, but reconnects after a stream ends).
            known = None
    if known is False:
        raise HTTPException(404, f"no task {json.dumps(task_id)[:80]}")
    after = (last_event_id or "").strip() or "0-0"
    if not STREAM_ID.match(after) or max(_id(after)) >= 2**64:  # Redis ids are two unsigned 64-bit numbers
        raise HTTPException(400, f"Last-Event-ID must be an event id of this stream, like 1700000000000-0 (the "
                                 f"id: line of a message), got {json.dumps(after)[:80]}")
    return StreamingResponse(follow(r, task_id, after, request.app.state.settings.sse_keepalive_s,
                                    rev.redis_wait_s(), known=known is not None,
                                    compat=SeedCompat(r, task_id) if compat == "seed" else None),
                             media_type="text/event-stream", headers=SSE_HEADERS)
