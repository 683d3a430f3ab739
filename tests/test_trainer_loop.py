"""The training loop without per-step host synchronisation (issue 15.1), on the CPU.

On CUDA the loop reads each step's loss one step late (``trainer.Readback``, lag 1) and takes its batches from a
thread that prepares (and page-locks) them ahead (``data.Prefetcher``). The CPU runs with lag 0; these tests set
``trainer.READBACK_LAG = 1`` so the lagged path runs here and must give the same run: losses, evaluations, epochs,
checkpoints, stop and resume, the NaN check. Compilation: the "auto" policy, and CUDA-graph mode's step code (mark
each graph step, copy the loss out of the graph's buffer) run through torch.compile on the CPU.
"""

from __future__ import annotations

import io
import threading

import pytest
import torch
from rich.console import Console
from toy import losses, run, toy_request

from slmb.console import ConsoleSink
from slmb.core import events as ev
from slmb.core import store
from slmb.core import trainer as trainer_mod
from slmb.core.control import FileControl
from slmb.core.data import Prefetcher
from slmb.core.trainer import COMPILE_AUTO_MIN_S, EAGER_MFU, Readback, compile_policy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def named(events, name):
    return [e for e in events if e.name == name]


@pytest.fixture
def small_text(tmp_path):
    """About 2,000 bytes of text: about 15 steps of 4 x 32 bytes per epoch, so a short run crosses epochs."""
    path = tmp_path / "small.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40)))
    return str(path)


@pytest.fixture
def lagged(monkeypatch):
    monkeypatch.setattr(trainer_mod, "READBACK_LAG", 1)


# ---------------------------------------------------------------------------------------------------- Prefetcher


def test_prefetcher_hands_over_every_step_in_order_and_runs_ahead():
    made = []
    ahead = threading.Event()

    def fetch(i):
        made.append(i)
        if i == 3:
            ahead.set()
        return [(torch.full((2, 3), i), torch.full((2, 3), -i))]

    with Prefetcher(fetch, start=2, stop=9, depth=2) as batches:
        first = batches.next()
        assert ahead.wait(10)  # made while the consumer holds step 2: the thread works ahead
        got = [first] + [batches.next() for _ in range(6)]
        with pytest.raises(IndexError, match="end at 9"):
            batches.next()
    assert made == list(range(2, 9))
    assert [int(b[0][0][0, 0]) for b in got] == list(range(2, 9))
    assert [int(b[0][1][0, 0]) for b in got] == [-i for i in range(2, 9)]


def test_prefetcher_raises_the_fetch_error_at_its_step():
    def fetch(i):
        if i == 2:
            raise ValueError("window 2 is unreadable")
        return [(torch.zeros(1), torch.zeros(1))]

    batches = Prefetcher(fetch, start=0, stop=5)
    batches.next(), batches.next()
    with pytest.raises(ValueError, match="window 2 is unreadable"):
        batches.next()
    batches.close()


def test_prefetcher_closes_while_its_thread_waits_for_room():
    batches = Prefetcher(lambda i: [(torch.zeros(1), torch.zeros(1))], start=0, stop=10**9, depth=1)
    batches.next()
    batches.close()
    assert not batches._thread.is_alive()


def test_batches_of_a_run_are_the_loaders(small_text, monkeypatch):
    """The prefetched batches are the ones WindowLoader gives for each step (resumes depend on it)."""
    from slmb.core import data

    seen = []
    real = data.WindowLoader.batch

    def spy(self, epoch, index, rank=0, world=1):
        x, y = real(self, epoch, index, rank, world)
        if self.shuffle:
            seen.append((epoch, index, x.clone()))
        return x, y

    monkeypatch.setattr(data.WindowLoader, "batch", spy)
    result, _ = run(toy_request(dataset=small_text, epochs=2, batch_size=4, grad_accum_steps=2))
    assert result.state == "finished" and result.step == 14  # 7 optimizer steps of 2 micro-batches per epoch
    assert [(e, i) for e, i, _ in seen] == [(e, i) for e in range(2) for i in range(14)]


# ---------------------------------------------------------------------------------------------------- Readback


def test_readback_returns_each_step_lag_steps_late_and_everything_on_drain():
    back = Readback(torch.device("cpu"), lag=1)
    back.push(1, 0, 0.1, torch.tensor([2.5, 1.0, 0.0]))
    assert back.ready() == []  # step 1 is the newest: not read yet
    back.push(2, 0, 0.2, torch.tensor([2.25, 0.5, 1.0]))
    [one] = back.ready()
    assert (one.step, one.epoch, one.lr, one.loss, one.grad_norm, one.stop) == (1, 0, 0.1, 2.5, 1.0, False)
    [two] = back.ready(drain=True)
    assert (two.step, two.loss, two.stop) == (2, 2.25, True)
    assert Readback(torch.device("cpu")).lag == 0  # the CPU computes synchronously: nothing to wait for


