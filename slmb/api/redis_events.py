"""Events, stop flags and run status of queued training runs, kept in Redis (DESIGN.md §4, §5).

Keys of one task::

    slmb:task:<id>            hash: model_name, queue, created, ``terminal`` once the run has ended, and
                              ``writer``/``seq``: the trainer's sink and the last event it numbered, and
                              ``mlflow_checked`` once reconcile has seen the ended run's MLflow run closed
    slmb:task:<id>:events     stream: one entry per event, fields ``event`` (the name) and ``json`` (the wire form)
    slmb:task:<id>:status     hash: the run status (``Control.write_status``), each field a JSON value
    slmb:task:<id>:request    the request JSON as sent
    slmb:task:<id>:stop       the stop flag, ``{"force": bool, "ts": float}``
    slmb:task:<id>:alive      the trainer's heartbeat: a key with a short TTL that the training process renews
    slmb:task:<id>:grace      the reaper's note that it gave a lapsed heartbeat one more period (worker.py)
    slmb:running              the tasks whose trainer has started and not yet ended

Events live in a stream, not pub/sub, so a client that connects late or reconnects with ``Last-Event-ID``
reads everything it missed. Every stream ends with exactly one terminal event (finished, stopped, error): the
script that appends refuses anything after the first one, so a trainer's ``finished`` racing a forced
``stopped``, or a ``step`` from a process that is being killed, can never follow or double the end. The
terminal event also sets an expiry on all keys of the task, so Redis does not grow with every run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import redis
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from slmb.api.trust import redact_event
from slmb.core import events as ev
from slmb.core.control import DONE_STATES, State
from slmb.core.store import StoreError, check_task_id

log = logging.getLogger("slmb.api")

RUNNING = "slmb:running"
STREAM_MAXLEN_ENV, TASK_TTL_ENV = "SLMB_STREAM_MAXLEN", "SLMB_TASK_TTL_S"
DEFAULT_STREAM_MAXLEN = 10_000  # approximate (XADD MAXLEN ~): step events are throttled, so runs rarely reach it
DEFAULT_TASK_TTL_S = 7 * 24 * 3600  # how long an ended task's events and status stay readable
EVENT_BUFFER_ENV, DEFAULT_EVENT_BUFFER = "SLMB_EVENT_BUFFER", 10_000  # events a run queues while Redis is away
REDIS_WAIT_ENV, DEFAULT_REDIS_WAIT_S = "SLMB_REDIS_WAIT_S", 60.0  # how long a run's end or a reader waits for it
DROPPABLE = frozenset({"step", "progress"})  # throttled samples: what a full buffer gives up first
RESEND_WINDOW = 2_000  # delivered events kept to re-send what a restarted Redis lost
SEND_BATCH = 200

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


def event_buffer() -> int:
    return int(os.environ.get(EVENT_BUFFER_ENV) or DEFAULT_EVENT_BUFFER)


def redis_wait_s() -> float:
    return float(os.environ.get(REDIS_WAIT_ENV) or DEFAULT_REDIS_WAIT_S)


# KEYS: task hash, stream, status, request, stop flag, running set.
# ARGV: maxlen, event name, wire JSON, "1" if terminal, ttl, task id, and for a numbered event (a sink's) its
# writer, seq and the seq of the writer's event before it ("" when not numbered).
# A numbered event at or below the last seq its writer stored is a retry whose reply was lost: skipped. One whose
# predecessor is not the last stored is refused (SLMB_GAP): Redis lost events (a restart), the writer re-sends.
_APPEND_LUA = """
if redis.call('HEXISTS', KEYS[1], 'terminal') == 1 then return false end
if ARGV[8] ~= '' then
  local last = redis.call('HMGET', KEYS[1], 'writer', 'seq')
  local stored = 0
  if last[1] == ARGV[7] then stored = tonumber(last[2]) end
  if tonumber(ARGV[8]) <= stored then return false end
  if tonumber(ARGV[9]) ~= stored then
    return redis.error_reply('SLMB_GAP the stream has this writer up to event ' .. stored .. ', not ' .. ARGV[9])
  end
  redis.call('HSET', KEYS[1], 'writer', ARGV[7], 'seq', ARGV[8])
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'event', ARGV[2], 'json', ARGV[3])
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'terminal', ARGV[2])
  redis.call('SREM', KEYS[6], ARGV[6])
  for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
