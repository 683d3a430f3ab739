"""Training throughput of one peer on the GPT-2 benchmark shape, in this process; prints one JSON line.

Shape (``--shape bench``, the default): vocab 50257, emb 256, 4 blocks, 4 heads, context 128, batch 8, dropout 0.1,
AdamW + clip 1.0 (all peers use ``trainer.make_optimizer``'s parameter groups; fused kernels for slmb, torch's default
for the peers). ``--shape gpt2-124m`` is GPT-2 small (emb 768, 12 blocks, 12 heads, context 1024; what
bench/gpu_training.py runs the nanoGPT peer at); ``--ctx/--emb/--layers/--heads`` override one dimension. Peers:

- ``slmb``: the model compiled from its canvas JSON (``tests/hf_convert.gpt2_body``) and stepped by the trainer's
  own ``TrainStep`` after ``runtime.prepare_device`` (threads, allocator), with ``autocast_for``'s precision.
  ``--loss full`` swaps the chunked LM-head loss for full logits + F.cross_entropy (to measure that lever).
- ``hf``: transformers' GPT2LMHeadModel (SDPA attention), logits + F.cross_entropy as its own loss does.
- ``nano``: a hand-written nanoGPT-style model (bench/nanogpt.py).

``--alloc`` picks the allocator: ``default`` (glibc as is), ``mallopt`` (slmb's in-process fix), ``jemalloc``
(the caller preloads it; bench/run_all.py does). slmb always gets ``prepare_device`` unless ``--alloc default``.
Random token batches: speed does not depend on the text. Use bench/run_all.py for repeated, alternated runs.

    .venv/bin/python bench/train.py --peer slmb --dtype auto [--steps 8 --warmup 3 --device cpu --compile]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the HF <-> slmb canvas mapping
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {"bench": dict(vocab=50257, emb=256, layers=4, heads=4, ctx=128),
          "gpt2-124m": dict(vocab=50257, emb=768, layers=12, heads=12, ctx=1024)}
SHAPE = SHAPES["bench"]


def flops_per_token(n_params: int, layers: int, emb: int, ctx: int) -> float:
    """Training FLOPs per token (PaLM appendix B, as nanoGPT's estimate_mfu): 6N + 12·L·E·T."""
    return 6 * n_params + 12 * layers * emb * ctx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", choices=["slmb", "hf", "nano"], default="slmb")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--alloc", choices=["default", "mallopt", "jemalloc"], default=None,
                    help="default: mallopt for slmb (what it does), glibc as is for the peers")
    ap.add_argument("--loss", choices=["chunked", "full"], default="chunked", help="slmb only")
    ap.add_argument("--adam", choices=["fused", "default"], default=None,
                    help="default: fused for slmb (make_optimizer's choice); torch's default for the peers, fused on "
                         "CUDA only (nanoGPT's choice)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    for dim in ("ctx", "emb", "layers", "heads"):
        ap.add_argument(f"--{dim}", type=int, default=None, help=f"override the shape's {dim}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--window", action="store_true",
                    help="time the timed steps as one window, reading their losses after it (no host sync per step, "
                         "as nanoGPT's loop); default: each step alone, its loss read at once")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                    help="torch.compile's mode (implies --compile); reduce-overhead replays CUDA graphs")
    args = ap.parse_args()
    args.compile = args.compile or args.compile_mode is not None
    mode = None if args.compile_mode in (None, "default") else args.compile_mode

    from slmb.core.runtime import autocast_for, cpu_cores, keep_freed_memory, prepare_device
    from slmb.core.trainer import TrainStep, make_optimizer, resolve_device

    device = resolve_device(args.device)
    alloc = args.alloc or ("mallopt" if args.peer == "slmb" else "default")
    if device.type == "cpu":
        if alloc == "jemalloc" and "jemalloc" not in os.environ.get("LD_PRELOAD", ""):
            sys.exit("--alloc jemalloc needs LD_PRELOAD=libjemalloc.so.2 (bench/run_all.py sets it)")
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", cpu_cores())))
    if args.peer == "slmb" and (alloc == "mallopt" or device.type == "cuda"):
        prepare_device(device)  # threads + allocator on the CPU; TF32 matmuls on CUDA (the peers keep torch's default)
    elif alloc == "mallopt":
        keep_freed_memory()

    shape = {**SHAPES[args.shape], **{k: getattr(args, k) for k in ("ctx", "emb", "layers", "heads")
                                       if getattr(args, k) is not None}}
    V, E, L, H, T, B = shape["vocab"], shape["emb"], shape["layers"], shape["heads"], shape["ctx"], args.batch
    torch.manual_seed(0)
    if args.peer == "slmb":
        from hf_convert import gpt2_body
        from transformers import GPT2Config

        from slmb.core.compiler import build_model
        from slmb.core.spec import TrainRequest

        body = gpt2_body(GPT2Config(vocab_size=V, n_embd=E, n_layer=L, n_head=H, n_positions=T), "gelu_tanh", True)
        body["config"].pop("dtype")  # the request's default ("auto"), unless asked for
        if args.dtype != "auto":
            body["config"]["dtype"] = args.dtype
        req = TrainRequest.model_validate(body)
        model = build_model(req, device=device)
        dtype, autocast, _ = autocast_for(req.config.dtype, device, model.num_parameters())
        loss_fn = None
        if args.loss == "full":
            def loss_fn(x, y):
                return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        if args.compile:
            loss_fn = torch.compile(loss_fn or model.loss, mode=mode)
    else:
        if args.peer == "hf":
            from transformers import GPT2Config, GPT2LMHeadModel

            cfg = GPT2Config(vocab_size=V, n_embd=E, n_layer=L, n_head=H, n_positions=T,
                             activation_function="gelu_new")
            model = GPT2LMHeadModel(cfg).to(device)
            net = model if not args.compile else torch.compile(model, mode=mode)

            def logits_of(x):
                return net(input_ids=x).logits
        else:
            from nanogpt import GPT

            model = GPT(V, T, E, L, H).to(device)
            net = model if not args.compile else torch.compile(model, mode=mode)

            def logits_of(x):
                return net(x)

        def loss_fn(x, y):
            return F.cross_entropy(logits_of(x).float().flatten(0, 1), y.flatten())

        dtype, autocast, _ = autocast_for("fp32" if args.dtype == "auto" else args.dtype, device)
    model.train()
    adam = args.adam or ("fused" if args.peer == "slmb" or device.type == "cuda" else "default")
    optimizer = make_optimizer(model, 3e-4, 0.1, device, fused=adam == "fused")
    step = TrainStep(model, optimizer, autocast, device, grad_clip=1.0, loss_fn=loss_fn)

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, V, (B, T), generator=gen), torch.randint(0, V, (B, T), generator=gen))
               for _ in range(4)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, losses = [], []
    for i in range(args.warmup if args.window else args.warmup + args.steps):
        t0 = time.perf_counter()
        loss, _ = step([batches[i % len(batches)]], 3e-4)
        losses.append(loss.item())  # a sync point, as the trainer's loss check was
        sync()
        times.append(time.perf_counter() - t0)
    if args.window:  # the timed steps queued back to back, their losses read after the last
        t0 = time.perf_counter()
        pending = [step([batches[i % len(batches)]], 3e-4)[0] for i in range(args.warmup, args.warmup + args.steps)]
        losses += [loss.item() for loss in pending]
        sync()
        times += [(time.perf_counter() - t0) / args.steps] * args.steps
    warmup_times, times = times[:args.warmup], times[args.warmup:]
    n_params = V * E + L * (12 * E * E + 13 * E) + 2 * E  # tied head + blocks + final norm (no position table)
    tps = B * T * len(times) / sum(times)
    fpt = flops_per_token(n_params, L, E, T)
    out = {"peer": args.peer, "shape": shape, "dtype": dtype, "alloc": alloc if device.type == "cpu" else "cuda",
           "loss": args.loss if args.peer == "slmb" else "full", "adam": adam, "compile": args.compile,
           "compile_mode": args.compile_mode or ("default" if args.compile else None), "window": args.window,
           "device": str(device),
           "batch": B, "threads": torch.get_num_threads(), "tokens_per_s": tps,
           "steps": len(times), "step_s_median": statistics.median(times), "warmup_step_s": warmup_times,
           "flops_per_token": fpt, "flops_per_s": fpt * tps,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "losses": losses[:2],
           "loss_last": losses[-1]}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
