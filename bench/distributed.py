"""Step-time overhead of DDP and FSDP against a plain one-process run, stepped by the trainer's own parts.

Each mode trains the same model at the same global batch with ``TrainStep`` (plus, on several processes, the
trainer's ``Dist``: the DDP wrapper or FSDP2 shards, gradient sync, the per-step loss all-reduce that also carries
the stop flag) and reports global tokens/s over ``--steps`` timed steps after ``--warmup``:

- ``plain``: one process, no process group (what ``slmb train`` runs), ``--threads`` threads on the CPU;
- ``ddp``, ``fsdp``: torchrun with ``--processes`` processes (gloo on the CPU, each with threads/processes
  threads; NCCL on CUDA, one GPU each).

Each mode runs ``--repeats`` times in fresh processes, alternating; the table gives the median and the range.

    .venv/bin/python bench/distributed.py                      # CPU: 1 process x 2 threads vs 2 x 1 (issue 12)
    .venv/bin/python bench/distributed.py --device cuda --processes 1 \\
        --canvas ../shared/requests/gpt2-reference.json --batch 16 --ctx 1024   # NCCL, world size 1

Model: the GPT-2 benchmark shape of bench/train.py (vocab 50257, width 256, 4 blocks, context 128) unless
``--canvas`` names a request file. Random token batches: speed does not depend on the text.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # hf_convert: the GPT-2 canvas of the benchmark shape


def request_body(args: argparse.Namespace) -> dict:
    if args.canvas:
        body = json.loads(Path(args.canvas).read_text())
    else:
        from hf_convert import gpt2_body
        from train import SHAPE
        from transformers import GPT2Config

        cfg = GPT2Config(vocab_size=SHAPE["vocab"], n_embd=SHAPE["emb"], n_layer=SHAPE["layers"],
                         n_head=SHAPE["heads"], n_positions=SHAPE["ctx"])
        body = gpt2_body(cfg, "gelu_tanh", True)
    config = body.setdefault("config", {})
    config["batch_size"] = args.batch
    if args.ctx:
        config["context_length"] = args.ctx
    config["dtype"] = args.dtype
    config["activation_checkpointing"] = args.activation_checkpointing
    return body


def worker(args: argparse.Namespace) -> None:
    """One process of one mode (under torchrun for ddp/fsdp): time the steps; rank 0 prints a JSON line."""
    import torch

    from slmb.core.compiler import build_model
    from slmb.core.distributed import Dist, launched
    from slmb.core.runtime import autocast_for, prepare_device
    from slmb.core.trainer import TrainStep, make_optimizer, resolve_device
    from slmb.core.validate import require_valid

    device = resolve_device(args.device)
    dist = Dist.from_env(device) if launched() else Dist()
    device = dist.device if dist.active else device
    prepare_device(device)
    req = require_valid(request_body(args)).request
    B, T, W = req.config.batch_size, req.config.context_length, dist.world_size
    torch.manual_seed(0)
    model = build_model(req, device="cpu" if args.mode == "fsdp" else device)
    for repeat in (m for m in model.modules() if type(m).__name__ == "Repeat"):
        repeat.checkpointing = req.config.activation_checkpointing
    dtype, autocast, _ = autocast_for(req.config.dtype, device, model.num_parameters())
    loss_fn = dist.setup_model(model, args.mode, dtype, args.compile)
    optimizer = make_optimizer(model, 3e-4, 0.1, device)
    step = TrainStep(model, optimizer, autocast, device, grad_clip=1.0, loss_fn=loss_fn,
                     micro_step=dist.micro_step if dist.active else None)
    V = model.vocab_size
    gen = torch.Generator().manual_seed(0)
    share = B // W
    batches = []
    for _ in range(4):
        x, y = torch.randint(0, V, (B, T), generator=gen), torch.randint(0, V, (B, T), generator=gen)
        batches.append((x[dist.rank * share:(dist.rank + 1) * share], y[dist.rank * share:(dist.rank + 1) * share]))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss, grad_norm = step([batches[i % len(batches)]], 3e-4)
        dist.step_numbers(loss, grad_norm, False).tolist()  # the trainer's step all-reduce, read at once (as on a CPU)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if dist.is_main:
        out = {"mode": args.mode, "processes": W, "threads": torch.get_num_threads(), "device": str(device),
               "dtype": dtype, "batch": B, "ctx": T, "parameters": sum(p.numel() for p in model.parameters()),
               "tokens_per_s": B * T * len(times) / sum(times), "step_ms": 1000 * statistics.median(times)}
        if device.type == "cuda":
            out["gpu"] = torch.cuda.get_device_name()
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        print("RESULT " + json.dumps(out), flush=True)
    dist.close()  # after a barrier: a rank leaving while another still talks can abort it


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    own = [a for a in sys.argv[1:] if a != "--worker"]
    cmd_args = [str(HERE / "distributed.py"), "--worker", "--mode", mode, *own]
    env = {**os.environ}
    if mode == "plain":
        cmd = [sys.executable, *cmd_args]
        if args.device == "cpu":
            env["OMP_NUM_THREADS"] = str(args.threads)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.processes}",
               *cmd_args]
        if args.device == "cpu":
            env["OMP_NUM_THREADS"] = str(max(1, args.threads // args.processes))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode or line is None:
        sys.exit(f"{mode} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--processes", type=int, default=2, help="processes for ddp and fsdp")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads in all (plain: all; ranks: split)")
    ap.add_argument("--modes", default="plain,ddp,fsdp")
    ap.add_argument("--canvas", help="a request file instead of the GPT-2 benchmark shape")
    ap.add_argument("--batch", type=int, default=8, help="global batch")
    ap.add_argument("--ctx", type=int, default=None, help="context length (default: the canvas's)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    modes = args.modes.split(",")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            results[mode].append(run_mode(args, mode))
    base = statistics.median(r["tokens_per_s"] for r in results[modes[0]])
    first = results[modes[0]][0]
    print(f"\n{first['device']} {first.get('gpu', '')}, {first['parameters']:,} parameters, global batch "
          f"{first['batch']} x {first['ctx']}, {first['dtype']}, {args.repeats} runs each (median, range)\n")
    print(f"| mode | processes x threads | tokens/s | range | step ms | vs {modes[0]} |")
    print("|---|---|---|---|---|---|")
    for mode in modes:
        rs = results[mode]
        tps = [r["tokens_per_s"] for r in rs]
        med = statistics.median(tps)
        print(f"| {mode} | {rs[0]['processes']} x {rs[0]['threads']} | {med:,.0f} | {min(tps):,.0f}-{max(tps):,.0f} | "
              f"{statistics.median(r['step_ms'] for r in rs):,.1f} | {100 * (base / med - 1):+.1f}% step time |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