end
return id
"""


def _append(script: Any, client: Any, event: ev.Event, writer: str = "", seq: int | None = None,
            prev: int = 0) -> Any:
    tid = event.task_id
    # What enters the stream is read by HTTP clients: no absolute paths of this machine (the JSONL log keeps them).
    args = [stream_maxlen(), event.name, redact_event(event).to_json(), "1" if event.terminal else "0",
            task_ttl_s(), tid, writer, "" if seq is None else seq, prev]
    return script(keys=[*task_keys(tid), RUNNING], args=args, client=client)


def append_event(conn: redis.Redis, event: ev.Event) -> str | None:
    """Add ``event`` to its task's stream. Returns the stream id, or ``None`` when the stream has already
    ended (the event is dropped)."""
    result = _append(conn.register_script(_APPEND_LUA), conn, event)
    return _text(result) if result else None


def _status_fields(task_id: str, state: State, info: dict[str, Any]) -> dict[str, str]:
    fields = {k: json.dumps(v, default=str) for k, v in info.items()}
    fields.update(task_id=json.dumps(task_id), state=json.dumps(state), updated=json.dumps(time.time()))
    return fields


class RedisEventSink:
    """Sink that appends a run's events to its task's stream, in order, without ever holding up the training
    loop or giving up on Redis while the run lasts.

    ``emit`` only queues the event; a thread appends the queue in batches. When Redis fails (down, restarting,
    stalled past the socket timeout) the thread retries with backoff (0.1 s doubling to 5 s) while the queue
    grows up to ``SLMB_EVENT_BUFFER`` events; past that the oldest ``step``/``progress`` events are dropped
    (a ``warning`` says so), never any other event. Each event carries this sink's sequence number and its
    predecessor's, which the append script checks: re-sending a batch whose reply was lost never doubles an
    event, and a restarted Redis that lost the last events it had acknowledged (an append-only file syncs once a
    second) refuses the next one, so the thread re-sends them first, from the last ``RESEND_WINDOW`` it keeps.
    ``close`` waits up to ``SLMB_REDIS_WAIT_S`` for the queue, whose last event is the terminal one, to drain.

    The run's status writes and stop-flag reads go through the same thread (:class:`TrainerControl`), so the
    status hash is written in order with the events and a Redis fault never reaches the training loop.
    """

    def __init__(self, conn: redis.Redis, task_id: str, *, buffer_max: int | None = None):
        self.conn, self.task_id = conn, task_id
        self.buffer_max = buffer_max or event_buffer()
        self.writer = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._script = conn.register_script(_APPEND_LUA)
        self._queue: deque[tuple[int | None, ev.Event | dict[str, str]]] = deque()  # (seq, event or status)
        self._sent: deque[tuple[int, ev.Event]] = deque(maxlen=RESEND_WINDOW)  # delivered, kept for a resend
        self._cond = threading.Condition()
        self._seq = self._dropped = self._stored = 0  # _stored: the last seq Redis is known to hold
        self._closed = self._abandoned = self._resync = self._check_stop = self._stop = False
        self._stop_read = False
        self._thread = threading.Thread(target=self._run, name=f"redis-events-{task_id[:8]}", daemon=True)
        self._thread.start()

    def emit(self, event: ev.Event) -> None:
        with self._cond:
            self._seq += 1
            self._queue.append((self._seq, event))
            if len(self._queue) > self.buffer_max:
                self._drop_one()
            self._cond.notify_all()

    def write_status(self, fields: dict[str, str]) -> None:
        with self._cond:
            self._queue.append((None, fields))
            self._cond.notify_all()

    def stop_requested(self) -> bool:
        """The stop flag as last read; each call asks the thread to read it again. The first call reads it
        here (a run stopped while queued must see it before it starts)."""
        if not self._stop_read:
            self._stop_read = True
            with contextlib.suppress(redis.RedisError):
                self._stop = bool(self.conn.exists(stop_key(self.task_id)))
        with self._cond:
            self._check_stop = True
            self._cond.notify_all()
        return self._stop

    def close(self) -> None:
        wait_s = redis_wait_s()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: not self._queue, timeout=wait_s):
                self._abandoned = True
                self._cond.notify_all()
                log.error("task %s: %d events (the last: %s) could not be written to Redis within %g s "
                          "(SLMB_REDIS_WAIT_S)", self.task_id, len(self._queue), self._last_name(), wait_s)

    def _last_name(self) -> str:
        item = self._queue[-1][1] if self._queue else None
        return item.name if isinstance(item, ev.Event) else "status"

    def _drop_one(self) -> None:
        for i in range(len(self._queue)):
            item = self._queue[i][1]
            if isinstance(item, ev.Event) and item.name in DROPPABLE:
                del self._queue[i]
                self._dropped += 1
                if self._dropped == 1:
                    self._seq += 1
                    self._queue.append((self._seq, ev.Warning(
                        task_id=self.task_id, source=type(self).__name__,
                        message=f"Redis is unreachable and {self.buffer_max} events are waiting for it: older "
                                "step and progress events are being dropped (SLMB_EVENT_BUFFER)")))
                return

    def _run(self) -> None:
        backoff = 0.0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._check_stop or self._closed or self._abandoned)
                if self._abandoned or (self._closed and not self._queue):
                    return
            batch, check = [], False
            try:
                if self._resync:
                    self._requeue_lost()
                with self._cond:
                    batch = list(itertools.islice(self._queue, SEND_BATCH))
                    check, self._check_stop = self._check_stop, False
                if batch:
                    self._send(batch)
                if check:
                    self._stop = self._stop or bool(self.conn.exists(stop_key(self.task_id)))
            except Exception as exc:  # Redis down or stalled, mostly; whatever it is, the run's events wait
                if backoff == 0:
                    log.warning("task %s: writing events to Redis failed (%s: %s); retrying until it is back",
                                self.task_id, type(exc).__name__, exc)
                backoff = min(max(0.1, backoff * 2), 5.0)
                with self._cond:
                    self._resync = True
                    self._check_stop = self._check_stop or check
                    self._cond.wait_for(lambda: self._abandoned, timeout=backoff)
                continue
            if backoff:
                log.warning("task %s: Redis is back; events delivered", self.task_id)
            backoff = 0.0
            with self._cond:
                for sent in batch:  # the queue starts with the batch, less what emit dropped meanwhile
                    if self._queue and self._queue[0] is sent:
                        self._queue.popleft()
                    if sent[0] is not None:
                        self._sent.append(sent)
                self._cond.notify_all()

    def _send(self, batch: list[tuple[int | None, ev.Event | dict[str, str]]]) -> None:
        prev = self._stored
        with self.conn.pipeline(transaction=False) as pipe:
            for seq, item in batch:
                if isinstance(item, ev.Event):
                    try:
                        _append(self._script, pipe, item, self.writer, seq, prev)
                    except Exception as exc:  # it cannot be serialised (a pipeline sends nothing yet): say so
                        _append(self._script, pipe, ev.Warning(
                            task_id=self.task_id, source=type(self).__name__,
                            message=f"a {item.name} event could not be stored: {type(exc).__name__}: {exc}"),
                            self.writer, seq, prev)
                    prev = seq
                else:
                    pipe.hset(status_key(self.task_id), mapping=item)
            pipe.execute()
        self._stored = prev

    def _requeue_lost(self) -> None:
        """Put back, ahead of the queue, the delivered events Redis no longer has (it restarted and its
        append-only file missed their last second): those numbered above the last seq it stored for us. A lost
        event older than the resend window stays lost; the stream goes on from what Redis has."""
        writer, seq = self.conn.hmget(task_key(self.task_id), "writer", "seq")
        stored = int(seq) if writer is not None and _text(writer) == self.writer else 0
        with self._cond:
            lost = [sent for sent in self._sent if sent[0] > stored]
            for _ in lost:
                self._sent.pop()
            self._queue.extendleft(reversed(lost))
            self._stored, self._resync = stored, False


class TrainerControl:
    """The :class:`~slmb.core.control.Control` of a training process in a worker: status writes and stop-flag
    reads go through the run's :class:`RedisEventSink`, so they never block or fail the training loop."""

    def __init__(self, sink: RedisEventSink):
        self.sink = sink
        self.redis = RedisControl(sink.conn)

    def stop_requested(self, task_id: str) -> bool:
        return self.sink.stop_requested()

    def write_status(self, task_id: str, state: State, **info: Any) -> None:
        self.sink.write_status(_status_fields(task_id, state, info))

    def register_process(self, task_id: str, pid: int | None = None) -> None:
        import socket

        self.sink.write_status({"pid": json.dumps(os.getpid() if pid is None else pid),
                                "host": json.dumps(socket.gethostname())})

    def clear_stop(self, task_id: str) -> None:
        self.redis.clear_stop(task_id)

    def read_status(self, task_id: str) -> dict[str, Any] | None:
        return self.redis.read_status(task_id)

    def request_stop(self, task_id: str, force: bool = False) -> dict[str, Any]:
        return self.redis.request_stop(task_id, force)