def test_the_loop_waits_for_a_step_only_at_the_steps_that_need_it(lagged, monkeypatch):
    """Having queued step n, the loop reads step n-1's numbers, never n's, except at the first step, evaluations,
    checkpoints and the last step; and nothing else reads a tensor to the host during training steps."""
    log = []
    real_ready, real_push = Readback.ready, Readback.push

    def push(self, step, *args):
        log.append(("push", step))
        return real_push(self, step, *args)

    def ready(self, drain=False):
        out = real_ready(self, drain)
        log.append(("drain" if drain else "read", [n.step for n in out]))
        return out

    monkeypatch.setattr(Readback, "push", push)
    monkeypatch.setattr(Readback, "ready", ready)
    items = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: items.append(1) or real_item(t))
    result, events = run(toy_request(max_steps=12, eval_every=5, checkpoint_every=4))
    assert result.step == 12
    drains = [steps for kind, steps in log if kind == "drain"]
    assert drains == [[1], [3, 4], [5], [7, 8], [9, 10], [11, 12], []]  # first, ckpt 4, eval 5, ckpt 8, eval 10, end
    newest = 0
    for kind, value in log:
        if kind == "push":
            newest = value
        elif kind == "read":
            assert value in ([], [newest - 1])  # never the step just queued
    assert sorted(s for kind, steps in log if kind != "push" for s in steps) == list(range(1, 13))
    # Host reads besides Readback: one per evaluated split (2 evals x train/val) plus the final evaluation.
    assert len(items) == 2 * len(named(events, "eval"))


# ---------------------------------------------------------------------------------------------------- lagged loop


def test_a_lagged_run_is_the_same_run(small_text, monkeypatch):
    body = toy_request(dataset=small_text, epochs=2, eval_every=5, checkpoint_every=4, name="same")
    outcomes = {}
    for lag in (0, 1):
        monkeypatch.setattr(trainer_mod, "READBACK_LAG", lag)
        result, events = run(body)
        outcomes[lag] = (result, events)
    (r0, e0), (r1, e1) = outcomes[0], outcomes[1]
    n = named(e0, "started")[0].steps_per_epoch
    assert 8 <= n <= 20 and r0.step == r1.step == 2 * n and r0.state == r1.state == "finished"
    assert losses(e1) == losses(e0) and list(losses(e1)) == list(range(1, 2 * n + 1))  # every step, in order
    assert [(e.step, e.val_loss) for e in named(e1, "eval")] == [(e.step, e.val_loss) for e in named(e0, "eval")]
    assert [(e.epoch, e.step, e.epoch_loss) for e in named(e1, "epoch")] == \
        [(e.epoch, e.step, e.epoch_loss) for e in named(e0, "epoch")] == \
        [(0, n, pytest.approx(sum(losses(e0)[s] for s in range(1, n + 1)) / n)),
         (1, 2 * n, pytest.approx(sum(losses(e0)[s] for s in range(n + 1, 2 * n + 1)) / n))]
    assert [e.step for e in named(e1, "checkpoint")] == list(range(4, 2 * n, 4))
    assert [e.grad_norm for e in named(e1, "step")] == [e.grad_norm for e in named(e0, "step")]
    assert r1.val_loss == r0.val_loss and r1.train_loss == r0.train_loss


def test_a_lagged_stop_checkpoints_a_consistent_state_and_resumes_exactly(lagged):
    body = toy_request(max_steps=12, dropout=0.1, eval_every=100, name="lag-resume")
    full, full_events = run(body)
    task_id = store.new_task_id()

    def stop_at_5(event):
        if event.name == "step" and event.step == 5:
            FileControl().request_stop(task_id)

    stopped, first = run(body, task_id=task_id, sinks=[ev.CallbackSink(stop_at_5)])
    # Step 5's numbers arrive after step 6 was queued: the run stops after step 6, with 6's loss in its state.
    assert stopped.state == "stopped" and stopped.step == 6 and stopped.path.endswith("step-00000006")
    state = store.read_json(store.run_dir(task_id).checkpoints / "step-00000006" / "trainer.json")["state"]
    assert state["step"] == 6 and state["last_loss"] == losses(full_events)[6]
    assert state["epoch_loss_steps"] == 6
    assert losses(first) == {k: v for k, v in losses(full_events).items() if k <= 5}  # 6's was read at the stop
    resumed, second = run(None, task_id=task_id, resume=True)
    assert resumed.step == 12 and resumed.val_loss == full.val_loss
    assert losses(second) == {k: v for k, v in losses(full_events).items() if k > 6}


def test_a_lagged_run_still_stops_at_the_step_whose_loss_is_not_finite(lagged, monkeypatch):
    from slmb.core.model import SLM

    calls = []
    real_loss = SLM.loss

    def loss(self, ids, targets):
        value = real_loss(self, ids, targets)
        calls.append(1)
        return value * float("nan") if len(calls) == 3 and self.training else value

    monkeypatch.setattr(SLM, "loss", loss)
    task_id = store.new_task_id()
    with pytest.raises(trainer_mod.TrainingError, match="the loss became nan at step 3"):
        run(toy_request(max_steps=10), task_id=task_id)
    events = ev.read_events(store.run_dir(task_id).events)
    assert [e.name for e in events[-2:]] == ["status", "error"] and "at step 3" in events[-1].message
    assert max(e.step for e in named(events, "step")) < 3


