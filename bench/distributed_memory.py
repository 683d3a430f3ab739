"""Per-device training memory of four reference canvases, one device / DDP / FSDP, from slmb's estimator.

Nothing is allocated: the canvases are built on the meta device (as validation does) and ``memory.estimate``
adds up each device's terms (docs/memory.md, docs/distributed.md). Prints markdown tables for
docs/distributed.md: each canvas on one device (one process) and under DDP and FSDP on 1, 2, 4 and 8 devices,
with and without activation checkpointing, on CUDA in bf16, with marks for what fits an 80 GB and a 141 GB GPU.

Canvases: GPT-2 (162 M) and Llama 3.2 1B (1.24 B) are the front end's own bodies (../shared/requests/); Qwen3
0.6B and Llama 2 7B (6.7 B) are the same canvas shapes at those models' published sizes, written by
tests/hf_convert.py the way the front end sends them. ``batch_size`` is the global batch: ``--rows`` rows per
device (default 1, what the front end sends) times the devices, so that it splits evenly.

``--measure`` (a CUDA machine) trains canvases on one GPU instead and prints the allocator's peaks beside the
estimates (docs/distributed.md, "Estimate vs measured").

    .venv/bin/python bench/distributed_memory.py                          # the front end's batch and context
    .venv/bin/python bench/distributed_memory.py --rows 8 --context 2048  # a pre-training-sized micro-batch
    python bench/distributed_memory.py --measure "Llama 3.2 1B" "Qwen3 0.6B"  # on a GPU: 8 rows x 1024
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # hf_convert: canvases equivalent to Hugging Face configs

GiB = 1 << 30
# What torch reports as the total memory of an 80 GB (A100/H100) and a 141 GB (H200) GPU, rounded down: the
# limit admission compares with on such a worker (memory.machine_memory).
GPUS = {"80 GB": 79 * GiB, "141 GB": 139 * GiB}
DEVICES = (1, 2, 4, 8)


def _shared() -> Path:
    import os

    return Path(os.environ.get("SLMB_SHARED_DIR") or ROOT.parent / "shared")


def _hf_like(**kw: Any) -> dict[str, Any]:
    """A transformers config.json's fields, as slmb.core.interop's llama_body reads them."""
    return {"rms_norm_eps": 1e-6, **kw}


def canvases() -> dict[str, dict[str, Any]]:
    from hf_convert import llama_body

    qwen3 = llama_body(_hf_like(hidden_size=1024, vocab_size=151936, max_position_embeddings=40960,
                                num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                rope_parameters={"rope_theta": 1_000_000}, intermediate_size=3072,
                                num_hidden_layers=28, tie_word_embeddings=True), qk_norm=True, model_family="qwen3")
    llama2 = llama_body(_hf_like(hidden_size=4096, vocab_size=32000, max_position_embeddings=4096,
                                 num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                                 rope_parameters={"rope_theta": 10_000}, intermediate_size=11008,
                                 num_hidden_layers=32, tie_word_embeddings=False, rms_norm_eps=1e-5),
                        model_family="llama2")
    # llama_body trains at the model's whole window: give these the Llama 3.2 body's context (the front end's).
    for body in (qwen3, llama2):
        body["config"].update(context_length=256, stride=256)
    requests = _shared() / "requests"
    return {"GPT-2": json.loads((requests / "gpt2-reference.json").read_text()), "Qwen3 0.6B": qwen3,
            "Llama 3.2 1B": json.loads((requests / "llama3-reference.json").read_text()), "Llama 2 7B": llama2}


def _with_context(nodes: list[dict[str, Any]], T: int) -> None:
    """Windows shorter than T grow to T (a learned position table gains rows)."""
    for node in nodes:
        if node.get("data", {}).get("ctxLength", T) < T:
            node["data"]["ctxLength"] = T
        _with_context(node.get("children", []), T)


def rows_for(name: str, body: dict[str, Any], rows: int, context: int | None) -> list[list[str]]:
    from slmb.core import memory
    from slmb.core.compiler import plan
    from slmb.core.validate import meta_build, validate

    body = json.loads(json.dumps(body))
    body["config"].update(device="cuda", dtype="bf16")
    if context:
        body["config"].update(context_length=context, stride=context)
        _with_context(body["model"], context)
    report = validate(body, build=False)
    assert report.ok, [e.to_dict() for e in report.errors]
    built = meta_build(report.plan)
    T = body["config"]["context_length"]
    out = []
    for strategy, W in [(None, 1)] + [(s, W) for s in ("ddp", "fsdp") for W in DEVICES]:
        peaks = []
        for checkpointing in (False, True):
            config = {**body["config"], "batch_size": rows * W, "activation_checkpointing": checkpointing}
            p = plan(type(report.request).model_validate({**body, "config": config}))
            est = memory.estimate(p, built.total, built.matrices, "cuda", world_size=W, strategy=strategy,
                                  block_parameters=built.block_copies)
            peaks.append(est.peak)
        run = "one device" if strategy is None else f"{strategy.upper()} × {W}"
        marks = [" ".join("✓" if peak <= limit else "✗" for limit in GPUS.values()) for peak in peaks]
        out.append([f"{name} ({built.total / 1e9:.2f} B)" if not out else "", run, f"{rows * W} × {T}",
                    f"{peaks[0] / GiB:,.1f}", marks[0], f"{peaks[1] / GiB:,.1f}", marks[1]])
    return out


def measure(names: list[str], rows: int, context: int) -> None:
    """On a CUDA machine: train each canvas on one GPU as one process and as a one-rank DDP and FSDP run, with
    and without activation checkpointing, each in a process of its own (the allocator's peak is then that
    setting's alone), and print the measured peaks beside the estimates."""
    import subprocess

    print("| canvas | run | rows × context | activation checkpointing | measured peak allocated GiB | "
          "peak reserved GiB | estimate less runtime GiB | estimate / measured |")
    print("|---|---|---|---|---:|---:|---:|---:|", flush=True)
    for name in names:
        for run in ("one", "ddp", "fsdp"):
            for checkpointing in ("off", "on"):
                subprocess.run([sys.executable, __file__, "--rows", str(rows), "--context", str(context),
                                "--one", name, run, checkpointing], check=True)


def measure_one(name: str, run: str, checkpointing: bool, rows: int, context: int, steps: int = 3) -> None:
    """Train ``steps`` steps with the trainer's own parts (TrainStep, make_optimizer, Dist.setup_model on a
    one-rank process group) and print the allocator's peak beside the estimate less its runtime term (the CUDA
    context and the caching allocator's rounding, which torch's counters do not show)."""
    import os

    import torch

    from slmb.core import memory
    from slmb.core import nodes as N
    from slmb.core.compiler import build_model, plan
    from slmb.core.distributed import Dist
    from slmb.core.runtime import autocast_for, prepare_device
    from slmb.core.spec import TrainRequest
    from slmb.core.trainer import TrainStep, make_optimizer
    from slmb.core.validate import meta_build

    strategy = None if run == "one" else run
    body = json.loads(json.dumps(canvases()[name]))
    body["config"].update(device="cuda", dtype="bf16", batch_size=rows, context_length=context, stride=context,
                          activation_checkpointing=checkpointing)
    _with_context(body["model"], context)
    req = TrainRequest.model_validate(body)
    p = plan(req)
    built = meta_build(p)
    est = memory.estimate(p, built.total, built.matrices, "cuda", world_size=1, strategy=strategy,
                          block_parameters=built.block_copies)
    device = torch.device("cuda", 0)
    prepare_device(device)
    dist = Dist()
    if strategy:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
        dist = Dist.from_env(device)
    torch.manual_seed(0)
    model = build_model(req, device="cpu" if strategy == "fsdp" else device)  # as the trainer builds it
    for repeat in (m for m in model.modules() if isinstance(m, N.Repeat)):
        repeat.checkpointing = checkpointing
    dtype, autocast, _ = autocast_for("bf16", device, built.total)
    loss_fn = dist.setup_model(model, strategy, dtype, False) if strategy else None
    step = TrainStep(model, make_optimizer(model, 1e-4, 0.1, device), autocast, device, loss_fn=loss_fn,
                     micro_step=dist.micro_step if strategy else None)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        x = torch.randint(0, p.vocab_size or 2, (rows, context))
        step([(x, x.roll(-1, 1))], 1e-4)
    torch.cuda.synchronize()
    got, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    want = est.peak - est.terms["runtime"]
    label = "one process" if strategy is None else f"{strategy.upper()} × 1"
    print(f"| {name} | {label} | {rows} × {context} | {'on' if checkpointing else 'off'} | {got / GiB:.1f} | "
          f"{reserved / GiB:.1f} | {want / GiB:.1f} | {want / got:.2f} |", flush=True)
    dist.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=None, help="rows of the micro-batch per device (default 1)")
    ap.add_argument("--context", type=int, default=None, help="context_length (default: each canvas's own)")
    ap.add_argument("--measure", nargs="+", metavar="CANVAS", choices=["GPT-2", "Qwen3 0.6B", "Llama 3.2 1B"],
                    help="on a CUDA machine: train these canvases on one GPU and print measured peaks beside the "
                         "estimates (--rows, --context: default 8 and 1024)")
    ap.add_argument("--one", nargs=3, metavar=("CANVAS", "RUN", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        name, run, checkpointing = args.one
        measure_one(name, run, checkpointing == "on", args.rows, args.context)
        return
    if args.measure:
        measure(args.measure, args.rows or 8, args.context or 1024)
        return
    gpus = " ".join(GPUS)
    print(f"| canvas | run | batch_size × context | GiB per device | fits {gpus} | with activation checkpointing "
          f"| fits {gpus} |")
    print("|---|---|---|---:|:---:|---:|:---:|")
    for name, body in canvases().items():
        for row in rows_for(name, body, args.rows or 1, args.context):
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
