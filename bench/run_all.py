"""Every benchmark in one command: matmul peak, training (slmb vs Hugging Face vs nanoGPT-style) and generation.

Each training measurement is a fresh process (allocator state matters), the peers alternate round-robin, and
``--reps`` rounds give a median and a spread. Prints Markdown tables (the ones in docs/benchmarks.md);
``--json PATH`` also keeps the raw runs.

    .venv/bin/python bench/run_all.py [--reps 3] [--quick]          # CPU, ~10 min on the 2-core dev box
    python3 bench/run_all.py --device cuda --reps 2                  # on a GPU: bf16, fused AdamW, compile
    .venv/bin/python bench/run_all.py --loop                         # + loop overhead (bench/loop_overhead.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"

# (label, bench/train.py arguments). The first rows are the headline; the rest measure one lever each.
# The BASELINE row (Hugging Face's default) is the 1.00x of the "vs HF default" column.
BASELINE_CPU = "HF GPT2LMHeadModel default (fp32, glibc)"
BASELINE_CUDA = "HF GPT2LMHeadModel default (fp32, eager)"
CPU_TRAIN = [
    ("slmb default (dtype auto, chunked CE, mallopt)", ["--peer", "slmb", "--dtype", "auto"]),
    (BASELINE_CPU, ["--peer", "hf", "--dtype", "fp32"]),
    ("slmb fp32 (chunked CE, mallopt)", ["--peer", "slmb", "--dtype", "fp32"]),
    ("slmb fp32, full-logits CE", ["--peer", "slmb", "--dtype", "fp32", "--loss", "full"]),
    ("slmb fp32, glibc default allocator", ["--peer", "slmb", "--dtype", "fp32", "--alloc", "default"]),
    ("slmb bf16, unfused AdamW", ["--peer", "slmb", "--dtype", "bf16", "--adam", "default"]),
    ("slmb bf16, full-logits CE", ["--peer", "slmb", "--dtype", "bf16", "--loss", "full"]),
    ("HF bf16 (glibc)", ["--peer", "hf", "--dtype", "bf16"]),
    ("HF fp32 + mallopt", ["--peer", "hf", "--dtype", "fp32", "--alloc", "mallopt"]),
    ("HF bf16 + mallopt", ["--peer", "hf", "--dtype", "bf16", "--alloc", "mallopt"]),
    ("HF fp32 + jemalloc preload", ["--peer", "hf", "--dtype", "fp32", "--alloc", "jemalloc"]),
    ("nanoGPT fp32 + mallopt", ["--peer", "nano", "--dtype", "fp32", "--alloc", "mallopt"]),
    ("nanoGPT bf16 + mallopt", ["--peer", "nano", "--dtype", "bf16", "--alloc", "mallopt"]),
]
QUICK = {0, 1, 2, 11}
BASELINE_CUDA_64 = "HF GPT2LMHeadModel default (fp32, eager), batch 64"
CUDA_TRAIN = [  # most important first: a GPU lease may end before the last row
    ("slmb default (auto = bf16, eager)", ["--peer", "slmb", "--dtype", "auto"]),
    (BASELINE_CUDA, ["--peer", "hf", "--dtype", "fp32"]),
    ("slmb bf16 + compile", ["--peer", "slmb", "--dtype", "auto", "--compile"]),
    ("slmb bf16 + compile (CUDA graphs)", ["--peer", "slmb", "--dtype", "auto", "--compile-mode", "reduce-overhead"]),
    ("HF bf16 + compile", ["--peer", "hf", "--dtype", "bf16", "--compile"]),
    ("nanoGPT bf16 + compile", ["--peer", "nano", "--dtype", "bf16", "--compile"]),
    ("slmb bf16, full-logits CE", ["--peer", "slmb", "--dtype", "auto", "--loss", "full"]),
    ("slmb default (auto = bf16, eager), batch 64", ["--peer", "slmb", "--dtype", "auto", "--batch", "64"]),
    (BASELINE_CUDA_64, ["--peer", "hf", "--dtype", "fp32", "--batch", "64"]),
    ("slmb bf16 + compile, batch 64", ["--peer", "slmb", "--dtype", "auto", "--compile", "--batch", "64"]),
    ("HF bf16 + compile, batch 64", ["--peer", "hf", "--dtype", "bf16", "--compile", "--batch", "64"]),
    ("nanoGPT bf16 + compile, batch 64", ["--peer", "nano", "--dtype", "bf16", "--compile", "--batch", "64"]),
]


def run_json(args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(device: str) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    import transformers

    gpu = f", GPU {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores ({', '.join(bf16) or 'no native bf16'}){gpu}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}; "
            f"{datetime.date.today().isoformat()}")


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}"


def train_table(runs: dict[str, list[dict]], peak: dict, baselines: list[str], cuda: bool) -> str:
    """The Markdown training table: median tokens/s, spread, ratio to the median of the ``baselines`` row run at
    the same batch size, model FLOP/s and MFU against the measured matmul peak of the row's precision, peak
    memory. Rows with no run are left out; without a baseline run at the row's batch size the ratio column says
    so instead of printing nan."""
    runs = {label: rs for label, rs in runs.items() if rs}
    base = {runs[b][0]["batch"]: statistics.median(r["tokens_per_s"] for r in runs[b]) for b in baselines if b in runs}
    mem = "peak GPU MB" if cuda else "peak RSS MB"
    lines = [f"| run | dtype | tokens/s (median) | spread | vs HF default (same batch) | model GFLOP/s | "
             f"% of peak (MFU) | {mem} |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, rs in runs.items():
        tps = [r["tokens_per_s"] for r in rs]
        med = statistics.median(tps)
        flops = statistics.median(r["flops_per_s"] for r in rs)
        pk = peak["bf16_flops"] if rs[0]["dtype"] == "bf16" else peak["fp32_flops"]
        memory = statistics.median(r["peak_gpu_mb" if cuda else "peak_rss_mb"] for r in rs)
        b = base.get(rs[0]["batch"])
        ratio = f"{med / b:.2f}x" if b else "(no baseline run)"
        lines.append(f"| {label} | {rs[0]['dtype']} | {med:,.0f} | {spread(tps)} | {ratio} | {flops / 1e9:,.1f} | "
                     f"{100 * flops / pk:.0f}% | {memory:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="headline rows only (slmb, HF, nanoGPT)")
    ap.add_argument("--rows", default=None, help="comma-separated row numbers of the CPU table to run (0 = first)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--loop", action="store_true", help="also bench/loop_overhead.py: `slmb train` end to end against "
                    "the bare step (~8 min on the CPU at --reps 3)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run (default: all cores)")
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    cuda = args.device.startswith("cuda")
    steps = args.steps or (50 if cuda else 8)
    print(f"**Machine:** {machine('cuda' if cuda else 'cpu')}\n")

    peak = run_json([str(HERE / "peak.py"), "--device", args.device])
    threads = f"{peak['threads']} thread" + ("s" if peak["threads"] != 1 else "")
    print(f"Matmul peak ({threads}): fp32 {peak['fp32_flops'] / 1e9:,.0f} GFLOP/s "
          f"({peak.get('fp32_n', peak['n'])}³), bf16 {peak['bf16_flops'] / 1e9:,.0f} GFLOP/s "
          f"({peak.get('bf16_n', peak['n'])}³)\n")

    rows = {int(i) for i in args.rows.split(",")} if args.rows else QUICK if args.quick else set(range(len(CPU_TRAIN)))
    configs = CUDA_TRAIN if cuda else [c for i, c in enumerate(CPU_TRAIN) if i in rows]
    runs: dict[str, list[dict]] = {label: [] for label, _ in configs}
    for rep in range(args.reps):
        for label, extra in configs:
            env = {"LD_PRELOAD": JEMALLOC} if "jemalloc" in extra else None
            try:
                r = run_json([str(HERE / "train.py"), "--device", args.device, "--steps", str(steps),
                              "--batch", str(args.batch), *extra], env)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:  # one broken peer must not lose the rest
                print(f"<!-- rep {rep + 1}: {label}: FAILED {str(exc)[-600:]} -->", flush=True)
                continue
            runs[label].append(r)
            print(f"<!-- rep {rep + 1}: {label}: {r['tokens_per_s']:,.0f} tokens/s -->", flush=True)
            if args.json:
                args.json.write_text(json.dumps({"peak": peak, "train": runs}, indent=1))
    print(f"\nTraining, GPT-2 shape (V 50257, E 256, 4 blocks, 4 heads, T 128, batch {args.batch} unless the row "
          f"says otherwise), {steps} timed steps after 3 warm-up, {args.reps} fresh processes per row, alternated\n")
    print(train_table(runs, peak, [BASELINE_CUDA, BASELINE_CUDA_64] if cuda else [BASELINE_CPU], cuda))

    gen = []
    if not args.skip_generate:
        for _ in range(args.reps):
            gen.append(run_json([str(HERE / "generate.py"), "--reps", "2", "--device", args.device, "--json"]))
        names = list(gen[0]["seconds"])
        new = gen[0]["new_tokens"]
        same = all(g["identical"] for g in gen)
        peer = statistics.median(t for g in gen for t in g["seconds"]["HF generate (cache)"])
        print(f"\nGeneration: batch 1, 16-token prompt, {new} new tokens, greedy; {args.reps} fresh processes x 2 "
              f"alternated runs; identical tokens on all exact paths: {'yes' if same else 'NO'}; peak RSS "
              f"{statistics.median(g['peak_rss_mb'] for g in gen):,.0f} MB\n")
        print("| path | tokens/s (median) | spread | vs HF generate | model GFLOP/s |")
        print("|---|---:|---:|---:|---:|")
        for name in names:
            ts = [t for g in gen for t in g["seconds"][name]]
            med = statistics.median(ts)
            print(f"| {name} | {new / med:,.0f} | {new / max(ts):,.0f}-{new / min(ts):,.0f} | {peer / med:.2f}x | "
                  f"{gen[0]['flops_per_token'] * new / med / 1e9:,.1f} |")
    loop = None
    if args.loop:
        proc = subprocess.run([sys.executable, str(HERE / "loop_overhead.py"), "--reps", str(args.reps), "--device",
                               args.device], capture_output=True, text=True, cwd=ROOT, timeout=7200)
        if proc.returncode != 0:
            print(f"<!-- loop overhead: FAILED {proc.stderr[-600:]} -->")
        else:
            *text, last = proc.stdout.strip().splitlines()
            loop = json.loads(last)
            print("\nLoop overhead (`slmb train` end to end against the bare step, bench/loop_overhead.py)")
            print("\n".join(line for line in text if not line.startswith("<!--")))
    if args.json:
        args.json.write_text(json.dumps({"peak": peak, "train": runs, "generate": gen, "loop": loop}, indent=1))


if __name__ == "__main__":
    main()
