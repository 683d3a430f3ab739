"""Faults under a real ``slmb serve`` (issue 11, points 8 and 9): its private Redis (append-only file under
SLMB_HOME) and its worker killed with SIGKILL, Redis stalled with SIGSTOP, ``slmb serve`` restarted with a run
queued; every time the service comes back by itself, no run is stranded and MLflow's sqlite store has no run
left RUNNING for a task that ended."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import shared_dir
from service_fixtures import FAST, log_tail, read_sse, tiny_request, wait_until

from slmb.api.serve import free_port

pytest_plugins = ["service_fixtures"]
LONG = 1_000_000  # steps: a run that lasts until the test stops it


@dataclass
class Serve:
    tmp: Path
    env: dict[str, str]
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        return (Path(self.env["SLMB_HOME"]) / "redis" / "url").read_text().strip()

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=10)

    def start(self, workers: int = 1) -> None:
        self.port = free_port()
        with open(self.tmp / "serve.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "slmb", "serve", "--port", str(self.port),
                                          "--workers", str(workers), "--log-level", "warning"],
                                         env=self.env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT)
        self.wait_healthy(workers)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def health(self) -> dict[str, Any] | None:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            return httpx.get(f"{self.url}/healthz", timeout=15).json()
        return None

    def wait_healthy(self, workers: int = 1, timeout: float = 120) -> dict[str, Any]:
        def healthy() -> dict[str, Any] | None:
            body = self.health()
            ok = body and body["redis"]["ok"] and body["mlflow"]["ok"] and body["workers"].get("count", 0) >= workers
            return body if ok else None

        return wait_until(healthy, timeout, f"a healthy slmb serve\n{self.log()}", interval=0.3)

    def log(self) -> str:
        return log_tail(self.tmp / "serve.log")

    def process(self, name: str) -> dict[str, Any]:
        return next(p for p in self.health()["processes"] if p["name"] == name)

    def worker_pid(self) -> int:
        from rq import Queue, Worker

        conn = self.redis()
        workers = [w for w in Worker.all(connection=conn, queue=Queue("slmb", connection=conn)) if w.pid]
        return max(workers, key=lambda w: w.last_heartbeat).pid

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.client() as c:
            resp = c.post("/api/v1/train-complete-model", json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def events(self, task_id: str, until: str | None = None, timeout: float = 180) -> list[dict[str, Any]]:
        with self.client() as c:
            return read_sse(c, f"/api/v1/events/{task_id}", timeout=timeout,
                            on_message=lambda m: m["event"] == until)

    def stop_run(self, task_id: str, force: bool = False) -> None:
        with self.client() as c:
            resp = c.post("/api/v1/stop-training", json={"task_id": task_id, "force_kill": force})
        assert resp.status_code == 200, resp.text

    def mlflow_runs(self) -> dict[str, Any]:
        """The MLflow runs of the store, by task id."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.env["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("slmb")
        return {r.data.tags["task_id"]: r for r in client.search_runs([experiment.experiment_id], max_results=1000)
                if "task_id" in r.data.tags}


def serve_env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, **FAST, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "SLMB_HOME": str(tmp / "home"),
           "SLMB_TOKENIZER_DIR": str(shared_dir() / "tokenizers"), "SLMB_DATA_DIR": str(shared_dir() / "datasets"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "SLMB_RESTART_BACKOFF_S": "0.5",
           "SLMB_RECONCILE_INTERVAL_S": "2"}
    for key in ("SLMB_REDIS_URL", "SLMB_API_TOKEN"):
        env.pop(key, None)
    from mlflow.tracking import MlflowClient

    # Artifacts under tmp, not in ./mlruns of whichever process creates the experiment first.
    MlflowClient(env["MLFLOW_TRACKING_URI"]).create_experiment("slmb", (tmp / "mlartifacts").as_uri())
    return env


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Serve]:
    """`slmb serve` with its private Redis and one worker."""
    tmp = tmp_path_factory.mktemp("faults")
    service = Serve(tmp, serve_env(tmp))
    try:
        service.start(workers=1)
        yield service
    finally:
        service.stop()


def terminal_of(events: list[dict[str, Any]]) -> dict[str, Any]:
    ends = [m for m in events if m.get("event") in ("finished", "stopped", "error")]
    assert len(ends) == 1, events[-5:]
    return ends[0]


