"""RQ job entry points and the worker that runs them (DESIGN.md §5).

A task is one RQ job whose id is the task id. :func:`submit` records the request and the ``queued`` event in
Redis and enqueues :func:`train_job`; a worker (``slmb worker``) forks a work-horse per job, which calls
:func:`slmb.core.trainer.train` with a Redis event sink and :class:`~slmb.api.redis_events.RedisControl`.

How a run ends when the trainer cannot say so itself:
- forced stop: RQ kills the work-horse and calls :func:`on_stopped` in the worker, which ends the stream
  with ``stop_forced`` and ``stopped``;
- the work-horse dies (OOM killer, a crash): its worker sees it at once and ends the stream with ``error``;
- the worker is killed: the work-horse dies with it (``PR_SET_PDEATHSIG``), the liveness key the worker
  renewed expires, and :func:`reap_dead_tasks` (run by the API every few seconds and by ``slmb train
  --queue`` while it follows) fails the job and ends the stream with ``error``. RQ's own abandoned-job check
  would take over a minute.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

import redis
from rq import Callback, Queue, Worker, get_current_job
from rq.job import JobStatus
from rq.job_lifecycle import record_job_failure
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from slmb.api import redis_events as rev
from slmb.core import events as ev
from slmb.core.store import new_task_id

log = logging.getLogger("slmb.worker")

QUEUE_ENV, DEFAULT_QUEUE = "SLMB_QUEUE", "slmb"
HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S = "SLMB_HEARTBEAT_S", 2  # whole seconds: RQ's monitor times with alarm()
HEARTBEAT_MISSES = 3  # the liveness key lives this many intervals
FINALIZE_TTL_S = 120  # liveness granted to a worker's stop/failure callback, which may wait on MLflow
JOB_TIMEOUT_ENV = "SLMB_JOB_TIMEOUT_S"  # RQ's default of 180 s would kill every real training run


def queue_name() -> str:
    return os.environ.get(QUEUE_ENV) or DEFAULT_QUEUE


def heartbeat_s() -> int:
    return max(1, int(os.environ.get(HEARTBEAT_ENV) or DEFAULT_HEARTBEAT_S))


def get_queue(conn: redis.Redis, name: str | None = None) -> Queue:
    # JSON, not pickle: nothing a worker reads from Redis is ever unpickled.
    return Queue(name or queue_name(), connection=conn, serializer=JSONSerializer)


def submit(conn: redis.Redis, request: Mapping[str, Any], *, task_id: str | None = None,
           queue: str | None = None) -> str:
    """Record a (validated) request in Redis, emit ``queued`` and enqueue its training job. Returns the task id,
    which is also the RQ job id."""
    task_id = task_id or new_task_id()
    q = get_queue(conn, queue)
    model_name = request.get("modelName") or request.get("model_name") or ""
    with conn.pipeline() as pipe:
        pipe.hset(rev.task_key(task_id), mapping={"model_name": model_name, "queue": q.name,
                                                  "created": time.time()})
        pipe.set(rev.request_key(task_id), json.dumps(dict(request)))
        pipe.execute()
    control = rev.RedisControl(conn)
    control.write_status(task_id, "queued", model_name=model_name)
    # `queued` goes into the stream before the job exists, so no worker's `started` can precede it.
    rev.append_event(conn, ev.Queued(task_id=task_id, position=q.count))
    timeout = int(os.environ.get(JOB_TIMEOUT_ENV) or -1)  # -1: no limit
    ttl = rev.task_ttl_s()
    try:
        q.enqueue_call(train_job, args=(task_id,), job_id=task_id, timeout=timeout, result_ttl=ttl,
                       failure_ttl=ttl, description=f"train {model_name or task_id}",
                       on_failure=Callback(on_failure), on_stopped=Callback(on_stopped))
    except Exception as exc:
        control.close_failed(task_id, f"could not enqueue the job: {exc}", type(exc).__name__)
        raise
    return task_id


def enqueue_request(conn: redis.Redis, request: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                    *, queue: str | None = None) -> str:
    """Validate a request (with ``slmb train``'s overrides) and :func:`submit` it. Raises
    :class:`~slmb.core.validate.RequestInvalidError` listing every problem. Returns the task id."""
    from slmb.core.trainer import apply_overrides
    from slmb.core.validate import require_valid

    body = apply_overrides(request, overrides) if isinstance(request, Mapping) else request
    report = require_valid(body)
    task_id = new_task_id()
    if not report.request.model_name:  # the same default the trainer would pick
        body["modelName"] = f"model-{task_id[:8]}"
    return submit(conn, body, task_id=task_id, queue=queue)


def load_request(conn: redis.Redis, task_id: str) -> dict[str, Any]:
    raw = conn.get(rev.request_key(task_id))
    if raw is None:
        raise LookupError(f"the request of task {task_id} is no longer in Redis")
    return json.loads(raw)


# ---------------------------------------------------------------------------------------------------- job


def train_job(task_id: str) -> dict[str, Any]:
    """What the work-horse runs: train the stored request, events to the task's stream."""
    job = get_current_job()
    conn = job.connection
    die_with_parent()
    control = rev.RedisControl(conn)
    ended = rev.terminal_event(conn, task_id)
    if ended:  # cancelled while a worker was taking it
        return {"task_id": task_id, "state": ended}
    from slmb.core.trainer import train

    try:
        result = train(load_request(conn, task_id), task_id=task_id, sinks=[rev.RedisEventSink(conn, task_id)],
                       control=control)
    except Exception as exc:
        # The trainer reports its own errors; this covers what fails before it can (a missing request).
        control.close_failed(task_id, f"{type(exc).__name__}: {exc}", type(exc).__name__)
        raise
    return _jsonable(result)


def _jsonable(result: Any) -> dict[str, Any]:
    """The trainer's result as the job's return value (RQ stores it as JSON)."""
    data = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else {"result": result}
    return json.loads(json.dumps(data, default=str))


def on_stopped(job: Any, connection: redis.Redis) -> None:
    """RQ killed the work-horse on ``send_stop_job_command``: end the stream as the trainer would have."""
    beat(connection, job.id, FINALIZE_TTL_S)
    rev.RedisControl(connection).close_forced(job.id, "the training process was killed (force_kill)")


def on_failure(job: Any, connection: redis.Redis, exc_type: type, exc_value: BaseException, tb: Any) -> None:
    """The job failed: the work-horse died, RQ found it abandoned, or the trainer raised (then its own
    ``error`` event is already there and this one is dropped)."""
    message = str(exc_value) or exc_type.__name__
    if exc_type.__name__ == "AbandonedJobError":
        message = "the worker running this task was lost"
    beat(connection, job.id, FINALIZE_TTL_S)
    rev.RedisControl(connection).close_failed(job.id, message, exc_type.__name__)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (a no-op elsewhere).

    The work-horse calls it with SIGKILL: RQ puts the horse in its own process group, so a killed worker would
    otherwise leave an orphan that trains on, unsupervised, after its job has been declared failed. ``slmb
    serve`` starts its Redis and workers with it, so nothing outlives a killed ``serve``.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def beat(conn: redis.Redis, task_id: str, ttl_s: float | None = None) -> None:
    """Renew a task's liveness key (``slmb:task:<id>:alive``)."""
    conn.set(rev.alive_key(task_id), os.getpid(), px=int((ttl_s or heartbeat_s() * HEARTBEAT_MISSES) * 1000))


class TrainingWorker(Worker):
    """RQ's forking worker, renewing the liveness key of the task it runs from its own process (not the
    work-horse's): a horse busy in a long call that holds the GIL (``torch.compile``) never looks dead, a dead
    horse is handled by this worker (RQ's failure callback), and a dead worker stops the key."""

    def execute_job(self, job: Any, queue: Queue) -> None:
        with self.connection.pipeline() as pipe:  # one transaction: a running task always has a live key
            pipe.sadd(rev.RUNNING, job.id)
            pipe.set(rev.alive_key(job.id), os.getpid(), px=heartbeat_s() * HEARTBEAT_MISSES * 1000)
            pipe.execute()
        try:
            super().execute_job(job, queue)
        finally:
            self.connection.delete(rev.alive_key(job.id))

    def maintain_heartbeats(self, job: Any, execution: Any) -> None:
        super().maintain_heartbeats(job, execution)
        beat(self.connection, job.id)

    def handle_work_horse_killed(self, job: Any, retpid: Any, ret_val: Any, rusage: Any) -> None:
        """The work-horse died without being asked to (RQ calls no failure callback for that)."""
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        if ret_val and os.WIFSIGNALED(ret_val):
            sig = signal.Signals(os.WTERMSIG(ret_val))
            how = f"was killed by {sig.name}" + (" (often the out-of-memory killer)" if sig == signal.SIGKILL else "")
        else:
            how = f"exited with status {os.waitstatus_to_exitcode(ret_val) if ret_val is not None else '?'}"
        beat(self.connection, job.id, FINALIZE_TTL_S)
        rev.RedisControl(self.connection).close_failed(job.id, f"the training process {how}", "ProcessDied")


def reap_dead_tasks(conn: redis.Redis) -> list[str]:
    """Fail the tasks whose training process stopped beating without ending its stream. Returns their ids.

    Safe to run from many places at once: the terminal ``error`` is appended once, and failing an RQ job
    that has already failed changes nothing."""
    reaped = []
    for raw in conn.smembers(rev.RUNNING):
        task_id = raw.decode()
        if rev.terminal_event(conn, task_id):
            conn.srem(rev.RUNNING, task_id)
            continue
        if conn.exists(rev.alive_key(task_id)):
            continue
        message = (f"no heartbeat from the task's worker for {heartbeat_s() * HEARTBEAT_MISSES} s: the worker "
                   "was killed or lost, or the job ended without a final event")
        job = rev.fetch_job(conn, task_id)
        if job is not None and job.get_status() == JobStatus.STARTED:
            with conn.pipeline() as pipe:
                StartedJobRegistry(job.origin, connection=conn, serializer=JSONSerializer).remove_executions(
                    job, pipeline=pipe)
                record_job_failure(job, message, pipe)
                pipe.execute()
        rev.RedisControl(conn).close_failed(task_id, message, "WorkerLost")
        conn.srem(rev.RUNNING, task_id)
        reaped.append(task_id)
        log.warning("task %s: %s", task_id, message)
    return reaped


# ---------------------------------------------------------------------------------------------------- worker


def preload() -> None:
    """Import what every job needs once, in the worker: each job's work-horse is a fork and starts warm."""
    import mlflow.tracking  # noqa: F401 - the tracking sink's client, seconds to import
    import torch  # noqa: F401

    import slmb.core.trainer  # noqa: F401


def run_worker(redis_url: str, queues: list[str] | None = None, *, burst: bool = False,
               name: str | None = None) -> bool:
    """Run an RQ worker on ``queues`` (default: ``$SLMB_QUEUE`` or ``slmb``) until it is stopped."""
    conn = rev.connect(redis_url)
    preload()
    # RQ blocks for worker_ttl - 15 s waiting for a job and heartbeats in between: this makes an idle worker
    # heartbeat as often as a busy one, so /healthz can tell a dead worker from a quiet one within seconds.
    worker = TrainingWorker([get_queue(conn, q) for q in (queues or [queue_name()])], connection=conn,
                            serializer=JSONSerializer, name=name, job_monitoring_interval=heartbeat_s(),
                            worker_ttl=heartbeat_s() + 15)
    return worker.work(burst=burst, with_scheduler=False, logging_level="INFO")
