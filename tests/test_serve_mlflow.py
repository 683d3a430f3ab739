"""The MLflow UI that ``slmb serve`` starts (issue 14, point 2), on a real ``slmb serve`` subprocess with its
private Redis, one worker and ``mlflow server`` on a free port: the run link in the train response opens on it, the
run shows there (MLflow's REST API, as its UI reads it) with its params, loss curve and artifacts, the UI is
restarted when killed; ``--no-mlflow`` starts none and gives no dead link; a taken port fails at once; ``slmb
train`` prints the command that opens a UI, or the run's link when one answers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_fixtures import FAST, log_tail, read_sse, tiny_request, wait_until
from toy import toy_request
from typer.testing import CliRunner

from slmb.api.serve import free_port

SLMB = [sys.executable, "-m", "slmb"]
START_S = 240  # `mlflow server` takes 10-20 s to answer on a busy 2-core machine; the API starts first


@dataclass
class Served:
    home: Path
    env: dict[str, str]
    proc: subprocess.Popen
    log: Path
    port: int
    mlflow_port: int | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict[str, Any] | None:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            return httpx.get(f"{self.url}/healthz", timeout=15).json()
        return None

    def process(self, name: str) -> dict[str, Any] | None:
        return next((p for p in (self.health() or {}).get("processes", []) if p["name"] == name), None)

    def log_tail(self) -> str:
        return log_tail(self.log)

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        resp = httpx.post(f"{self.url}/api/v1/train-complete-model", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        return resp.json()


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, **FAST, "SLMB_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    for key in ("MLFLOW_TRACKING_URI", "SLMB_MLFLOW_UI", "SLMB_SERVE_MLFLOW", "SLMB_REDIS_URL"):
        env.pop(key, None)  # the default store, sqlite under SLMB_HOME, as a user gets it
    return env


@contextlib.contextmanager
def serve(home: Path, *flags: str, workers: int = 1) -> Iterator[Served]:
    home.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), home / "serve.log"
    mlflow_port = int(flags[flags.index("--mlflow-port") + 1]) if "--mlflow-port" in flags else None
    with open(log, "ab") as out:
        proc = subprocess.Popen([*SLMB, "serve", "--port", str(port), "--workers", str(workers), *flags],
                                env=_env(home), cwd=home, stdout=out, stderr=subprocess.STDOUT)
    served = Served(home, _env(home), proc, log, port, mlflow_port)
    try:
        def api_up() -> dict[str, Any] | None:
            assert proc.poll() is None, f"slmb serve exited\n{served.log_tail()}"
            body = served.health()
            return body if body and body["redis"]["ok"] and body["workers"].get("count", 0) >= workers else None

        wait_until(api_up, START_S, f"slmb serve's API\n{served.log_tail()}", interval=0.5)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def ui_answers(served: Served) -> bool:
    mlflow = (served.health() or {}).get("mlflow", {})
    return bool(mlflow.get("ui_answers"))


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("serve-mlflow") / "home", "--mlflow-port", str(free_port())) as s:
        yield s


@pytest.fixture(scope="module")
def finished_run(served) -> dict[str, Any]:
    body = served.submit(tiny_request("mlflow-ui", max_steps=20))
    with httpx.Client(timeout=60) as c:
        events = read_sse(c, body["sse_url_abs"], timeout=300)
    assert events[-1]["event"] == "finished", events[-1]
    return body


def _mlflow(served: Served, route: str, **params: Any) -> dict[str, Any]:
    resp = httpx.get(f"http://127.0.0.1:{served.mlflow_port}{route}", params=params, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json() if resp.headers["content-type"].startswith("application/json") else {"text": resp.text}


def test_run_link_opens_on_the_ui_with_params_curves_and_artifacts(served, finished_run):
    mlflow_url = finished_run["mlflow_url"]
    base = f"http://127.0.0.1:{served.mlflow_port}"
    assert mlflow_url.startswith(f"{base}/#/experiments/"), mlflow_url
    run_id = mlflow_url.rsplit("/runs/", 1)[1]
    assert run_id == finished_run["mlflow_run_id"] and "mlflow_ui_command" not in finished_run
    # The link's server answers: the UI's page itself, and its health.
    wait_until(lambda: ui_answers(served), START_S, f"the MLflow UI\n{served.log_tail()}", interval=0.5)
    page = httpx.get(f"{base}/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    run = _mlflow(served, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["max_steps"] == "20" and params["model_name"] == "mlflow-ui" and params["emb_dim"] == "32"
    assert run["info"]["status"] == "FINISHED"
    history = _mlflow(served, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="train/step_loss")
    steps = sorted(m["step"] for m in history["metrics"])
    assert len(steps) >= 5 and steps[-1] >= 15, steps  # a curve, not a number
    val = _mlflow(served, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="eval/val_loss")
    assert len(val["metrics"]) >= 2
    files = {f["path"]: f for f in _mlflow(served, "/api/2.0/mlflow/artifacts/list", run_id=run_id)["files"]}
    assert {"structure.json", "model.safetensors", "metadata.json", "loss_curve.png"} <= set(files), files
    assert files["model.safetensors"]["file_size"] > 10_000
    # What the UI's artifact view fetches: the canvas JSON as it was posted.
    canvas = json.loads(_mlflow(served, "/get-artifact", path="structure.json", run_uuid=run_id)["text"])
    assert canvas["model"] == tiny_request("mlflow-ui", max_steps=20)["model"]


def test_cli_train_prints_the_link_when_a_ui_answers(served, finished_run, monkeypatch, tmp_path):
    from slmb.cli import app

    wait_until(lambda: ui_answers(served), START_S, "the MLflow UI", interval=0.5)
    path = tmp_path / "req.json"
    path.write_text(json.dumps(toy_request(name="cli-linked")))
    monkeypatch.setenv("SLMB_HOME", str(served.home))  # the store the UI shows
    monkeypatch.setenv("SLMB_MLFLOW_UI", f"http://127.0.0.1:{served.mlflow_port}")
    result = CliRunner().invoke(app, ["train", str(path), "--max-steps", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("MLflow run"))
    assert line.startswith(f"MLflow run: http://127.0.0.1:{served.mlflow_port}/#/experiments/"), line
    run = _mlflow(served, "/api/2.0/mlflow/runs/get", run_id=line.rsplit("/runs/", 1)[1])["run"]
    assert run["info"]["status"] == "FINISHED"


def test_a_killed_ui_is_restarted(served, finished_run):
    wait_until(lambda: ui_answers(served), START_S, "the MLflow UI", interval=0.5)
    before = served.process("mlflow")
    assert before and before["alive"]
    # The `mlflow server` command is serve's child; its web server (a grandchild) holds the port and must go too.
    pid = next(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_mlflow_child(p, served))
    os.kill(pid, signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        child = served.process("mlflow")
        return child if child and child["restarts"] > before["restarts"] and child["alive"] else None

    child = wait_until(restarted, 120, f"the MLflow UI restarted\n{served.log_tail()}", interval=0.5)
    assert child["last_exit"] == "killed by SIGKILL"
    wait_until(lambda: ui_answers(served), START_S, f"the restarted MLflow UI answering\n{served.log_tail()}",
               interval=0.5)
    run_id = finished_run["mlflow_run_id"]
    assert _mlflow(served, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]["info"]["run_id"] == run_id


def _is_mlflow_child(proc_dir: Path, served: Served) -> bool:
    try:
        argv = (proc_dir / "cmdline").read_bytes().split(b"\0")
        ppid = int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return ppid == served.proc.pid and b"server" in argv and str(served.mlflow_port).encode() in argv


def test_no_mlflow_starts_none_and_gives_no_dead_link(tmp_path):
    with serve(tmp_path / "home", "--no-mlflow", workers=0) as served:
        health = served.health()
        assert [p["name"] for p in health["processes"]] == ["redis"]
        assert health["mlflow"]["ui"] is None
        assert health["mlflow"]["ui_command"] == "mlflow ui --backend-store-uri sqlite:///$SLMB_HOME/mlflow.db"
        body = served.submit(tiny_request("no-ui"))
        assert body["mlflow_url"] is None
        assert body["mlflow_ui_command"] == "mlflow ui --backend-store-uri sqlite:///$SLMB_HOME/mlflow.db"
        assert body["mlflow_run_path"] == f"#/experiments/1/runs/{body['mlflow_run_id']}"
        assert "http" not in json.dumps({k: v for k, v in body.items() if k.startswith("mlflow")})


def test_a_taken_port_fails_at_once_naming_the_options(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([*SLMB, "serve", "--port", str(free_port()), "--workers", "0", "--mlflow-port",
                               str(port)], env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"port {port}" in done.stderr and "--mlflow-port" in done.stderr and "--no-mlflow" in done.stderr
    assert not (tmp_path / "home" / "redis").exists()  # nothing was started


def test_cli_train_without_a_ui_prints_the_command_that_opens_one(tmp_path, monkeypatch):
    from slmb.cli import app
    from slmb.core.store import slmb_home

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "req.json"
    path.write_text(json.dumps(toy_request(name="cli-no-ui")))
    result = CliRunner().invoke(app, ["train", str(path), "--max-steps", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("MLflow run"))
    assert f"mlflow ui --backend-store-uri sqlite:///{slmb_home() / 'mlflow.db'}" in line, line
    assert "#/experiments/1/runs/" in line and "http" not in line, line


def test_a_ui_left_by_a_killed_serve_is_ended_by_the_next(tmp_path):
    """SIGKILL takes `slmb serve` and its `mlflow` command down, but not MLflow's web server (a grandchild): the
    next `slmb serve` on that SLMB_HOME ends it rather than fail on its port."""
    home, port = tmp_path / "home", free_port()
    with serve(home, "--mlflow-port", str(port), workers=0) as first:
        wait_until(lambda: ui_answers(first), START_S, f"the MLflow UI\n{first.log_tail()}", interval=0.5)
        first.proc.kill()
        first.proc.wait()
    leftover = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
    assert leftover.status_code == 200  # the orphan still holds the port
    with serve(home, "--mlflow-port", str(port), "--log-level", "debug", workers=0) as second:
        wait_until(lambda: ui_answers(second), START_S, f"the new MLflow UI\n{second.log_tail()}", interval=0.5)
        assert "that a killed slmb serve left on port" in second.log.read_text()
        assert second.process("mlflow")["restarts"] == 0


def test_a_tracking_server_is_the_ui_and_nothing_is_started(monkeypatch):
    from slmb.api.serve import MlflowUI
    from slmb.core import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000/")
    with socket.socket() as taken:  # the port is not even looked at
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ui = MlflowUI(True, "127.0.0.1", taken.getsockname()[1])
    assert ui.argv is None and ui.url == "http://mlflow.example:5000"
    assert tracking.mlflow_run_url("r1", "3") == "http://mlflow.example:5000/#/experiments/3/runs/r1"
