"""RQ job entry points and the worker that runs them (DESIGN.md §5).

A task is one RQ job whose id is the task id. :func:`submit` records the request and the ``queued`` event in
Redis and enqueues :func:`train_job`; a worker (``slmb worker``) forks a work-horse per job, which calls
:func:`slmb.core.trainer.train` with a Redis event sink and :class:`~slmb.api.redis_events.RedisControl`.
A worker started with ``--nproc-per-node N`` ($SLMB_NPROC_PER_NODE) trains each job on N processes instead: the
work-horse runs torchrun, whose ranks (:mod:`slmb.api.rank`) train the job, rank 0 streaming its events; torchrun
and every rank die with the work-horse, so all that follows holds for them too.

How a run ends when the trainer cannot say so itself:
- forced stop: RQ kills the work-horse and calls :func:`on_stopped` in the worker, which ends the stream
  with ``stop_forced`` and ``stopped``;
- the work-horse dies (OOM killer, a crash): its worker sees it at once and ends the stream with ``error``;
- the worker is killed: the work-horse dies with it (``PR_SET_PDEATHSIG``), the liveness key the worker
  renewed expires, and :func:`reap_dead_tasks` (run by the API every few seconds and by ``slmb train
  --queue`` while it follows) fails the job and ends the stream with ``error``, after one more liveness
  period of grace (a Redis stall or restart also lets the key lapse while the worker lives). RQ's own
  abandoned-job check would take over a minute;
- anything else (a job RQ failed or lost, an MLflow run left RUNNING): :func:`reconcile`, run by the API at
  start-up and every ``SLMB_RECONCILE_INTERVAL_S``.

A worker rides out Redis stalls and restarts: heartbeats that fail are skipped while the work-horse trains on,
and when RQ's loop gives up on Redis, :func:`run_worker` waits for it and starts the loop again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import redis
from rq import Callback, Queue, Worker, get_current_job
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from slmb.api import redis_events as rev
from slmb.core import events as ev
from slmb.core.distributed import die_with_parent  # the work-horse calls it; serve starts its children with it
from slmb.core.store import new_task_id

log = logging.getLogger("slmb.worker")

QUEUE_ENV, DEFAULT_QUEUE = "SLMB_QUEUE", "slmb"
HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S = "SLMB_HEARTBEAT_S", 2  # whole seconds: RQ's monitor times with alarm()
HEARTBEAT_MISSES = 3  # the liveness key lives this many intervals
FINALIZE_TTL_S = 120  # liveness granted to a worker's stop/failure callback, which may wait on MLflow
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)
MAX_REDIS_WAIT_S = 10.0  # a worker that lost Redis tries again at least this often
MLFLOW_CHECKED = "mlflow_checked"  # task hash field: reconcile has seen the ended task's MLflow run closed
JOB_TIMEOUT_ENV = "SLMB_JOB_TIMEOUT_S"  # RQ's default of 180 s would kill every real training run
NPROC_ENV = "SLMB_NPROC_PER_NODE"  # processes (devices) a worker trains each job on; unset: in the work-horse
REDIS_URL_ENV = "SLMB_REDIS_URL"  # the worker's Redis, which the ranks of its jobs connect to


def queue_name() -> str:
    return os.environ.get(QUEUE_ENV) or DEFAULT_QUEUE


def nproc_per_node() -> int | None:
    """The processes a worker trains each job on through torchrun (``slmb worker --nproc-per-node``), or None:
    each job trains in the work-horse itself."""
    value = os.environ.get(NPROC_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{NPROC_ENV} must be a whole number >= 1, got {value!r}")
    return int(value)


def heartbeat_s() -> int:
    return max(1, int(os.environ.get(HEARTBEAT_ENV) or DEFAULT_HEARTBEAT_S))


def get_queue(conn: redis.Redis, name: str | None = None) -> Queue:
    # JSON, not pickle: nothing a worker reads from Redis is ever unpickled.
    return Queue(name or queue_name(), connection=conn, serializer=JSONSerializer)


def submit(conn: redis.Redis, request: Mapping[str, Any], *, task_id: str | None = None,
           queue: str | None = None, origin: str = "http") -> str:
    """Record a (validated) request in Redis, emit ``queued`` and enqueue its training job. Returns the task id,
    which is also the RQ job id. ``origin`` "cli" (``slmb train --queue``, the machine's owner) lets the worker
    read local paths; any other task is trained confined (:mod:`slmb.api.trust`)."""
    task_id = task_id or new_task_id()
    q = get_queue(conn, queue)
    model_name = request.get("modelName") or request.get("model_name") or ""
    with conn.pipeline() as pipe:
        pipe.hset(rev.task_key(task_id), mapping={"model_name": model_name, "queue": q.name,
                                                  "created": time.time(), "origin": origin})
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
    return submit(conn, body, task_id=task_id, queue=queue, origin="cli")


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
    nproc = nproc_per_node()
    if nproc is not None:
        return _train_on_ranks(conn, task_id, nproc)
    from slmb.core.trainer import train

    try:
        sink = rev.RedisEventSink(conn, task_id)  # rides out Redis faults; so does the control built on it
        result = train(load_request(conn, task_id), task_id=task_id, sinks=[sink], control=rev.TrainerControl(sink),
                       confined=conn.hget(rev.task_key(task_id), "origin") != b"cli")
    except Exception as exc:
        # The trainer reports its own errors; this covers what fails before it can (a missing request).
        control.close_failed(task_id, f"{type(exc).__name__}: {exc}", type(exc).__name__)
        raise
    return _jsonable(result)


def _train_on_ranks(conn: redis.Redis, task_id: str, nproc: int) -> dict[str, Any]:
    """Train the task on ``nproc`` processes: run torchrun (:mod:`slmb.api.rank` on each) and wait for it.

    torchrun runs in a session of its own and gets SIGKILL when this work-horse dies (``distributed.start``); each
    rank does the same with torchrun. So RQ's forced stop, which kills the work-horse's process group, and the
    death of the worker (the work-horse dies with it) take every rank down. A rank that dies ends the others
    (torchrun); when no rank could end the stream (rank 0 was killed), this process ends it with ``error``."""
    from slmb.core import distributed as D

    try:
        config = load_request(conn, task_id).get("config")
    except Exception as exc:
        rev.RedisControl(conn).close_failed(task_id, f"{type(exc).__name__}: {exc}", type(exc).__name__)
        raise
    device = config.get("device") if isinstance(config, dict) else None
    cmd = D.torchrun_command([task_id], nproc_per_node=nproc, module="slmb.api.rank")
    proc = D.start(cmd, D.rank_env(nproc, device if isinstance(device, str) and device else "auto"))
    try:
        returncode = proc.wait()  # no signal handler of this process touches proc; RQ's job timeout raises here
    finally:
        if proc.poll() is None:  # the job timed out: the ranks stop after their step, with a checkpoint
            D.stop_process_group(proc)
    ended = rev.terminal_event(conn, task_id)
    if ended is None:
        ended = "error"
        rev.RedisControl(conn).close_failed(task_id, f"the training processes ended without a final event: "
                                                     f"{D.describe_exit(returncode)}", "ProcessDied")
    if ended == "error":  # the job fails, as when the trainer raises in the work-horse
        raise RuntimeError(f"the run failed on its {nproc} processes ({D.describe_exit(returncode)}); "
                           "its events say why")
    return {"task_id": task_id, "state": ended, "world_size": nproc}


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


def liveness_s() -> int:
    return heartbeat_s() * HEARTBEAT_MISSES


def beat(conn: redis.Redis, task_id: str, ttl_s: float | None = None) -> None:
    """Renew a task's liveness key (``slmb:task:<id>:alive``)."""
    conn.set(rev.alive_key(task_id), os.getpid(), px=int((ttl_s or liveness_s()) * 1000))


def grace_key(task_id: str) -> str:
    return f"slmb:task:{task_id}:grace"


class TrainingWorker(Worker):
    """RQ's forking worker, renewing the liveness key of the task it runs from its own process (not the
    work-horse's): a horse busy in a long call that holds the GIL (``torch.compile``) never looks dead, a dead
    horse is handled by this worker (RQ's failure callback), and a dead worker stops the key."""

    stopping = False  # asked to stop (SIGTERM, SIGINT), as opposed to RQ's loop giving up on Redis

    def request_stop(self, signum: Any, frame: Any) -> None:
        self.stopping = True
        super().request_stop(signum, frame)

    def execute_job(self, job: Any, queue: Queue) -> None:
        with self.connection.pipeline() as pipe:  # one transaction: a running task always has a live key
            pipe.sadd(rev.RUNNING, job.id)
            pipe.set(rev.alive_key(job.id), os.getpid(), px=liveness_s() * 1000)
            pipe.execute()
        try:
            super().execute_job(job, queue)
        finally:
            with contextlib.suppress(*REDIS_ERRORS):  # else the key expires by itself
                self.connection.delete(rev.alive_key(job.id))

    def maintain_heartbeats(self, job: Any, execution: Any) -> None:
        try:
            super().maintain_heartbeats(job, execution)
            beat(self.connection, job.id)
        except REDIS_ERRORS as exc:
            # Redis stalled or restarting: the work-horse trains on, the beats resume once Redis answers, and
            # the reaper's grace covers the gap. RQ would let this end the worker, and the horse with it.
            self.log.warning("Worker %s: heartbeat for job %s failed (%s: %s); trying again", self.name, job.id,
                             type(exc).__name__, exc)

    def teardown(self) -> None:
        """RQ's, but Redis being away does not stop the worker from starting over (its registration expires)."""
        with contextlib.suppress(*REDIS_ERRORS):
            self.register_death()
        with contextlib.suppress(*REDIS_ERRORS):
            self.unsubscribe()
        if self.pubsub_thread is not None and self.pubsub_thread.is_alive():
            self.pubsub_thread.stop()

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
    """End the tasks whose training process stopped beating without ending its stream. Returns their ids.

    A lapsed liveness key first earns one more liveness period: after a Redis stall or restart the key may
    have expired while the worker, alive, could not renew it. A task still silent after that ends with ``error``
    (``stopped`` if a forced stop was asked for) and its RQ job fails, so it never stays STARTED. Safe to run
    from many places at once: the terminal event is appended once, and failing a failed RQ job changes nothing.
    """
    return [task_id for task_id in (raw.decode() for raw in conn.smembers(rev.RUNNING))
            if _each_task(task_id, _reap_one, conn, task_id)]


def _each_task(task_id: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` for one task of a pass over many: a task whose records cannot be read (a damaged job or
    status) is logged and skipped, so it never stops the others from being reaped or reconciled. Redis being
    away ends the pass; the next one tries again."""
    try:
        return fn(*args)
    except REDIS_ERRORS:
        raise
    except Exception:
        log.exception("task %s: could not be checked; skipped", task_id)
        return None


def _reap_one(conn: redis.Redis, task_id: str) -> bool:
    if rev.terminal_event(conn, task_id):
        conn.srem(rev.RUNNING, task_id)
        return False
    if conn.exists(rev.alive_key(task_id)):
        return False
    if conn.set(grace_key(task_id), 1, nx=True, px=3 * liveness_s() * 1000):
        conn.set(rev.alive_key(task_id), "grace", nx=True, px=liveness_s() * 1000)
        return False
    message = (f"no heartbeat from the task's worker for {2 * liveness_s()} s: the worker was killed or "
               "lost, or the job ended without a final event")
    _fail_job(conn, rev.fetch_job(conn, task_id), message)
    if _force_stop_requested(conn, task_id):
        rev.RedisControl(conn).close_forced(task_id, f"the training process was killed or lost ({message})")
    else:
        rev.RedisControl(conn).close_failed(task_id, message, "WorkerLost")
    conn.srem(rev.RUNNING, task_id)
    log.warning("task %s: %s", task_id, message)
    return True


def _fail_job(conn: redis.Redis, job: Job | None, message: str) -> None:
    if job is not None and job.get_status() == JobStatus.STARTED:
        with conn.pipeline() as pipe:
            StartedJobRegistry(job.origin, connection=conn, serializer=JSONSerializer).remove_executions(
                job, pipeline=pipe)
            record_job_failure(job, message, pipe)
            pipe.execute()


def _force_stop_requested(conn: redis.Redis, task_id: str) -> bool:
    raw = conn.get(rev.stop_key(task_id))
    return bool(raw and json.loads(raw).get("force"))


# RQ states in which a job will not run (again): a task there without a terminal event was ended outside slmb.
_JOB_OVER = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}


def reconcile(conn: redis.Redis, *, mlflow: bool = True) -> dict[str, list[str]]:
    """Bring the tasks Redis knows in line with what happened to them (after a crash, a Redis restart, a
    tracking server that was down). Returns the task ids it ended and those whose MLflow run it closed.

    - a task without a terminal event whose RQ job is gone or over (RQ failed it, e.g. stuck after a worker
      died) ends with ``error`` (``stopped`` for a forced stop);
    - a STARTED job that is not among the running tasks (its record lost with the last second of writes)
      becomes one again, so :func:`reap_dead_tasks` watches its liveness;
    - an ended task whose MLflow run is still RUNNING gets it closed with the matching status (FINISHED,
      KILLED, FAILED). Only tasks Redis knows are touched, never the MLflow runs of local ``slmb train``s
      that share the store, and each ended task's run is looked at once.

    Queued jobs need nothing: RQ's queue lives in Redis, and a worker takes them when one is back."""
    done: dict[str, list[str]] = {"ended": [], "mlflow_closed": []}
    running = {raw.decode() for raw in conn.smembers(rev.RUNNING)}
    for task in rev.list_tasks(conn):
        task_id = task["task_id"]
        terminal = rev.terminal_event(conn, task_id)
        if terminal:
            if mlflow and not conn.hexists(rev.task_key(task_id), MLFLOW_CHECKED):
                try:
                    if _close_mlflow_run(task_id, terminal):
                        done["mlflow_closed"].append(task_id)
                except Exception as exc:  # MLflow down: these tasks are looked at again next time, not one by one
                    log.warning("task %s: could not check its MLflow run: %s: %s", task_id, type(exc).__name__, exc)
                    mlflow = False
                    continue
                conn.hset(rev.task_key(task_id), MLFLOW_CHECKED, 1)
            continue
        if task_id not in running and _each_task(task_id, _reconcile_one, conn, task):
            done["ended"].append(task_id)
    return done


def _reconcile_one(conn: redis.Redis, task: dict[str, Any]) -> bool:
    """End a task without a terminal event whose job is gone or over; returns whether it did."""
    task_id, grace_s = task["task_id"], liveness_s()
    job = rev.fetch_job(conn, task_id)
    status = job.get_status() if job is not None else None
    if status == JobStatus.STARTED:
        conn.sadd(rev.RUNNING, task_id)
        return False
    if job is None and time.time() - task["created"] > grace_s:
        message = "the task's job is no longer in Redis (lost in a Redis restart or expired)"
    elif status in _JOB_OVER and job.ended_at and time.time() - job.ended_at.timestamp() > grace_s:
        message = f"the task's job {status.value} without the run reporting an end"
    else:
        return False
    if status == JobStatus.STOPPED or _force_stop_requested(conn, task_id):
        rev.RedisControl(conn).close_forced(task_id, message)
    else:
        rev.RedisControl(conn).close_failed(task_id, message, "JobLost")
    log.warning("task %s: %s", task_id, message)
    return True


def _close_mlflow_run(task_id: str, terminal: str) -> bool:
    """Close the task's MLflow run if it is still RUNNING; returns whether it was."""
    from slmb.core import tracking

    if tracking.end_run(task_id, terminal):
        log.warning("task %s ended %s, but its MLflow run was still RUNNING: closed it", task_id, terminal)
        return True
    return False


# ---------------------------------------------------------------------------------------------------- worker


def preload() -> None:
    """Import what every job needs once, in the worker: each job's work-horse is a fork and starts warm."""
    import mlflow.tracking  # noqa: F401 - the tracking sink's client, seconds to import
    import torch  # noqa: F401

    import slmb.core.trainer  # noqa: F401


def run_worker(redis_url: str, queues: list[str] | None = None, *, burst: bool = False,
               name: str | None = None, nproc_per_node: int | None = None) -> bool:
    """Run an RQ worker on ``queues`` (default: ``$SLMB_QUEUE`` or ``slmb``) until it is stopped.

    ``nproc_per_node``: train each job on that many processes (one per GPU, or CPU processes) through torchrun;
    by default each job trains in the work-horse."""
    if nproc_per_node is not None:
        if nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
        os.environ[NPROC_ENV] = str(nproc_per_node)  # read by each job's work-horse (a fork of this process)
    os.environ[REDIS_URL_ENV] = redis_url  # the ranks of a job connect to it (slmb.api.rank)
    conn = rev.connect(redis_url)
    preload()
    worked = False
    while True:
        # RQ blocks for worker_ttl - 15 s waiting for a job and heartbeats in between: this makes an idle worker
        # heartbeat as often as a busy one, so /healthz can tell a dead worker from a quiet one within seconds.
        worker = TrainingWorker([get_queue(conn, q) for q in (queues or [queue_name()])], connection=conn,
                                serializer=JSONSerializer, name=name, job_monitoring_interval=heartbeat_s(),
                                worker_ttl=heartbeat_s() + 15)
        name = worker.name
        try:
            worked = worker.work(burst=burst, with_scheduler=False, logging_level="INFO") or worked
        except REDIS_ERRORS as exc:  # outside RQ's loop: registering the worker, or tearing it down
            log.warning("worker %s: Redis failed: %s: %s", name, type(exc).__name__, exc)
        if burst or worker.stopping:
            return worked
        # RQ's loop gave up, on Redis (a stall past the socket timeout, a restart) or on an error it logged:
        # wait for Redis and start again, not faster than once a second.
        time.sleep(1.0)
        _wait_for_redis(conn)
        with contextlib.suppress(*REDIS_ERRORS):
            worker.register_death()  # so that the name is free again
        log.warning("worker %s: Redis is back; working again", name)


def _wait_for_redis(conn: redis.Redis) -> None:
    wait_s = 0.5
    while True:
        try:
            conn.ping()
            return
        except REDIS_ERRORS:  # BusyLoadingError (replaying its append-only file) is a ConnectionError
            time.sleep(wait_s)
            wait_s = min(2 * wait_s, MAX_REDIS_WAIT_S)
