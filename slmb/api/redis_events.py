"""Events, stop flags and run status of queued training runs, kept in Redis (DESIGN.md §4, §5).

Keys of one task::

    slmb:task:<id>            hash: model_name, queue, created, and ``terminal`` once the run has ended
    slmb:task:<id>:events     stream: one entry per event, fields ``event`` (the name) and ``json`` (the wire form)
    slmb:task:<id>:status     hash: the run status (``Control.write_status``), each field a JSON value
    slmb:task:<id>:request    the request JSON as sent
    slmb:task:<id>:stop       the stop flag, ``{"force": bool, "ts": float}``
    slmb:task:<id>:alive      the trainer's heartbeat: a key with a short TTL that the training process renews
    slmb:running              the tasks whose trainer has started and not yet ended

Events live in a stream, not pub/sub, so a client that connects late or reconnects with ``Last-Event-ID``
reads everything it missed. Every stream ends with exactly one terminal event (finished, stopped, error): the
script that appends refuses anything after the first one, so a trainer's ``finished`` racing a forced
``stopped``, or a ``step`` from a process that is being killed, can never follow or double the end. The
terminal event also sets an expiry on all keys of the task, so Redis does not grow with every run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from slmb.core import events as ev
from slmb.core.control import DONE_STATES, State
from slmb.core.store import StoreError, check_task_id

log = logging.getLogger("slmb.api")

RUNNING = "slmb:running"
STREAM_MAXLEN_ENV, TASK_TTL_ENV = "SLMB_STREAM_MAXLEN", "SLMB_TASK_TTL_S"
DEFAULT_STREAM_MAXLEN = 10_000  # approximate (XADD MAXLEN ~): step events are throttled, so runs rarely reach it
DEFAULT_TASK_TTL_S = 7 * 24 * 3600  # how long an ended task's events and status stay readable

# RQ's job states in the words of the Celery backend the canvas was written for.
CELERY_STATES = {JobStatus.CREATED: "PENDING", JobStatus.QUEUED: "PENDING", JobStatus.DEFERRED: "PENDING",
                 JobStatus.SCHEDULED: "PENDING", JobStatus.READY_TO_ENQUEUE: "PENDING",
                 JobStatus.RATE_LIMITED: "PENDING", JobStatus.STARTED: "STARTED", JobStatus.FINISHED: "SUCCESS",
                 JobStatus.FAILED: "FAILURE", JobStatus.STOPPED: "REVOKED", JobStatus.CANCELED: "REVOKED"}
TERMINAL_CELERY = {"finished": "SUCCESS", "stopped": "REVOKED", "error": "FAILURE"}


def task_key(task_id: str) -> str:
    return f"slmb:task:{task_id}"


def events_key(task_id: str) -> str:
    return f"slmb:task:{task_id}:events"


def status_key(task_id: str) -> str:
    return f"slmb:task:{task_id}:status"


def request_key(task_id: str) -> str:
    return f"slmb:task:{task_id}:request"


def stop_key(task_id: str) -> str:
    return f"slmb:task:{task_id}:stop"


def alive_key(task_id: str) -> str:
    return f"slmb:task:{task_id}:alive"


def task_keys(task_id: str) -> list[str]:
    return [task_key(task_id), events_key(task_id), status_key(task_id), request_key(task_id), stop_key(task_id)]


def connect(url: str) -> redis.Redis:
    """A client for ``url``. Replies stay bytes, as RQ needs (it stores binary job data); this module decodes
    what it reads. Health-checked, so a restarted Redis is noticed."""
    return redis.Redis.from_url(url, health_check_interval=30)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def stream_maxlen() -> int:
    return int(os.environ.get(STREAM_MAXLEN_ENV) or DEFAULT_STREAM_MAXLEN)


def task_ttl_s() -> int:
    return int(os.environ.get(TASK_TTL_ENV) or DEFAULT_TASK_TTL_S)


# KEYS: task hash, stream, status, request, stop flag, running set.
# ARGV: maxlen, event name, wire JSON, "1" if terminal, ttl, task id.
_APPEND_LUA = """
if redis.call('HEXISTS', KEYS[1], 'terminal') == 1 then return false end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'event', ARGV[2], 'json', ARGV[3])
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'terminal', ARGV[2])
  redis.call('SREM', KEYS[6], ARGV[6])
  for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
end
return id
"""


def append_event(conn: redis.Redis, event: ev.Event) -> str | None:
    """Add ``event`` to its task's stream. Returns the stream id, or ``None`` when the stream has already
    ended (the event is dropped)."""
    tid = event.task_id
    args = [stream_maxlen(), event.name, event.to_json(), "1" if event.terminal else "0", task_ttl_s(), tid]
    result = conn.register_script(_APPEND_LUA)(keys=[*task_keys(tid), RUNNING], args=args)
    return _text(result) if result else None


class RedisEventSink:
    """Sink that appends every event to the task's Redis stream (see :func:`append_event`)."""

    def __init__(self, conn: redis.Redis, task_id: str):
        self.conn, self.task_id = conn, task_id

    def emit(self, event: ev.Event) -> None:
        append_event(self.conn, event)

    def close(self) -> None:
        pass


