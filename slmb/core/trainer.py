"""The training loop (DESIGN.md §4): one plain nanoGPT-style loop that emits typed events to sinks.

``train`` validates the request, prepares the token cache, builds the model and runs AdamW with warmup and a
cosine/linear/constant decay, gradient accumulation, clipping, autocast, periodic evaluation on fixed batches,
early stopping (the finished model then keeps the weights of the best evaluation) and checkpoints. It checks the
stop flag every step; a stop checkpoints and ends the event log with ``stopped``, and ``resume=True`` continues
from that checkpoint exactly (same data order, RNG, optimizer moments: the losses match an uninterrupted run).
A finished model goes to the completed store.

Precision. ``dtype`` is the compute precision: parameters and optimizer state stay fp32 and the forward runs
under autocast. bf16 runs on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX); fp16 only on CUDA, with a
gradient scaler; anything else falls back to fp32 with a ``warning`` event. A request without ``dtype`` gets
"auto": bf16 where it is native and the model is big enough to gain from it, else fp32 (``runtime.autocast_for``;
numbers in docs/benchmarks.md).

Speed. The loss comes from ``SLM.loss``, which never materialises the full logits; ``runtime.prepare_device``
sets threads and keeps glibc from returning freed memory to the kernel; ``TrainStep`` is the whole step, shared
with ``bench/train.py`` so the benchmark measures this code. On CUDA the loop never waits for the step it has
just queued (``Readback``: each step's loss reaches the host a step late) and a thread prepares the next batches in
page-locked memory (``data.Prefetcher``); ``compile_policy`` decides whether to torch.compile the loss (and replay
it as CUDA graphs).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmb.core import events as ev
from slmb.core.control import Control, get_control
from slmb.core.distributed import Dist
from slmb.core.runtime import autocast_for, prepare_device, trusted_peak, utilisation
from slmb.core.store import (
    Run,
    StoreError,
    create_run,
    latest_checkpoint,
    load_weights,
    new_task_id,
    read_json,
    run_dir,
    save_completed,
    save_weights,
    slmb_home,
    write_json,
)

STEP_EVERY_S = 0.5  # step/progress events at most twice a second (plus the first and the last step)
EMA = 0.9  # smoothing of loss_ema
READBACK_LAG: int | None = None  # steps a loss is read late (Readback): None = 1 on CUDA, 0 elsewhere; tests set 1
MAX_STARTED_WARNINGS = 100  # a request with thousands of unknown keys must not make the started event huge


@dataclass
class TrainResult:
    """How a ``train`` call ended: ``state`` is "finished" (``path`` = the completed model) or "stopped"
    (``path`` = the checkpoint to resume from, None if the run stopped before its first step)."""

    task_id: str
    model_name: str
    state: str
    step: int
    total_steps: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    path: str | None
    elapsed_s: float
    mlflow: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainState:
    """Everything besides tensors that a checkpoint needs to resume exactly; saved as JSON."""

    step: int = 0
    loss_ema: float | None = None
    last_loss: float | None = None
    eval_train_loss: float | None = None
    val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None  # the step of best_val_loss; with early stopping its weights are kept
    best_train_loss: float | None = None
    evals_without_improvement: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0
    elapsed_s: float = 0.0


class TrainingError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------- setup


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA > MPS > CPU; anything else as given (an unavailable device is a clear error)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} was asked for, but CUDA is not available here; use 'auto' or 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError(f"device {name!r} was asked for, but MPS is not available here; use 'auto' or 'cpu'")
    return device


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device,
                   fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices and embeddings (>= 2-D): decaying biases and norm gains toward zero
    only hurts. Fused kernels on CUDA and on the CPU by default (on this project's CPU, 25 ms instead of 89 ms
    per step for the 16 M-parameter GPT-2 benchmark model)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if fused is None:
        fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


class TrainStep:
    """One optimizer step over ``grad_accum_steps`` micro-batches: autocast forward + loss, backward, clip, AdamW.

    The training loop and ``bench/train.py`` both call this, so the benchmark measures the trainer's own step.
    ``loss_fn(x, y)`` defaults to ``model.loss`` (chunked LM-head cross-entropy); batches arrive on the CPU.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, autocast: Callable[[], Any],
                 device: torch.device, *, scaler: Any = None, grad_clip: float | None = 1.0,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 micro_step: Callable[[bool], Any] | None = None, graphs: bool = False):
        """``micro_step(last)``: the context of one micro-batch (a distributed run synchronises gradients on the
        last one only; ``Dist.micro_step``). ``graphs``: ``loss_fn`` replays CUDA graphs (torch.compile's
        "reduce-overhead"): each micro-batch starts a new graph step, and its loss is copied out of the graph's
        output buffer, which the next replay overwrites."""
        self.model, self.optimizer, self.autocast, self.device = model, optimizer, autocast, device
        self.graphs = graphs
        self.scaler, self.grad_clip = scaler, grad_clip or float("inf")
        self.loss_fn = loss_fn or model.loss
        self.micro_step = micro_step
        self.params = [p for p in model.parameters() if p.requires_grad]

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = self.to_device(x), self.to_device(y)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast():
            return self.loss_fn(x, y)

    def __call__(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], lr: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (mean loss over the micro-batches, gradient norm before clipping), both 0-d tensors on the device.

        Nothing here waits for the device: on CUDA the optimizer step is queued behind the backward pass, and the
        caller reads the numbers (one sync) when it needs them."""
        opt, scaler, accum = self.optimizer, self.scaler, len(batches)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = None
        for k, (x, y) in enumerate(batches):
            with self.micro_step(k == accum - 1) if self.micro_step else contextlib.nullcontext():
                loss = self.loss(x, y)
                (scaler.scale(loss / accum) if scaler is not None else loss / accum).backward()
            loss = loss.detach().clone() if self.graphs else loss.detach()
            loss_sum = loss if loss_sum is None else loss_sum + loss
        if scaler is not None:
            scaler.unscale_(opt)
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor of the sharded gradients' norm
            grad_norm = grad_norm.full_tensor()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum / accum, grad_norm.detach()


def get_lr(step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int, schedule: str) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine/linear decay to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_lr + coeff * (lr - min_lr)


@dataclass
class StepNumbers:
    """One optimizer step's numbers on the host (``Readback``)."""

    step: int  # the step count after it (1 for the first step)
    epoch: int
    lr: float
    loss: float  # mean over micro-batches and ranks
    grad_norm: float
    stop: bool  # some rank wanted to stop (distributed runs; agreed through the step's all-reduce)


