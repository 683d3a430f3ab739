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
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, shared_dir

from slmb.core import memory
from slmb.core.validate import validate

pytest_plugins = ["service_fixtures"]
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
TINY = canvas(E=16, B=1, T=8)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, dict[str, int]]:
    """Every case's peak, each in a process of its own (the allocator keeps freed memory: one process per
    measurement), all at once: a busy machine shares its cores between them rather than running them in turn.
    "tiny" is a run of a tiny model: what any run costs besides its model (lazy imports, data, arenas)."""
    tmp = tmp_path_factory.mktemp("measure")
    procs = {}
    for name, body in {**CASES, "tiny": TINY}.items():
        path = tmp / f"{len(procs)}.json"
        path.write_text(json.dumps({**body, "modelName": f"case-{len(procs)}"}))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SLMB_HOME": str(tmp / f"home-{len(procs)}"),
               "SLMB_DATA_DIR": str(shared_dir() / "datasets")}
        procs[name] = subprocess.Popen([sys.executable, "-c", MEASURE, str(path)], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
        results[name] = json.loads(out.strip().splitlines()[-1])
        assert results[name]["state"] == "finished"
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_bounds_the_measured_peak(case, measured):
    """Never below the measured peak; at most twice the measured footprint of the model itself (the peak less
    a tiny model's peak), where the constant runtime term cannot hide an error."""
    est, tiny_est = estimate_of(CASES[case]), estimate_of(TINY)
    peak, tiny = measured[case]["peak"], measured["tiny"]["peak"]
    model_measured, model_estimate = peak - tiny, est.peak - tiny_est.peak
    print(f"{case}: estimate {est.peak / MiB:.0f} MiB, measured {peak / MiB:.0f} MiB; "
          f"model part {model_estimate / MiB:.1f} vs {model_measured / MiB:.1f} MiB "
          f"({model_estimate / model_measured:.2f}x)")
    assert model_measured > 20 * MiB  # the model dominates allocator noise
    assert est.peak >= peak
    assert model_estimate >= model_measured
    assert model_estimate <= 2 * model_measured


def test_runtime_term_covers_a_tiny_run(measured):
    tiny = measured["tiny"]
    assert estimate_of(TINY).terms["runtime"] >= tiny["peak"] >= tiny["baseline"]

# -- exact terms ---------------------------------------------------------------------------------------------

def test_state_terms_are_four_bytes_per_parameter_each():
    body = canvas(E=64, V=257, blocks=2, B=4, T=32)
    est = estimate_of(body)
    P = (2 * 257 * 64 + 32 * 64  # embedding, head, positions
         + 2 * (2 * 2 * 64 + 64 * 3 * 64 + 64 * 64 + 64 * 256 + 256 * 64)  # blocks: 2 LayerNorms, no biases
         + 2 * 64)  # final LayerNorm
    assert est.parameters == P == 133_888
    t = est.terms
    assert (t["weights"], t["gradients"], t["adamw_states"], t["best_weights"]) == (4 * P, 4 * P, 8 * P, 0)
    assert (t["weight_casts"], t["runtime"], est.dtype, est.device) == (0, memory.RUNTIME_BYTES["cpu"], "fp32", "cpu")
    N = 4 * 32
    # fp32 chunked loss head: dL/dh and dL/dW filled while one (N, V) chunk of logits and its dL/dh rows exist
    assert t["loss_head"] == max(N * 64 * 4 + 257 * 64 * 4 + N * 257 * 4 + N * 64 * 4, 2 * N * 64 * 4 + 257 * 64 * 4)
    assert est.peak == sum(t.values())
    patient = estimate_of(canvas(E=64, V=257, blocks=2, B=4, T=32, early_stopping_patience=2))
    assert patient.terms["best_weights"] == 4 * P and patient.peak == est.peak + 4 * P
    # activations grow with the micro-batch (batch_size), not with grad_accum_steps
    assert estimate_of(canvas(E=64, blocks=2, B=8, T=32)).terms["activations"] > t["activations"]
    assert estimate_of(canvas(E=64, blocks=2, B=4, T=32, grad_accum_steps=4)).peak == est.peak


def test_bf16_and_cuda_terms():
    # Judged for a CUDA worker (bf16 by default there): weights cast to bf16, full logits when they are small.
    est = estimate_of(canvas(E=64, V=257, blocks=1, B=4, T=32, device="cuda", dtype="auto"))
    N = 4 * 32
    assert (est.device, est.dtype, est.terms["runtime"]) == ("cuda", "bf16", 1 << 30)
    assert est.terms["loss_head"] == N * 257 * (2 + 12)
    assert est.terms["weight_casts"] == 2 * (64 * 3 * 64 + 64 * 64 + 2 * 64 * 256 + 64 * 257)


def test_parse_bytes():
    assert memory.parse_bytes("16GiB") == 16 << 30
    assert memory.parse_bytes("500MB") == 500_000_000
    assert memory.parse_bytes("1.5g") == 3 << 29
    assert memory.parse_bytes("2 TiB") == 2 << 40
    assert memory.parse_bytes("123") == 123 and memory.parse_bytes(4096) == 4096
    assert memory.parse_bytes("64k") == 65536 and memory.parse_bytes("1kb") == 1000
    for bad in ("", "lots", "16 GiBs", "-1GB", "0", "1e9"):
        with pytest.raises(ValueError, match="memory size"):
            memory.parse_bytes(bad)


def test_worker_memory_default_and_setting(monkeypatch):
    monkeypatch.delenv("SLMB_WORKER_MEMORY", raising=False)
    ram = memory._ram_bytes()
    limit, source = memory.worker_memory("cpu")
    assert limit == ram - max(ram // 10, memory.MIN_RESERVE) or limit == ram // 2
    assert 0 < limit < ram and "RAM" in source
    monkeypatch.setenv("SLMB_WORKER_MEMORY", "3GiB")
    assert memory.worker_memory("cpu") == (3 << 30, "SLMB_WORKER_MEMORY")
    assert memory.worker_memory("cpu", "1GB")[0] == 10**9


# -- refusals ------------------------------------------------------------------------------------------------

def wide_embedding() -> dict[str, Any]:
    """The reported case: embedding width 10^6 (weights alone ~374 GiB with GPT-2's vocabulary)."""
    body = canvas(E=64, V=50257, blocks=1, name="wide")
    body["model"][0]["data"]["embDim"] = 10**6
    body["model"].insert(1, {"type": "linear", "data": {"id": "down", "outDim": 64}})
    return body


def ten_billion() -> dict[str, Any]:
    return canvas(E=4096, V=50257, blocks=50, B=8, T=1024, name="ten-billion")


def test_reported_canvases_are_refused_fast(monkeypatch):
    monkeypatch.setenv("SLMB_WORKER_MEMORY", "64GiB")
    validate(canvas())  # imports done: what is timed is the check
    for body, weights_gib in ((wide_embedding(), 187), (ten_billion(), 39)):
        t0 = time.perf_counter()
        report = validate(body, admit=True)
        assert time.perf_counter() - t0 < 2.0  # meta device: nothing allocated
        [error] = report.errors
        assert error.check == "memory" and error.path == "/model"
        assert f"weights {weights_gib}." in error.message and "more than the 64.0 GiB" in error.message
        assert error.expected == "<= 64.0 GiB" and error.found.endswith("GiB")
        assert "fewer or narrower blocks" in error.hint and "batch_size" in error.hint
        assert not any("GiB in fp32" in w.message for w in report.warnings)  # the error replaces the warning


def test_activation_bound_refusal_points_at_the_batch():
    report = validate(canvas(E=128, blocks=8, B=512, T=1024), admit=True, memory_limit=8 << 30)
    [error] = report.errors
    assert error.path == "/config/batch_size" and error.hint.startswith("lower batch_size")
    assert validate(canvas(E=128, blocks=8, B=4, T=1024), admit=True, memory_limit=8 << 30).ok


def test_cli_validate_and_train_refuse_with_the_estimate(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from slmb.cli import app

    monkeypatch.delenv("SLMB_WORKER_MEMORY", raising=False)  # --max-memory sets it for the trainer: restored after
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = CliRunner().invoke
    path = tmp_path / "req.json"
    path.write_text(json.dumps(canvas(E=128, V=4096, blocks=2, name="cli-mem")))  # ~0.9 GiB at its peak
    out = run(app, ["validate", str(path), "--max-memory", "500MiB"])
    assert out.exit_code == 1, out.output
    assert "training needs about" in out.output and "500.0 MiB" in out.output and "hint:" in out.output
    assert run(app, ["validate", str(path)], env={"SLMB_WORKER_MEMORY": "500MiB"}).exit_code == 1
    ok = run(app, ["validate", str(path), "--max-memory", "4GiB"])
    assert ok.exit_code == 0 and "training peak ≈" in ok.output
    bad = run(app, ["validate", str(path), "--max-memory", "lots"])
    assert bad.exit_code == 2 and "not a memory size" in bad.output
    train = run(app, ["train", str(path), "--no-track", "--max-memory", "500MiB"])
    assert train.exit_code == 1
    assert "training needs about" in train.output and "more than the 500.0 MiB" in train.output
    assert "hint: " in train.output
    runs = Path(os.environ["SLMB_HOME"]) / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # refused before a run was created
    # --max-memory overrides $SLMB_WORKER_MEMORY: the run trains
    trained = run(app, ["train", str(path), "--no-track", "--json", "--max-steps", "1", "--max-memory", "8GiB"],
                  env={"SLMB_WORKER_MEMORY": "500MiB"})
    assert trained.exit_code == 0, trained.output[-2000:]
    assert '"event":"finished"' in trained.output.replace(" ", "")


def test_trainer_guard_ends_the_run_with_an_error_event(monkeypatch):
    from slmb.core.events import read_events
    from slmb.core.store import run_dir
    from slmb.core.trainer import train

    monkeypatch.setenv("SLMB_WORKER_MEMORY", "300MiB")  # a worker smaller than the API that queued the run
    with pytest.raises(memory.MemoryLimitError, match=r"training needs about .* more than the 300\.0 MiB"):
        train(canvas(name="guarded"), task_id="guarded-run", track=False)
    events = list(read_events(run_dir("guarded-run").events))
    assert events[-1].name == "error" and events[-1].type == "MemoryLimitError"
    assert "To fit:" in events[-1].message
    assert not any(e.name == "started" for e in events)  # refused before the model or any data


def test_http_answers_422_before_queueing(service, monkeypatch):
    from fastapi.testclient import TestClient

    from slmb.api.app import Settings, create_app
    from slmb.core import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)
    conn = service.redis()

    def state() -> tuple:
        exp = tracking.client().get_experiment_by_name(tracking.experiment_name())
        runs = len(tracking.client().search_runs([exp.experiment_id])) if exp else 0
        return runs, conn.llen("rq:queue:slmb"), sorted(k for k in conn.keys("*") if not k.startswith(b"rq:worker"))

    before = state()
    app = create_app(Settings(redis_url=service.redis_url, worker_memory_bytes=64 << 30))
    with TestClient(app, raise_server_exceptions=False) as client:
        for body in (wide_embedding(), ten_billion()):
            resp = client.post("/api/v1/train-complete-model", json=body)
            assert resp.status_code == 422, resp.text
            [error] = resp.json()["errors"]
            assert error["check"] == "memory" and error["path"] == "/model" and error["severity"] == "error"
            assert error["message"].startswith("training needs about") and "weights" in error["message"]
            assert "adamw states" in error["message"] and "more than the 64.0 GiB" in error["message"]
            assert error["expected"] == "<= 64.0 GiB" and "GiB" in error["found"]
            assert "batch_size" in error["hint"] and "more memory" in error["hint"]
    assert state() == before  # nothing queued, no run recorded, no MLflow run


def test_service_setting(monkeypatch):
    from slmb.api.app import Settings

    monkeypatch.delenv("SLMB_WORKER_MEMORY", raising=False)
    assert Settings.from_env().worker_memory_bytes is None  # the machine's, judged per request's device
    monkeypatch.setenv("SLMB_WORKER_MEMORY", "16GiB")
    assert Settings.from_env().worker_memory_bytes == 16 << 30
    monkeypatch.setenv("SLMB_WORKER_MEMORY", "plenty")
    with pytest.raises(ValueError, match="not a memory size: 'plenty'"):
        Settings.from_env()
