"""bf16 autocast vs fp32 across model sizes: the numbers behind ``runtime.AUTO_BF16_MIN_PARAMS``.

Each size trains a few steps through the trainer's ``TrainStep`` (chunked CE, fused AdamW, allocator fix) in fp32
and in bf16, alternating, and prints tokens/s and the bf16/fp32 ratio.

    .venv/bin/python bench/dtype_sizes.py [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from toy import toy_request

from slmb.core.compiler import build_model
from slmb.core.runtime import autocast_for, prepare_device
from slmb.core.spec import TrainRequest
from slmb.core.trainer import TrainStep, make_optimizer

# (d, blocks, vocab, context, batch)
SIZES = [(64, 1, 257, 64, 16), (128, 2, 257, 64, 16), (256, 4, 257, 128, 8), (64, 2, 50257, 64, 16),
         (128, 2, 50257, 64, 16), (256, 4, 50257, 128, 8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cpu")
    prepare_device(device)
    print(f"threads {torch.get_num_threads()}")
    print("| d | blocks | vocab | T x B | parameters | fp32 tokens/s | bf16 tokens/s | bf16 / fp32 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d, blocks, vocab, ctx, batch in SIZES:
        req = TrainRequest.model_validate(toy_request(d=d, blocks=blocks, vocab=vocab, ctx=ctx))
        torch.manual_seed(0)
        x = torch.randint(0, vocab, (batch, ctx))
        y = torch.randint(0, vocab, (batch, ctx))
        rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
        steps = {}
        for dtype in rates:
            model = build_model(req)
            _, autocast, _ = autocast_for(dtype, device)
            steps[dtype] = TrainStep(model, make_optimizer(model, 1e-4, 0.1, device), autocast, device)
            for _ in range(2):
                steps[dtype]([(x, y)], 1e-4)
        for _ in range(args.reps):
            for dtype, step in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step([(x, y)], 1e-4)
                rates[dtype].append(args.steps * batch * ctx / (time.perf_counter() - t0))
        f32, b16 = statistics.median(rates["fp32"]), statistics.median(rates["bf16"])
        n = steps["fp32"].model.num_parameters()
        print(f"| {d} | {blocks} | {vocab} | {ctx} x {batch} | {n / 1e6:.2f} M | {f32:,.0f} | {b16:,.0f} | "
              f"{b16 / f32:.2f} |", flush=True)


if __name__ == "__main__":
    main()
