"""The command line against the service: `slmb train --queue`, `slmb stop`, `slmb list`, `slmb events` with
$SLMB_REDIS_URL, and `slmb serve` starting and stopping the whole stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import tiny_request, wait_until  # noqa: E402

from slmb.api.serve import free_port  # noqa: E402

pytest_plugins = ["service_fixtures"]
SLMB = [sys.executable, "-m", "slmb"]


@pytest.fixture
def cli_env(service, tmp_path):
    return {**service.env, "SLMB_HOME": str(tmp_path / "home-cli")}


def test_train_queue_follows_the_run_and_list_and_events_read_redis(service, cli_env, tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_request("tiny-cli")))
    done = subprocess.run([*SLMB, "train", str(path), "--queue", "--json", "--max-steps", "12"], env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    task_id = done.stderr.split("task ", 1)[1].split()[0]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    names = [e["event"] for e in events]
    assert names[0] == "queued" and "started" in names and names[-1] == "finished"
    assert events[-1]["data"]["step"] == 12  # the --max-steps override went with the request

    listed = subprocess.run([*SLMB, "list", "--json"], env=cli_env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    tasks = {t["task_id"]: t for t in json.loads(listed.stdout)["tasks"]}
    assert tasks[task_id]["state"] == "finished" and tasks[task_id]["celery_state"] == "SUCCESS"
    assert tasks[task_id]["model_name"] == "tiny-cli"
    table = subprocess.run([*SLMB, "list"], env=cli_env, capture_output=True, text=True, timeout=60)
    assert task_id in table.stdout

    replay = subprocess.run([*SLMB, "events", task_id], env=cli_env, capture_output=True, text=True, timeout=60)
    assert [json.loads(line) for line in replay.stdout.splitlines()] == events


def test_slmb_stop_reaches_a_queued_run_through_redis(service, cli_env, tmp_path):
    path = tmp_path / "long.json"
    path.write_text(json.dumps(tiny_request("long-cli", max_steps=100_000)))
    proc = subprocess.Popen([*SLMB, "train", str(path), "--queue", "--json"], env=cli_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        task_id = proc.stderr.readline().split("task ", 1)[1].split()[0]
        for line in proc.stdout:
            if json.loads(line)["event"] == "step":
                break
        stop = subprocess.run([*SLMB, "stop", task_id], env=cli_env, capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert "stop requested" in stop.stdout and "[STARTED]" in stop.stdout
        rest = [json.loads(line) for line in proc.stdout]
        assert proc.wait(60) == 3  # EXIT_STOPPED, as a local `slmb train`
    finally:
        proc.kill()
    assert rest[-1]["event"] == "stopped" and rest[-1]["data"]["reason"] == "requested"
    unknown = subprocess.run([*SLMB, "stop", "no-such-task"], env=cli_env, capture_output=True, text=True,
                             timeout=60)
    assert unknown.returncode == 1 and "no run" in unknown.stderr


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_serve_runs_the_whole_stack_and_stops_it_on_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "SLMB_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    for key in ("SLMB_REDIS_URL", "MLFLOW_TRACKING_URI", "SLMB_API_TOKEN"):
        env.pop(key, None)
    proc = subprocess.Popen([*SLMB, "serve", "--port", str(port), "--workers", "1", "--log-level", "warning"],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def healthy():
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
            except httpx.HTTPError:
                return None
            return body if body["workers"].get("count") == 1 and body["mlflow"]["ok"] else None

        health = wait_until(healthy, 90, "slmb serve to be healthy", interval=0.25)
        assert health["status"] == "ok" and health["redis"]["ok"]
        children = _children(proc.pid)
        assert len(children) == 2  # redis-server and one worker
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 15
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in children), 10,
                   "serve's children to exit")
        assert (tmp_path / "home" / "mlflow.db").exists()  # MLflow defaults to the store's sqlite file
    finally:
        proc.kill()
        proc.wait()
