"""``GET /api/v1/events/{task_id}``: a task's events as Server-Sent Events.

Each message is ``id: <Redis stream id>`` and ``data: {"event": ..., "data": {...}}``. The stream starts with
``connected``, replays everything stored (or everything after ``Last-Event-ID``), follows live with a
blocking ``XREAD``, sends a ``: keep-alive`` comment whenever it has been quiet for the keep-alive interval,
and ends after the terminal event. One ``XREAD`` at a time per client, on a pooled connection: when the
client goes away Starlette cancels the generator, and redis-py drops the connection it was blocked on.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.responses import StreamingResponse

from slmb.api import redis_events as rev
from slmb.core import events as ev
from slmb.core.spec import MODEL_NAME_RE

router = APIRouter(tags=["training"])
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


def sse_message(data: str, event_id: str | None = None) -> str:
    return (f"id: {event_id}\n" if event_id is not None else "") + f"data: {data}\n\n"


async def follow(r, task_id: str, after: str, keepalive_s: float) -> AsyncIterator[str]:
    yield sse_message(ev.Connected(task_id=task_id).to_json(), after)
    key, cursor = rev.events_key(task_id), after
    while True:
        reply = await r.xread({key: cursor}, count=500, block=max(1, int(keepalive_s * 1000)))
        if not reply:
            # Quiet. A task that has ended (and whose end this client has already seen) has nothing more.
            if await r.hexists(rev.task_key(task_id), "terminal") and not await r.xread({key: cursor}, count=1):
                return
            yield ": keep-alive\n\n"
            continue
        for eid, fields in reply[0][1]:
            cursor = eid.decode()
            yield sse_message(fields[b"json"].decode(), cursor)
            if fields[b"event"].decode() in ev.TERMINAL:
                return


@router.get("/events/{task_id}", summary="Follow a task's events (Server-Sent Events)",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}, 404: {"description": "unknown task"}})
async def events(task_id: str, request: Request,
                 last_event_id: str | None = Header(None, description="resume after this stream id")
                 ) -> StreamingResponse:
    r = request.app.state.aredis
    if not MODEL_NAME_RE.match(task_id) or not await r.exists(rev.task_key(task_id)):
        raise HTTPException(404, f"no task {json.dumps(task_id)[:80]}")
    after = last_event_id.strip() if last_event_id and STREAM_ID.match(last_event_id.strip()) else "0-0"
    return StreamingResponse(follow(r, task_id, after, request.app.state.settings.sse_keepalive_s),
                             media_type="text/event-stream", headers=SSE_HEADERS)
