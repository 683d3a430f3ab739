"""GPU training on the GPT-2 reference canvas at context 1024 (issue 15 point 1): `slmb train` itself, side by side
with a nanoGPT-style peer, in one run; prints one markdown table and writes the raw numbers as JSON.

Variants, each in a fresh process, in this order (a failing one is reported as failed; the others still run):

- ``eager``: ``slmb train`` with ``config.compile: false``;
- ``nano``: bench/train.py ``--peer nano --shape gpt2-124m`` (Karpathy's model: tied head, flash SDPA, fused AdamW,
  bf16 autocast, ``torch.compile``) at the same context, batch and timed-step count, on random tokens;
- ``graphs``: ``slmb train`` with ``compile: true, cuda_graphs: true`` (torch.compile mode "reduce-overhead");
- ``compile``: ``slmb train`` with ``compile: true`` (torch.compile's default mode).

Every ``slmb train`` run is the real CLI (``--json --no-track``, in a subprocess whose peak GPU memory is read at
exit) on ``$SLMB_SHARED_DIR/requests/gpt2-reference.json`` (12 blocks, width 768, 162 M parameters, untied head)
with context 1024 (the canvas's position table and attention follow), bf16, tiny_shakespeare and the gpt2
tokenizer, ``max_steps`` ``--steps``, ``val_fraction`` 0 and ``eval_every`` past the end (the one evaluation,
after the last step, is outside every timed step). The batch is the largest of ``--batches`` that slmb's memory
estimate (``slmb.core.validate``, as ``slmb train`` admits runs) fits on the device; a run refused for memory
or out of memory is retried at the next smaller batch.

Numbers, from the step events after step ``--skip`` (compiling, CUDA-graph recording and warm-up come before):

- tokens/s: tokens of the steady steps over the wall time between their step events (the trainer's own busy-time
  figure is in the JSON too); the peer: its timed steps queued back to back, their losses read after the last
  (``--window``: no host sync per step, as nanoGPT's own loop and slmb's loop on CUDA);
- model TFLOP/s = tokens/s x training FLOPs per token (6 per matrix weight + attention: PaLM's estimate, as
  nanoGPT's); MFU = that over the best bf16 matmul peak any run here measured (``runtime.trusted_peak``);
- compile s = first step time - a steady step time; "pays after" = the run length (steps) from which the compiled
  variant's total time (its extra warm-up time over its steady steps, plus its first evaluation's extra time: the
  eval-mode recompile) beats eager's;
- peak GPU MiB: ``torch.cuda.max_memory_allocated`` of the training process (peak RSS on a CPU).

Each run gets a cold Inductor cache of its own (compile times as a first run sees them; ``--warm-cache`` shares
one). Wall time on an H200: about 6 minutes expected, at most ``--budget`` (500 s). ``--smoke``: the same flow on
the CPU at a toy shape (width 64, 1 block, context 64, batch 4), a minute or two; tests/test_bench.py runs it.

    python3 bench/gpu_training.py [--json PATH]          # on the GPU machine: bash bench/gpu_session.sh
    .venv/bin/python bench/gpu_training.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LABELS = {"eager": "slmb train, eager", "nano": "nanoGPT-style peer", "graphs": "slmb train, compile + CUDA graphs",
          "compile": "slmb train, compile"}
SLMB_CONFIG = {"eager": {"compile": False}, "graphs": {"compile": True, "cuda_graphs": True},
               "compile": {"compile": True, "cuda_graphs": False}}
# Seconds each variant may take, start to end. nanoGPT's compile takes about a minute on an H200; slmb's compiled
# loss also unrolls its chunked cross-entropy (about 100 chunks at batch 64 x 1024), and the evaluation's eval-mode
# recompile and saving the 162 M-parameter model come on top. --budget caps the sum (the device tool: 600 s a call).
TIMEOUT_S = {"eager": 100, "nano": 150, "graphs": 240, "compile": 240}
# A GPU run: the largest batch that fits; the smoke run: the same choice at a toy shape.
GPU = dict(device="cuda", ctx=1024, steps=60, skip=12, batches=(64, 32, 16, 8), budget=500, timeouts=TIMEOUT_S)
# The smoke run shares one Inductor cache (the second slmb compile is a cache hit): CPU compiles take ~40 s each.
SMOKE = dict(device="cpu", ctx=64, steps=30, skip=6, batches=(4, 2), budget=400,
             timeouts=dict.fromkeys(TIMEOUT_S, 150))
SMOKE_SHAPE = dict(emb=64, heads=2, blocks=1)
MEMORY_FAILURES = ("out of memory", "OutOfMemoryError", "training needs about")
# `slmb train` in this process, with its peak memory printed (stderr) when it exits; argv after -c: the CLI's.
CHILD = """
import atexit, json, resource, sys