def task_exists(conn: redis.Redis, task_id: str) -> bool:
    return bool(conn.exists(task_key(task_id)))


def terminal_event(conn: redis.Redis, task_id: str) -> str | None:
    return _text(conn.hget(task_key(task_id), "terminal"))


def read_events(conn: redis.Redis, task_id: str, after: str = "0-0") -> list[tuple[str, dict[str, Any]]]:
    """Every event stored after stream id ``after``, as ``(id, wire dict)``."""
    entries = conn.xrange(events_key(task_id), min=f"({after}" if after != "0-0" else "-")
    return [(_text(eid), json.loads(fields[b"json"])) for eid, fields in entries]


def follow_events(conn: redis.Redis, task_id: str, after: str = "0-0", *, block_s: float = 2.0,
                  idle: Callable[[], object] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(id, wire dict)`` from the start (or after ``after``) and then live, until the terminal event.

    ``idle()`` is called whenever ``block_s`` passes without an event (the CLI uses it to look for dead
    workers); the generator also ends if the task ended while it was not looking.
    """
    cursor, key = after, events_key(task_id)
    while True:
        reply = conn.xread({key: cursor}, count=500, block=int(block_s * 1000))
        if not reply:
            if terminal_event(conn, task_id) and not conn.xread({key: cursor}, count=1):
                return
            if idle is not None:
                idle()
            continue
        for eid, fields in reply[0][1]:
            cursor = _text(eid)
            yield cursor, json.loads(fields[b"json"])
            if fields[b"event"].decode() in ev.TERMINAL:
                return


def follow_into(conn: redis.Redis, task_id: str, sink: ev.Sink, *, idle: Callable[[], object] | None = None
                ) -> str:
    """Emit a task's events, from the start and then live, to ``sink``; returns the terminal event's name."""
    name = ""
    for _, wire in follow_events(conn, task_id, idle=idle):
        name = wire["event"]
        if name in ev.EVENT_TYPES:
            sink.emit(ev.parse_event(wire))
    return name


def list_tasks(conn: redis.Redis) -> list[dict[str, Any]]:
    """The tasks Redis knows (until they expire), oldest first: id, model, state, Celery-style state, step."""
    tasks = []
    for key in conn.scan_iter(match=task_key("*"), count=1000):
        task_id = key.decode().removeprefix(task_key(""))
        if ":" in task_id:  # a task's sub-key (events, status, ...)
            continue
        meta = {k.decode(): v.decode() for k, v in conn.hgetall(key).items()}
        status = RedisControl(conn).read_status(task_id) or {}
        tasks.append({"task_id": task_id, "model_name": meta.get("model_name"), "queue": meta.get("queue"),
                      "created": float(meta.get("created") or 0), "state": status.get("state", "queued"),
                      "celery_state": celery_state(conn, task_id), "step": status.get("step"),
                      "message": status.get("message")})
    return sorted(tasks, key=lambda t: t["created"])


# ---------------------------------------------------------------------------------------------------- control


def fetch_job(conn: redis.Redis, task_id: str) -> Job | None:
    try:
        return Job.fetch(task_id, connection=conn, serializer=JSONSerializer)
    except NoSuchJobError:
        return None


def celery_state(conn: redis.Redis, task_id: str) -> str:
    """PENDING, STARTED, SUCCESS, FAILURE or REVOKED: how the run ended if it has, else the RQ job's state."""
    terminal = terminal_event(conn, task_id)
    if terminal:
        return TERMINAL_CELERY[terminal]
    job = fetch_job(conn, task_id)
    return CELERY_STATES.get(job.get_status(), "PENDING") if job is not None else "PENDING"


class RedisControl:
    """The stop flag and run status of :mod:`slmb.core.control`, kept in Redis so that the API, the CLI and
    workers on other machines share them. It also stops RQ jobs: a queued one is cancelled, a forced stop
    kills the job's work-horse with RQ's ``send_stop_job_command``."""

    def __init__(self, conn: redis.Redis):
        self.conn = conn

    def stop_requested(self, task_id: str) -> bool:
        return bool(self.conn.exists(stop_key(task_id)))

    def clear_stop(self, task_id: str) -> None:
        self.conn.delete(stop_key(task_id))

    def write_status(self, task_id: str, state: State, **info: Any) -> None:
        fields = {k: json.dumps(v, default=str) for k, v in info.items()}
        fields.update(task_id=json.dumps(task_id), state=json.dumps(state), updated=json.dumps(time.time()))
        self.conn.hset(status_key(task_id), mapping=fields)

    def read_status(self, task_id: str) -> dict[str, Any] | None:
        raw = self.conn.hgetall(status_key(task_id))
        return {k.decode(): json.loads(v) for k, v in raw.items()} or None

    def register_process(self, task_id: str, pid: int | None = None) -> None:
        import socket

        self.conn.hset(status_key(task_id), mapping={"pid": json.dumps(os.getpid() if pid is None else pid),
                                                      "host": json.dumps(socket.gethostname())})

    def request_stop(self, task_id: str, force: bool = False) -> dict[str, Any]:
        """Stop a task wherever it is: cancel it while queued, else set the flag the trainer checks every step;
        ``force`` also kills the job's process. Returns ``{task_id, mode, state, celery_state, message}``."""
        check_task_id(task_id)
        if not task_exists(self.conn, task_id):
            raise StoreError(f"no task {task_id!r}")
        mode = "force_kill" if force else "cooperative_stop"
        state = (self.read_status(task_id) or {}).get("state", "queued")
        terminal = terminal_event(self.conn, task_id)
        if terminal or state in DONE_STATES:
            return self._answer(task_id, mode, f"the run has already {terminal or state}")
        self.conn.set(stop_key(task_id), json.dumps({"force": force, "ts": time.time()}))
        job = fetch_job(self.conn, task_id)
        status = job.get_status() if job is not None else None
        if status is None or CELERY_STATES.get(status) == "PENDING":
            return self._cancel(task_id, job, mode, force)
        if status != JobStatus.STARTED:
            return self._answer(task_id, mode, f"the job has already {status.value}")
        append_event(self.conn, ev.StopRequested(task_id=task_id, force=force))
        if not force:
            return self._answer(task_id, mode, "stop requested; the trainer checkpoints and stops at its next step")
        from rq.command import send_stop_job_command

        try:
            send_stop_job_command(self.conn, task_id, serializer=JSONSerializer)
        except InvalidJobOperation:  # it ended or is between states: the flag still stops it at its next step
            return self._answer(task_id, mode, "the job is not executing on any worker; the stop flag is set")
        return self._answer(task_id, mode, "the worker was told to kill the training process")

    def _cancel(self, task_id: str, job: Job | None, mode: str, force: bool) -> dict[str, Any]:
        if job is not None:
            with contextlib.suppress(InvalidJobOperation):  # already cancelled
                job.cancel()
        # If a worker took the job in the meantime, the flag stops it before its first step; either way the
        # stream ends here, and whatever the trainer emits later is dropped.
        message = "cancelled before it started"
        self._end(task_id, {"message": message}, ev.StopRequested(task_id=task_id, force=force),
                  ev.Status(task_id=task_id, state="stopped", message=message),
                  ev.Stopped(task_id=task_id, reason="cancelled"))
        return self._answer(task_id, mode, message)

    def _end(self, task_id: str, status: dict[str, Any], *events: ev.Event) -> None:
        """End a run from outside its trainer: the status, the task's MLflow run (which its trainer will never
        close), then ``events``, the last one terminal. As with the trainer, a client that sees the terminal
        event finds MLflow up to date. Nothing happens if the run has already ended."""
        if terminal_event(self.conn, task_id):
            return
        state = events[-1].name
        self.write_status(task_id, state, **status)
        from slmb.core import tracking

        try:
            tracking.end_run(task_id, state)
        except Exception as exc:  # tracking never decides how a run ends
            log.warning("task %s: could not close its MLflow run: %s", task_id, exc)
        for event in events:
            append_event(self.conn, event)

    def _answer(self, task_id: str, mode: str, message: str) -> dict[str, Any]:
        state = (self.read_status(task_id) or {}).get("state", "queued")
        return {"task_id": task_id, "mode": mode, "state": state,
                "celery_state": celery_state(self.conn, task_id), "message": message}

    def close_forced(self, task_id: str, message: str) -> None:
        """End the stream of a task whose process was killed: ``stop_forced``, ``status``, ``stopped`` with
        the last step and checkpoint the stream shows (a killed trainer writes nothing more itself)."""
        step = checkpoint = None
        for _, fields in self.conn.xrevrange(events_key(task_id)):  # at most ~MAXLEN entries
            wire = json.loads(fields[b"json"])
            data = wire.get("data") or {}
            if checkpoint is None and wire["event"] == "checkpoint":
                checkpoint = data.get("path")
            if step is None and "step" in data and wire["event"] in ("step", "progress", "checkpoint"):
                step = data["step"]
        self._end(task_id, {"step": step, "checkpoint": checkpoint, "message": message},
                  ev.StopForced(task_id=task_id, message=message),
                  ev.Status(task_id=task_id, state="stopped", message=message),
                  ev.Stopped(task_id=task_id, step=step, checkpoint=checkpoint, reason="force"))

    def close_failed(self, task_id: str, message: str, error_type: str) -> None:
        """End the stream of a task that failed outside the trainer (its process died, RQ failed the job)."""
        self._end(task_id, {"message": message, "error_type": error_type},
                  ev.Status(task_id=task_id, state="error", message=message),
                  ev.Error(task_id=task_id, message=message, type=error_type))
