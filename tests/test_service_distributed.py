"""The HTTP service training each run on two processes (issue 12, points 4 and 5): ``slmb serve --nproc-per-node 2``
on the test stack's Redis, its worker running every job through torchrun (gloo on the CPU, one thread a rank).

A run submitted over HTTP finishes with one event stream (rank 0's) and a listed model that generates; a stop
over HTTP ends every rank at one step with one checkpoint; a forced stop, and a rank that dies, leave no process
of the run behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    Stack,
    events_of,
    log_tail,
    read_sse,
    stop_process,
    submit_and_wait,
    wait_until,
)
from toy import toy_request  # noqa: E402

from slmb.api.serve import free_port  # noqa: E402

pytest_plugins = ["service_fixtures"]
QUEUE = "dist"
LONG = 1_000_000  # steps: a run that lasts until the test stops it


@dataclass
class DistService:
    stack: Stack
    url: str
    home: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def log(self) -> str:
        return log_tail(self.stack.tmp / "dist-serve.log", 80)

    def job(self, task_id: str) -> Job:
        return Job.fetch(task_id, connection=self.stack.redis(), serializer=JSONSerializer)

    def mlflow_state(self, task_id: str) -> tuple[str, str]:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.stack.mlflow_uri)
        experiment = client.get_experiment_by_name("slmb")
        run = client.search_runs([experiment.experiment_id], f"tags.task_id = '{task_id}'")[0]
        return run.info.status, run.data.tags["training_status"]

    def wait_idle(self) -> None:
        """The worker took no new job and is waiting for one (after the last run's process has gone)."""
        with self.client() as client:
            wait_until(lambda: client.get("/healthz").json()["workers"]["workers"][0]["state"] == "idle", 30,
                       f"the worker to be idle again\n{self.log()}")


@pytest.fixture(scope="module")
def dist(service) -> Iterator[DistService]:
    """`slmb serve --nproc-per-node 2` (API and one worker, queue "dist") on the session stack's Redis and MLflow."""
    home = service.tmp / "home-dist"
    port = free_port()
    proc = service.start("dist-serve", [sys.executable, "-m", "slmb", "serve", "--redis-url", service.redis_url,
                                        "--workers", "1", "--nproc-per-node", "2", "--port", str(port),
                                        "--log-level", "warning"],
                         SLMB_HOME=str(home), SLMB_QUEUE=QUEUE)
    served = DistService(service, f"http://127.0.0.1:{port}", home)
    try:
        def healthy() -> bool:
            try:
                body = httpx.get(f"{served.url}/healthz", timeout=15).json()
            except (httpx.HTTPError, ValueError):
                return False
            return body["status"] == "ok" and body["queue"] == QUEUE

        wait_until(healthy, 120, f"slmb serve --nproc-per-node 2 to be healthy\n{served.log()}", interval=0.3)
        yield served
    finally:
        stop_process(proc, grace_s=60)


def run_processes(task_id: str) -> dict[int, str]:
    """{pid: command line} of every live process whose command names the task: torchrun and its ranks."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmd = Path(entry.path, "cmdline").read_bytes()
        except OSError:  # it ended meanwhile
            continue
        if task_id.encode() in cmd:  # (a zombie's command line is empty: it is gone, only not yet reaped)
            found[int(entry.name)] = cmd.replace(b"\0", b" ").decode(errors="replace")
    return found


def rank_of(pid: int) -> int | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)


def tiny(name: str, max_steps: int) -> dict[str, Any]:
    """Two blocks, a global batch of 8 (4 rows a rank)."""
    return toy_request(name=name, blocks=2, batch_size=8, max_steps=max_steps, eval_every=3, device="cpu")


def test_a_two_process_run_over_http_finishes_and_its_model_is_listed_and_generates(dist):
    with dist.client() as client:
        resp = client.post("/api/v1/train-complete-model", json=tiny("dist-toy", max_steps=6))
        assert resp.status_code == 200, resp.text
        task_id = resp.json()["task_id"]
        events = events_of(read_sse(client, f"/api/v1/events/{task_id}", timeout=240))
        names = [m["event"] for m in events]
        assert names[:2] == ["connected", "queued"] and names[-1] == "finished", f"{names}\n{dist.log()}"
        # One stream, rank 0's: every event once.
        assert names.count("started") == names.count("finished") == 1 and "error" not in names
        started = next(m["data"] for m in events if m["event"] == "started")
        assert (started["world_size"], started["strategy"], started["batch_size"]) == (2, "ddp", 8)
        assert started["total_steps"] == 6
        assert events[-1]["data"]["step"] == 6 and events[-1]["data"]["model_name"] == "dist-toy"
        assert [m["data"]["step"] for m in events if m["event"] == "eval"] == [3, 6]

        wait_until(lambda: not run_processes(task_id), 30, "torchrun and its ranks to exit")
        job = dist.job(task_id)
        wait_until(lambda: job.get_status() == JobStatus.FINISHED, 30, "RQ to file the job as finished")
        assert job.return_value() == {"task_id": task_id, "state": "finished", "world_size": 2}
        assert dist.mlflow_state(task_id) == ("FINISHED", "finished")

        models = {m["model_name"]: m for m in client.get("/api/v1/completed-models").json()["models"]}
        assert models["dist-toy"]["has_structure"] and models["dist-toy"]["task_id"] == task_id
        out = client.post("/api/v1/generate-text", json={"model_name": "dist-toy", "input_text": "ROMEO:",
                                                         "max_length": 16, "temperature": 0.8, "seed": 3})
        assert out.status_code == 200, out.text
        text = out.json()["output_text"]
        assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    dist.wait_idle()


def test_the_api_admits_runs_by_the_workers_process_count(dist):
    """`serve --nproc-per-node 2` tells its API: a global batch that does not split over 2 processes is refused
    before it is queued."""
    body = tiny("dist-odd", 4)
    body["config"]["batch_size"] = 7
    with dist.client() as client:
        resp = client.post("/api/v1/train-complete-model", json=body)
        health = client.get("/healthz").json()
    assert resp.status_code == 422, resp.text
    assert [(e["path"], e["check"]) for e in resp.json()["errors"]] == [("/config/batch_size", "distributed")]
    assert health["nproc_per_node"] == 2


def test_a_stop_over_http_ends_every_rank_at_one_step_with_one_checkpoint(dist):
    with dist.client() as client:
        task_id = submit_and_wait(client, tiny("dist-coop", LONG), until="step", timeout=240)
        stop = client.post("/api/v1/stop-training", json={"task_id": task_id, "force_kill": False}).json()
        assert stop["mode"] == "cooperative_stop" and stop["celery_state"] == "STARTED", stop
        events = events_of(read_sse(client, f"/api/v1/events/{task_id}", timeout=120))
    names = [m["event"] for m in events]
    assert names.count("stopped") == 1 and names[-1] == "stopped", f"{names[-6:]}\n{dist.log()}"
    assert names[-3:] == ["checkpoint", "status", "stopped"] and "error" not in names
    stopped = events[-1]["data"]
    assert stopped["reason"] == "requested" and stopped["step"] >= 1
    # Both ranks saved their shard of the one checkpoint, at the step the run stopped after.
    checkpoint = Path(stopped["checkpoint"].replace("$SLMB_HOME", str(dist.home)))
    assert checkpoint.name == f"step-{stopped['step']:08d}"
    meta = json.loads((checkpoint / "trainer.json").read_text())
    assert (meta["format"], meta["world_size"], meta["strategy"]) == ("dcp", 2, "ddp")
    assert meta["state"]["step"] == stopped["step"]
    assert sorted(p.name for p in checkpoint.glob("rng-rank-*")) == ["rng-rank-0.safetensors",
                                                                      "rng-rank-1.safetensors"]
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]

    wait_until(lambda: not run_processes(task_id), 30, "torchrun and its ranks to exit")
    job = dist.job(task_id)
    wait_until(lambda: job.get_status() == JobStatus.FINISHED, 30, "RQ to file the job as done")
    assert job.return_value()["state"] == "stopped"
    assert dist.mlflow_state(task_id) == ("KILLED", "stopped")
    dist.wait_idle()


def test_a_force_stop_ends_every_process_of_the_run_even_a_hung_one(dist):
    """Rank 1 hangs (SIGSTOP), so rank 0 waits in a collective and no rank can stop cooperatively: the forced
    stop kills the work-horse, torchrun dies with it, and each rank with torchrun."""
    with dist.client() as client:
        task_id = submit_and_wait(client, tiny("dist-force", LONG), until="step", timeout=240)
        procs = run_processes(task_id)
        assert len(procs) == 3, procs  # torchrun and two ranks
        ranks = {rank_of(pid): pid for pid in procs if "torch.distributed.run" not in procs[pid]}
        assert sorted(ranks) == [0, 1], procs
        os.kill(ranks[1], signal.SIGSTOP)
        stop = client.post("/api/v1/stop-training", json={"task_id": task_id, "force_kill": True}).json()
        assert stop["mode"] == "force_kill", stop
        events = events_of(read_sse(client, f"/api/v1/events/{task_id}", timeout=60))
    assert [m["event"] for m in events[-3:]] == ["stop_forced", "status", "stopped"], dist.log()
    assert events[-1]["data"]["reason"] == "force" and events[-1]["data"]["step"] >= 1
    wait_until(lambda: not run_processes(task_id), 10, f"every process of the run to die: {procs}")
    job = dist.job(task_id)
    wait_until(lambda: job.get_status() == JobStatus.STOPPED, 10, "RQ to file the job as stopped")
    assert dist.mlflow_state(task_id) == ("KILLED", "stopped")
    dist.wait_idle()


def test_a_rank_whose_work_horse_is_already_gone_exits_before_touching_the_task(service):
    """A rank started just before its work-horse was killed (it set PR_SET_PDEATHSIG too late to be told) quits
    at once, rather than wait for a process group that will never form."""
    from slmb.api import redis_events as rev

    gone = subprocess.Popen(["true"])
    gone.wait()
    task_id = "0123456789abcdef0123456789abcdef"
    env = {**service.env, "SLMB_LAUNCHER_PID": str(gone.pid)}
    done = subprocess.run([sys.executable, "-m", "slmb.api.rank", task_id], env=env, capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stderr) == (1, "")
    assert not any(service.redis().exists(key) for key in rev.task_keys(task_id))
    # With its work-horse alive, the same rank gets as far as the task, which does not exist, and says so.
    done = subprocess.run([sys.executable, "-m", "slmb.api.rank", task_id], env={**env, "SLMB_LAUNCHER_PID": str(
        os.getpid())}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"LookupError: the request of task {task_id}" in done.stderr
    service.redis().delete(*rev.task_keys(task_id))  # (it ended the stream of the task it could not find)


def test_a_killed_rank_0_ends_the_run_with_an_error_and_no_process_left(dist):
    """Rank 0, which alone writes the stream, dies (as under the OOM killer): torchrun ends rank 1, and the
    work-horse ends the stream with `error` saying how torchrun ended; the worker takes the next job."""
    with dist.client() as client:
        task_id = submit_and_wait(client, tiny("dist-rank0", LONG), until="step", timeout=240)
        procs = run_processes(task_id)
        [rank0] = [pid for pid in procs if "torch.distributed.run" not in procs[pid] and rank_of(pid) == 0]
        os.kill(rank0, signal.SIGKILL)
        events = events_of(read_sse(client, f"/api/v1/events/{task_id}", timeout=120))
    error = events[-1]
    assert error["event"] == "error" and error["data"]["type"] == "ProcessDied", f"{events[-4:]}\n{dist.log()}"
    assert error["data"]["message"] == ("the training processes ended without a final event: torchrun exited "
                                        "with status 1")
    wait_until(lambda: not run_processes(task_id), 10, f"every process of the run to die: {procs}")
    job = dist.job(task_id)
    wait_until(lambda: job.get_status() == JobStatus.FAILED, 10, "RQ to file the job as failed")
    assert dist.mlflow_state(task_id) == ("FAILED", "error")
    dist.wait_idle()
