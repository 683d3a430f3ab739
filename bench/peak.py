"""The machine's matmul ceiling: FLOP/s of a square matmul in fp32 and bf16 (``runtime.matmul_peak``: the best
of ``--reps`` after a warm-up, the same measurement the trainer's MFU is reported against).

    .venv/bin/python bench/peak.py [--n 2048] [--device cpu] [--record]    # prints one JSON line

``--record`` also keeps each measurement in ``$SLMB_HOME/peaks.json`` where it beats the one recorded
(``runtime.trusted_peak``): run it on a quiet machine and later runs report MFU against it.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from slmb.core.runtime import matmul_peak, matmul_peak_size, trusted_peak
from slmb.core.store import slmb_home


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help="2048 on a CPU, 8192 on a GPU")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget", type=float, default=20.0,
                    help="seconds per precision at most: a CPU shrinks the product to fit (bf16 without native "
                         "support runs below 1 GFLOP/s)")
    ap.add_argument("--record", action="store_true", help="keep the measurements in $SLMB_HOME/peaks.json where "
                                                           "they beat the recorded ones (the trainer's MFU peak)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    n = args.n or (8192 if dev.type == "cuda" else 2048)
    if dev.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", len(os.sched_getaffinity(0)))))
    out = {"n": n, "device": str(dev), "threads": torch.get_num_threads()}
    for name in ("fp32", "bf16"):
        out[f"{name}_n"] = matmul_peak_size(dev, name, n, args.reps, args.budget)
        out[f"{name}_flops"] = matmul_peak(dev, name, n=out[f"{name}_n"], reps=args.reps, budget_s=None)
        if args.record:
            out[f"{name}_recorded"] = trusted_peak(dev, name, slmb_home(), measure=lambda f=out[f"{name}_flops"]: f)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
