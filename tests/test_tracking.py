import time

import pytest
import torch

from slmb.core import events as ev
from slmb.core import store, tracking

REQUEST = {"config": {"epochs": 2, "batch_size": 4, "learning_rate": 1e-3, "rope_config": {"factor": 8.0}},
           "model": [{"type": "tokenEmbedding", "data": {"vocabSize": 256, "embDim": 16}}],
           "dataset": "tiny_shakespeare", "modelName": "tiny"}


def test_default_uri_and_links(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SLMB_MLFLOW_UI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{store.slmb_home() / 'mlflow.db'}"
    # No UI serves the local store: no link, the command that opens one.
    assert tracking.mlflow_run_url("r1", "7") is None
    assert tracking.mlflow_ui_command() == f"mlflow ui --backend-store-uri sqlite:///{store.slmb_home() / 'mlflow.db'}"
    assert tracking.mlflow_run_path("r1", "7") == "#/experiments/7/runs/r1"
    monkeypatch.setenv("SLMB_MLFLOW_UI", "http://127.0.0.1:5123/")  # as `slmb serve` sets it
    assert tracking.mlflow_run_url("r1", "7") == "http://127.0.0.1:5123/#/experiments/7/runs/r1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000/")  # a server is its own UI
    assert tracking.mlflow_run_url("r1", "7") == "http://mlflow.example:5000/#/experiments/7/runs/r1"
    assert tracking.mlflow_ui_command() is None


def test_params_are_the_flattened_config_with_defaults():
    params = tracking.request_params(REQUEST)
    assert params["epochs"] == "2" and params["learning_rate"] == "0.001"
    assert params["grad_clip"] == "1.0"  # a default the request left out
    assert "warmup_steps" not in params  # its default depends on the run's length: the sink logs it when it starts
    assert params["rope_config.factor"] == "8.0"
    assert params["dataset"] == "tiny_shakespeare" and params["model_name"] == "tiny"


def _events(task_id, path):
    yield ev.Status(task_id=task_id, state="running")
    yield ev.Started(task_id=task_id, model_name="tiny", total_steps=4, epochs=2, steps_per_epoch=2, batch_size=4,
                     context_length=16, parameters=4096, device="cpu", dtype="fp32", tokenizer="byte",
                     dataset="tiny_shakespeare", warmup_steps=0)
    for step in range(1, 5):
        yield ev.Step(task_id=task_id, step=step, total_steps=4, epoch=(step - 1) // 2, loss=5.0 - step, lr=1e-3,
                      grad_norm=0.5, tokens_per_sec=1000.0, mfu=0.01 * step)
        yield ev.Progress(task_id=task_id, step=step, total_steps=4, progress=25.0 * step, epoch=0, epochs=2,
                          loss=5.0 - step, loss_ema=5.0 - step / 2, elapsed_s=step, eta_s=4 - step)
        if step % 2 == 0:
            yield ev.Epoch(task_id=task_id, epoch=step // 2 - 1, step=step, epoch_loss=5.5 - step)
            yield ev.Eval(task_id=task_id, step=step, train_loss=5.0 - step, val_loss=5.2 - step,
                          best_val_loss=5.2 - step)
    yield ev.Status(task_id=task_id, state="finished")
    yield ev.Finished(task_id=task_id, model_name="tiny", step=4, train_loss=1.0, val_loss=1.2, path=str(path),
                      elapsed_s=4.0)


def test_mlflow_sink_logs_metrics_params_tags_and_artifacts(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = store.save_completed("tiny", REQUEST, {"w": torch.zeros(4)}, {})
    got = []
    sink = tracking.MlflowSink("task-1", REQUEST, flush_every_s=0.05)
    emitter = ev.Emitter([sink, ev.CallbackSink(got.append)])
    for event in _events("task-1", path):
        emitter.emit(event)
    info = sink.describe()
    emitter.close()
    assert not [e for e in got if e.name == "warning"]

    client = tracking.client()
    run = client.get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["model_name"] == "tiny" and run.data.tags["task_id"] == "task-1"
    assert run.data.tags["training_status"] == "finished"
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["dataset"] == "tiny_shakespeare"
    assert run.data.params["warmup_steps"] == "0"  # the trainer's resolved default, from the started event
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in ("train/step_loss", "train/step_loss_ema", "train/epoch_loss", "eval/train_loss",
                           "eval/val_loss", "train/lr", "train/tokens_per_sec", "train/grad_norm", "train/mfu")}
    assert sorted(history["train/step_loss"]) == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0)]
    assert sorted(history["eval/val_loss"]) == [(2, pytest.approx(3.2)), (4, pytest.approx(1.2))]
    assert sorted(history["train/epoch_loss"]) == [(2, 3.5), (4, 1.5)]
    assert sorted(history["train/mfu"]) == [(s, pytest.approx(0.01 * s)) for s in range(1, 5)]
    assert all(len(v) >= 2 for v in history.values())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"structure.json", "loss_curve.png", "model.safetensors"} <= artifacts
    # Artifacts of the default store live under SLMB_HOME, not in the working directory.
    assert run.info.artifact_uri.startswith((store.slmb_home() / "mlartifacts").as_uri())
    assert "mlflow_url" not in info  # no UI serves this store: the model's metadata keeps no dead link


def test_every_step_recorded_by_the_loop_is_a_point_of_the_curve(monkeypatch):
    """Step events are throttled (twice a second); the loop's record_step gives MLflow every step, once."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sink = tracking.MlflowSink("task-steps", REQUEST, flush_every_s=0.05)
    emitter = ev.Emitter([sink])
    for step in range(1, 11):
        sink.record_step(step, 10.0 - step, 1e-3 * step)
        if step in (1, 10):  # the events the trainer would have sent
            emitter.emit(ev.Step(task_id="task-steps", step=step, total_steps=10, epoch=0, loss=10.0 - step,
                                 lr=1e-3 * step, grad_norm=0.5))
    emitter.emit(ev.Stopped(task_id="task-steps", step=10))
    run_id = sink.describe()["mlflow_run_id"]
    emitter.close()
    client = tracking.client()
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/step_loss")) == [
        (s, 10.0 - s) for s in range(1, 11)]
    assert len(client.get_metric_history(run_id, "train/lr")) == 10
    assert [m.step for m in client.get_metric_history(run_id, "train/grad_norm")] == [1, 10]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"structure.json", "loss_curve.png"}


def test_a_resumed_task_continues_its_mlflow_run(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = tracking.client()
    first = tracking.start_run("task-2", REQUEST, client)
    client.set_terminated(first[1], "KILLED")  # as a stopped run ends
    changed = {**REQUEST, "config": {**REQUEST["config"], "max_steps": 50, "epochs": 3}}
    assert tracking.start_run("task-2", changed, client) == first
    run = client.get_run(first[1])
    assert run.data.params["epochs"] == "2" and run.data.params["max_steps"] == "50"
    assert run.info.status == "RUNNING"


def test_an_unreachable_server_is_one_quick_warning(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    got = []
    t0 = time.monotonic()
    sink = tracking.MlflowSink("task-3", REQUEST, flush_every_s=0.05)
    emitter = ev.Emitter([sink, ev.CallbackSink(got.append)])
    for event in _events("task-3", store.slmb_home()):
        emitter.emit(event)
    emitter.close()
    assert time.monotonic() - t0 < 20
    warnings = [e for e in got if e.name == "warning"]
    assert len(warnings) == 1 and "127.0.0.1:9" in warnings[0].message
    assert warnings[0].source == "MlflowSink"
    assert got[-1].name == "finished"
    assert sink.describe() == {}
