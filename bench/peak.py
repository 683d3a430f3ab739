"""The machine's matmul ceiling: FLOP/s of a square matmul in fp32 and bf16 (median of ``--reps`` after warm-up).

    .venv/bin/python bench/peak.py [--n 2048] [--device cpu]    # prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help="2048 on a CPU, 8192 on a GPU")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    n = args.n or (8192 if dev.type == "cuda" else 2048)
    if dev.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", len(os.sched_getaffinity(0)))))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out = {"n": n, "device": str(dev), "threads": torch.get_num_threads()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        times = []
        for i in range(args.reps + 2):
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out[f"{name}_flops"] = 2 * n**3 / statistics.median(times)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