def assert_no_running_run_of_an_ended_task(service: Serve) -> None:
    from slmb.api import redis_events as rev

    conn = service.redis()
    for task_id, run in service.mlflow_runs().items():
        ended = rev.terminal_event(conn, task_id)
        assert not (ended and run.info.status == "RUNNING"), (task_id, ended, run.info.status)


def train_and_finish(service: Serve, name: str) -> None:
    task_id = service.submit(tiny_request(name))["task_id"]
    assert terminal_of(service.events(task_id))["event"] == "finished", service.log()


def test_a_killed_worker_is_replaced_and_its_run_ends_failed_in_mlflow(served):
    task_id = served.submit(tiny_request("faults-killed-run", max_steps=LONG))["task_id"]
    served.events(task_id, until="step")
    before = served.process("worker-0")["restarts"]
    os.kill(served.worker_pid(), signal.SIGKILL)

    end = terminal_of(served.events(task_id))
    assert end["event"] == "error" and end["data"]["type"] == "WorkerLost", end
    run = served.mlflow_runs()[task_id]
    assert run.info.status == "FAILED" and run.data.tags["training_status"] == "error"

    health = served.wait_healthy(1)
    worker = next(p for p in health["processes"] if p["name"] == "worker-0")
    assert worker["restarts"] == before + 1 and worker["last_exit"] == "killed by SIGKILL" and worker["alive"]
    assert "/" not in str(health["processes"])  # names and states, no paths
    train_and_finish(served, "faults-after-worker-kill")
    assert_no_running_run_of_an_ended_task(served)


def test_a_killed_redis_comes_back_on_the_same_port_with_its_data(served):
    served.wait_healthy(1)
    url = served.redis_url
    running = served.submit(tiny_request("faults-redis-running", max_steps=LONG))["task_id"]
    served.events(running, until="step")
    queued = served.submit(tiny_request("faults-redis-queued"))["task_id"]
    conn = served.redis()
    wait_until(lambda: conn.get(f"slmb:task:{queued}:request"), 10, "the queued request in Redis")
    os.kill(int(conn.info("server")["process_id"]), signal.SIGKILL)

    def answers() -> bool:
        with contextlib.suppress(redis.RedisError):
            return bool(redis.Redis.from_url(url, socket_timeout=2).ping())
        return False

    wait_until(answers, 60, f"Redis back at {url}\n{served.log()}", interval=0.2)
    assert served.redis_url == url
    assert conn.exists(f"slmb:task:{queued}:request") and conn.exists(f"slmb:task:{running}:events")
    health = served.wait_healthy(1)
    assert next(p for p in health["processes"] if p["name"] == "redis")["last_exit"] == "killed by SIGKILL"

    served.stop_run(running)
    assert terminal_of(served.events(running))["event"] == "stopped", served.log()
    assert terminal_of(served.events(queued))["event"] == "finished", served.log()
    assert_no_running_run_of_an_ended_task(served)


def test_a_stalled_redis_neither_kills_the_worker_nor_its_run(served):
    served.wait_healthy(1)
    restarts = served.process("worker-0")["restarts"]
    task_id = served.submit(tiny_request("faults-stall", max_steps=LONG))["task_id"]
    served.events(task_id, until="step")
    pid = int(served.redis().info("server")["process_id"])
    # Longer than the worker's Redis socket timeout (SLMB_HEARTBEAT_S + 10 s) and than a run's liveness period.
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(13)
    finally:
        os.kill(pid, signal.SIGCONT)

    served.wait_healthy(1)
    conn = served.redis()
    stream = f"slmb:task:{task_id}:events"
    last = conn.xrevrange(stream, count=1)[0][0]
    wait_until(lambda: conn.xrevrange(stream, count=1)[0][0] != last, 60, "the run to go on after the stall")
    time.sleep(7)  # past the reaper's grace (two liveness periods of 3 s): a falsely reaped run would show by now
    assert not conn.hget(f"slmb:task:{task_id}", "terminal"), served.events(task_id)[-3:]
    served.stop_run(task_id)
    assert terminal_of(served.events(task_id))["event"] == "stopped", served.log()
    assert served.process("worker-0")["restarts"] == restarts, served.log()
    train_and_finish(served, "faults-after-stall")


