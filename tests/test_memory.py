"""Admission control: the peak-memory estimate (slmb/core/memory.py) against measured peaks, its exact terms,
the limit setting, and the refusals of `slmb validate`, `slmb train` and the trainer.

The measured peak is the VmHWM of a real `train()` in a subprocess (one thread), reset after the imports, so
it is the run's own growth; docs/memory.md has the same table with numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, shared_dir

from slmb.core import memory
from slmb.core.validate import validate

MiB = 1 << 20


def canvas(E: int = 64, V: int = 257, blocks: int = 1, B: int = 4, T: int = 32, *, llama: bool = False,
           dropout: float = 0.0, tied: bool = False, name: str = "mem", **config: Any) -> dict[str, Any]:
    """A GPT-2-like (LayerNorm, learned positions, MHA, GELU) or Llama-like (RMSNorm, GQA with RoPE, SwiGLU)
    canvas on the byte tokenizer; a vocabulary above 257 is a padded head (wider than the tokenizer needs)."""
    def node(type_: str, id_: str, **data: Any) -> dict[str, Any]:
        return {"type": type_, "data": {"id": id_, **data}}

    heads = max(1, E // 32)
    if llama:
        block = [node("normalization", "n1", normType="RMS Normalization"),
                 node("gqAttention", "attn", numHeads=heads, numKvGroups=max(1, heads // 2), dropoutRate=dropout),
                 node("residual", "r1", source="n1:in"),
                 node("normalization", "n2", normType="RMS Normalization"),
                 node("feedForward", "ff", hiddenDim=3 * E, feedForwardType="Gated", actFunc="SwiGLU"),
                 node("residual", "r2", source="n2:in")]
        first = [node("tokenEmbedding", "tok", vocabSize=V, embDim=E)]
        norm = "RMS Normalization"
    else:
        block = [node("normalization", "n1", normType="Layer Normalization"),
                 node("mhAttention", "attn", numHeads=heads, dropoutRate=dropout),
                 node("dropout", "d1", dropoutRate=dropout),
                 node("residual", "r1", source="n1:in"),
                 node("normalization", "n2", normType="Layer Normalization"),
                 node("feedForward", "ff", hiddenDim=4 * E, feedForwardType="Standard", actFunc="GELU"),
                 node("dropout", "d2", dropoutRate=dropout),
                 node("residual", "r2", source="n2:in")]
        first = [node("tokenEmbedding", "tok", vocabSize=V, embDim=E),
                 node("positionalEmbedding", "pos", posType="Learned Positional Embedding", ctxLength=T)]
        norm = "Layer Normalization"
    cfg = {"context_length": T, "stride": T, "batch_size": B, "tokenizer": "byte", "dtype": "fp32", "device": "cpu",
           "max_steps": 2, "warmup_steps": 1, "eval_every": 2, "eval_batches": 1, "max_rows": 2000, **config}
    return {"modelName": name, "dataset": "tiny_shakespeare", "config": cfg, "model": [
        *first, {"type": "transformerBlock", "data": {"id": "blk", "numOfBlocks": blocks}, "children": block},
        node("normalization", "nf", normType=norm), node("linear", "head", outDim=V, weightTying=tied)]}


def estimate_of(body: dict[str, Any]) -> memory.MemoryEstimate:
    report = validate(body)
    assert report.ok, report.errors
    return report.summary.estimate


# -- measured peaks ------------------------------------------------------------------------------------------

MEASURE = textwrap.dedent("""
    import json, sys
    import slmb.core.tracking, slmb.core.trainer  # what a worker has imported before its first run

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    baseline = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS: the peak from here on is the run's
    result = slmb.core.trainer.train(json.load(open(sys.argv[1])), track=False)
    print(json.dumps({"state": result.state, "baseline": baseline, "peak": status("VmHWM")}))
""")

# (name, canvas): each dominated by a different term, 20-300 MB, a couple of seconds of training each.
CASES = {
    "wide-vocab head": canvas(E=256, V=16384, blocks=1, B=8, T=64),
    "deep, activations": canvas(E=128, blocks=8, B=16, T=128),
    "attention dropout (math SDPA)": canvas(E=128, blocks=2, B=4, T=512, dropout=0.1),
    "llama-like, GQA + SwiGLU": canvas(E=256, V=4096, blocks=2, B=8, T=128, llama=True, tied=True),
    "weights, accum 2 + early stopping": canvas(E=512, V=8192, blocks=2, B=2, T=32, grad_accum_steps=2,
                                                early_stopping_patience=1, val_fraction=0.1),
}


def measure(body: dict[str, Any], tmp_path: Path) -> dict[str, int]:
    path = tmp_path / f"{body['modelName']}.json"
    path.write_text(json.dumps(body))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLMB_HOME": str(tmp_path / "home"),
           "SLMB_DATA_DIR": str(shared_dir() / "datasets")}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["state"] == "finished"
    return result


@pytest.fixture(scope="module")
def fixed_cost(tmp_path_factory) -> tuple[memory.MemoryEstimate, dict[str, int]]:
    """A run of a tiny model: what any run costs besides its model (lazy imports, data, allocator arenas)."""
    body = canvas(E=16, B=1, T=8, name="tiny")
    return estimate_of(body), measure(body, tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_bounds_the_measured_peak(case, fixed_cost, tmp_path):
    """Never below the measured peak; at most twice the measured footprint of the model itself (the peak less
    a tiny model's peak), where the constant runtime term cannot hide an error."""
    tiny_est, tiny = fixed_cost
    body = {**CASES[case], "modelName": "m" + str(abs(hash(case)))}
    est = estimate_of(body)
    measured = measure(body, tmp_path)
    model_measured, model_estimate = measured["peak"] - tiny["peak"], est.peak - tiny_est.peak
    print(f"{case}: estimate {est.peak / MiB:.0f} MiB, measured {measured['peak'] / MiB:.0f} MiB; "
          f"model part {model_estimate / MiB:.1f} vs {model_measured / MiB:.1f} MiB "
          f"({model_estimate / model_measured:.2f}x)")
    assert model_measured > 20 * MiB  # the model dominates allocator noise
    assert est.peak >= measured["peak"]
    assert model_estimate >= model_measured
    assert model_estimate <= 2 * model_measured


def test_runtime_term_covers_a_tiny_run(fixed_cost):
    tiny_est, tiny = fixed_cost
    assert tiny_est.terms["runtime"] >= tiny["peak"] >= tiny["baseline"]
