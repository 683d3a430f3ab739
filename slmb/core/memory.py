"""Admission control (DESIGN.md §2.3): the peak memory of a training run, and what a worker may use.

``estimate`` reads the compiler's plan and the parameter counts of the meta-device build (validation has both)
and adds up what the trainer holds at its peak, the second optimizer step (the AdamW states exist by then):

    weights + gradients + AdamW (exp_avg, exp_avg_sq)           4 bytes per parameter each (fp32 master copies)
    + best weights                                           a 4-byte copy when early stopping may roll back
    + runtime                                                Python, torch, MLflow: a worker after its imports
    + max(training pass, evaluation pass)
      training pass = activations autograd saves for backward, for one micro-batch (batch_size x context_length),
                      and the backward workspace of the largest node
                      + the loss head (SLM.loss) + bf16/fp16 copies of the weights autocast makes
      evaluation    = the largest tensors alive at once in a no-grad forward

With ``activation_checkpointing`` each transformer-block copy keeps only its input for backward, and one copy's
activations exist again while its backward recomputes them. Several processes (``world_size`` W, per device):
the micro-batch is batch_size / W rows; DDP adds its rebuilt gradient buckets to a full replica; FSDP2 shards
weights, gradients and AdamW states 1/W and adds what is unsharded at once (the root group, two block copies'
parameters, one copy's gradients and the fp32 reduce-scatter buffer). docs/distributed.md has the table.

Gradients are counted whole while every activation is still saved: backward frees activations as it fills
gradients, so the sum is an upper bound (by at most the gradients), as is counting every node's output as saved.
docs/memory.md derives each term and compares the estimate with measured peaks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from slmb.core.compiler import Plan, PlanNode
from slmb.core.model import CUDA_FULL_LOGITS_MAX, ce_chunk_rows

# What a run takes besides its tensors. CPU: a worker with torch, slmb and MLflow imported (420 MiB measured on
# this project's machine) plus what a run of a tiny model adds (150 MiB: lazy imports, the dataset and its tokens,
# allocator arenas); docs/memory.md. CUDA: the context, cuBLAS workspaces and the caching allocator's rounding.
RUNTIME_BYTES = {"cpu": 768 << 20, "cuda": 1 << 30}
# The default limit leaves this share of the machine's RAM (at least MIN_RESERVE) to the OS, the API, Redis
# and the page cache: an estimate that fits in all of RAM would still push the machine into the OOM killer.
RESERVE_SHARE = 0.1
MIN_RESERVE = 2 << 30
STRATEGIES = ("ddp", "fsdp")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)(b?)\s*$", re.IGNORECASE)


class MemoryLimitError(ValueError):
    """A run's estimated peak memory is more than the worker may use."""