def test_runs_queued_or_running_when_serve_stops_are_not_lost(served):
    """Runs last on the module's service, whose worker and Redis the supervisor has restarted: SIGTERM still
    lets the run on that worker stop cooperatively (it checkpoints) before Redis goes; a run queued then, and
    one queued while no worker is alive (with a warning), run when `slmb serve` is back with a worker."""
    assert served.process("worker-0")["restarts"] >= 1 and served.process("redis")["restarts"] >= 1
    url = served.redis_url
    running = served.submit(tiny_request("faults-serve-stopped", max_steps=LONG))["task_id"]
    served.events(running, until="step")
    answer = served.submit(tiny_request("faults-queued-across-restart"))
    assert answer["workers_alive"] == 1 and not any(w["check"] == "workers" for w in answer["warnings"])
    served.stop()
    assert served.proc.returncode == 0, served.log()
    log = Path(served.env["SLMB_HOME"]) / "runs" / running / "events.jsonl"
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["event"] == "stopped" and last["data"]["reason"] == "requested", last

    served.start(workers=0)
    assert served.redis_url == url  # the same port again, while it is free
    late = served.submit(tiny_request("faults-queued-without-worker"))
    assert late["workers_alive"] == 0
    assert any(w["check"] == "workers" and "stays queued" in w["message"] for w in late["warnings"])
    second = subprocess.run([sys.executable, "-m", "slmb", "serve", "--port", str(free_port()), "--workers", "0"],
                            env=served.env, cwd=served.tmp, capture_output=True, text=True, timeout=120)
    assert second.returncode != 0 and "another slmb serve is using the Redis data" in second.stderr
    served.stop()

    served.start(workers=1)
    for task_id in (answer["task_id"], late["task_id"]):
        assert terminal_of(served.events(task_id))["event"] == "finished", served.log()
    runs = served.mlflow_runs()
    assert [runs[t].info.status for t in (running, answer["task_id"], late["task_id"])] == [
        "KILLED", "FINISHED", "FINISHED"]
    assert_no_running_run_of_an_ended_task(served)


# ---------------------------------------------------------------------------------------------------- reconcile


@pytest.fixture
def redis_conn(tmp_path, monkeypatch) -> Iterator[redis.Redis]:
    """A redis-server of the test's own, MLflow's sqlite store in tmp, one-second heartbeats."""
    from mlflow.tracking import MlflowClient
    from service_fixtures import start_redis, stop_process

    monkeypatch.setenv("SLMB_HEARTBEAT_S", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).create_experiment("slmb", (tmp_path / "art").as_uri())
    proc, url = start_redis(tmp_path)
    conn = redis.Redis.from_url(url)
    try:
        yield conn
    finally:
        conn.close()
        stop_process(proc)


def test_reconcile_closes_the_mlflow_run_of_an_ended_task_and_leaves_local_runs_alone(redis_conn):
    from slmb.api import redis_events as rev
    from slmb.api.worker import reconcile, submit
    from slmb.core import events as ev
    from slmb.core import tracking

    body = tiny_request("reconciled")
    service_task = submit(redis_conn, body)
    tracking.start_run(service_task, body)
    tracking.start_run("local-cli-run", body)  # a local `slmb train` on the same store: Redis does not know it
    rev.append_event(redis_conn, ev.Stopped(task_id=service_task, reason="requested"))  # MLflow never told

    assert reconcile(redis_conn)["mlflow_closed"] == [service_task]
    runs = {r.data.tags["task_id"]: r for r in tracking.client().search_runs(
        [tracking.client().get_experiment_by_name("slmb").experiment_id])}
    assert runs[service_task].info.status == "KILLED" and runs[service_task].data.tags["training_status"] == "stopped"
    assert runs["local-cli-run"].info.status == "RUNNING"
    tracking.client().update_run(runs[service_task].info.run_id, status="RUNNING")  # as a later local --resume
    assert reconcile(redis_conn)["mlflow_closed"] == []  # an ended task's run is looked at once


