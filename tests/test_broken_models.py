"""Broken models through the real CLI and over HTTP (the app in-process on a redis-server of the test's own and a
real MLflow sqlite store): listed as broken with the reason, refused with it, never a 500 or a stale cached copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from service_fixtures import start_redis, stop_process
from toy import toy_request

from slmb.core import store
from slmb.core.compiler import build_model
from slmb.core.spec import TrainRequest

SLMB = [sys.executable, "-m", "slmb"]


def save_model(name: str, d: int = 32, structure_d: int | None = None):
    """A real model (byte tokenizer); with ``structure_d``, weights of width ``d`` under a structure of that width."""
    weights = build_model(TrainRequest.model_validate(toy_request(d=d)))
    return store.save_completed(name, toy_request(name=name, d=structure_d or d), weights.state_dict(),
                                {"tokenizer": "byte", "parameters": weights.num_parameters()})


def truncate(path) -> None:
    data = (path / store.WEIGHTS).read_bytes()
    (path / store.WEIGHTS).write_bytes(data[: len(data) // 2])


def slmb(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SLMB, *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=120)


MISMATCH = ("model 'mismatch' is broken: model.safetensors does not match structure.json: "
            "chain.layers.0.weight has shape [257, 16], the structure needs [257, 32]; ")


def test_cli_lists_broken_models_and_refuses_to_generate_from_them():
    save_model("good")
    truncate(save_model("cut"))
    (save_model("junk-structure") / store.STRUCTURE).write_text("{not json")
    save_model("mismatch", d=16, structure_d=32)

    listed = {m["model_name"]: m for m in json.loads(slmb("list", "--json").stdout)["models"]}
    assert (listed["good"]["status"], "error" in listed["good"]) == ("ok", False)
    cut = listed["cut"]["error"]
    assert listed["cut"]["status"] == "broken" and cut.startswith("model.safetensors is truncated: its header lists ")
    assert listed["junk-structure"]["error"].startswith("structure.json is not valid JSON: Expecting property name")
    assert listed["mismatch"]["status"] == "ok"  # only loading the weights into the model can tell

    table = slmb("list").stdout
    assert "cut (broken)" in table and "good (broken)" not in table
    assert f"broken cut: {cut}" in table

    refused = slmb("generate", "cut", "hi", "-n", "2")
    assert (refused.returncode, refused.stderr.strip()) == (1, f"error: model 'cut' is broken: {cut}")
    refused = slmb("generate", "mismatch", "hi", "-n", "2")
    assert refused.returncode == 1 and refused.stderr.startswith(f"error: {MISMATCH}"), refused.stderr
    assert refused.stderr.strip().endswith("more shapes differ")
    assert "Traceback" not in refused.stderr
    ok = slmb("generate", "good", "hi", "-n", "3", "--seed", "1", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["model_name"] == "good"


@pytest.fixture
def api(tmp_path, monkeypatch):
    """The app in-process; Redis and MLflow of this test's own."""
    from mlflow.tracking import MlflowClient

    from slmb.api.app import Settings, create_app

    redis_proc, url = start_redis(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    MlflowClient(uri).create_experiment("slmb", (tmp_path / "mlartifacts").as_uri())
    try:
        with TestClient(create_app(Settings(redis_url=url)), raise_server_exceptions=False) as client:
            yield client
    finally:
        stop_process(redis_proc)


def generate(client: TestClient, name: str, stream: bool = False):
    return client.post("/api/v1/generate-text" + ("/stream" if stream else ""),
                       json={"model_name": name, "input_text": "hi", "max_length": 3, "seed": 1})


def models(client: TestClient) -> dict[str, dict]:
    resp = client.get("/api/v1/completed-models")
    assert resp.status_code == 200
    return {m["model_name"]: m for m in resp.json()["models"]}


def test_http_lists_broken_models_and_answers_409_naming_model_and_reason(api):
    save_model("good")
    truncate(save_model("cut"))
    (save_model("junk-meta") / store.METADATA).write_text("]")

    listed = models(api)
    assert (listed["good"]["status"], "error" in listed["good"]) == ("ok", False)
    assert listed["cut"]["status"] == "broken" and listed["cut"]["error"].startswith("model.safetensors is truncated")
    assert listed["junk-meta"] | {"status": "broken", "error": "metadata.json is not valid JSON: Expecting value: "
                                  "line 1 column 1 (char 0)"} == listed["junk-meta"]
    for name in ("cut", "junk-meta"):
        for stream in (False, True):
            resp = generate(api, name, stream)
            assert resp.status_code == 409, resp.text
            assert resp.json()["detail"] == f"model {name!r} is broken: {listed[name]['error']}"
            assert str(store.slmb_home()) not in resp.text
    assert generate(api, "good").status_code == 200
    streamed = generate(api, "good", stream=True)
    assert streamed.status_code == 200 and '"event": "done"' in streamed.text
    assert generate(api, "no-such-model").status_code == 404


def test_a_model_whose_tokenizer_is_not_on_the_server_is_a_409_without_paths(api, monkeypatch, tmp_path):
    weights = build_model(TrainRequest.model_validate(toy_request(d=32)))
    store.save_completed("needs-llama2", toy_request(name="needs-llama2", d=32), weights.state_dict(),
                         {"tokenizer": "llama2", "parameters": weights.num_parameters()})
    monkeypatch.setenv("SLMB_TOKENIZER_DIR", str(tmp_path / "no-tokenizers"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the user cache is searched too
    for stream in (False, True):
        resp = generate(api, "needs-llama2", stream)
        assert resp.status_code == 409, resp.text
        assert resp.json()["detail"] == ("model 'needs-llama2' cannot be used here: its tokenizer's files are not "
                                         "on this server")
        assert str(tmp_path) not in resp.text


def test_a_seed_out_of_torchs_range_is_refused():
    from slmb.core.generate import SamplingParams

    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    for seed in (2**64, 2**70, -1):
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=seed)


def test_a_cached_model_whose_files_turn_to_junk_is_refused_not_served_from_memory(api):
    path = save_model("m")
    assert generate(api, "m").status_code == 200  # now in the cache
    (path / store.WEIGHTS).write_bytes(b"\0" * 64)  # overwritten in place: same version, same metadata
    resp = generate(api, "m")
    assert resp.status_code == 409 and "model.safetensors is not a safetensors file: its header" in resp.text
    assert models(api)["m"]["status"] == "broken"

    path = save_model("m")  # republished whole: served again
    assert generate(api, "m").status_code == 200 and models(api)["m"]["status"] == "ok"

    # Weights that are a whole safetensors file but another model's: only the full check at load can tell, and the
    # listing says so afterwards.
    store.save_weights(path / store.WEIGHTS,
                       build_model(TrainRequest.model_validate(toy_request(name="mismatch", d=16))).state_dict())
    resp = generate(api, "m")
    assert resp.status_code == 409 and "model.safetensors does not match structure.json" in resp.json()["detail"]
    assert models(api)["m"]["error"] == resp.json()["detail"].removeprefix("model 'm' is broken: ")


def test_a_broken_copy_in_mlflow_is_refused_and_then_listed_as_broken(api, tmp_path):
    from mlflow.tracking import MlflowClient

    source = save_model("remote")
    truncate(source)
    files = tmp_path / "artifacts"
    files.mkdir()
    for name in (store.WEIGHTS, store.STRUCTURE, store.METADATA):
        (files / name).write_bytes((source / name).read_bytes())
    store.get_model("remote")  # exists locally only to build the files: remove it, so MLflow alone has it
    os.unlink(store.slmb_home() / "completed" / "remote")

    mlflow = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = mlflow.create_run(mlflow.get_experiment_by_name("slmb").experiment_id,
                            tags={"model_name": "remote", "training_status": "finished", "task_id": "t-remote"})
    for name in (store.WEIGHTS, store.STRUCTURE, store.METADATA):
        mlflow.log_artifact(run.info.run_id, str(files / name))
    mlflow.set_terminated(run.info.run_id, "FINISHED")

    listed = models(api)["remote"]
    assert (listed["source"], listed["status"]) == ("mlflow", "ok")  # not fetched yet: unchecked
    resp = generate(api, "remote")
    assert resp.status_code == 409
    detail = resp.json()["detail"]
    assert detail.startswith(f"model 'remote' is broken (the copy in MLflow run {run.info.run_id}): "
                             "model.safetensors is truncated: ")
    listed = models(api)["remote"]
    assert (listed["source"], listed["status"]) == ("mlflow", "broken") and listed["error"] in detail
    assert [e.name for e in store.list_models()] == []  # the broken copy never entered the store
