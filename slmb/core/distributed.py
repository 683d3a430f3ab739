"""Training on several processes (DESIGN.md §8): torch.distributed's DDP and FSDP2 inside the one training loop.

torchrun (``torch.distributed.run``) starts one process per device and gives each its place in the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...). ``trainer.train`` sees that (:func:`launched`), joins the
process group (NCCL on CUDA, gloo on the CPU) and runs the same loop as one process, with a :class:`Dist` doing
the parts that differ:

- the model: ``ddp`` wraps it in DistributedDataParallel (a replica per device, gradients all-reduced);
  ``fsdp`` applies FSDP2's ``fully_shard`` to every transformer-block copy and then to the root (embeddings,
  final norm, head), with bf16 compute and fp32 master weights and gradient reductions when the run is bf16;
- the data: ``batch_size`` is the global batch. Rank r reads rows [r·B/W, (r+1)·B/W) of the batch one process
  would read (``WindowLoader.batch``), so for the same seed the ranks see disjoint windows whose union is the
  one-process batch, and the loss curve is the one-process curve (to floating-point reduction order). Gradients
  are synchronised only on the last micro-step of an accumulated step;
- the numbers: the step loss and the evaluation losses are averaged over ranks; every rank then takes the same
  decisions (non-finite loss, early stopping);
- stopping: rank 0 reads the stop flag; the step's loss all-reduce carries it (and any rank's signal flag) to
  every rank, so all ranks stop after the same step and write one checkpoint together;
- checkpoints: ``torch.distributed.checkpoint`` (DCP) writes every rank's shard of model, optimizer and best
  weights into ``step-N/dcp/``; rank 0 adds ``trainer.json`` and renames the folder into place. DCP reshards on
  load, so a run resumes on another world size (and a one-process run can continue a distributed checkpoint, or
  the reverse);
- publishing: the full (consolidated) state dict is gathered to rank 0, which alone writes the completed model
  (the same safetensors as a one-process run), emits events and logs to MLflow.

A rank that dies ends the run: gloo notices the closed connection at the next collective, NCCL after its
watchdog timeout (``SLMB_DIST_TIMEOUT_S``, default 600 s), and torchrun stops the other ranks; the launcher
(``launch``) then closes the event log of a run whose rank 0 could not.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

TIMEOUT_ENV, DEFAULT_TIMEOUT_S = "SLMB_DIST_TIMEOUT_S", 600.0
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_ENV = "SLMB_LAUNCHER_PID"  # set by `launch`: the process that owns the run's signals and its log's end


class DistributedError(RuntimeError):
    """A distributed run cannot start as asked (world size, batch, strategy)."""


def launched() -> bool:
    """True in a process started by torchrun (or anything else that sets torch.distributed's variables)."""
    return all(k in os.environ for k in TORCHRUN_ENV)


class Dist:
    """The parts of a run that depend on its processes. ``Dist()`` is one process: every method is a no-op or the
    one-process code path, so the trainer has one loop. ``Dist.from_env`` joins torchrun's process group."""

    def __init__(self) -> None:
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.active = False  # in a process group (torchrun), even of world size 1
        self.strategy: str | None = None  # "ddp" | "fsdp" once the model is set up
        self.device = torch.device("cpu")
        self.stop_signalled = False  # a SIGINT/SIGTERM this process received (see `catch_signals`)
        self._wrapped: nn.Module | None = None
        self._flags: torch.Tensor | None = None  # (0., 1.) on the device: the stop flag without a copy

    # ------------------------------------------------------------------------------------------------ setup

    @classmethod
    def from_env(cls, device: torch.device) -> Dist:
        """Join torchrun's process group. ``device`` is the type the request asked for: on CUDA each process
        takes ``cuda:LOCAL_RANK`` and NCCL; on the CPU, gloo."""
        import torch.distributed as dist

        self = cls()
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise DistributedError(f"local rank {self.local_rank} has no GPU: this machine has "
                                       f"{torch.cuda.device_count()}; use --nproc-per-node <= that")
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        elif device.type == "cpu":
            self.device = device
        else:
            raise DistributedError(f"distributed training runs on CUDA (NCCL) or the CPU (gloo), not {device.type}")
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S))
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timeout,
                                    device_id=self.device if self.device.type == "cuda" else None)
        self.active = True
        return self

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self, wait: bool = True) -> None:
        """Leave the process group. After a run that ended well (``wait``) every rank first waits for the others:
        gloo tearing a group down while a peer still uses it can abort that peer ("terminate called without an
        active exception") after its run has ended well. After a failure, no wait: the peers may be inside
        another collective, which a barrier would not match, and they learn of the failure when this process's
        connections close."""
        import torch.distributed as dist

        if self.active and dist.is_initialized():
            if wait:
                with contextlib.suppress(Exception):
                    dist.barrier()
            dist.destroy_process_group()
        self.active = False

    def check_batch(self, batch_size: int, loader_batch: int) -> None:
        """``batch_size`` (global) must split evenly over the ranks, and the data must hold a whole batch."""
        W = self.world_size
        if W == 1:
            return
        if batch_size % W:
            raise DistributedError(f"batch_size {batch_size} is the global batch and must be a multiple of the "
                                   f"{W} processes (each takes batch_size / {W} rows); use e.g. "
                                   f"{max(W, batch_size // W * W)} or {(batch_size // W + 1) * W}")
        if loader_batch < batch_size:
            raise DistributedError(f"the training split has only {loader_batch} windows, fewer than batch_size "
                                   f"{batch_size}: use more data or a smaller batch_size")

    def setup_model(self, model: nn.Module, strategy: str | None, dtype: str, compile_: bool,
                    mode: str | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Wrap ``model`` for ``strategy`` and return the loss function the step calls: ``(x, y) -> loss``.

        ``model`` stays the module whose state dict names the weights (FSDP shards it in place; DDP wraps it).
        ``mode``: torch.compile's mode ("reduce-overhead" replays CUDA graphs; one process only)."""
        from slmb.core import nodes as N

        if not self.active:  # one process: the model's own loss (compiled when asked)
            return torch.compile(model.loss, mode=mode) if compile_ else model.loss
        self.strategy = strategy
        if strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bf16" \
                else MixedPrecisionPolicy()
            for repeat in (m for m in model.modules() if isinstance(m, N.Repeat)):
                repeat.call_hooks = True  # FSDP gathers a block's shards in the block's pre-forward hook
                for block in repeat.blocks:
                    if compile_:
                        block.compile()
                    fully_shard(block, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
            self._wrapped = model
            return lambda x, y: model(x, targets=y)
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # The buffers (rotary tables) are the same on every rank: no per-forward broadcast. torch 2.13 renamed it.
        quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"
        ddp = DDP(model, device_ids=ids, gradient_as_bucket_view=True, **{quiet: False})
        self._wrapped = ddp
        fn = torch.compile(ddp) if compile_ else ddp
        return lambda x, y: fn(x, targets=y)

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's forward and backward: gradients are synchronised on the last only."""
        if self._wrapped is None or (last and self.strategy == "ddp"):
            return contextlib.nullcontext()
        if self.strategy == "ddp":
            return self._wrapped.no_sync()
        return _fsdp_sync(self._wrapped, last)

    # ------------------------------------------------------------------------------------------------ collectives

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any."""
        if not self.active:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def step_numbers(self, loss: torch.Tensor, grad_norm: torch.Tensor, stop: bool) -> torch.Tensor:
        """The step's numbers for the host, still on the device: (loss averaged over ranks, gradient norm, 1 if
        any rank wants to stop). One all-reduce on several ranks; no host synchronisation (the trainer reads the
        result later, ``trainer.Readback``)."""
        if self._flags is None or self._flags.device != loss.device:  # device constants: no copy per step
            self._flags = torch.tensor([0.0, 1.0], device=loss.device)
        W = self.world_size
        t = torch.stack([loss.detach().float() / W, grad_norm.detach().float() / W, self._flags[int(stop)]])  # (3,)
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(t)  # the gradient norm is the same on every rank: its mean is itself
        return t

    def share(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's rows of an evaluation batch and their share of it. Every rank runs a forward pass (FSDP's
        collectives need all of them); one left without rows repeats row 0 with weight 0."""
        if self.world_size == 1:
            return x, y, 1.0
        rows = torch.arange(x.shape[0]).tensor_split(self.world_size)[self.rank]
        if len(rows) == 0:
            return x[:1], y[:1], 0.0
        return x[rows], y[rows], len(rows) / x.shape[0]

    def mean(self, weighted_sum: float, weight: float) -> float:
        """sum over ranks of ``weighted_sum`` / sum over ranks of ``weight``."""
        if self.active:
            import torch.distributed as dist

            t = torch.tensor([weighted_sum, weight], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            weighted_sum, weight = t.tolist()
        return weighted_sum / weight

    # ------------------------------------------------------------------------------------------------ weights

    def snapshot(self, model: nn.Module, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """A copy of the weights to roll back to (early stopping): on the CPU for one process, this rank's shards
        (or replica) where they live for a distributed run."""
        if not self.active:
            from slmb.core.trainer import snapshot_weights

            return snapshot_weights(model, into)
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model)
        with torch.no_grad():
            if into is not None:
                for key, value in state.items():
                    into[key].copy_(value)
                return into
            return {k: v.detach().clone() for k, v in state.items()}

    def restore(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        if not self.active:
            model.load_state_dict(weights)
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, dict(weights))

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0, on the CPU, named as in a one-process run (tied names
        included); None on the other ranks. Collective: every rank calls it."""
        if not self.active:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        # A tied weight may come back under one of its names only, or (FSDP) gathered once per name: give every
        # name of a tied weight the one tensor, so the file stores it once, with its aliases, as one process does.
        for name, source in _tied_names(model).items():
            if name != source and source in full:
                full[name] = full[source]
        return full

    # ------------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, run: Any, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                        state: Any, best: Mapping[str, torch.Tensor] | None = None) -> Path:
        """``checkpoints/step-N/``: the one-process format for one process, DCP shards otherwise (collective).

        Built under ``.tmp-step-N`` and renamed into place by rank 0 once every rank has written its part, so a
        kill mid-save never leaves a folder that looks whole; older checkpoints go only after that."""
        from slmb.core.trainer import save_checkpoint

        if not self.active:
            return save_checkpoint(run, model, optimizer, scaler, state, best)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from slmb.core.store import save_weights, write_json

        final = run.checkpoints / f"step-{state.step:08d}"
        tmp = run.checkpoints / f".tmp-step-{state.step:08d}"
        if self.is_main:
            tmp.mkdir(parents=True, exist_ok=True)
        self.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        payload: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        if best is not None:
            payload["best"] = dict(best)
        dcp.save(payload, checkpoint_id=str(tmp / "dcp"))
        rng = {"rng.cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        save_weights(tmp / f"rng-rank-{self.rank}.safetensors", rng)
        self.barrier()
        if self.is_main:
            write_json(tmp / "trainer.json", {
                "format": "dcp", "state": asdict(state), "world_size": self.world_size, "strategy": self.strategy,
                "best": best is not None, "scaler": scaler.state_dict() if scaler is not None else None})
            import shutil

            os.rename(tmp, final)
            for old in [*run.checkpoints.glob("step-*"), *run.checkpoints.glob(".tmp-step-*")]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    def load_checkpoint(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                        seed: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, list[str]]:
        """Restore model, optimizer, scaler and RNG from either format on any world size.

        Returns (the loop state as saved, the best weights or None, warnings)."""
        from slmb.core.store import load_weights, read_json
        from slmb.core.trainer import load_checkpoint

        meta = read_json(path / "trainer.json")
        warnings: list[str] = []
        if meta.get("format") != "dcp":
            if not self.active:
                state = load_checkpoint(path, model, optimizer, scaler, self.device)
                best = load_weights(path / "best.safetensors") if (path / "best.safetensors").is_file() else None
                return asdict(state), best, warnings
            best = self._load_single(path, model, optimizer)
            warnings.append(f"resumed a one-process checkpoint on {self.world_size} processes: the data order and "
                            "losses continue; dropout's random stream does not")
        else:
            best = self._load_dcp(path, model, optimizer, meta)
            saved_world = meta.get("world_size")
            rng_file = path / f"rng-rank-{self.rank}.safetensors"
            if saved_world == self.world_size and rng_file.is_file():
                rng = load_weights(rng_file)
                torch.set_rng_state(rng["rng.cpu"])
                if "rng.cuda" in rng and self.device.type == "cuda":
                    torch.cuda.set_rng_state(rng["rng.cuda"], self.device)
            elif saved_world != self.world_size:
                warnings.append(f"resumed a checkpoint of {saved_world} process(es) on {self.world_size}: weights, "
                                "optimizer, data order and schedule continue; dropout's random stream does not")
                torch.manual_seed(seed + 7919 * self.rank + meta["state"]["step"])
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        return meta["state"], best, warnings

    def _load_dcp(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                  meta: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        payload: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        if meta.get("best"):
            payload["best"] = {k: v.detach().clone() for k, v in model_sd.items()}
        dcp.load(payload, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"])
        return payload.get("best")

    def _load_single(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
                     ) -> dict[str, torch.Tensor] | None:
        """A one-process checkpoint (whole tensors; optimizer state keyed by parameter index) into the wrapped
        model on every rank: each rank reads the files and keeps its share."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from slmb.core.store import load_weights, read_json

        meta = read_json(path / "trainer.json")
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, load_weights(path / "model.safetensors"), options=full)
        tensors = load_weights(path / "trainer.safetensors")
        names = optimizer_param_names(model)  # index -> name, in make_optimizer's order
        state: dict[str, dict[str, Any]] = {names[int(i)]: dict(s) for i, s in meta["optimizer_scalars"].items()}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(names[int(index)], {})[name] = value
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in meta["param_groups"]]
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=full)
        best = None
        if (path / "best.safetensors").is_file():  # whole tensors -> this rank's kind of tensors
            best = self.snapshot(model)
            live = self.snapshot(model)
            set_model_state_dict(model, load_weights(path / "best.safetensors"), options=full)
            best = self.snapshot(model, best)
            self.restore(model, live)
        return best