def test_reconcile_ends_lost_jobs_and_the_reaper_ends_started_jobs_of_dead_workers(redis_conn):
    from rq.job import JobStatus

    from slmb.api import redis_events as rev
    from slmb.api.worker import reap_dead_tasks, reconcile, submit

    lost = submit(redis_conn, tiny_request("lost"))
    redis_conn.delete(f"rq:job:{lost}")  # its job gone with the last second of writes before a crash
    redis_conn.hset(rev.task_key(lost), "created", time.time() - 60)
    orphans = [submit(redis_conn, tiny_request(f"orphan-{i}")) for i in range(2)]
    for task_id in orphans:  # STARTED by a worker that died while Redis was down: not among the running tasks
        rev.fetch_job(redis_conn, task_id).set_status(JobStatus.STARTED)
    rev.RedisControl(redis_conn).request_stop(orphans[1], force=True)
    queued = submit(redis_conn, tiny_request("queued"))

    assert reconcile(redis_conn, mlflow=False)["ended"] == [lost]
    assert rev.terminal_event(redis_conn, lost) == "error"
    assert {m.decode() for m in redis_conn.smembers(rev.RUNNING)} == set(orphans)
    assert reap_dead_tasks(redis_conn) == []  # a lapsed heartbeat first earns one more liveness period
    reaped: list[str] = []
    wait_until(lambda: reaped.extend(reap_dead_tasks(redis_conn)) or len(reaped) >= 2, 30, "the orphans reaped",
               interval=0.5)
    assert sorted(reaped) == sorted(orphans)
    assert rev.terminal_event(redis_conn, orphans[0]) == "error"
    assert rev.terminal_event(redis_conn, orphans[1]) == "stopped"  # a forced stop ends KILLED, not FAILED
    assert all(rev.fetch_job(redis_conn, t).get_status() == JobStatus.FAILED for t in orphans)  # not STARTED
    assert rev.terminal_event(redis_conn, queued) is None
    assert rev.fetch_job(redis_conn, queued).get_status() == JobStatus.QUEUED  # a worker will take it


def test_a_task_whose_records_are_damaged_does_not_stop_the_others_being_reaped(redis_conn):
    from rq.job import JobStatus

    from slmb.api import redis_events as rev
    from slmb.api.worker import reap_dead_tasks, submit

    damaged, dead = submit(redis_conn, tiny_request("damaged")), submit(redis_conn, tiny_request("dead"))
    rev.fetch_job(redis_conn, dead).set_status(JobStatus.STARTED)
    redis_conn.sadd(rev.RUNNING, damaged, dead)
    redis_conn.hset(f"rq:job:{damaged}", "status", "no-such-status")  # unreadable for RQ
    reaped: list[str] = []
    wait_until(lambda: reaped.extend(reap_dead_tasks(redis_conn)) or dead in reaped, 30, "the dead task reaped",
               interval=0.5)
    assert rev.terminal_event(redis_conn, dead) == "error"


# ---------------------------------------------------------------------------------------------------- supervisor


@pytest.mark.parametrize("runs_s, stable_s, backoffs", [(0, 30, [0.2, 0.4, 0.8, 0.8]), (1, 0.5, [0.2, 0.2, 0.2])])
def test_the_supervisor_backs_off_doubling_to_a_cap_and_starts_over_after_a_stable_run(monkeypatch, runs_s,
                                                                                      stable_s, backoffs):
    from slmb.api.serve import Child, Supervisor

    monkeypatch.setenv("SLMB_RESTART_BACKOFF_S", "0.2")
    monkeypatch.setenv("SLMB_RESTART_BACKOFF_MAX_S", "0.8")
    monkeypatch.setenv("SLMB_RESTART_STABLE_S", str(stable_s))
    seen: list[float] = []
    supervisor = Supervisor(interval_s=0.02)
    child = supervisor.add(Child("quitter", lambda n: [sys.executable, "-c", f"import time; time.sleep({runs_s}); "
                                                                              "raise SystemExit(3)"],
                                 on_exit=lambda c: seen.append(c.backoff_s)))
    supervisor.run_in_background()
    wait_until(lambda: len(seen) >= len(backoffs), 120, "the child to exit often enough")
    supervisor.stop()
    assert seen[:len(backoffs)] == backoffs
    assert child.last_exit == "exited with status 3" and child.restarts >= len(backoffs) - 1
    restarts = child.restarts
    time.sleep(1.5)
    assert child.restarts == restarts  # stopped: no more restarts