@dataclass
class MemoryEstimate:
    device: str  # "cpu" or "cuda": which memory the terms are in
    dtype: str  # the compute precision the trainer will use there
    parameters: int
    terms: dict[str, int]  # bytes on one device; their sum is the peak
    training_pass: int  # activations + loss_head + weight_casts
    evaluation_pass: int
    world_size: int = 1
    strategy: str | None = None  # None: one process; "ddp" or "fsdp": the terms are one device's of world_size
    checkpointing: bool = False  # activation_checkpointing
    batch_rows: int = 0  # rows of the micro-batch on one device: batch_size, or batch_size / world_size

    @property
    def peak(self) -> int:
        """Bytes on one device (per process) at the peak."""
        return sum(self.terms.values())

    @property
    def demand(self) -> int:
        """What the limit is compared with: CPU processes (gloo) share the machine's RAM, GPUs have their own."""
        return self.peak * (self.world_size if self.strategy and self.device == "cpu" else 1)

    @property
    def per_parameter(self) -> int:
        """Weights, gradients, AdamW states, the best-weights copy and what FSDP/DDP hold besides: what only a
        smaller model (or, under FSDP, more devices) reduces."""
        return sum(self.terms.get(k, 0) for k in ("weights", "gradients", "adamw_states", "best_weights",
                                                   "unsharded_params", "unsharded_grads", "reduce_scatter",
                                                   "ddp_buckets"))

    @property
    def where(self) -> str:
        """How the run is spread, for messages: "" for one process."""
        if not self.strategy:
            return ""
        return f"{self.strategy.upper()} over {self.world_size} process{'es' if self.world_size > 1 else ''}"

    def breakdown(self) -> str:
        return ", ".join(f"{name.replace('_', ' ')} {human_bytes(n)}" for name, n in self.terms.items() if n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def parse_bytes(text: str | int) -> int:
    """"16GiB", "500MB", "1.5g", "1073741824" -> bytes. KB/MB/GB/TB are powers of 1000; KiB/MiB/GiB/TiB and the
    bare K/M/G/T (as ``docker -m`` and ``ulimit`` read them) are powers of 1024."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise ValueError(f"not a memory size: {text!r} (use bytes, or a number with KB/MB/GB/TB or "
                             "KiB/MiB/GiB/TiB, e.g. 16GiB)")
        number, prefix, binary, b = m.groups()
        power = "kmgtp".index(prefix.lower()) + 1 if prefix else 0
        base = 1000 if prefix and b and not binary else 1024
        value = int(float(number) * base**power)
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------------- limit


def device_kind(device: str) -> str:
    """The memory a run on ``device`` ("auto", "cpu", "cuda:1", "mps") uses: "cuda" or "cpu" (RAM; MPS shares it)."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def machine_memory(device: str = "cpu") -> int:
    """What a worker here may use by default: the GPU's memory for CUDA; for the CPU, RAM (MemTotal, or the
    cgroup's limit when lower) less a reserve of ``RESERVE_SHARE`` of it, at least ``MIN_RESERVE``."""
    if device_kind(device) == "cuda":
        import torch

        if torch.cuda.is_available():
            index = torch.device(device).index if device.startswith("cuda") else None
            return torch.cuda.get_device_properties(index or 0).total_memory
    ram = _ram_bytes()
    return max(ram - max(int(ram * RESERVE_SHARE), MIN_RESERVE), ram // 2)


def _ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def worker_memory(device: str = "cpu", setting: int | str | None = None) -> tuple[int, str]:
    """(bytes a training worker may use, where that number comes from): ``setting`` when given, else
    ``$SLMB_WORKER_MEMORY``, else ``machine_memory(device)``."""
    if setting is not None:
        return parse_bytes(setting), "the limit set: SLMB_WORKER_MEMORY or --max-memory"
    if os.environ.get("SLMB_WORKER_MEMORY"):
        return parse_bytes(os.environ["SLMB_WORKER_MEMORY"]), "SLMB_WORKER_MEMORY"
    where = "this machine's GPU memory" if device_kind(device) == "cuda" else "this machine's RAM less a reserve"
    return machine_memory(device), where


# ---------------------------------------------------------------------------------------------------- estimate


def estimate(p: Plan, parameters: int, matrix_parameters: int, device: str | None = None, *, world_size: int = 1,
             strategy: str | None = None, block_parameters: Sequence[int] = ()) -> MemoryEstimate:
    """The peak memory of training ``p`` on one device (see the module docstring).

    Args:
        p: the compiler's plan of a valid request (``config.activation_checkpointing`` is read from it).
        parameters: the model's parameters (tied weights once), from the meta-device build.
        matrix_parameters: the weights of its nn.Linear layers (what autocast casts to bf16/fp16).
        device: where it will train (default: the request's ``config.device``).
        world_size: processes (devices) of a distributed run.
        strategy: None for one process, "ddp" (a replica per device) or "fsdp" (FSDP2, sharded per block copy).
        block_parameters: each transformer-block copy's parameters, in order (FSDP gathers one copy at a time);
            required for "fsdp" when the model has blocks. ``validate.summarize`` passes them.
    """
    if strategy not in (None, *STRATEGIES):
        raise ValueError(f"strategy must be None, 'ddp' or 'fsdp', got {strategy!r}")
    cfg = p.request.config
    device = device or cfg.device
    kind = device_kind(device)
    dtype = _compute_dtype(cfg.dtype, kind, parameters)
    low = dtype != "fp32"
    s = 2 if low else 4  # bytes of a compute-precision element
    W = world_size if strategy else 1
    B = -(-cfg.batch_size // W)  # the global batch is split over the processes
    N = B * cfg.context_length
    ckpt = bool(cfg.activation_checkpointing)
    acts = _Activations(kind, s, B, cfg.context_length)
    trunk, copies = _trunk(p.nodes)
    if strategy == "fsdp" and copies and len(block_parameters) != len(copies):
        raise ValueError(f"fsdp needs the parameters of each of the {len(copies)} block copies, got "
                         f"{len(block_parameters)}")
    head = trunk.pop() if p.nodes and p.nodes[-1].type == "linear" else None
    memo: dict[int, int] = {}  # block copies repeat the same plan nodes

    def saved(n: PlanNode) -> int:
        if id(n) not in memo:
            memo[id(n)] = acts.saved(n)
        return memo[id(n)]

    kept = [saved(n) for n in trunk]
    # While a node's backward runs, its input gradients and temporaries take about what it saved.
    activations = sum(kept) + max(kept, default=0)
    if ckpt and copies:
        # Each copy keeps only its (fp32) input; backward recomputes one copy's activations at a time.
        per_copy = [sum(saved(n) for n in nodes) for _, nodes in copies]
        activations += (sum(N * width * 4 for width, _ in copies) + max(per_copy) - sum(per_copy))
    # compile "auto" decides at run time (trainer.compile_policy): the estimate takes the larger of both losses.
    compiled = (False, True) if cfg.compile == "auto" and not cfg.cuda_graphs \
        else (cfg.compile is True or cfg.cuda_graphs,)
    if head is not None:
        loss = max(_loss_head(head, N, kind, low, c, tied=head.args["weight_tying"]) for c in compiled)
    else:  # no linear head: full logits and F.cross_entropy (logits, their fp32 copy, log-softmax, its gradient)
        loss = N * (p.vocab_size or 0) * (acts.s + 12)
    # FSDP's mixed precision gathers the parameters already in the compute dtype: autocast has nothing to cast.
    casts = 2 * matrix_parameters if low and strategy != "fsdp" else 0
    training = activations + loss + casts
    widest = max((w for n in trunk for w in (n.in_width or 0, n.out_width or 0)), default=0)
    evaluation = (max(kept, default=0) + 2 * N * widest * 4
                  + max(_loss_head(head, N, kind, low, c, tied=False, grad=False) for c in compiled))
    passes = ({"activations": activations, "loss_head": loss, "weight_casts": casts} if training >= evaluation
              else {"evaluation": evaluation})
    held = -(-parameters // W) if strategy == "fsdp" else parameters  # this device's share of each state
    weights = 4 * held
    terms = {"weights": weights, "gradients": weights, "adamw_states": 2 * weights,
             "best_weights": weights if cfg.early_stopping_patience is not None else 0}
    if strategy == "fsdp":
        # The root group (everything outside the block copies) stays gathered from forward through backward;
        # a block copy is gathered for its forward and again for its backward, the next one prefetched meanwhile;
        # gradients exist unsharded for the root and the copy in backward, then are copied into an fp32 flat
        # buffer to be reduce-scattered (the root's at the very end, when no copy's remain).
        root = parameters - sum(block_parameters)
        largest = max(block_parameters, default=0)
        terms |= {"unsharded_params": (root + 2 * largest) * s, "unsharded_grads": (root + largest) * s,
                  "reduce_scatter": 4 * max(root, largest)}
    elif strategy == "ddp":
        # With gradient_as_bucket_view the gradients are views into DDP's buckets, which live from the wrapping on
        # (counted as the gradients). After the first step DDP rebuilds the buckets once, in the order gradients
        # became ready, and the second step's forward runs with both sets allocated: measured on an H200
        # (docs/distributed.md), 4 bytes per parameter above the steps after it.
        terms["ddp_buckets"] = weights
    terms |= {**passes, "runtime": RUNTIME_BYTES[kind]}
    return MemoryEstimate(kind, dtype, parameters, terms, training, evaluation, W, strategy, ckpt, B)


def check(est: MemoryEstimate, limit: int, source: str) -> str | None:
    """None when ``est`` fits in ``limit``; else the message that says so (``hint`` says what to change)."""
    if est.demand <= limit:
        return None
    if not est.strategy:
        memory = "GPU" if est.device == "cuda" else "RAM"
        return (f"training needs about {human_bytes(est.peak)} of {memory} at its peak ({est.breakdown()}), more "
                f"than the {human_bytes(limit)} a worker may use ({source})")
    if est.device == "cuda":
        return (f"training needs about {human_bytes(est.peak)} of memory on each GPU with {est.where} at its peak "
                f"({est.breakdown()}), more than the {human_bytes(limit)} a worker may use ({source})")
    return (f"training needs about {human_bytes(est.peak)} of RAM per process with {est.where} at its peak "
            f"({est.breakdown()}), {human_bytes(est.demand)} for the {est.world_size} processes that share this "
            f"RAM, more than the {human_bytes(limit)} a worker may use ({source})")


def hint(est: MemoryEstimate) -> str:
    checkpointing = "" if est.checkpointing else ", or set activation_checkpointing: true"
    if est.strategy == "fsdp":
        batch = (f"lower batch_size (the global batch: {est.batch_rows} rows per device now; grad_accum_steps keeps "
                 f"the effective batch) or context_length{checkpointing}")
        devices = (f"train on more devices (weights, gradients and AdamW states are split over them: "
                   f"{human_bytes(est.terms['weights'] * 4)} per device over {est.world_size})")
        model = "use fewer or narrower blocks, a smaller embedding width or vocabulary"
        first, second = (devices, batch) if est.per_parameter >= est.training_pass else (batch, devices)
        return f"{first}; or {second}; or {model}"
    batch = ("lower batch_size (grad_accum_steps keeps the effective batch) or context_length" + checkpointing
             + ("" if est.dtype != "fp32" else ", train in bf16 where the device supports it"))
    model = ("use fewer or narrower blocks, a smaller embedding width or vocabulary (4 bytes x 4 per parameter "
             "for weights, gradients and AdamW)")
    first, second = (model, batch) if est.per_parameter >= est.training_pass else (batch, model)
    if est.strategy == "ddp":
        shard = (f"set distributed: fsdp (each of the {est.world_size} devices then holds 1/{est.world_size} of "
                 "the weights, gradients and AdamW states instead of a full replica)")
        first, second = (shard, f"{first}; or {second}") if est.per_parameter >= est.training_pass else (
            first, f"{shard}; or {second}")
    return f"{first}; or {second}; or train on a machine with more memory (SLMB_WORKER_MEMORY sets the limit)"


def _compute_dtype(dtype: str, kind: str, parameters: int) -> str:
    import torch

    from slmb.core.runtime import autocast_for

    if kind == "cuda" and not torch.cuda.is_available():  # judged on a machine without the GPU
        return "bf16" if dtype == "auto" else dtype
    return autocast_for(dtype, torch.device(kind), parameters)[0]


def _expanded(nodes: list[PlanNode]) -> list[PlanNode]:
    out = []
    for n in nodes:
        out.extend(_expanded(n.children) * n.repeat if n.type == "transformerBlock" else [n])
    return out


def _trunk(nodes: list[PlanNode]) -> tuple[list[PlanNode], list[tuple[int, list[PlanNode]]]]:
    """(every node the forward runs, in order; each top-level block copy as (input width, its nodes)). A
    top-level block copy is the unit that FSDP shards and activation checkpointing recomputes (Repeat.blocks)."""
    trunk: list[PlanNode] = []
    copies: list[tuple[int, list[PlanNode]]] = []
    for n in nodes:
        if n.type != "transformerBlock":
            trunk.append(n)
            continue
        copy = _expanded(n.children)
        for _ in range(n.repeat):
            copies.append((n.in_width or 0, copy))
            trunk.extend(copy)
    return trunk, copies


@dataclass
class _Activations:
    """Bytes autograd keeps for one node at a micro-batch of B x T tokens: each node's output (the next one
    saves it) and what the node saves inside. Under autocast, products and their outputs are in the low
    precision (``s`` bytes) while norms compute in fp32 and the residual stream stays fp32."""

    kind: str
    s: int  # bytes of an activation element in the compute precision
    B: int
    T: int

    def saved(self, n: PlanNode) -> int:
        a, N, s = n.args, self.B * self.T, self.s
        E = n.in_width or 0
        low = s < 4
        if n.type == "tokenEmbedding":
            return N * (8 + a["emb_dim"] * 4)  # the ids and the fp32 lookup
        if n.type == "positionalEmbedding":
            return N * E * 4 if a["windowed"] else 0  # rotary/relative markers only change later attention
        if n.type == "normalization":
            fp32 = 2 if a["norm_type"] == "rmsnorm" else 1  # RMSNorm saves x and x·rsqrt; LayerNorm x
            return N * E * (4 * fp32 + (s if low else 4)) + 8 * N  # + statistics
        if n.type == "residual":
            return N * E * 4
        if n.type == "dropout":
            return N * E * (1 + 4) if a["rate"] > 0 else 0  # the keep mask, the output
        if n.type == "linear":
            return N * ((2 * E) if low else 0) + N * a["out_dim"] * s
        if n.type == "feedForward":
            cast = 2 * N * E * (2 if a["gated"] else 1) if low else 0  # autocast's copy of the fp32 input
            return cast + N * a["hidden_dim"] * s * (4 if a["gated"] else 2) + N * E * s
        if n.type in ("mhAttention", "gqAttention"):
            return self._attention(n)
        return N * E * 4

    def _attention(self, n: PlanNode) -> int:
        a, N, s, B, T = n.args, self.B * self.T, self.s, self.B, self.T
        E, H, KV, hd = n.in_width or 0, a["num_heads"], a["num_kv_heads"], a["head_dim"]
        total = (2 * N * E if s < 4 else 0) + N * (H + 2 * KV) * hd * s  # input cast, qkv
        if a["qk_norm"]:
            total += 2 * N * (H + KV) * hd * 4
        if a["rope"]:
            total += N * (H + KV) * hd * s
        # SDPA: its output and a per-row logsumexp; the math kernel (on the CPU with dropout or a mask) keeps
        # the scores, their softmax and, with dropout, the mask and the dropped copy: (B, H, T, T) each.
        total += N * H * hd * s + B * H * T * 4
        math_kernel = self.kind == "cpu" and (a["dropout"] > 0 or a["relative"])
        if math_kernel:
            total += B * H * T * T * (2 * s + (s + 1 if a["dropout"] > 0 else 0)) + (2 * N * H * hd * s if KV != H
                                                                                        else 0)
        if a["relative"]:
            total += H * T * T * (4 + s)  # the bias table lookup and the mask
        return total + N * H * hd * s + N * E * s  # heads merged for proj, proj's output


def _loss_head(head: PlanNode | None, N: int, kind: str, low: bool, compiled: bool, tied: bool,
               grad: bool = True) -> int:
    """SLM.loss with a linear head of (V, E): chunked cross-entropy, or full logits on CUDA when small."""
    if head is None:  # the logits are the last node's output, counted with the activations
        return 0
    E, V = head.in_width or 0, head.args["out_dim"] or 0
    s = 2 if low else 4
    if kind == "cuda" and N * V <= CUDA_FULL_LOGITS_MAX and not compiled:
        # logits in the compute precision, their fp32 copy, log-softmax and its gradient (fp32)
        return N * V * (s + 12) if grad else N * V * (s + 4)
    rows = ce_chunk_rows(N, V, kind == "cuda")
    chunk = rows * V  # logits of one chunk
    if not grad:
        return chunk * (4 + (s if low else 0)) + ((N + V) * E * s if low else 0)
    # backward: the saved dL/dh and dL/dW, their scaled copies (dL/dW's becomes the weight's gradient, counted
    # there; one more when it is added to a tied embedding's gradient)
    backward = 2 * N * E * 4 + V * E * 4 * (2 if tied else 1)
    # A CPU's GEMM library may pack the (V, E) weight into a buffer of its own for the chunk products (MKL on an
    # Intel Xeon: measured 39 MiB above an AMD EPYC's peak for a 16384 x 256 head, docs/memory.md).
    packed = V * E * s if kind == "cpu" else 0
    if not low:
        # forward: dL/dh and dL/dW filled chunk by chunk; one chunk's logits and its dL/dh rows
        return max(N * E * 4 + V * E * 4 + chunk * 4 + rows * E * 4 + packed, backward)
    # bf16/fp16 forward: the inputs cast, the whole (N, V) gradient in the low precision, then either one chunk's
    # logits in both precisions or, at the end, dL/dh and dL/dW in both
    held = (N + V) * E * s + N * V * s
    return max(held + chunk * (s + 4) + packed, held + (N + V) * E * (s + 4), backward)
