"""The service settings the README promises, on a stack of this module's own (real redis-server on a free port,
real ``slmb worker`` and ``slmb serve --workers 0`` subprocesses): ``SLMB_QUEUE``, ``SLMB_PUBLIC_URL``,
``SLMB_STREAM_MAXLEN``, ``SLMB_TASK_TTL_S`` and ``SLMB_JOB_TIMEOUT_S``.

The API and its worker run with a queue of their own, a small stream length and a short task TTL; a second
worker listens on the default queue and must never take the API's jobs.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

pytest.register_assert_rewrite("service_fixtures")
from conftest import shared_dir  # noqa: E402
from service_fixtures import (  # noqa: E402
    FAST,
    Stack,
    events_of,
    log_tail,
    read_sse,
    start_redis,
    stop_process,
    tiny_request,
    wait_until,
)

from slmb.api import redis_events as rev  # noqa: E402
from slmb.api.serve import free_port  # noqa: E402

QUEUE = "readme-queue"
PUBLIC_URL = "https://canvas.example.org/slmb-service"
MAXLEN = 20
TTL_S = 15
SETTINGS = {"SLMB_QUEUE": QUEUE, "SLMB_STREAM_MAXLEN": str(MAXLEN), "SLMB_TASK_TTL_S": str(TTL_S)}
SLMB = [sys.executable, "-m", "slmb"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Redis, the API (SLMB_QUEUE, SLMB_PUBLIC_URL, ...) and a worker on the default queue only; the test of
    SLMB_QUEUE starts the worker on the API's queue."""
    tmp = tmp_path_factory.mktemp("readme-service")
    redis_proc, url = start_redis(tmp)
    env = {**os.environ, **FAST, **SETTINGS, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "SLMB_TOKENIZER_DIR": str(shared_dir() / "tokenizers"), "SLMB_DATA_DIR": str(shared_dir() / "datasets"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "SLMB_REDIS_URL": url}
    for name in ("SLMB_API_TOKEN", "SLMB_JOB_TIMEOUT_S"):
        env.pop(name, None)
    from mlflow.tracking import MlflowClient

    MlflowClient(env["MLFLOW_TRACKING_URI"]).create_experiment("slmb", (tmp / "mlartifacts").as_uri())
    stack = Stack(tmp, url, env)
    try:
        port = free_port()
        stack.api_url = f"http://127.0.0.1:{port}"
        stack.start("api", [*SLMB, "serve", "--redis-url", url, "--workers", "0", "--port", str(port),
                            "--log-level", "warning"], SLMB_HOME=str(tmp / "home-api"), SLMB_PUBLIC_URL=PUBLIC_URL)
        # No --queue: this worker takes $SLMB_QUEUE's jobs, so it must not see the module's setting.
        stack.start("other-worker", [*SLMB, "worker", "--redis-url", url, "--name", f"other-{os.getpid()}"],
                    SLMB_HOME=str(tmp / "home-other"), SLMB_QUEUE="")
        with httpx.Client() as client:
            def up() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return client.get(f"{stack.api_url}/healthz").status_code in (200, 503)
                return False

            wait_until(up, 90, f"the API\n{log_tail(tmp / 'api.log')}", interval=0.25)
        stack.wait_for_workers("slmb", 1, timeout=90)
        yield stack
    finally:
        stack.stop()
        stop_process(redis_proc)


def ensure_queue_worker(stack: Stack) -> None:
    if not getattr(stack, "queue_worker", None):
        stack.queue_worker = stack.start_worker("queue-worker", queue=QUEUE)
    stack.wait_for_workers(QUEUE, 1, timeout=90)


def wait_terminal(conn, task_id: str, timeout: float = 120) -> str:
    return wait_until(lambda: rev.terminal_event(conn, task_id), timeout, f"task {task_id} to end")


def test_queue_and_public_url(stack):
    """The API queues on $SLMB_QUEUE (not on `slmb`), a worker on another queue leaves the job alone, one on
    $SLMB_QUEUE takes it; the response's absolute URLs start with $SLMB_PUBLIC_URL."""
    conn = stack.redis()
    with stack.client() as client:
        resp = client.post("/api/v1/train-complete-model", json=tiny_request("on-my-queue", max_steps=4))
        assert resp.status_code == 200, resp.text
        body = resp.json()
    task_id = body["task_id"]
    assert body["sse_url_abs"] == f"{PUBLIC_URL}/api/v1/events/{task_id}"
    assert body["stop_url_abs"] == f"{PUBLIC_URL}/api/v1/stop-training"
    assert body["sse_url"] == f"/api/v1/events/{task_id}"

    job = Job.fetch(task_id, connection=conn, serializer=JSONSerializer)
    assert job.origin == QUEUE
    assert task_id in Queue(QUEUE, connection=conn).job_ids
    assert Queue("slmb", connection=conn).count == 0
    # The worker on `slmb` is idle and blocked on its own queue; give it time it would need to take a job.
    time.sleep(3)
    assert job.get_status().value == "queued" and rev.RedisControl(conn).read_status(task_id)["state"] == "queued"

    ensure_queue_worker(stack)
    assert wait_terminal(conn, task_id) == "finished", log_tail(stack.tmp / "queue-worker.log")
    job.refresh()
    assert job.worker_name.startswith("queue-worker-")
    assert "on-my-queue" not in log_tail(stack.tmp / "other-worker.log", 1000)


def test_stream_trimmed_to_maxlen_and_ended_task_expires(stack):
    """Every evaluation is an event: 150 of them in a stream capped at ~20 (XADD MAXLEN ~ trims whole stream
    nodes, so Redis keeps at most MAXLEN + stream-node-max-entries). After the terminal event every key of the
    task has the TTL, and then they are gone."""
    conn = stack.redis()
    ensure_queue_worker(stack)
    steps = 150
    body = tiny_request("trimmed", max_steps=steps)
    body["config"].update(eval_every=1, eval_batches=1)
    with stack.client() as client:
        task_id = client.post("/api/v1/train-complete-model", json=body).json()["task_id"]
        assert wait_terminal(conn, task_id) == "finished", log_tail(stack.tmp / "queue-worker.log")
        node = int(conn.config_get("stream-node-max-entries")["stream-node-max-entries"])
        info = conn.xinfo_stream(rev.events_key(task_id))
        kept = info["length"]
        assert info["entries-added"] > steps  # one eval event per step
        assert kept <= MAXLEN + node < steps, kept

        # The stream holds the newest events; a late SSE client is told, then replays what is left.
        late = events_of(read_sse(client, f"/api/v1/events/{task_id}", timeout=30))
        names = [m["event"] for m in late]
        assert names[:2] == ["connected", "warning"] and "SLMB_STREAM_MAXLEN" in late[1]["data"]["message"]
        assert names[-1] == "finished" and "queued" not in names
        assert len(late) == kept + 2 and late[-1]["data"]["step"] == steps

    keys = [k for k in rev.task_keys(task_id) if conn.exists(k)]
    assert rev.events_key(task_id) in keys and rev.task_key(task_id) in keys and rev.request_key(task_id) in keys
    for key in [*keys, f"rq:job:{task_id}"]:
        assert 0 < conn.ttl(key) <= TTL_S, (key, conn.ttl(key))
    wait_until(lambda: not any(conn.exists(k) for k in [*rev.task_keys(task_id), f"rq:job:{task_id}"]),
               TTL_S + 60, "the ended task's keys to expire", interval=0.5)
    with stack.client() as client:
        assert client.get(f"/api/v1/events/{task_id}").status_code == 404


def test_job_timeout_fails_the_run_with_an_error_event(stack, tmp_path):
    """A run past $SLMB_JOB_TIMEOUT_S (read where the job is queued: here `slmb train --queue`) is killed, its
    stream ends with `error`, and the command following it exits 1."""
    conn = stack.redis()
    ensure_queue_worker(stack)
    path = tmp_path / "endless.json"
    path.write_text(json.dumps(tiny_request("timed-out", max_steps=100_000)))
    env = {**stack.env, "SLMB_JOB_TIMEOUT_S": "4", "SLMB_HOME": str(tmp_path / "home-cli")}
    done = subprocess.run([*SLMB, "train", str(path), "--queue", "--json"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, (done.stdout[-2000:], done.stderr)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    names = [e["event"] for e in events]
    assert names[0] == "queued" and names[-1] == "error", names
    error = events[-1]["data"]
    assert error["type"] == "JobTimeoutException" and "(4 seconds)" in error["message"], error
    assert error["ts"] - events[0]["data"]["ts"] >= 4
    task_id = error["task_id"]
    assert Job.fetch(task_id, connection=conn, serializer=JSONSerializer).get_status().value == "failed"
    assert rev.celery_state(conn, task_id) == "FAILURE"
    # The worker survives and is free for the next job.
    wait_until(lambda: not conn.smembers(rev.RUNNING), 30, "no task left running")
