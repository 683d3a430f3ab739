"""A real MLflow tracking server as ``MLFLOW_TRACKING_URI`` (README "Where things go"): `slmb train` logs its
params, metrics, tags, status and artifacts to it over HTTP, and the API, with another ``SLMB_HOME``, lists the
model from the server and generates with it (the weights downloaded from the server's artifact store)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from toy import toy_request

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import log_tail, wait_until  # noqa: E402

from slmb.api.serve import free_port  # noqa: E402

SLMB = [sys.executable, "-m", "slmb"]
# slmb gives a tracking server 5 s per request (a server that is down must cost seconds); one server worker on a
# busy test machine can take longer than that.
SLOW_SERVER = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a sqlite backend and a served artifact store in a tmp dir, on a free port."""
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if exe is None:
        pytest.fail("the mlflow command is missing (it comes with the mlflow package: make setup)")
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - the server writes to it until it ends
    proc = subprocess.Popen([exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    log.close()
    uri = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{uri}/health", timeout=5).status_code == 200
        assert proc.poll() is None, log_tail(tmp / "server.log")
        return False

    try:
        wait_until(answers, 180, f"mlflow server\n{log_tail(tmp / 'server.log')}", interval=0.5)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own group: it runs its workers as children
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(autouse=True)
def _patient_client(monkeypatch):
    for key, value in SLOW_SERVER.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def trained(mlflow_server, tmp_path_factory):
    """A toy model trained by `slmb train` with MLFLOW_TRACKING_URI set to the server."""
    from conftest import shared_dir

    home = tmp_path_factory.mktemp("home-train")
    env = {**os.environ, **SLOW_SERVER, "OMP_NUM_THREADS": "1", "SLMB_HOME": str(home),
           "MLFLOW_TRACKING_URI": mlflow_server, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "SLMB_DATA_DIR": str(shared_dir() / "datasets")}
    request = toy_request(name="tracked", max_steps=6, eval_every=3)
    path = home / "request.json"
    path.write_text(json.dumps(request))
    done = subprocess.run([*SLMB, "train", str(path), "--json"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=home)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[-1]["event"] == "finished"
    assert not (home / "mlruns").exists() and not (home / "mlflow.db").exists()  # nothing tracked locally
    return {"request": request, "task_id": events[-1]["data"]["task_id"], "model": Path(events[-1]["data"]["path"])}


def test_train_logs_the_run_to_the_server(mlflow_server, trained, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("slmb")
    [run] = client.search_runs([experiment.experiment_id], f"tags.task_id = '{trained['task_id']}'")
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.tags["training_status"] == "finished" and run.data.tags["model_name"] == "tracked"
    params = run.data.params
    assert (params["max_steps"], params["eval_every"], params["batch_size"], params["tokenizer"]) == (
        "6", "3", "4", "byte")
    assert (params["dataset"], params["model_name"]) == ("tiny_shakespeare", "tracked")
    for key in ("train/step_loss", "train/lr", "eval/val_loss", "eval/train_loss"):
        assert key in run.data.metrics, key
    val = client.get_metric_history(run.info.run_id, "eval/val_loss")
    assert sorted(m.step for m in val) == [3, 6] and all(0 < m.value < 10 for m in val)

    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"structure.json", "model.safetensors", "metadata.json", "loss_curve.png"} <= files
    # The artifacts went to the server's store, and they are the model's own files.
    client.download_artifacts(run.info.run_id, "structure.json", str(tmp_path))
    client.download_artifacts(run.info.run_id, "model.safetensors", str(tmp_path))
    assert json.loads((tmp_path / "structure.json").read_text()) == trained["request"]
    assert (tmp_path / "model.safetensors").read_bytes() == (trained["model"] / "model.safetensors").read_bytes()


def test_api_lists_and_serves_the_model_from_the_server(mlflow_server, trained, monkeypatch, tmp_path):
    """The API with an empty store of its own and the same MLFLOW_TRACKING_URI (as on another machine)."""
    from fastapi.testclient import TestClient

    from slmb.api.app import Settings, create_app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("SLMB_HOME", str(tmp_path / "home-api"))
    # No Redis: neither route needs it (the background reaper only logs that it is away).
    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    with TestClient(app, raise_server_exceptions=False) as client:
        models = {m["model_name"]: m for m in client.get("/api/v1/completed-models").json()["models"]}
        assert models["tracked"]["source"] == "mlflow" and models["tracked"]["task_id"] == trained["task_id"]
        resp = client.post("/api/v1/generate-text", json={"model_name": "tracked", "input_text": "ROMEO:",
                                                          "max_length": 16, "seed": 1})
        assert resp.status_code == 200, resp.text
        assert resp.json()["output_text"].startswith("ROMEO:")
        models = {m["model_name"]: m for m in client.get("/api/v1/completed-models").json()["models"]}
        assert models["tracked"]["source"] == "local"
    from safetensors.torch import load_file

    fetched = load_file(tmp_path / "home-api" / "completed" / "tracked" / "model.safetensors")
    trained_weights = load_file(trained["model"] / "model.safetensors")
    assert fetched.keys() == trained_weights.keys()
    assert all(fetched[k].equal(trained_weights[k]) for k in fetched)