def task_exists(conn: redis.Redis, task_id: str) -> bool:
    return bool(conn.exists(task_key(task_id)))


def terminal_event(conn: redis.Redis, task_id: str) -> str | None:
    return _text(conn.hget(task_key(task_id), "terminal"))


def read_events(conn: redis.Redis, task_id: str, after: str = "0-0") -> list[tuple[str, dict[str, Any]]]:
    """Every event stored after stream id ``after``, as ``(id, wire dict)``."""
    entries = conn.xrange(events_key(task_id), min=f"({after}" if after != "0-0" else "-")
    return [(_text(eid), json.loads(fields[b"json"])) for eid, fields in entries]


class EventsUnavailable(RuntimeError):
    """Redis stayed unreachable for longer than ``SLMB_REDIS_WAIT_S`` while following a task's events."""


def follow_events(conn: redis.Redis, task_id: str, after: str = "0-0", *, block_s: float = 2.0,
                  idle: Callable[[], object] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(id, wire dict)`` from the start (or after ``after``) and then live, until the terminal event.

    ``idle()`` is called whenever ``block_s`` passes without an event (the CLI uses it to look for dead
    workers); the generator also ends if the task ended while it was not looking. A Redis fault (a restart, a
    stall) is ridden out: the generator retries, resuming after the last event it yielded, and raises
    :class:`EventsUnavailable` only when Redis has been unreachable for ``SLMB_REDIS_WAIT_S``.
    """
    cursor, key = after, events_key(task_id)
    down_since, backoff = None, 0.0
    while True:
        try:
            reply = conn.xread({key: cursor}, count=500, block=int(block_s * 1000))
            down_since, backoff = None, 0.0
            if not reply:
                if terminal_event(conn, task_id) and not conn.xread({key: cursor}, count=1):
                    return
                if idle is not None:
                    idle()
                continue
        except redis.RedisError as exc:
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > redis_wait_s():
                raise EventsUnavailable(f"Redis has been unreachable for {redis_wait_s():g} s (SLMB_REDIS_WAIT_S): "
                                        f"{type(exc).__name__}: {exc}; the last event read was {cursor}") from exc
            backoff = min(max(0.1, backoff * 2), 2.0)
            time.sleep(backoff)
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
                      "message": status.get("message"), "mlflow_url": meta.get("mlflow_url")})
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
        self.conn.hset(status_key(task_id), mapping=_status_fields(task_id, state, info))

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