def _peak():
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update(peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20,
                   reserved_gpu_mb=torch.cuda.max_memory_reserved() / 2**20, gpu=torch.cuda.get_device_name())
    print("BENCH_PEAK " + json.dumps(out), file=sys.stderr, flush=True)

atexit.register(_peak)
sys.argv[0] = "slmb"
from slmb.cli import main
main()
"""


def shared_dir(given: str | None) -> Path:
    """Where requests/ and datasets/ are: --shared, $SLMB_SHARED_DIR, .whl/shared (what the GPU session carries),
    ../shared."""
    for d in (given, os.environ.get("SLMB_SHARED_DIR"), ROOT / ".whl" / "shared", ROOT.parent / "shared"):
        if d and (Path(d) / "requests" / "gpt2-reference.json").is_file():
            return Path(d)
    sys.exit("no shared folder with requests/gpt2-reference.json: give --shared or set SLMB_SHARED_DIR")


def request(shared: Path, ctx: int, batch: int, steps: int, device: str, smoke: bool, variant: str) -> dict:
    """The reference canvas at context ``ctx`` (every ``ctxLength`` follows), trained ``steps`` steps on
    ``device`` in bf16; ``smoke``: at ``SMOKE_SHAPE`` (vocab and head stay GPT-2's)."""
    body = json.loads((shared / "requests" / "gpt2-reference.json").read_text())

    def fix(nodes: list[dict]) -> None:
        for node in nodes:
            data = node["data"]
            if "ctxLength" in data:
                data["ctxLength"] = ctx
            if smoke:
                E = SMOKE_SHAPE["emb"]
                data.update({k: E for k in ("inDim", "embDim") if k in data})
                data.update({k: v for k, v in (("numHeads", SMOKE_SHAPE["heads"]), ("hiddenDim", 4 * E),
                                               ("numOfBlocks", SMOKE_SHAPE["blocks"])) if k in data})
                if "outDim" in data and data["outDim"] != body["config"]["vocab_size"]:
                    data["outDim"] = E
            fix(node.get("children", []))

    fix(body["model"])
    cfg = body["config"]
    if smoke:
        cfg.update(emb_dim=SMOKE_SHAPE["emb"], n_heads=SMOKE_SHAPE["heads"], n_blocks=SMOKE_SHAPE["blocks"])
    cfg.update(context_length=ctx, stride=ctx, batch_size=batch, dtype="bf16", device=device, tokenizer="gpt2",
               max_steps=steps, epochs=10_000, eval_every=steps + 1, eval_batches=1, val_fraction=0,
               checkpoint_every=None, **SLMB_CONFIG[variant])
    body.update(dataset="tiny_shakespeare", modelName=f"gpu-bench-{variant}")
    return body


def pick_batch(shared: Path, ctx: int, device: str, smoke: bool, batches: list[int]) -> tuple[list[int], dict]:
    """``batches`` from the largest that slmb's memory estimate fits on ``device`` down (what `slmb train` would
    admit), and each candidate's estimated peak in MiB."""
    from slmb.core.validate import validate

    fits, est = [], {}
    for b in sorted(batches, reverse=True):
        report = validate(request(shared, ctx, b, 1, device, smoke, "graphs"), admit=True)
        est[b] = report.summary.memory["training_total"] / 2**20 if report.summary else None
        if not any(e.check == "memory" for e in report.errors):
            fits.append(b)
    return fits or [min(batches)], est


def run(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> dict:
    """Run ``cmd`` in its own session (a timeout ends it and its children); stdout/stderr kept under ``log``."""
    t0 = time.monotonic()
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return {"rc": rc, "wall_s": time.monotonic() - t0, "stdout": log.with_suffix(".out").read_text(),
            "stderr": log.with_suffix(".err").read_text()}


def failure(res: dict, timeout: float) -> str | None:
    if res["rc"] is None:
        return f"timed out after {timeout:.0f} s"
    if res["rc"] != 0:
        lines = [ln for ln in res["stderr"].splitlines() if ln.strip() and not ln.startswith("BENCH_PEAK ")]
        return f"exit {res['rc']}: " + " / ".join(lines[-3:])[-600:]
    return None


def slmb_stats(events: list[dict], skip: int) -> dict:
    """Steady-state numbers from a run's events: the step events after step ``skip`` (each one's tokens/s covers
    the steps since the previous one), the first step alone, the final evaluation."""
    started = next(e["data"] for e in events if e["event"] == "started")
    steps = [e["data"] for e in events if e["event"] == "step"]
    tokens_per_step = started["batch_size"] * started["context_length"] * started.get("grad_accum_steps", 1)
    intervals, prev = [], 0  # (first step, last step, busy seconds, event ts)
    for s in steps:
        n = s["step"] - prev
        if n > 0 and s.get("tokens_per_sec"):
            intervals.append((prev + 1, s["step"], n * tokens_per_step / s["tokens_per_sec"], s["ts"]))
        prev = s["step"]
    steady = [iv for iv in intervals if iv[0] > skip] or intervals[-1:]
    busy_steps = sum(b - a + 1 for a, b, _, _ in steady)
    busy_tps = busy_steps * tokens_per_step / sum(t for _, _, t, _ in steady)
    # Wall time between the step events that bound the steady steps (the loop's own time, events included); the
    # last step's event comes after the evaluation, so the window ends at the event before it.
    before = [iv for iv in intervals if iv[1] < steady[0][0]]
    inner = [iv for iv in steady if iv[1] < intervals[-1][1]]
    wall_tps = wall_s = None
    if before and inner and inner[-1][3] > before[-1][3]:
        wall_s = inner[-1][3] - before[-1][3]
        wall_tps = (inner[-1][1] - before[-1][1]) * tokens_per_step / wall_s
    tps = wall_tps or busy_tps
    step_s = tokens_per_step / tps
    first_s = intervals[0][2] if intervals and intervals[0][1] == 1 else None
    total_busy = sum(t for _, _, t, _ in intervals)
    n_steps = intervals[-1][1] if intervals else 0
    eval_s = None
    evals = [e for e in events if e["event"] == "eval"]
    if evals:  # the evaluation after the last step: from the step event before it, less the steps in between
        t_eval = evals[-1]["data"]["ts"]
        earlier = [iv for iv in intervals if iv[3] < t_eval]
        last = intervals[-1]
        if earlier and last[3] >= t_eval:
            eval_s = t_eval - earlier[-1][3] - last[2]
    warnings = [e["data"]["message"] for e in events if e["event"] == "warning"]
    warnings += [w.get("message", "") for w in started.get("warnings") or []]
    return {"tokens_per_s": tps, "tokens_per_s_busy": busy_tps, "tokens_per_s_wall": wall_tps,
            "steady_steps": busy_steps, "wall_window_s": wall_s, "step_s": step_s, "first_step_s": first_s,
            "compile_s": first_s - step_s if first_s is not None else None,
            "warmup_extra_s": total_busy - n_steps * step_s, "final_eval_s": eval_s, "steps": n_steps,
            "flops_per_token": started.get("flops_per_token"), "peak_flops": started.get("peak_flops"),
            "batch": started["batch_size"], "context_length": started["context_length"],
            "parameters": started["parameters"], "dtype": started["dtype"], "device": started["device"],
            "compile": started.get("compile"), "warnings": warnings,
            "loss_first": steps[0]["loss"] if steps else None, "loss_last": steps[-1]["loss"] if steps else None}


def nano_stats(out: dict) -> dict:
    warm = out.get("warmup_step_s") or []
    step_s = out["step_s_median"]
    return {"tokens_per_s": out["tokens_per_s"], "step_s": step_s, "first_step_s": warm[0] if warm else None,
            "compile_s": warm[0] - step_s if warm else None,
            "warmup_extra_s": sum(warm) - len(warm) * step_s, "final_eval_s": None,
            "steady_steps": out["steps"], "flops_per_token": out["flops_per_token"],
            "batch": out["batch"], "context_length": out["shape"]["ctx"], "dtype": out["dtype"],
            "device": out["device"], "compile": {"enabled": out["compile"], "mode": out["compile_mode"]},
            "loss_first": out["losses"][0], "loss_last": out["loss_last"],
            "peak_gpu_mb": out.get("peak_gpu_mb"), "peak_rss_mb": out.get("peak_rss_mb")}


def run_slmb(variant: str, args: argparse.Namespace, shared: Path, batch: int, env: dict, logs: Path,
             timeout: float) -> dict:
    req = logs / f"{variant}-b{batch}.json"
    req.write_text(json.dumps(request(shared, args.ctx, batch, args.steps, args.device, args.smoke, variant)))
    res = run([sys.executable, "-c", CHILD, "train", str(req), "--json", "--no-track"], env, timeout,
              logs / f"{variant}-b{batch}")
    rec: dict[str, Any] = {"batch": batch, "wall_s": res["wall_s"], "rc": res["rc"], "request": str(req)}
    peak = [ln for ln in res["stderr"].splitlines() if ln.startswith("BENCH_PEAK ")]
    if peak:
        rec.update(json.loads(peak[-1].split(" ", 1)[1]))
    if (why := failure(res, timeout)) is not None:
        return {**rec, "status": "failed", "error": why}
    events = [json.loads(ln) for ln in res["stdout"].splitlines() if ln.startswith("{")]
    try:
        return {**rec, **slmb_stats(events, args.skip), "status": "ok"}
    except (StopIteration, KeyError, IndexError, ZeroDivisionError) as exc:
        return {**rec, "status": "failed", "error": f"no usable step events ({type(exc).__name__}: {exc})"}


def run_nano(args: argparse.Namespace, batch: int, env: dict, logs: Path, timeout: float) -> dict:
    dims = ["--emb", str(SMOKE_SHAPE["emb"]), "--layers", str(SMOKE_SHAPE["blocks"]),
            "--heads", str(SMOKE_SHAPE["heads"])] if args.smoke else []
    cmd = [sys.executable, str(HERE / "train.py"), "--peer", "nano", "--shape", "gpt2-124m", "--ctx", str(args.ctx),
           *dims, "--device", args.device, "--dtype", "bf16", *(["--compile"] if args.nano_compile else []),
           "--batch", str(batch),
           "--steps", str(args.steps - args.skip), "--warmup", str(args.skip), "--window"]
    res = run(cmd, env, timeout, logs / f"nano-b{batch}")
    rec: dict[str, Any] = {"batch": batch, "wall_s": res["wall_s"], "rc": res["rc"], "command": " ".join(cmd[1:])}
    if (why := failure(res, timeout)) is not None:
        return {**rec, "status": "failed", "error": why}
    return {**rec, **nano_stats(json.loads(res["stdout"].strip().splitlines()[-1])), "status": "ok"}


def run_all(variants: list[str], fits: list[int], run_variant: Any, timeouts: dict[str, float],
            budget: float) -> dict[str, dict]:
    """Each variant in turn, by ``run_variant(variant, batch, timeout) -> result``, within ``budget`` seconds.

    The first variant tries the batches that fit from the largest down; a run that failed for memory (refused by
    the estimate, or out of memory) is retried one batch size down, any other failure is reported as it is. The
    later variants start at the first one's batch."""
    deadline = time.monotonic() + budget
    results: dict[str, dict] = {}
    batch = fits[0]
    for variant in variants:
        candidates = fits if variant == variants[0] else [b for b in fits if b <= batch] or fits[-1:]
        for b in candidates:  # each retry costs a start-up (and a compile)
            timeout = min(timeouts[variant], deadline - time.monotonic())
            if timeout < 10:
                results[variant] = {"batch": b, "status": "failed", "error": "no time left in --budget"}
                break
            r = results[variant] = run_variant(variant, b, timeout)
            if r["status"] == "ok" or not any(m in r.get("error", "") for m in MEMORY_FAILURES):
                break
        r = results[variant]
        if variant == variants[0] and r["status"] == "ok":
            batch = r["batch"]
        print(f"{variant}: {r['status']}" + (f", {r['tokens_per_s']:,.0f} tokens/s at batch {r['batch']}"
                                             if r["status"] == "ok" else f" ({r.get('error')})"), flush=True)
    return results


def break_even(compiled: dict, eager: dict) -> float | str | None:
    """Steps from which the compiled run takes less time than the eager one ("never"; None: unknown)."""
    if compiled.get("status") != "ok" or eager.get("status") != "ok":
        return None
    saved = eager["step_s"] - compiled["step_s"]
    extra = ((compiled["warmup_extra_s"] + (compiled.get("final_eval_s") or 0))
             - (eager["warmup_extra_s"] + (eager.get("final_eval_s") or 0)))
    if saved <= 0:
        return "never"
    return max(0, math.ceil(extra / saved - 1e-9))


def fmt(x: float | None, spec: str = ",.0f", unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def table(results: dict, peak: float | None, cuda: bool) -> str:
    nano = results.get("nano", {})
    mem = "peak GPU MiB" if cuda else "peak RSS MiB"
    unit, scale = ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)
    rows = [f"| run | batch | tokens/s | model {unit} | MFU | vs nanoGPT | {mem} | compile s | pays after (steps) "
            "| process s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, r in results.items():
        if r.get("status") != "ok":
            rows.append(f"| {LABELS[variant]} | {r.get('batch', '-')} | failed: {r.get('error', '?')[:160]} "
                        "| | | | | | | |")
            continue
        flops = r["tokens_per_s"] * r["flops_per_token"] if r.get("flops_per_token") else None
        mfu = flops / peak if flops and peak else None
        ratio = r["tokens_per_s"] / nano["tokens_per_s"] if nano.get("status") == "ok" else None
        pays = r.get("pays_after_steps")
        pays_text = "-" if pays is None else pays if isinstance(pays, str) else f"{pays:,}"
        label = LABELS[variant] + (" + compile" if variant == "nano" and r["compile"]["enabled"] else "")
        rows.append(f"| {label} | {r['batch']} | {fmt(r['tokens_per_s'])} | {fmt(flops and flops / scale, '.1f')} "
                    f"| {'-' if mfu is None else ('>100% (peak measured low)' if mfu > 1 else f'{mfu:.1%}')} "
                    f"| {fmt(ratio, '.2f', 'x')} | {fmt(r.get('peak_gpu_mb') if cuda else r.get('peak_rss_mb'))} "
                    f"| {fmt(r.get('compile_s'), '.1f')} | {pays_text} | {fmt(r.get('wall_s'), '.0f')} |")
    return "\n".join(rows)


def environment(device: str) -> dict:
    import torch

    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "python": sys.version.split()[0]}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        from slmb.core.runtime import cpu_model

        info["cpu"] = cpu_model()
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the CPU at a toy shape (a minute)")
    ap.add_argument("--variants", default="eager,nano,graphs,compile", help="comma-separated, run in this order")
    ap.add_argument("--device", default=None)
    ap.add_argument("--ctx", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="max_steps of each slmb run (the peer: steps - skip)")
    ap.add_argument("--skip", type=int, default=None, help="steps left out of the steady state (compile, warm-up)")
    ap.add_argument("--batches", default=None, help="candidate batch sizes, e.g. 64,32,16,8 (the largest that "
                                                    "fits is used)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all variants together")
    ap.add_argument("--shared", default=None, help="folder with requests/ and datasets/ (default: SLMB_SHARED_DIR)")
    ap.add_argument("--warm-cache", action="store_true", help="one Inductor cache for every run (always with "
                                                              "--smoke)")
    ap.add_argument("--nano-compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the nanoGPT peer (default: yes; --smoke: no, a CPU compile takes a minute)")
    ap.add_argument("--json", type=Path, default=None, help="default: $OUT/gpu_training.json when $OUT is set")
    ap.add_argument("--logs", type=Path, default=None, help="write each run's request, events and stderr here "
                                                             "(default: the work folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (SLMB_HOME with the trained models, "
                                                         "Inductor caches, logs); removed by default")
    args = ap.parse_args()
    preset = SMOKE if args.smoke else GPU
    for key in ("device", "ctx", "steps", "skip", "budget"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.nano_compile is None:
        args.nano_compile = not args.smoke
    batches = [int(b) for b in args.batches.split(",")] if args.batches else list(preset["batches"])
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(LABELS):
        sys.exit(f"unknown variants: {sorted(unknown)} (known: {', '.join(LABELS)})")
    if args.skip >= args.steps:
        sys.exit("--skip must be below --steps")
    json_path = args.json or (Path(os.environ["OUT"]) / "gpu_training.json" if os.environ.get("OUT") else None)
    shared = shared_dir(args.shared)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("CUDA is not available here: run on a GPU machine, or use --smoke")
    work = Path(tempfile.mkdtemp(prefix="gpu-training-"))
    env = {**os.environ, "SLMB_HOME": str(work / "home"), "SLMB_SHARED_DIR": str(shared),
           "SLMB_DATA_DIR": os.environ.get("SLMB_DATA_DIR") or str(shared / "datasets"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "SLMB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if (shared / "tokenizers").is_dir():
        env.setdefault("SLMB_TOKENIZER_DIR", str(shared / "tokenizers"))
    if args.smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    fits, estimates = pick_batch(shared, args.ctx, args.device, args.smoke, batches)
    info = {**environment(args.device), "device": args.device, "smoke": args.smoke, "context_length": args.ctx,
            "steps": args.steps, "skip": args.skip, "batch_candidates": fits,
            "estimated_peak_mib": estimates, "work_dir": str(work)}
    print(f"# {info.get('gpu') or info.get('cpu')}, torch {info['torch']}, {info['date']}; context {args.ctx}, "
          f"batches that fit (estimate): {fits}; work folder {work}", flush=True)

    logs = args.logs or work  # each run's request, events and stderr, written as it runs
    logs.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}

    def run_variant(variant: str, batch: int, timeout: float) -> dict:
        cache = "inductor" if args.warm_cache or args.smoke else f"inductor-{variant}-b{batch}"
        env_v = {**env, "TORCHINDUCTOR_CACHE_DIR": str(work / cache)}
        if variant == "nano":
            r = run_nano(args, batch, env_v, logs, timeout)
        else:
            r = run_slmb(variant, args, shared, batch, env_v, logs, timeout)
        done[variant] = r
        if json_path:  # what has run so far survives a session cut short
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps({**info, "partial": True, "results": done}, indent=1, default=str))
        return r

    results = run_all(variants, fits, run_variant, preset["timeouts"], args.budget)
    for variant in ("graphs", "compile"):
        if variant in results and "eager" in results:
            results[variant]["pays_after_steps"] = break_even(results[variant], results["eager"])
    peaks = [r["peak_flops"] for r in results.values() if r.get("status") == "ok" and r.get("peak_flops")]
    peak, peak_source = max(peaks, default=None), "the best the slmb runs measured (runtime.trusted_peak)"
    if peak is None:  # no slmb run got as far as its started event: measure here, as the trainer would
        import torch

        from slmb.core.runtime import matmul_peak

        peak, peak_source = matmul_peak(torch.device(args.device), "bf16"), "measured here (runtime.matmul_peak)"
    text = table(results, peak, args.device.startswith("cuda"))
    notes = []
    for variant in ("graphs", "compile"):
        r = results.get(variant, {})
        chosen = r.get("compile")
        if r.get("status") == "ok" and chosen is not None and (
                not chosen.get("enabled") or bool(chosen.get("cuda_graphs")) != (variant == "graphs")):
            notes.append(f"{variant}: the trainer chose {chosen} (not what the variant asked for)")
        if r.get("status") == "ok" and chosen is None:
            notes.append(f"{variant}: the trainer reported no `compile` on its started event (a trainer older than "
                         "the compile/cuda_graphs keys: cuda_graphs may have been ignored)")
        for w in r.get("warnings", []):
            notes.append(f"{variant}: warning: {w}")
    unit, scale = ("TFLOP/s", 1e12) if args.device.startswith("cuda") else ("GFLOP/s", 1e9)
    print(f"\nbf16 matmul peak: {fmt(peak / scale, ',.1f')} {unit}, {peak_source}\n")
    print(text)
    for n in notes:
        print(f"\n- {n}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({**info, "peak_flops": peak, "peak_source": peak_source, "results": results,
                                         "table": text, "notes": notes}, indent=1, default=str))
        print(f"\nJSON: {json_path}")
    if args.logs and (work / "home" / "peaks.json").is_file():
        shutil.copy(work / "home" / "peaks.json", args.logs / "peaks.json")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