class Readback:
    """Reads each step's numbers (``Dist.step_numbers``: loss, gradient norm, stop flag) to the host without
    stalling the device.

    On CUDA the (3,) tensor is copied into page-locked memory with ``non_blocking=True`` and a CUDA event marks its
    arrival; ``ready()`` returns the steps whose numbers have arrived, waiting only for steps more than ``lag``
    behind the newest. With ``lag`` 1 the loop, having queued step n, waits for step n-1 while the GPU is busy with
    step n: the host never drains the device's queue, and there is no per-step synchronisation. ``drain=True``
    waits for every step (evaluation, checkpoints, the last step, a stop). Where the device runs synchronously (the
    CPU) ``lag`` is 0 and the numbers are read at once. The lag is a step count, the same on every rank, so ranks
    agree on a stop after the same step."""

    def __init__(self, device: torch.device, lag: int | None = None):
        from collections import deque

        self.cuda = device.type == "cuda"
        self.lag = (1 if self.cuda else 0) if lag is None else lag
        self._pending: deque[tuple[int, int, float, torch.Tensor, Any]] = deque()
        # Page-locked buffers, reused round-robin (at most lag + 1 steps are in flight).
        self._buffers = [torch.empty(3, pin_memory=True) for _ in range(self.lag + 2)] if self.cuda else []
        self._turn = 0

    def push(self, step: int, epoch: int, lr: float, numbers: torch.Tensor) -> None:
        if not self.cuda:
            self._pending.append((step, epoch, lr, numbers, None))
            return
        host = self._buffers[self._turn]
        self._turn = (self._turn + 1) % len(self._buffers)
        host.copy_(numbers, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._pending.append((step, epoch, lr, host, done))

    def ready(self, drain: bool = False) -> list[StepNumbers]:
        out = []
        keep = 0 if drain else self.lag
        while len(self._pending) > keep:
            step, epoch, lr, numbers, done = self._pending.popleft()
            if done is not None:
                done.synchronize()
            loss, grad_norm, stop = numbers.tolist()
            out.append(StepNumbers(step, epoch, lr, loss, grad_norm, stop > 0))
        return out


# config.compile "auto": compile on CUDA when the run, uncompiled, is estimated to take at least this long. On the
# H200, compiled steps of the GPT-2 benchmark shape ran 1.5x (batch 8) and 2.2x (batch 64) as fast as eager ones
# (docs/benchmarks.md); at 1.5x a run saves a third of its time, so a compile of about a minute pays from about 3
# minutes, and 5 leave a margin. The estimate assumes EAGER_MFU of the measured peak. On a CPU compiling did not
# pay (the same median step, eager and compiled, on an AMD EPYC Zen 4, after a 40 s compile): "auto" is off there.
COMPILE_AUTO_MIN_S = 300.0
EAGER_MFU = 0.2


def compile_policy(setting: bool | str, cuda_graphs: bool, device: torch.device, distributed: bool,
                   flops_per_step: float, total_steps: int, peak: float | None, accum: int = 1) -> dict[str, Any]:
    """Whether to torch.compile the loss, in which mode, and why: the ``started`` event's ``compile``.

    ``setting`` is ``config.compile`` (True, False or "auto"); ``cuda_graphs`` asks for mode "reduce-overhead"
    (CUDA only, one process only, one micro-batch per step: a graph replay reuses the memory of the previous
    one's outputs, where accumulated gradients would live). "auto" compiles on CUDA when the run's estimated
    eager time (``flops_per_step`` x ``total_steps`` at ``EAGER_MFU`` of ``peak``) is at least
    ``COMPILE_AUTO_MIN_S``, and never elsewhere."""
    estimate = flops_per_step * total_steps / (EAGER_MFU * peak) if peak else None
    graphs = cuda_graphs and device.type == "cuda" and not distributed and accum == 1
    if setting == "auto":
        if device.type != "cuda":
            enabled, reason = False, (f"auto: not on {device.type} (compiling did not pay on the CPUs measured; "
                                      "set compile: true to force it)")
        elif graphs:
            enabled, reason = True, "auto: cuda_graphs needs a compiled loss"
        elif estimate is None:
            enabled, reason = False, "auto: no peak to estimate the run's length"
        else:
            enabled = estimate >= COMPILE_AUTO_MIN_S
            verdict = "long enough to repay" if enabled else "too short to repay"
            reason = (f"auto: the run is estimated at {estimate:.0f} s uncompiled, {verdict} the compile time "
                      f"(compiles from {COMPILE_AUTO_MIN_S:.0f} s)")
    else:
        enabled = bool(setting) or graphs
        reason = "compile: true" if setting else ("cuda_graphs: true" if graphs else "compile: false")
    mode = "reduce-overhead" if graphs and enabled else ("default" if enabled else None)
    notes = []
    if cuda_graphs and not graphs:
        why = (f"on {device.type}" if device.type != "cuda" else "on several processes" if distributed
               else f"with grad_accum_steps {accum} (a replay would overwrite the gradients accumulated so far)")
        notes.append(f"cuda_graphs has no effect {why}")
    return {"enabled": enabled, "mode": mode, "cuda_graphs": graphs and enabled, "reason": reason,
            "estimated_eager_s": float(f"{estimate:.3g}") if estimate is not None else None, "notes": notes}


class CompileFallback:
    """A compiled loss that falls back to the eager one when compiling fails (a torch.compile/Inductor error on
    the first call, before any step has used it): the run goes on uncompiled, and ``on_fallback(message)`` says
    so. Any other error, and any error after the first call, is raised."""

    def __init__(self, compiled: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 eager: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], on_fallback: Callable[[str], None]):
        self.fn, self.eager, self.on_fallback, self.first = compiled, eager, on_fallback, True

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.first:
            return self.fn(x, y)
        from torch._dynamo.exc import TorchDynamoException

        try:
            out = self.fn(x, y)
        except TorchDynamoException as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            self.fn = self.eager
            self.on_fallback(f"torch.compile failed ({type(exc).__name__}: {first_line}); training uncompiled")
            out = self.fn(x, y)
        self.first = False
        return out


