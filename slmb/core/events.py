"""Typed training events and the sinks they go to (DESIGN.md §4).

An event is a small pydantic model whose class names it; on the wire (JSONL file, SSE, Redis stream) it is
``{"event": name, "data": {...}}`` and every payload carries ``task_id`` and ``ts``. The trainer emits
events to an :class:`Emitter`, which fans them out to sinks (JSONL file, console, MLflow, Redis) and makes
sure one failing sink never stops training: its exception becomes a ``warning`` to the others and the
sink is switched off.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

TERMINAL = frozenset({"finished", "stopped", "error"})


class Event(BaseModel):
    """Base of every event; subclasses set ``name`` and add their payload fields."""

    # Extra keys are kept so a newer writer's events still parse (supersets are allowed by the design).
    model_config = ConfigDict(extra="allow")

    name: ClassVar[str]
    task_id: str
    ts: float = Field(default_factory=time.time)

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL

    def to_wire(self) -> dict[str, Any]:
        return {"event": self.name, "data": self.model_dump(mode="json")}

    def to_json(self) -> str:
        return json.dumps(self.to_wire(), separators=(",", ":"), allow_nan=False)


class Connected(Event):
    name = "connected"


class Queued(Event):
    name = "queued"
    position: int | None = None


class Started(Event):
    name = "started"
    model_name: str
    total_steps: int
    epochs: int
    steps_per_epoch: int
    batch_size: int
    context_length: int
    parameters: int
    device: str
    dtype: str
    tokenizer: str
    dataset: str
    resumed_from_step: int = 0
    grad_accum_steps: int = 1
    train_tokens: int | None = None
    val_tokens: int | None = None
    token_cache_hit: bool | None = None  # the dataset's tokens came from the cache, not a fresh tokenization
    flops_per_token: int | None = None  # training FLOPs per token (SLM.flops_per_token)
    peak_flops: float | None = None  # matmul FLOP/s in the compute dtype, best seen here (runtime.trusted_peak)
    world_size: int = 1  # processes training together (torchrun); batch_size is the global batch over all of them
    strategy: str | None = None  # "ddp" or "fsdp" on several processes, None for one
    activation_checkpointing: bool = False
    warmup_steps: int | None = None  # the learning-rate warmup, in optimizer steps (None: a log older than the field)
    # Whether the loss was torch.compiled, and why (trainer.compile_policy): enabled, mode ("default",
    # "reduce-overhead" = CUDA graphs, None), cuda_graphs, reason, estimated_eager_s (config.compile "auto").
    compile: dict[str, Any] | None = None
    # The request's validation warnings (validate.Issue dicts: path, message, hint, severity, check, ...), e.g.
    # config keys that describe the architecture and disagree with the nodes, which define it.
    warnings: list[dict[str, Any]] = Field(default_factory=list)


class Step(Event):
    name = "step"
    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float | None = None
    tokens_per_sec: float | None = None
    mfu: float | None = None  # model FLOP utilisation: model_flops / peak_flops (0-1); None where it would pass 1
    model_flops: float | None = None  # training FLOP/s the model does (tokens/s x flops_per_token)


class Progress(Event):
    name = "progress"
    step: int
    total_steps: int
    progress: float  # percent, 0-100
    epoch: int
    epochs: int
    loss: float | None = None
    loss_ema: float | None = None
    val_loss: float | None = None
    lr: float | None = None
    tokens_per_sec: float | None = None
    mfu: float | None = None  # model FLOP/s over the trusted peak (runtime.trusted_peak); None where it would pass 1
    model_flops: float | None = None  # training FLOP/s the model does (tokens/s x flops_per_token)
    elapsed_s: float
    eta_s: float | None = None


class Epoch(Event):
    """The end of an epoch, with the mean training loss over it (``train/epoch_loss`` in MLflow)."""

    name = "epoch"
    epoch: int
    step: int
    epoch_loss: float


class Eval(Event):
    name = "eval"
    step: int
    train_loss: float
    val_loss: float | None = None
    best_val_loss: float | None = None


class Checkpoint(Event):
    name = "checkpoint"
    step: int
    path: str


class Status(Event):
    name = "status"
    state: Literal["queued", "running", "stopped", "finished", "error"]
    message: str | None = None


class StopRequested(Event):
    name = "stop_requested"
    force: bool = False


class StopForced(Event):
    name = "stop_forced"
    pid: int | None = None
    message: str | None = None


class Stopped(Event):
    name = "stopped"
    step: int | None = None
    checkpoint: str | None = None
    reason: str = "requested"


class Finished(Event):
    name = "finished"
    model_name: str
    step: int
    train_loss: float | None = None
    val_loss: float | None = None
    path: str
    elapsed_s: float


class Error(Event):
    name = "error"
    message: str
    type: str = "Error"


class Warning(Event):  # shadows the builtin inside this module only; the event is "warning" on the wire
    name = "warning"
    message: str
    source: str | None = None


EVENT_TYPES: dict[str, type[Event]] = {cls.name: cls for cls in (
    Connected, Queued, Started, Step, Progress, Epoch, Eval, Checkpoint, Status, StopRequested, StopForced,
    Stopped, Finished, Error, Warning)}


def parse_event(wire: dict[str, Any]) -> Event:
    """``{"event": name, "data": {...}}`` -> the typed event. Unknown names raise ``ValueError``."""
    name = wire.get("event")
    if name not in EVENT_TYPES:
        raise ValueError(f"unknown event {name!r}; known: {', '.join(EVENT_TYPES)}")
    return EVENT_TYPES[name].model_validate(wire.get("data") or {})


# ---------------------------------------------------------------------------------------------------- sinks


class Sink(Protocol):
    def emit(self, event: Event) -> None: ...

    def close(self) -> None: ...


class Emitter:
    """Fans events out to sinks. A sink that raises is reported once as a ``warning`` to the other sinks
    and then switched off, so a broken tracking server or terminal never stops a training run.

    Put sinks that may fail (network) first: when one fails on an event, the sinks after it receive the
    warning before that event, so the warning still precedes a terminal event in the event log.
    """

    def __init__(self, sinks: Iterable[Sink] = ()):
        self.sinks: list[Sink] = list(sinks)
        self._disabled: set[int] = set()
        self._task_id = ""

    def add(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def emit(self, event: Event) -> None:
        self._task_id = event.task_id
        for i, sink in enumerate(self.sinks):
            if i not in self._disabled:
                try:
                    sink.emit(event)
                except Exception as exc:  # any sink failure must stay out of the training loop
                    self._fail(i, exc)

    def close(self) -> None:
        for i, sink in enumerate(self.sinks):
            if i not in self._disabled:
                try:
                    sink.close()
                except Exception as exc:
                    self._fail(i, exc)
                self._disabled.add(i)

    def _fail(self, index: int, exc: Exception) -> None:
        self._disabled.add(index)
        name = type(self.sinks[index]).__name__
        warning = Warning(task_id=self._task_id, source=name,
                          message=f"{name} disabled after an error: {type(exc).__name__}: {exc}")
        self.emit(warning)

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class CallbackSink:
    """Calls ``fn(event)`` for every event (tests, the RQ worker's Redis publisher, notebooks)."""

    def __init__(self, fn: Callable[[Event], None], on_close: Callable[[], None] | None = None):
        self.fn, self.on_close = fn, on_close

    def emit(self, event: Event) -> None:
        self.fn(event)

    def close(self) -> None:
        if self.on_close is not None:
            self.on_close()


class JsonlSink:
    """Appends one JSON object per line to ``path``.

    Each line goes out in a single ``write`` on an ``O_APPEND`` descriptor: another process can follow
    the file while it grows, and a second writer (``slmb stop --force`` appending ``stopped`` for a killed
    trainer) never interleaves inside a line.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, event: Event) -> None:
        if self._fd is None:
            raise ValueError(f"JsonlSink for {self.path} is closed")
        os.write(self._fd, (event.to_json() + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------------------------------- readers


def read_events(path: str | os.PathLike[str]) -> list[Event]:
    """Every complete event in a JSONL event log (a half-written last line is left out)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    return [parse_event(json.loads(line)) for line in lines[:-1] if line.strip()]


def follow_events(path: str | os.PathLike[str], *, poll_s: float = 0.2, timeout_s: float | None = None,
                  until_terminal: bool = True) -> Iterator[Event]:
    """Yield events from a JSONL log as they are appended, like ``tail -f``.

    Stops when ``until_terminal`` and the log so far ends with a terminal event (``finished``, ``stopped``,
    ``error``), or when ``timeout_s`` passes. A terminal event followed by more events is not the end: a
    stopped run that was resumed appends to the same log. The file may not exist yet (the run is starting).
    """
    path = Path(path)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    offset, partial, last = 0, b"", None
    while True:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        *lines, partial = (partial + chunk).split(b"\n")
        for line in lines:
            if line.strip():
                last = parse_event(json.loads(line))
                yield last
        if until_terminal and last is not None and last.terminal and not partial:
            return
        if deadline is not None and time.monotonic() > deadline:
            return
        if not chunk:
            time.sleep(poll_s)