# ---------------------------------------------------------------------------------------------------- compile


def test_compile_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    peak = 1e15
    per_step = 1e12  # 1e12 FLOP a step at EAGER_MFU of 1e15: 1/200 s a step
    step_s = per_step / (EAGER_MFU * peak)
    long_run = int(COMPILE_AUTO_MIN_S / step_s) + 1
    short_run = int(COMPILE_AUTO_MIN_S / step_s) - 1

    auto = compile_policy("auto", False, cuda, False, per_step, long_run, peak)
    assert (auto["enabled"], auto["mode"], auto["cuda_graphs"]) == (True, "default", False)
    assert auto["estimated_eager_s"] == pytest.approx(long_run * step_s, rel=1e-3)
    assert "long enough to repay" in auto["reason"]
    short = compile_policy("auto", False, cuda, False, per_step, short_run, peak)
    assert short["enabled"] is False and "too short to repay" in short["reason"]
    on_cpu = compile_policy("auto", False, cpu, False, per_step, 10**9, peak)
    assert on_cpu["enabled"] is False and "not on cpu" in on_cpu["reason"]
    forced = compile_policy(True, False, cpu, False, per_step, 1, peak)
    assert (forced["enabled"], forced["mode"], forced["reason"]) == (True, "default", "compile: true")
    graphs = compile_policy("auto", True, cuda, False, per_step, 1, peak)
    assert (graphs["enabled"], graphs["mode"], graphs["cuda_graphs"]) == (True, "reduce-overhead", True)
    assert compile_policy(False, True, cuda, False, per_step, 1, peak)["mode"] == "reduce-overhead"
    ddp = compile_policy(True, True, cuda, True, per_step, 1, peak)
    assert (ddp["mode"], ddp["cuda_graphs"], ddp["notes"]) == ("default", False,
                                                               ["cuda_graphs has no effect on several processes"])
    assert compile_policy(False, True, cpu, False, per_step, 1, peak)["notes"] == ["cuda_graphs has no effect on cpu"]
    accumulating = compile_policy(True, True, cuda, False, per_step, 1, peak, accum=4)
    assert (accumulating["mode"], accumulating["cuda_graphs"]) == ("default", False)
    assert accumulating["notes"] == ["cuda_graphs has no effect with grad_accum_steps 4 (a replay would overwrite "
                                     "the gradients accumulated so far)"]


def test_the_started_event_says_whether_and_why_the_loss_was_compiled():
    _, events = run(toy_request(max_steps=1))
    [started] = named(events, "started")
    assert started.compile["enabled"] is False and started.compile["mode"] is None
    assert started.compile["reason"].startswith("auto: not on cpu")
    _, events = run(toy_request(max_steps=1, cuda_graphs=True, compile=False))
    assert named(events, "started")[0].compile["cuda_graphs"] is False
    assert "cuda_graphs has no effect on cpu" in [e.message for e in named(events, "warning")]


def test_cuda_graph_step_code_trains_like_eager_when_compiled_on_the_cpu():
    """TrainStep(graphs=True) marks a graph step per micro-batch and copies each loss out of the graph's output
    buffer before the next replay; torch.compile(mode="reduce-overhead") runs that code on the CPU (without
    graphs): the losses of eager steps, with gradient accumulation."""
    from slmb.core.compiler import build_model
    from slmb.core.runtime import autocast_for
    from slmb.core.spec import TrainRequest
    from slmb.core.trainer import TrainStep, make_optimizer

    req = TrainRequest.model_validate(toy_request())
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 257, (2, 32), generator=gen), torch.randint(0, 257, (2, 32), generator=gen))
               for _ in range(6)]
    curves = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        model = build_model(req)
        _, autocast, _ = autocast_for("fp32", torch.device("cpu"))
        loss_fn = torch.compile(model.loss, mode="reduce-overhead") if graphs else model.loss
        step = TrainStep(model, make_optimizer(model, 3e-3, 0.1, torch.device("cpu")), autocast,
                         torch.device("cpu"), loss_fn=loss_fn, graphs=graphs)
        curves[graphs] = [step(batches[2 * i:2 * i + 2], 3e-3)[0].item() for i in range(3)]
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)


def test_a_loss_that_fails_to_compile_trains_uncompiled_with_a_warning(monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    def broken_compile(fn, mode=None):
        def compiled(x, y):
            raise TorchDynamoException("no C++ compiler found for Inductor\n(long traceback)")
        return compiled

    _, eager = run(toy_request(max_steps=3, compile=False, name="eager"))
    monkeypatch.setattr(torch, "compile", broken_compile)
    terminal = io.StringIO()
    result, events = run(toy_request(max_steps=3, compile=True, name="fallback"),
                         sinks=[ConsoleSink(Console(file=terminal, width=200))])
    assert result.state == "finished"
    assert "torch.compile (compile: true); the first step compiles" in terminal.getvalue()  # slmb train's display
    assert [e.message for e in named(events, "warning")] == [
        "torch.compile failed (TorchDynamoException: no C++ compiler found for Inductor); training uncompiled"]
    assert losses(events) == losses(eager)
