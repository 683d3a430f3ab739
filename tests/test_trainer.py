import io
import json
import math
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console
from toy import losses, run, toy_request

from slmb.console import ConsoleSink
from slmb.core import events as ev
from slmb.core import store
from slmb.core.compiler import build_model
from slmb.core.control import FileControl
from slmb.core.runtime import (
    AUTO_BF16_MIN_PARAMS,
    PEAKS_FILE,
    PROBE_N,
    autocast_for,
    cpu_has_native_bf16,
    machine_key,
    matmul_peak,
    matmul_peak_size,
    read_peaks,
    trusted_peak,
    utilisation,
)
from slmb.core.spec import TrainRequest
from slmb.core.trainer import get_lr, train
from slmb.core.validate import RequestInvalidError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_lr_schedule():
    kw = {"total_steps": 110, "lr": 1.0, "min_lr": 0.1, "warmup_steps": 10}
    assert get_lr(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert get_lr(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert get_lr(60, schedule="cosine", **kw) == pytest.approx(0.55)
    assert get_lr(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert get_lr(60, schedule="linear", **kw) == pytest.approx(0.55)
    assert get_lr(85, schedule="linear", **kw) == pytest.approx(0.325)
    assert get_lr(100, schedule="constant", **kw) == 1.0


def test_default_warmup_is_a_tenth_of_the_run_at_most_100():
    config = TrainRequest.model_validate(toy_request()).config
    assert config.warmup_steps == 0  # toy_request sets it
    default = TrainRequest.model_validate({**toy_request(), "config": {}}).config
    assert default.warmup_steps is None
    assert [default.resolved_warmup(n) for n in (1, 9, 10, 37, 999, 1000, 5000)] == [0, 0, 1, 3, 99, 100, 100]
    assert [config.model_copy(update={"warmup_steps": w}).resolved_warmup(37) for w in (0, 5, 500)] == [0, 5, 500]


def test_a_short_run_reaches_its_learning_rate_and_says_its_warmup():
    """37 optimizer steps (of two micro-batches each) warm up for 3 by default, not 100: the lr reaches its peak."""
    body = toy_request(max_steps=37, batch_size=2, grad_accum_steps=2, learning_rate=1e-3)
    del body["config"]["warmup_steps"]
    terminal = io.StringIO()
    _, events = run(body, sinks=[ConsoleSink(Console(file=terminal, width=200))])
    assert "; 37 steps (warmup 3), 1 epoch(s)" in terminal.getvalue()  # slmb train's first line
    started = next(e for e in events if e.name == "started")
    assert started.warmup_steps == 3 and started.total_steps == 37
    lrs = {e.step: e.lr for e in events if e.name == "step"}
    assert len(lrs) == 37
    assert [lrs[1], lrs[2], lrs[3]] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # step k uses get_lr(k - 1)
    assert max(lrs.values()) == pytest.approx(1e-3) == lrs[4] and lrs[37] < lrs[5] < lrs[4]  # then cosine decay
    assert not [e for e in events if e.name == "warning"]


def test_an_explicit_warmup_stays_as_given():
    _, events = run(toy_request(max_steps=8, warmup_steps=6, learning_rate=1e-3))
    assert next(e for e in events if e.name == "started").warmup_steps == 6
    lrs = {e.step: e.lr for e in events if e.name == "step"}
    assert lrs[1] == pytest.approx(1e-3 / 6) and lrs[6] == pytest.approx(1e-3) and max(lrs.values()) == lrs[6]
    _, events = run(toy_request(max_steps=4, warmup_steps=100))  # longer than the run: kept, and a warning says so
    assert next(e for e in events if e.name == "started").warmup_steps == 100
    assert any("warmup_steps (100) >= total steps (4)" in e.message for e in events if e.name == "warning")


def test_the_started_event_carries_the_requests_validation_warnings():
    """Config keys that document the architecture but disagree with the nodes reach every screen of the run."""
    body = toy_request(max_steps=1, n_heads=4, emb_dim=32, n_blocks=3)  # the canvas: 2 heads, width 32, 1 block
    body["config"]["colour"] = "blue"
    terminal = io.StringIO()
    _, events = run(body, sinks=[ConsoleSink(Console(file=terminal, width=200))])
    assert "warning /config/n_blocks: config.n_blocks = 3 but the canvas has 1 blocks" in terminal.getvalue()
    started = next(e for e in events if e.name == "started")
    got = {w["path"]: w for w in started.warnings}
    assert set(got) == {"/config/n_heads", "/config/n_blocks", "/config/colour"}
    heads = got["/config/n_heads"]
    assert heads["message"] == "config.n_heads = 4 but /model/3/children/1 uses 2"
    assert heads["severity"] == "warning" and heads["check"] == "config_agreement" and heads["hint"]
    assert got["/config/n_blocks"]["message"] == "config.n_blocks = 3 but the canvas has 1 blocks"
    assert got["/config/colour"]["check"] == "unknown_keys"
    # On the wire (JSONL, Redis, SSE) as started.data.warnings.
    assert started.to_wire()["data"]["warnings"] == started.warnings
    _, clean = run(toy_request(max_steps=1, n_heads=2, emb_dim=32, n_blocks=1))
    assert next(e for e in clean if e.name == "started").warnings == []


def test_first_loss_is_close_to_ln_vocab():
    _, events = run(toy_request(max_steps=2))
    first = losses(events)[1]
    assert abs(first - math.log(257)) / math.log(257) < 0.1


def test_overfits_one_batch(tmp_path):
    text = Path(os.environ["SLMB_DATA_DIR"], "tiny_shakespeare", "input.txt").read_text()
    data = tmp_path / "one_batch.txt"
    data.write_text(text[:4 * 32 + 1])  # exactly four windows of 32 = one batch of 4
    body = toy_request(d=64, dataset=str(data), epochs=150, val_fraction=0, learning_rate=1e-2, lr_schedule="constant")
    result, events = run(body)
    assert result.state == "finished" and result.step == 150
    first, last = losses(events)[1], losses(events)[150]
    assert first > 5.0 and last < 0.5, (first, last)
    assert result.val_loss is None


def test_event_sequence_checkpoints_and_completed_model():
    body = toy_request(max_steps=6, eval_every=3, checkpoint_every=2)
    got = []
    result = train(body, sinks=[ev.CallbackSink(got.append)], track=False)
    names = [e.name for e in got]
    assert names[:2] == ["status", "started"] and names[-2:] == ["status", "finished"]
    assert {"step", "progress", "eval", "checkpoint"} <= set(names)
    steps = [e.step for e in got if e.name == "step"]
    assert steps[0] == 1 and steps[-1] == 6  # throttled, but the first and the last are always there
    assert [e.step for e in got if e.name == "eval"] == [3, 6]
    assert [e.step for e in got if e.name == "checkpoint"] == [2, 4]
    started = got[1]
    assert started.total_steps == 6 and started.tokenizer == "byte" and started.dtype == "fp32"
    model = build_model(TrainRequest.model_validate(body))
    assert started.parameters == model.num_parameters()
    # Model FLOP utilisation against the measured matmul peak, on every step and progress event.
    assert started.flops_per_token == model.flops_per_token(32) and started.peak_flops > 1e9
    for e in got:
        if e.name in ("step", "progress"):
            assert e.model_flops == pytest.approx(e.tokens_per_sec * started.flops_per_token)
            assert 0 < e.mfu <= 1 and e.mfu == pytest.approx(e.model_flops / started.peak_flops)
    progress = [e for e in got if e.name == "progress"]
    assert progress[-1].progress == 100.0 and progress[-1].eta_s == 0

    # The run directory holds the same events, the final status and only the latest checkpoint.
    run_dir = store.run_dir(result.task_id)
    assert [e.to_wire() for e in ev.read_events(run_dir.events)] == [e.to_wire() for e in got]
    assert FileControl().read_status(result.task_id)["state"] == "finished"
    assert [p.name for p in run_dir.checkpoints.iterdir()] == ["step-00000004"]
    assert json.loads(run_dir.request.read_text()) == body

    [entry] = store.list_models()
    assert entry.name == "toy" and entry.metadata["task_id"] == result.task_id
    assert entry.metadata["tokenizer"] == "byte" and entry.metadata["steps"] == 6
    assert entry.metadata["metrics"]["val_loss"] == pytest.approx(result.val_loss)
    request, state, _ = store.load_completed("toy")
    model = build_model(TrainRequest.model_validate(request))
    model.load_state_dict(state)
    assert model.chain.layers[-1].weight is model.chain.layers[0].weight  # the tie survives the round trip


def test_stop_and_resume_give_the_losses_of_an_uninterrupted_run():
    body = toy_request(max_steps=12, dropout=0.1, eval_every=4, name="resumable")
    del body["config"]["warmup_steps"]  # the default (12 // 10): the resumed session must warm up the same way
    full, _ = run(body)
    again, full_events = run(body)  # a second uninterrupted run: the loop is deterministic
    full_task_id = again.task_id
    assert full.state == "finished"

    task_id = store.new_task_id()

    def stop_at_5(event):
        if event.name == "step" and event.step == 5:
            FileControl().request_stop(task_id)

    stopped, first = run(body, task_id=task_id, sinks=[ev.CallbackSink(stop_at_5)])
    assert stopped.state == "stopped" and stopped.step == 5
    assert [e.name for e in first[-4:]] == ["stop_requested", "checkpoint", "status", "stopped"]
    assert first[-1].checkpoint == stopped.path and stopped.path.endswith("step-00000005")
    assert FileControl().read_status(task_id)["state"] == "stopped"
    assert store.get_model("resumable").metadata["task_id"] == full_task_id  # a stopped run publishes nothing

    resumed, second = run(None, task_id=task_id, resume=True)
    assert resumed.state == "finished" and resumed.step == 12
    assert second[1].name == "started" and second[1].resumed_from_step == 5
    assert second[1].warmup_steps == first[1].warmup_steps == 1
    assert losses(first) == {k: v for k, v in losses(full_events).items() if k <= 5}
    assert losses(second) == {k: v for k, v in losses(full_events).items() if k > 5}
    assert resumed.val_loss == full.val_loss
    # The run's log holds both sessions; following it reads through the stop to the end.
    log = [e.name for e in ev.follow_events(store.run_dir(task_id).events, timeout_s=5)]
    assert log.count("started") == 2 and log[-1] == "finished" and "stopped" in log
    with pytest.raises(store.StoreError, match="has finished"):
        train(None, task_id=task_id, resume=True, track=False)


def test_a_run_stopped_while_queued_stops_before_training():
    run_ = store.create_run({})
    FileControl().request_stop(run_.task_id)
    result, events = run(toy_request(), task_id=run_.task_id)
    assert result.state == "stopped" and result.step == 0 and result.path is None
    assert [e.name for e in events] == ["status", "stop_requested", "status", "stopped"]


def test_grad_accumulation_matches_a_bigger_batch():
    _, big = run(toy_request(max_steps=3, batch_size=4))
    _, accum = run(toy_request(max_steps=3, batch_size=2, grad_accum_steps=2))
    assert list(losses(accum)) == [1, 2, 3]
    for step, loss in losses(big).items():
        assert losses(accum)[step] == pytest.approx(loss, rel=1e-4)


def test_token_cache_is_reused_by_the_next_run():
    _, first = run(toy_request(max_steps=1))
    _, second = run(toy_request(max_steps=1))
    assert first[1].token_cache_hit is False and second[1].token_cache_hit is True
    assert first[1].train_tokens == second[1].train_tokens > 900_000


def test_early_stopping_finishes_when_val_loss_stops_improving():
    # A learning rate far below fp32 resolution leaves the weights, and so the validation loss, unchanged.
    result, events = run(toy_request(max_steps=50, eval_every=1, early_stopping_patience=2, learning_rate=1e-12))
    assert result.state == "finished" and result.step == 3
    assert any(e.name == "warning" and "early stopping" in e.message for e in events)


def test_early_stopping_keeps_the_weights_of_the_best_evaluation_across_a_stop_and_resume():
    # A constant, high learning rate: the validation loss soon stops improving (here: best at step 4, then
    # worse at 5 and 6). The exact step may differ between CPUs, so it is read from the eval events.
    cfg = dict(max_steps=40, eval_every=1, learning_rate=0.03, lr_schedule="constant", early_stopping_patience=2)
    result, events = run(toy_request(name="early", **cfg))
    evals = [(e.step, e.val_loss) for e in events if e.name == "eval"]
    best_step, best = min(evals, key=lambda e: e[1])
    assert result.step == best_step + 2 < 40 and result.val_loss == best
    [warning] = [e.message for e in events if e.name == "warning"]
    assert f"keeps the weights of step {best_step} (val loss {best:.4f})" in warning
    finished = events[-1]
    assert finished.name == "finished" and finished.val_loss == best
    assert store.get_model("early").metadata["best_step"] == best_step

    # The same run stopped one step after its best (the best weights only in memory) and resumed: the
    # checkpoint carried them.
    task_id = store.new_task_id()

    def stop_after_best(event):
        if event.name == "step" and event.step == best_step + 1:
            FileControl().request_stop(task_id)

    stopped, _ = run(toy_request(name="early-resumed", **cfg), task_id=task_id,
                     sinks=[ev.CallbackSink(stop_after_best)])
    assert stopped.step == best_step + 1
    resumed, _ = run(None, task_id=task_id, resume=True)
    assert resumed.step == best_step + 2 and resumed.val_loss == best

    # Both published models hold exactly the weights of a run trained for best_step steps.
    reference, _ = run(toy_request(name="reference", **{**cfg, "max_steps": best_step}))
    assert reference.val_loss == best
    _, ref_state, _ = store.load_completed("reference")
    for name in ("early", "early-resumed"):
        _, state, _ = store.load_completed(name)
        assert state.keys() == ref_state.keys()
        assert all(torch.equal(state[k], ref_state[k]) for k in state), name


def test_compile_trains_like_eager():
    # config.compile wraps SLM.loss (trunk + chunked cross-entropy) in torch.compile: the same losses. (No
    # dropout: compiled code draws its dropout masks from its own generator, so they differ from eager ones.)
    curves = {}
    for compiled in (False, True):
        result, events = run(toy_request(name=f"compiled-{compiled}", max_steps=4, eval_every=2,
                                         compile=compiled))
        assert result.state == "finished" and result.step == 4
        curves[compiled] = losses(events)
    assert curves[True].keys() == curves[False].keys() == {1, 2, 3, 4}
    for step, loss in curves[False].items():
        assert curves[True][step] == pytest.approx(loss, rel=1e-4), step


def test_unsupported_dtype_falls_back_to_fp32_with_a_warning():
    _, events = run(toy_request(max_steps=1, dtype="fp16", device="cpu"))  # fp16 needs CUDA
    warning = next(e for e in events if e.name == "warning")
    assert "fp16" in warning.message and "fp32" in warning.message
    assert next(e for e in events if e.name == "started").dtype == "fp32"


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_autocast_on_a_cpu_with_native_bf16():
    _, events = run(toy_request(max_steps=2, dtype="bf16", device="cpu"))
    assert next(e for e in events if e.name == "started").dtype == "bf16"
    assert not [e for e in events if e.name == "warning"]
    assert abs(losses(events)[1] - math.log(257)) < 0.6


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_loss_curve_tracks_fp32():
    # "auto" picks bf16 for real models: its training must follow the fp32 run closely, step by step.
    curves = {}
    for dtype in ("fp32", "bf16"):
        _, events = run(toy_request(d=64, max_steps=30, dtype=dtype, device="cpu"))
        curves[dtype] = losses(events)
    assert len(curves["fp32"]) == 30 and curves["fp32"][30] < curves["fp32"][1] - 1.0  # it learned
    worst = max(abs(curves["bf16"][s] - curves["fp32"][s]) / curves["fp32"][s] for s in curves["fp32"])
    assert worst < 0.03, worst


def test_auto_dtype_is_the_default_and_resolves_by_device_and_size():
    body = toy_request(max_steps=1)
    body["config"].pop("dtype")
    assert TrainRequest.model_validate(body).config.dtype == "auto"
    cpu = torch.device("cpu")
    native = "bf16" if cpu_has_native_bf16() else "fp32"
    assert autocast_for("auto", cpu, AUTO_BF16_MIN_PARAMS)[0] == native
    assert autocast_for("auto", cpu, AUTO_BF16_MIN_PARAMS - 1)[0] == "fp32"  # a toy model: bf16 would be slower
    assert autocast_for("fp32", cpu, 10**9)[0] == "fp32"  # an explicit dtype is honoured
    _, events = run(body)
    started = next(e for e in events if e.name == "started")
    assert started.dtype == "fp32" and not [e for e in events if e.name == "warning"]


def test_trusted_peak_keeps_the_best_measurement_per_machine_so_mfu_never_passes_100_percent(tmp_path):
    """A busy start-up measures the peak low (MFU read 256-1,252% under load): the best measurement this machine has
    shown is cached under $SLMB_HOME and used instead, and raised when a later one is higher."""
    cpu = torch.device("cpu")
    key = machine_key(cpu, "bf16")
    assert f"threads={torch.get_num_threads()}" in key and "|bf16|" in key and key != machine_key(cpu, "fp32")
    assert trusted_peak(cpu, "bf16", tmp_path, measure=lambda: 4e11) == 4e11  # first: its own measurement, recorded
    assert read_peaks(tmp_path) == {key: 4e11}
    # Later, under load: the cores give a quarter of that. The recorded peak stands and the file is unchanged.
    before = (tmp_path / PEAKS_FILE).read_bytes()
    assert trusted_peak(cpu, "bf16", tmp_path, measure=lambda: 1e11) == 4e11
    assert (tmp_path / PEAKS_FILE).read_bytes() == before
    # A better moment raises it; other settings keep their own.
    assert trusted_peak(cpu, "bf16", tmp_path, measure=lambda: 5e11) == 5e11
    assert trusted_peak(cpu, "fp32", tmp_path, measure=lambda: 2e11) == 2e11
    assert read_peaks(tmp_path) == {key: 5e11, machine_key(cpu, "fp32"): 2e11}
    assert trusted_peak(cpu, "bf16", None, measure=lambda: 1e11) == 1e11  # no home: this measurement alone
    # A damaged cache is ignored and rewritten.
    (tmp_path / PEAKS_FILE).write_text("{not json")
    assert trusted_peak(cpu, "bf16", tmp_path, measure=lambda: 3e11) == 3e11 and read_peaks(tmp_path) == {key: 3e11}
    # MFU over a peak it exceeds is no number at all, never 250%.
    assert utilisation(2e11, 4e11) == 0.5 and utilisation(1e12, 4e11) is None and utilisation(1.0, 0.0) is None


def test_a_run_under_a_low_measured_peak_uses_the_recorded_one(tmp_path, monkeypatch):
    """The trainer's peak_flops is the recorded best: a run started on a busy machine reports MFU against it."""
    import slmb.core.runtime as runtime

    monkeypatch.setenv("SLMB_HOME", str(tmp_path))
    body = toy_request(max_steps=2)
    body["config"]["dtype"] = "fp32"
    key = machine_key(torch.device("cpu"), "fp32")
    (tmp_path / PEAKS_FILE).write_text(json.dumps({key: {"flops": 9e15}}))  # "recorded earlier"
    monkeypatch.setattr(runtime, "matmul_peak", lambda device, dtype: 1e3)  # "measured under load"
    got: list = []
    train(body, sinks=[ev.CallbackSink(got.append)], track=False)
    started = next(e for e in got if e.name == "started")
    assert started.peak_flops == 9e15
    steps = [e for e in got if e.name == "step"]
    assert steps and all(e.mfu == pytest.approx(e.model_flops / 9e15) and e.mfu < 1e-3 for e in steps)


def test_matmul_peak_shrinks_its_product_to_fit_the_time_budget():
    # bf16 on a CPU without native bf16 runs below 1 GFLOP/s: a full-size product there would take minutes.
    cpu = torch.device("cpu")
    assert matmul_peak_size(cpu, "fp32", 1024, 3, None) == 1024  # no budget: the size asked for
    assert matmul_peak_size(cpu, "fp32", 1024, 3, 1e6) == 1024  # fits
    assert matmul_peak_size(cpu, "fp32", 1024, 3, 1e-9) == PROBE_N  # nothing fits: the probe's size
    mid = matmul_peak_size(cpu, "fp32", 4096, 3, 0.05)  # 137 GFLOP a product: far over 50 ms on any CPU
    assert PROBE_N <= mid < 4096 and mid % 64 == 0
    assert matmul_peak_size(torch.device("cuda"), "bf16", 8192, 3, 1e-9) == 8192  # GPUs: no probe, as asked
    assert matmul_peak(cpu, "fp32", n=2048, reps=1, budget_s=1e-9) > 1e8  # measured at the probe's size


def test_vocabulary_is_checked_before_anything_runs():
    with pytest.raises(RequestInvalidError, match="vocabulary"):
        train(toy_request(vocab=100), track=False)
    assert not (store.slmb_home() / "runs").exists()


def test_a_failure_ends_the_log_with_error():
    task_id = store.new_task_id()
    with pytest.raises(FileNotFoundError):
        run(toy_request(dataset="no_such_dataset_here"), task_id=task_id)
    events = ev.read_events(store.run_dir(task_id).events)
    assert [e.name for e in events[-2:]] == ["status", "error"]
    assert "no_such_dataset_here" in events[-1].message
    assert FileControl().read_status(task_id)["state"] == "error"


def test_a_hard_interrupt_still_ends_the_log():
    task_id = store.new_task_id()

    def interrupt(event):
        if event.name == "step" and event.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(toy_request(max_steps=10, checkpoint_every=1), task_id=task_id, sinks=[ev.CallbackSink(interrupt)])
    last = ev.read_events(store.run_dir(task_id).events)[-1]
    assert last.name == "stopped" and last.reason == "interrupted"
    assert last.checkpoint.endswith("step-00000001")  # the step-2 checkpoint was never written


def test_training_is_tracked_in_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from slmb.core import tracking

    result, events = run(toy_request(max_steps=4, eval_every=2), track=True)
    assert not [e for e in events if e.name == "warning"]
    client = tracking.client()
    mlrun = client.get_run(result.mlflow["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["training_status"] == "finished"
    assert mlrun.data.tags["task_id"] == result.task_id and mlrun.data.tags["model_name"] == "toy"
    assert mlrun.data.params["context_length"] == "32" and mlrun.data.params["tokenizer"] == "byte"
    steps = client.get_metric_history(mlrun.info.run_id, "train/step_loss")
    assert sorted(m.step for m in steps) == [1, 2, 3, 4]
    assert len(client.get_metric_history(mlrun.info.run_id, "eval/val_loss")) == 2
    assert {"structure.json", "loss_curve.png", "model.safetensors"} <= {
        a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert store.get_model("toy").metadata["mlflow_run_id"] == mlrun.info.run_id