def optimizer_param_names(model: nn.Module) -> list[str]:
    """The parameter names in ``trainer.make_optimizer``'s order (matrices and embeddings, then the rest), which
    is the index a one-process checkpoint keys optimizer state by."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]


def _tied_names(model: nn.Module) -> dict[str, str]:
    """{every parameter name: the name the state-dict API keeps for its tensor}."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(param), name)
    return out


@contextlib.contextmanager
def _fsdp_sync(model: Any, sync: bool) -> Iterator[None]:
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ---------------------------------------------------------------------------------------------------- signals


@contextlib.contextmanager
def catch_signals(d: Dist) -> Iterator[None]:
    """In a rank of a run started by torchrun directly: SIGINT (Ctrl-C reaches every rank) and SIGTERM (torchrun
    passes a Ctrl-C on as SIGTERM) ask for a stop, which the next step's all-reduce agrees on, so every rank
    checkpoints at the same step. A second SIGINT quits at once. Ranks started by ``launch`` get no signals from
    the terminal: the launcher turns Ctrl-C into a stop flag."""
    def on_signal(signum: int, frame: Any) -> None:
        if d.stop_signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        d.stop_signalled = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------------- launcher


def torchrun_command(args: Sequence[str], *, nproc_per_node: int, nnodes: str | int = 1, node_rank: int = 0,
                     master_addr: str | None = None, master_port: int | None = None,
                     rdzv_endpoint: str | None = None, module: str = "slmb") -> list[str]:
    """The torchrun command that runs ``python -m MODULE ARGS`` on ``nproc_per_node`` processes here.

    One machine: torchrun's standalone rendezvous on a free local port, unless an address is given. Several:
    ``rdzv_endpoint`` (host:port of the c10d rendezvous, the same on every machine; ``run_id`` names the job) or
    ``master_addr``/``master_port`` with ``node_rank``. No restarts: a rank that fails ends the run. The
    rendezvous id is the same on every machine ("slmb"): one job per endpoint."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}",
           f"--nnodes={nnodes}", "--max-restarts=0", "--monitor-interval=0.5"]
    if rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", "--rdzv-id=slmb"]
    elif str(nnodes) == "1" and master_addr is None and master_port is None:
        cmd += ["--standalone"]
    else:
        cmd += [f"--node-rank={node_rank}", f"--master-addr={master_addr or '127.0.0.1'}",
                f"--master-port={master_port or 29500}"]
    return [*cmd, "-m", module, *args]


def rank_env(nproc_per_node: int, device: str) -> dict[str, str]:
    """Environment for the ranks: on the CPU, this machine's cores split between them (torchrun would give each
    one thread and print a banner about it), unless OMP_NUM_THREADS is set."""
    from slmb.core.runtime import cpu_cores

    if "OMP_NUM_THREADS" in os.environ or (device.startswith(("cuda", "auto")) and torch.cuda.is_available()):
        return {}
    return {"OMP_NUM_THREADS": str(max(1, cpu_cores() // max(1, nproc_per_node)))}


def start(cmd: Sequence[str], env: Mapping[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """Start torchrun in its own session (a Ctrl-C in the terminal reaches the launcher only; the launcher
    decides what it means) and tied to this process: if the launcher dies, torchrun gets SIGKILL, and each rank
    does the same with torchrun (``die_with_parent`` in the rank), so no rank outlives the run's owner."""
    full_env = {**os.environ, **(env or {}), LAUNCHER_ENV: str(os.getpid())}
    return subprocess.Popen(list(cmd), env=full_env, start_new_session=True, preexec_fn=die_with_parent, **popen)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits (PR_SET_PDEATHSIG); no-op elsewhere.

    Ranks call it (torchrun gone: they go too), torchrun gets it from ``start``, the service's work-horse calls it
    (RQ puts the horse in its own process group, so a killed worker would otherwise leave an orphan training on),
    and ``slmb serve`` starts its Redis and workers with it, so nothing outlives a killed ``serve``."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End torchrun and every rank: SIGTERM to the group (torchrun passes it on), SIGKILL after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is not None:
            return