def apply_overrides(body: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The request with command-line overrides: ``model_name`` sets ``modelName``, ``dataset`` the request's
    dataset; other keys go to ``config``."""
    body = dict(body)
    config = dict(body.get("config") or {})
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in ("model_name", "modelName"):
            body.pop("model_name", None)
            body["modelName"] = value
        elif key == "dataset":
            body["dataset"] = value
        else:
            config[key] = value
    body["config"] = config
    return body


# ---------------------------------------------------------------------------------------------------- checkpoints


def snapshot_weights(model: nn.Module, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A CPU copy of ``model``'s state dict (tied names stay one tensor); refills ``into`` in place when given."""
    state = model.state_dict()
    if into is not None:
        with torch.no_grad():
            for key, value in state.items():
                into[key].copy_(value)
        return into
    copies: dict[int, torch.Tensor] = {}
    out = {}
    for key, value in state.items():
        if value.data_ptr() not in copies:
            copies[value.data_ptr()] = value.detach().to("cpu", copy=True)
        out[key] = copies[value.data_ptr()]
    return out


def save_checkpoint(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                    state: TrainState, best: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``checkpoints/step-N/`` (model + optimizer + RNG as safetensors, the rest JSON) and drop older ones.

    ``best``: the weights of the best validation loss so far, when early stopping may need them and they are
    not the current ones (``best.safetensors``).

    The directory is built under a temporary name and renamed into place, so a kill mid-save never leaves a
    checkpoint that looks complete.
    """
    final = run.checkpoints / f"step-{state.step:08d}"
    if (final / "trainer.json").is_file():
        return final
    tmp = run.checkpoints / f".tmp-step-{state.step:08d}-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    save_weights(tmp / "model.safetensors", model.state_dict())
    if best is not None:
        save_weights(tmp / "best.safetensors", best)
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in opt["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    save_weights(tmp / "trainer.safetensors", tensors)
    write_json(tmp / "trainer.json", {"state": asdict(state), "param_groups": opt["param_groups"],
                                      "optimizer_scalars": scalars,
                                      "scaler": scaler.state_dict() if scaler is not None else None})
    os.rename(tmp, final)
    # Only the newest checkpoint is kept, and a temporary one a killed process left behind goes too.
    for old in [*run.checkpoints.glob("step-*"), *run.checkpoints.glob(".tmp-step-*")]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                    device: torch.device) -> TrainState:
    """Restore model, optimizer, scaler and RNG from a checkpoint (no pickle anywhere); returns the loop state."""
    meta = read_json(path / "trainer.json")
    model.load_state_dict(load_weights(path / "model.safetensors", device))
    tensors = load_weights(path / "trainer.safetensors")
    opt_state: dict[int, dict[str, Any]] = {int(i): dict(s) for i, s in meta["optimizer_scalars"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return TrainState(**meta["state"])


# ---------------------------------------------------------------------------------------------------- train


def train(request: Mapping[str, Any] | None, *, task_id: str | None = None, sinks: Sequence[ev.Sink] = (),
          overrides: Mapping[str, Any] | None = None, resume: bool = False, control: Control | None = None,
          track: bool = True, step_every_s: float = STEP_EVERY_S, confined: bool = False,
          dist: Dist | None = None) -> TrainResult:
    """Train the model a request describes; see the module docstring.

    Args:
        request: the request JSON as sent (``slmb train`` reads it from a file). With ``resume`` it may be None:
            the run's own ``request.json`` is used.
        task_id: the run's id (a new one by default); with ``resume``, the stopped run to continue.
        sinks: where events go besides ``runs/<task_id>/events.jsonl`` and MLflow (console, Redis, a callback).
        overrides: config keys to replace (``epochs``, ``max_steps``, ``batch_size``, ``device``, ``dtype``, ...),
            and ``model_name``.
        resume: continue ``task_id`` from its latest checkpoint.
        control: where stop flags and status live (files in the run directory by default).
        track: log to MLflow.
        step_every_s: minimum seconds between ``step``/``progress`` events (0 = every step).
        confined: the request comes from the HTTP API, not the machine's owner: a named dataset or a file under
            ``$SLMB_DATA_DIR`` only, and tokenizers by name only (``prepare_tokens``, ``load_tokenizer``).
        dist: the processes training together (slmb.core.distributed). By default one, or, in a process torchrun
            started, its process group (joined here, left at the end). Every rank calls ``train`` with the same
            arguments; rank 0's task id, request and checkpoint are the ones used, and only rank 0 writes events,
            status, MLflow and the completed model (``sinks`` and ``control`` are used there only).

    Raises:
        RequestInvalidError: the request is invalid (nothing is created).
        Any setup or training error, after ``error`` has been emitted.
        KeyboardInterrupt: after ``stopped`` (reason "interrupted") has been emitted.
    """
    own_dist = dist is None
    dist = dist or join_processes(request, overrides)
    try:
        result = _train(request, task_id, sinks, overrides, resume, control or get_control(), track,
                        step_every_s, confined, dist)
    except BaseException:
        if own_dist:
            dist.close(wait=False)
        raise
    if own_dist:
        dist.close()
    return result


def join_processes(request: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None) -> Dist:
    """In a process torchrun started, join its process group (the request's device picks NCCL or gloo);
    otherwise one process (``Dist()``)."""
    from slmb.core import distributed as D

    return D.Dist.from_env(resolve_device(_device_hint(request, overrides))) if D.launched() else D.Dist()


def _device_hint(request: Any, overrides: Mapping[str, Any] | None) -> str:
    """The device a request asks for, before it is validated: torchrun's ranks must pick their backend (NCCL or
    gloo) before they can agree on anything."""
    device = (overrides or {}).get("device")
    if device is None and isinstance(request, Mapping) and isinstance(request.get("config"), Mapping):
        device = request["config"].get("device")
    return device if isinstance(device, str) and device else "auto"


def _setup_body(request: Mapping[str, Any] | None, task_id: str | None, overrides: Mapping[str, Any] | None,
                resume: bool, control: Control) -> dict[str, Any]:
    """The request to train (the stored one on resume), with overrides; raises when there is nothing to train."""
    if resume:
        if task_id is None:
            raise ValueError("resume needs the task id of a stopped run")
        run = run_dir(task_id)
        if not run.exists():
            raise StoreError(f"no run {task_id!r} to resume in {run.path.parent}")
        if (control.read_status(task_id) or {}).get("state") == "finished":
            raise StoreError(f"run {task_id} has finished; there is nothing to resume")
        if request is None:
            request = read_json(run.request)
    elif request is None:
        raise ValueError("a request is needed to start a run")
    return apply_overrides(request, overrides)


class _Silent:
    """The control of a rank other than 0: rank 0 alone reads stop flags and writes the status."""

    def stop_requested(self, task_id: str) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _train(request: Mapping[str, Any] | None, task_id: str | None, sinks: Sequence[ev.Sink],
           overrides: Mapping[str, Any] | None, resume: bool, control: Control, track: bool, step_every_s: float,
           confined: bool, dist: Dist) -> TrainResult:
    from slmb.core.distributed import LAUNCHER_ENV
    from slmb.core.validate import RequestInvalidError, validate

    # Rank 0 decides what to train (its task id, its stored request on resume) and tells the others.
    body: dict[str, Any] | None = None
    failure: Exception | None = None
    if dist.is_main:
        task_id = task_id or new_task_id()
        try:
            body = _setup_body(request, task_id, overrides, resume, control)
        except (ValueError, StoreError) as exc:
            failure = exc
    body, failure, task_id = dist.broadcast((body, failure, task_id))
    if failure is not None:
        raise failure
    report = validate(body, build=False)
    if not report.ok:
        raise RequestInvalidError(report)
    if dist.is_main:
        run = create_run(body, task_id)
    else:
        run = run_dir(task_id)
        run.checkpoints.mkdir(parents=True, exist_ok=True)  # DCP writes this rank's shard there
    model_name = report.request.model_name or f"model-{run.task_id[:8]}"

    mlflow_sink = None
    if track and dist.is_main:
        from slmb.core.tracking import MlflowSink

        mlflow_sink = MlflowSink(run.task_id, body)
    # The sink that may fail (a remote tracking server) goes first, so its warning precedes the terminal event.
    emitter = ev.Emitter([*([mlflow_sink] if mlflow_sink else []), ev.JsonlSink(run.events), *sinks]
                         if dist.is_main else [])
    if not dist.is_main:
        control = _Silent()  # type: ignore[assignment]
    if resume:
        control.clear_stop(run.task_id)
    # A force-stop kills the process that owns the run: the launcher (`slmb train --nproc-per-node`, a worker),
    # else torchrun's agent (its ranks die with it), else this process.
    owner = os.environ.get(LAUNCHER_ENV) or (os.getppid() if dist.active else None)
    control.register_process(run.task_id, int(owner) if owner else None)
    control.write_status(run.task_id, "running", model_name=model_name, pid=os.getpid())
    emitter.emit(ev.Status(task_id=run.task_id, state="running"))
    loop = _Loop(run, body, report.request, model_name, emitter, control, mlflow_sink, step_every_s, confined,
                 dist, warnings=[w.to_dict() for w in report.warnings[:MAX_STARTED_WARNINGS]])
    try:
        return loop.run(resume)
    except KeyboardInterrupt:
        # A second Ctrl-C: leave at once without saving, but still end the log (with an earlier checkpoint, if any).
        ckpt = latest_checkpoint(run)
        checkpoint = str(ckpt) if ckpt else None
        control.write_status(run.task_id, "stopped", step=loop.state.step, checkpoint=checkpoint)
        emitter.emit(ev.Status(task_id=run.task_id, state="stopped", message="interrupted"))
        emitter.emit(ev.Stopped(task_id=run.task_id, step=loop.state.step, checkpoint=checkpoint,
                                reason="interrupted"))
        raise
    except Exception as exc:
        message = _failure_message(exc, dist)
        control.write_status(run.task_id, "error", message=message, error_type=type(exc).__name__)
        emitter.emit(ev.Status(task_id=run.task_id, state="error", message=message))
        emitter.emit(ev.Error(task_id=run.task_id, message=message, type=type(exc).__name__))
        raise
    finally:
        gc.unfreeze()  # the loop froze what existed before it (_Loop.run); a no-op when it did not get there
        emitter.close()


def _failure_message(exc: Exception, dist: Dist) -> str:
    """The error's text; a collective that failed because another rank died says so first."""
    text = str(exc)
    if not dist.active:
        return text
    import torch.distributed

    peer_lost = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out")
    if isinstance(exc, torch.distributed.DistError) or any(marker in text for marker in peer_lost):
        detail = re.sub(r"^\[[^\]]*\] ", "", text.splitlines()[0] if text else type(exc).__name__)  # gloo's source
        return f"another process of this run failed or was killed (torch.distributed: {detail})"
    return text


def _build_device(req: Any, device: torch.device, strategy: str | None) -> torch.device:
    """Where to create the weights: on the training device, as one process does (so the random initialisation
    is the one-process one there), unless FSDP must shard a model whose whole fp32 weights would take more than
    half of one GPU: then on the CPU, and ``fully_shard`` moves each rank's shard to its GPU."""
    if strategy != "fsdp" or device.type != "cuda":
        return device
    from slmb.core.compiler import build_model

    weights = 4 * build_model(req, device="meta").num_parameters()
    return device if weights < torch.cuda.get_device_properties(device).total_memory // 2 else torch.device("cpu")


def _num_parameters(model: nn.Module) -> int:
    """Parameters of the whole model, tied once; a sharded (FSDP) parameter counts its global size."""
    return sum(p.numel() for p in model.parameters())


class _Loop:
    """One training run's state; ``run`` is the loop. A class only so the stop/finish paths share the state."""

    def __init__(self, run: Run, body: dict[str, Any], req: Any, model_name: str, emitter: ev.Emitter,
                 control: Control, mlflow_sink: Any, step_every_s: float, confined: bool = False,
                 dist: Dist | None = None, warnings: list[dict[str, Any]] | None = None):
        self.dist = dist or Dist()
        self.run_, self.body, self.req, self.model_name = run, body, req, model_name
        self.emitter, self.control, self.mlflow_sink = emitter, control, mlflow_sink
        self.step_every_s, self.confined = step_every_s, confined
        self.task_id = run.task_id
        self.state = TrainState()
        self.t_session, self.elapsed_before = time.monotonic(), 0.0
        self.total_steps = 0
        self.best_weights: dict[str, torch.Tensor] | None = None  # with early stopping: the best eval's weights
        self.parameters = 0
        self.warnings = warnings or []  # the request's validation warnings, for the started event
        # config.init_from's own tokenizer files (an imported checkpoint's), copied into the finished model.
        self.own_tokenizer: dict[str, Path] = {}

    def emit(self, event_type: type[ev.Event], **data: Any) -> None:
        self.emitter.emit(event_type(task_id=self.task_id, **data))

    def warn(self, message: str) -> None:
        self.emit(ev.Warning, message=message, source="trainer")

    def local_stop(self) -> bool:
        """This process's wish to stop: the run's stop flag (rank 0 reads it) or a signal this rank received."""
        return self.dist.stop_signalled or self.control.stop_requested(self.task_id)

    def run(self, resume: bool) -> TrainResult:
        from slmb.core import nodes as N
        from slmb.core.compiler import build_model
        from slmb.core.data import DatasetError, Prefetcher, WindowLoader, prepare_tokens
        from slmb.core.distributed import DistributedError
        from slmb.core.memory import MemoryLimitError
        from slmb.core.tokenizers import check_vocab, load_tokenizer
        from slmb.core.validate import choose_strategy, memory_refusal

        cfg, req, dist = self.req.config, self.req, self.dist
        if dist.any(self.local_stop()):  # stopped while queued: nothing to save
            return self._stopped(None)

        device = dist.device if dist.active else resolve_device(cfg.device)
        prepare_device(device)
        W = dist.world_size
        # Before any weight or token exists: an error, not an OOM kill. "auto" picks DDP or FSDP by the estimate.
        strategy = choose_strategy(req, str(device), W) if dist.active else None
        refusal = memory_refusal(req, str(device), world_size=W, strategy=strategy)
        if refusal:
            raise MemoryLimitError(refusal)

        if cfg.init_from is not None and cfg.tokenizer is None:  # the pretrained model's own tokenizer
            from slmb.core.interop import init_tokenizer_files

            self.own_tokenizer = init_tokenizer_files(cfg.init_from, confined=self.confined)
        if self.own_tokenizer:
            tokenizer = load_tokenizer(str(next(iter(self.own_tokenizer.values()))))
        else:
            tokenizer = load_tokenizer(cfg.tokenizer_name, paths=not self.confined)
        torch.manual_seed(cfg.seed)
        model = build_model(req, device=_build_device(req, device, strategy))
        if cfg.init_from is not None:  # pretrained weights, checked shape for shape, before any wrapping
            from slmb.core.interop import init_from_weights, load_init_weights

            init_from_weights(model, load_init_weights(cfg.init_from, confined=self.confined), cfg.init_from)
        if dist.rank:  # dropout's masks differ between ranks (rank 0 keeps the one-process stream)
            torch.manual_seed(cfg.seed + dist.rank)
        check_vocab(model.vocab_size, tokenizer)  # before any data is tokenized or step taken
        dtype, autocast, fallback = autocast_for(cfg.dtype, device, model.num_parameters())
        if fallback:
            self.warn(fallback)
        if dtype == "fp16" and strategy == "fsdp":
            raise DistributedError("fp16 with FSDP is not supported: use bf16 (or distributed: ddp)")
        scaler = torch.amp.GradScaler("cuda") if dtype == "fp16" else None
        if dist.local_rank:  # one tokenization per machine: local rank 0 fills the token cache, then the others
            dist.barrier()
        data = prepare_tokens(req.dataset, req.dataset_config, tokenizer, val_fraction=cfg.val_fraction,
                              max_rows=cfg.max_rows, text_field=cfg.text_field, confined=self.confined)
        if dist.active and not dist.local_rank:
            dist.barrier()
        T, B, accum = cfg.context_length, cfg.batch_size, cfg.grad_accum_steps
        train_loader = WindowLoader(data.train, T, cfg.resolved_stride, B, cfg.seed)
        dist.check_batch(B, train_loader.batch_size)
        val_loader = None
        if len(data.val) > T:
            val_loader = WindowLoader(data.val, T, T, B, cfg.seed, shuffle=False, split="val")
        elif cfg.val_fraction > 0:
            self.warn(f"the validation split has {len(data.val)} tokens, too few for one window of {T + 1}; "
                      "no validation loss is computed")
        steps_per_epoch = len(train_loader) // accum
        if steps_per_epoch == 0:
            raise DatasetError(f"one epoch has {len(train_loader)} batches of {B}, fewer than grad_accum_steps "
                               f"({accum}); use more data or a smaller batch_size / grad_accum_steps")
        total_steps = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total_steps = min(total_steps, cfg.max_steps)
        warmup = cfg.resolved_warmup(total_steps)
        if warmup >= total_steps:
            self.warn(f"warmup_steps ({warmup}) >= total steps ({total_steps}): the learning rate "
                      "never reaches learning_rate")
        min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.learning_rate / 10
        for repeat in (m for m in model.modules() if isinstance(m, N.Repeat)):
            repeat.checkpointing = cfg.activation_checkpointing
        flops_per_token = model.flops_per_token(T)
        # All ranks together: one device's peak times the world size (measured on rank 0 only; the best this
        # machine has shown, cached under $SLMB_HOME, so that a busy start-up cannot make MFU exceed 100%).
        peak = trusted_peak(device, dtype, slmb_home()) * W if dist.is_main else 1.0
        compiling = compile_policy(cfg.compile, cfg.cuda_graphs, device, dist.active,
                                   flops_per_token * B * T * accum, total_steps, peak if dist.is_main else None,
                                   accum)
        compiling = dist.broadcast(compiling)  # rank 0's estimate decides for every rank
        for note in compiling.pop("notes"):
            self.warn(note)
        loss_fn = dist.setup_model(model, strategy, dtype, compiling["enabled"],
                                   None if compiling["mode"] in (None, "default") else compiling["mode"])
        optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, device)

        st = self.state
        if resume:
            ckpt = latest_checkpoint(self.run_) if dist.is_main else None
            ckpt = dist.broadcast(str(ckpt) if ckpt else None)
            if ckpt is None:
                raise StoreError(f"run {self.task_id} has no checkpoint to resume from")
            saved, self.best_weights, notes = dist.load_checkpoint(Path(ckpt), model, optimizer, scaler, cfg.seed)
            self.state = st = TrainState(**saved)
            self.elapsed_before = st.elapsed_s
            for note in notes:
                self.warn(note)
        start_step = st.step
        step = TrainStep(model, optimizer, autocast, device, scaler=scaler, grad_clip=cfg.grad_clip,
                         loss_fn=loss_fn, micro_step=dist.micro_step if dist.active else None,
                         graphs=compiling["cuda_graphs"])
        if compiling["enabled"] and not dist.active:

            def uncompiled(message: str) -> None:
                step.graphs = False
                compiling.update(enabled=False, mode=None, cuda_graphs=False, reason=message)
                self.warn(message)

            step.loss_fn = CompileFallback(loss_fn, model.loss, uncompiled)
        pin = device.type == "cuda"
        eval_sets = {"train": train_loader.eval_batches(cfg.eval_batches),
                     "val": val_loader.eval_batches(cfg.eval_batches) if val_loader else []}
        if pin:  # held for the whole run: page-locked once, copied to the GPU without a host wait at each eval
            eval_sets = {k: [(x.pin_memory(), y.pin_memory()) for x, y in v] for k, v in eval_sets.items()}

        @torch.no_grad()
        def evaluate(batches: list) -> float | None:
            """The mean loss over ``batches`` (one host sync); on several ranks each evaluates its rows and the
            mean is global."""
            if not batches:
                return None
            model.eval()
            total, weight = None, 0.0
            for x, y in batches:
                xr, yr, w = dist.share(x, y)
                loss = step.loss(xr, yr).float() * w
                total = loss if total is None else total + loss
                weight += w
            model.train()
            return dist.mean(total.item(), weight)

        def fetch(index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            """The micro-batches of optimizer step ``index`` (0-based), this rank's rows."""
            epoch, cursor = divmod(index, steps_per_epoch)
            return [train_loader.batch(epoch, cursor * accum + k, dist.rank, W) for k in range(accum)]

        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.total_steps = total_steps
        params = self.parameters = _num_parameters(model)
        # Everything made so far (modules of torch, MLflow, ...: ~700k objects) leaves the cyclic garbage collector's
        # view for the loop: its full passes over them cost ~1.5% of the loop. Undone when the run ends (_train).
        gc.collect()
        gc.freeze()
        self.emit(ev.Started, model_name=self.model_name, total_steps=total_steps, epochs=cfg.epochs,
                  steps_per_epoch=steps_per_epoch, batch_size=B, context_length=T,
                  parameters=params, device=str(device), dtype=dtype, tokenizer=tokenizer.name,
                  dataset=req.dataset, resumed_from_step=start_step, train_tokens=len(data.train),
                  val_tokens=len(data.val), token_cache_hit=data.from_cache, grad_accum_steps=accum,
                  flops_per_token=flops_per_token, peak_flops=peak, world_size=W, strategy=strategy,
                  activation_checkpointing=cfg.activation_checkpointing, warmup_steps=warmup,
                  compile=compiling, warnings=self.warnings)

        model.train()
        t0 = time.monotonic()
        # tokens/s counts training time only (no evaluation, checkpoints or event handling); the ETA uses wall time.
        last_emit, tokens_since_emit, busy_since_emit, evaluated_at = 0.0, 0, 0.0, -1
        stop_reason = None
        # On several ranks the stop is agreed: read before the first step, then carried by each step's all-reduce
        # (read back a fixed number of steps later), so every rank leaves the loop after the same step.
        agreed_stop = dist.any(self.local_stop()) if dist.active else False
        # No host synchronisation per step: the next steps' batches are made (and page-locked) by a thread, and
        # each step's loss reaches the host one step late on CUDA (Readback), except at the steps that need the
        # state to match the weights (the first and last, evaluation, checkpoints, a stop): they wait for it.
        readback = Readback(device, READBACK_LAG)
        batches = Prefetcher(fetch, st.step, total_steps, pin=pin)
        try:
            while st.step < total_steps:
                if agreed_stop if dist.active else self.local_stop():
                    stop_reason = "requested"
                    break
                t_step = time.monotonic()
                lr = get_lr(st.step, total_steps, cfg.learning_rate, min_lr, warmup, cfg.lr_schedule)
                loss, grad_norm = step(batches.next(), lr)
                st.step += 1
                readback.push(st.step, (st.step - 1) // steps_per_epoch, lr,
                              dist.step_numbers(loss, grad_norm, dist.active and self.local_stop()))
                evaluating = st.step % cfg.eval_every == 0 or st.step == total_steps
                checkpointing = bool(cfg.checkpoint_every) and st.step % cfg.checkpoint_every == 0
                done = readback.ready(drain=evaluating or checkpointing or st.step == start_step + 1)
                tokens_since_emit += B * T * accum
                busy_since_emit += time.monotonic() - t_step  # with the wait for the device: its time, too
                for numbers in done:
                    agreed_stop = self._account(numbers, steps_per_epoch) or agreed_stop
                if evaluating:
                    evaluated_at = st.step
                    stop_reason = self._evaluate(evaluate, eval_sets, dist, model)
                for numbers in done:
                    now = time.monotonic()
                    if not (numbers.step in (start_step + 1, total_steps) or stop_reason
                            or now - last_emit >= self.step_every_s):
                        continue
                    tps = tokens_since_emit / max(busy_since_emit, 1e-9)
                    model_flops = tps * flops_per_token
                    mfu = utilisation(model_flops, peak)
                    eta = (now - t0) / (st.step - start_step) * (total_steps - st.step)
                    self.emit(ev.Step, step=numbers.step, total_steps=total_steps, epoch=numbers.epoch,
                              loss=numbers.loss, lr=numbers.lr, grad_norm=numbers.grad_norm, tokens_per_sec=tps,
                              mfu=mfu, model_flops=model_flops)
                    self.emit(ev.Progress, step=numbers.step, total_steps=total_steps,
                              progress=100.0 * numbers.step / total_steps, epoch=numbers.epoch, epochs=cfg.epochs,
                              loss=numbers.loss, loss_ema=st.loss_ema, val_loss=st.val_loss, lr=numbers.lr,
                              tokens_per_sec=tps, mfu=mfu, model_flops=model_flops, elapsed_s=self.elapsed(),
                              eta_s=eta)
                    last_emit = now
                    if numbers is done[-1]:
                        tokens_since_emit, busy_since_emit = 0, 0.0
                if stop_reason == "early_stopping":
                    break
                if checkpointing and st.step < total_steps:
                    self._checkpoint()
            for numbers in readback.ready(drain=True):  # a stop leaves steps in flight: the state must match
                self._account(numbers, steps_per_epoch)
        finally:
            batches.close()

        if stop_reason == "requested":
            return self._stopped(model)
        if evaluated_at != st.step:
            st.eval_train_loss, st.val_loss = evaluate(eval_sets["train"]), evaluate(eval_sets["val"])
            self.emit(ev.Eval, step=st.step, train_loss=st.eval_train_loss, val_loss=st.val_loss,
                      best_val_loss=st.best_val_loss)
        if stop_reason == "early_stopping":
            message = f"early stopping: no better validation loss in {cfg.early_stopping_patience} evaluations"
            if self.best_weights is not None and st.best_step != st.step:
                dist.restore(model, self.best_weights)
                st.val_loss, st.eval_train_loss = st.best_val_loss, st.best_train_loss
                message += (f"; the model keeps the weights of step {st.best_step} (val loss "
                            f"{st.best_val_loss:.4f}), the best evaluation")
            self.warn(message)
        return self._finished(model, tokenizer, dtype, device)

    def _account(self, numbers: StepNumbers, steps_per_epoch: int) -> bool:
        """Fold one step's numbers, read back from the device, into the state (in step order): the loss check,
        EMA, epoch mean and ``epoch`` event, MLflow's per-step point. Returns the step's agreed stop flag."""
        st, loss = self.state, numbers.loss
        if not math.isfinite(loss):
            raise TrainingError(f"the loss became {loss} at step {numbers.step}; lower the learning_rate or use fp32")
        st.last_loss = loss
        st.loss_ema = loss if st.loss_ema is None else EMA * st.loss_ema + (1 - EMA) * loss
        st.epoch_loss_sum += loss
        st.epoch_loss_steps += 1
        if self.mlflow_sink is not None:  # every step's point on MLflow's curves (events are throttled)
            self.mlflow_sink.record_step(numbers.step, loss, numbers.lr)
        if numbers.step % steps_per_epoch == 0:
            self.emit(ev.Epoch, epoch=numbers.epoch, step=numbers.step,
                      epoch_loss=st.epoch_loss_sum / st.epoch_loss_steps)
            st.epoch_loss_sum, st.epoch_loss_steps = 0.0, 0
        return numbers.stop

    def _evaluate(self, evaluate: Callable[[list], float | None], eval_sets: Mapping[str, list], dist: Dist,
                  model: nn.Module) -> str | None:
        """The periodic evaluation at the current step: losses, best-so-far (and its weights, with early
        stopping), the ``eval`` event. Returns "early_stopping" when patience has run out."""
        st, cfg = self.state, self.req.config
        st.eval_train_loss, st.val_loss = evaluate(eval_sets["train"]), evaluate(eval_sets["val"])
        if st.val_loss is not None:
            if st.best_val_loss is None or st.val_loss < st.best_val_loss:
                st.best_val_loss, st.evals_without_improvement = st.val_loss, 0
                st.best_step, st.best_train_loss = st.step, st.eval_train_loss
                if cfg.early_stopping_patience is not None:  # what it would roll back to
                    self.best_weights = dist.snapshot(model, self.best_weights)
            else:
                st.evals_without_improvement += 1
        self.emit(ev.Eval, step=st.step, train_loss=st.eval_train_loss, val_loss=st.val_loss,
                  best_val_loss=st.best_val_loss)
        patience = cfg.early_stopping_patience
        if patience is not None and st.evals_without_improvement >= patience:
            return "early_stopping"
        return None

    def elapsed(self) -> float:
        """Training seconds over every session of this run (a resumed run continues the clock)."""
        return self.elapsed_before + time.monotonic() - self.t_session

    def _checkpoint(self) -> Path:
        self.state.elapsed_s = self.elapsed()
        st = self.state
        best = self.best_weights if st.best_step is not None and st.best_step != st.step else None
        path = self.dist.save_checkpoint(self.run_, self.model, self.optimizer, self.scaler, st, best)
        self.emit(ev.Checkpoint, step=self.state.step, path=str(path))
        return path

    def _stopped(self, model: nn.Module | None) -> TrainResult:
        st = self.state
        self.emit(ev.StopRequested)
        path = str(self._checkpoint()) if model is not None else None
        self.control.write_status(self.task_id, "stopped", step=st.step, checkpoint=path)
        self.emit(ev.Status, state="stopped")
        self.emit(ev.Stopped, step=st.step, checkpoint=path, reason="requested")
        return self._result("stopped", path)

    def _finished(self, model: nn.Module, tokenizer: Any, dtype: str, device: torch.device) -> TrainResult:
        st, cfg = self.state, self.req.config
        elapsed = self.elapsed()  # before waiting for MLflow, which may still be starting up
        weights = self.dist.full_state_dict(model)  # every rank takes part; rank 0 alone gets them
        if weights is None:
            return self._result("finished", None)
        mlflow = self.mlflow_sink.describe() if self.mlflow_sink is not None else {}
        metadata = {
            "task_id": self.task_id, "tokenizer": tokenizer.name, "tokenizer_vocab_size": tokenizer.vocab_size,
            "dataset": self.req.dataset, "dataset_config": self.req.dataset_config,
            "parameters": self.parameters, "vocab_size": model.vocab_size,
            "context_length": cfg.context_length, "dtype": dtype, "device": str(device), "steps": st.step,
            "best_step": st.best_step,
            "epochs": cfg.epochs, "elapsed_s": round(elapsed, 3),
            "metrics": {"train_loss": st.eval_train_loss, "val_loss": st.val_loss,
                        "best_val_loss": st.best_val_loss, "last_step_loss": st.last_loss, "loss_ema": st.loss_ema},
            **mlflow,
        }
        if self.own_tokenizer:
            metadata["tokenizer"] = metadata["tokenizer_file"] = next(iter(self.own_tokenizer))
        path = save_completed(self.model_name, self.body, weights, metadata, extra_files=self.own_tokenizer)
        self.control.write_status(self.task_id, "finished", step=st.step, path=str(path))
        self.emit(ev.Status, state="finished")
        self.emit(ev.Finished, model_name=self.model_name, step=st.step, train_loss=st.eval_train_loss,
                  val_loss=st.val_loss, path=str(path), elapsed_s=elapsed)
        return self._result("finished", str(path), mlflow)

    def _result(self, state: str, path: str | None, mlflow: dict[str, Any] | None = None) -> TrainResult:
        st = self.state
        return TrainResult(self.task_id, self.model_name, state, st.step, self.total_steps,
                           st.eval_train_loss, st.val_loss, st.best_val_loss, path, self.elapsed(), mlflow or {})
