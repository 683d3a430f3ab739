"""Generation throughput: slmb (with and without KV cache) beside Hugging Face ``generate`` on one model.

Batch 1, a 16-token prompt, 256 new tokens, greedy, the GPT-2 benchmark shape (vocab 50257, emb 256,
4 blocks, 4 heads). The context is 512 so that 16 + 256 tokens fit HF's position table. Both sides hold
the same weights (copied from the HF model), so greedy decoding must produce the same tokens; the script
checks that before it reports speed. Runs alternate between the peers; medians over ``--reps``.
"slmb (KV cache, bf16 weights)" decodes with a bf16 copy of the weights (``Generator(dtype=torch.bfloat16)``):
faster, not bit-identical, so it is left out of the equality check. bench/run_all.py runs this in fresh processes.

    .venv/bin/python bench/generate.py [--reps 3] [--new 256] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the HF <-> slmb weight mapping

from hf_convert import gpt2_body, load_gpt2

from slmb.core.compiler import build_model
from slmb.core.generate import Generator, SamplingParams
from slmb.core.spec import TrainRequest
from slmb.core.tokenizers import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON line (seconds per run) instead of a table")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", len(os.sched_getaffinity(0)))))
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=50257, n_embd=256, n_layer=4, n_head=4, n_positions=512,
                     activation_function="gelu_new")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(cfg).eval().to(args.device)
    body = gpt2_body(cfg, "gelu_tanh", tied=True)
    slm = build_model(TrainRequest.model_validate(body))
    load_gpt2(slm, hf)
    slm = slm.to(args.device).eval()

    tok = load_tokenizer("gpt2")
    prompt_ids = tok.encode("It was the best of times, it was the worst of times, it was the age of wisdom")[:16]
    prompt = tok.decode(prompt_ids)
    assert tok.encode(prompt) == prompt_ids
    params = SamplingParams(max_new_tokens=args.new, temperature=0, stop_at_eos=False)
    cached, uncached = Generator(slm, tok), Generator(slm, tok, use_cache=False)
    half = Generator(slm, tok, dtype=torch.bfloat16)
    x = torch.tensor([prompt_ids], device=args.device)

    def run_hf(use_cache: bool) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(x, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                              use_cache=use_cache, pad_token_id=tok.eos_id)
        return out[0, len(prompt_ids):].tolist()

    runners = {
        "slmb (KV cache)": lambda: cached.generate(prompt, params).token_ids,
        "slmb (no cache)": lambda: uncached.generate(prompt, params).token_ids,
        "HF generate (cache)": lambda: run_hf(True),
        "slmb (KV cache, bf16 weights)": lambda: half.generate(prompt, params).token_ids,
    }
    tokens = {name: fn() for name, fn in runners.items()}  # warm-up, and the equality check
    same = len({tuple(t) for name, t in tokens.items() if "bf16" not in name}) == 1
    agree = sum(a == b for a, b in zip(tokens["slmb (KV cache, bf16 weights)"], tokens["HF generate (cache)"],
                                       strict=True))
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.reps):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    if args.json:
        n_params = sum(p.numel() for n, p in hf.named_parameters() if "wpe" not in n)
        print(json.dumps({"new_tokens": args.new, "identical": same, "bf16_agree": agree, "seconds": times,
                          "flops_per_token": 2 * n_params,
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        sys.exit(0 if same else 1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, device {args.device}")
    print(f"batch 1, prompt 16, new {args.new}, greedy; identical tokens on all exact paths: "
          f"{'yes' if same else 'NO'}; bf16 weights agree with HF on {agree}/{args.new} tokens")
    peer = statistics.median(times["HF generate (cache)"])
    print(f"{'':30}{'tokens/s':>10}{'spread':>16}{'vs HF':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rates = sorted(args.new / t for t in ts)
        print(f"{name:30}{args.new / med:10.1f}{f'{rates[0]:.0f}-{rates[-1]:.0f}':>16}{peer / med:7.2f}x")
    if not same:
        sys.exit("token mismatch between slmb and Hugging Face")


if __name__ == "__main__":
    main()