def close_log(task_id: str, how: str, *, interrupted: bool = False, track: bool = True) -> str | None:
    """After the ranks of a run are gone: end its event log if rank 0 could not (it was killed, or lost its
    peers mid-collective), with ``stopped`` (``interrupted``: a second Ctrl-C) or ``error`` saying ``how``; close
    its MLflow run (``track``: the run logs to MLflow). Returns the terminal event's name the log now ends with
    (None if there is no log)."""
    from slmb.core import events as ev
    from slmb.core.control import FileControl
    from slmb.core.store import latest_checkpoint, run_dir

    run = run_dir(task_id)
    if not run.events.exists():
        return None
    history = ev.read_events(run.events)
    ended = next((e for e in reversed(history) if e.terminal), None)
    if ended is not None:
        return ended.name
    step = next((e.step for e in reversed(history) if isinstance(e, (ev.Step, ev.Progress, ev.Checkpoint))), None)
    control, sink = FileControl(), ev.JsonlSink(run.events)
    try:
        if interrupted:
            ckpt = latest_checkpoint(run)
            checkpoint = str(ckpt) if ckpt else None
            sink.emit(ev.Status(task_id=task_id, state="stopped", message="interrupted"))
            sink.emit(ev.Stopped(task_id=task_id, step=step, checkpoint=checkpoint, reason="interrupted"))
            control.write_status(task_id, "stopped", step=step, checkpoint=checkpoint)
            state = "stopped"
        else:
            message = f"a training process of this run died: {how}"
            sink.emit(ev.Status(task_id=task_id, state="error", message=message))
            sink.emit(ev.Error(task_id=task_id, message=message, type="ProcessDied"))
            control.write_status(task_id, "error", message=message, error_type="ProcessDied")
            state = "error"
    finally:
        sink.close()
    if not track:
        return state
    from slmb.core import tracking

    with contextlib.suppress(Exception):  # MLflow away: the log, which users read first, is already closed
        tracking.end_run(task_id, state)
    return state


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"torchrun was killed by {signal.Signals(-returncode).name}"
    return f"torchrun exited with status {returncode}"
