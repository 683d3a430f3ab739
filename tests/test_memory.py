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
    # fp32 chunked loss head: dL/dh and dL/dW filled while one (N, V) chunk of logits and its dL/dh rows exist,
    # and the GEMM library's packed copy of the (V, E) weight (on a CPU)
    assert t["loss_head"] == max(N * 64 * 4 + 257 * 64 * 4 + N * 257 * 4 + N * 64 * 4 + 257 * 64 * 4,
                                 2 * N * 64 * 4 + 257 * 64 * 4)
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


# -- several devices (docs/distributed.md) ---------------------------------------------------------------------

def big_llama(B: int = 8, **config: Any) -> dict[str, Any]:
    """~0.5 B parameters whose states dominate at 1 row of 64 tokens per device, judged for a CUDA worker."""
    return canvas(E=1024, V=32000, blocks=24, B=B, T=64, llama=True, device="cuda", dtype="bf16", **config)


def per_device(body: dict[str, Any], world_size: int, strategy: str | None) -> memory.MemoryEstimate:
    from slmb.core.validate import summarize

    report = validate(body, build=False)
    assert report.ok, report.errors
    return summarize(report.plan, world_size=world_size, strategy=strategy).estimate


def test_fsdp_shards_the_states_and_gathers_one_block_at_a_time():
    body = big_llama()
    ddp, fsdp = per_device(body, 8, "ddp"), per_device(body, 8, "fsdp")
    P, E, V = ddp.parameters, 1024, 32000
    root = 2 * V * E + E  # embedding, untied head, final RMSNorm: outside the 24 block copies
    block = (P - root) // 24
    assert block * 24 + root == P and block == 2 * E + E * E + 2 * E * 512 + E * E + 3 * E * 3072
    states = ("weights", "gradients", "adamw_states")
    assert [ddp.terms[k] for k in states] == [4 * P, 4 * P, 8 * P]
    assert [fsdp.terms[k] for k in states] == [4 * -(-P // 8), 4 * -(-P // 8), 8 * -(-P // 8)]
    # bf16 gathers: the root group and two block copies; one copy's gradients and the root's; the fp32
    # reduce-scatter buffer of the larger group; no autocast weight copies (the parameters come in bf16)
    assert fsdp.terms["unsharded_params"] == (root + 2 * block) * 2
    assert fsdp.terms["unsharded_grads"] == (root + block) * 2
    assert fsdp.terms["reduce_scatter"] == 4 * max(root, block)
    assert fsdp.terms["weight_casts"] == 0 < ddp.terms["weight_casts"] == 2 * (P - V * E - 24 * 2 * E - E)
    assert ddp.terms["ddp_buckets"] == 4 * P and "ddp_buckets" not in fsdp.terms  # the second step's rebuilt set
    # each device holds 1 of the 8 rows either way: the same activations and loss head
    assert (ddp.batch_rows, fsdp.batch_rows) == (1, 1)
    assert fsdp.terms["activations"] == ddp.terms["activations"]
    # the model's part shrinks by more than half the device count (the unsharded groups do not shrink)
    ratio = (ddp.peak - ddp.terms["runtime"]) / (fsdp.peak - fsdp.terms["runtime"])
    assert 4 < ratio < 8, ratio
    peaks = [per_device(body, W, "fsdp").peak for W in (2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] == fsdp.peak
    text = memory.check(fsdp, 1 << 30, "SLMB_WORKER_MEMORY")
    assert text.startswith(f"training needs about {memory.human_bytes(fsdp.peak)} of memory on each GPU with FSDP "
                           "over 8 processes at its peak (weights ")
    assert "unsharded params" in text and "reduce scatter" in text
    assert memory.hint(fsdp).startswith("train on more devices")


def test_activation_checkpointing_keeps_each_block_input_and_recomputes_one_block():
    E, B, T = 128, 16, 128
    N = B * T
    plain = {n: estimate_of(canvas(E=E, blocks=n, B=B, T=T)) for n in (7, 8)}
    ckpt = {n: estimate_of(canvas(E=E, blocks=n, B=B, T=T, activation_checkpointing=True)) for n in (7, 8)}
    copy = plain[8].terms["activations"] - plain[7].terms["activations"]  # what one block copy saves
    assert copy > 20 * N * E * 4 > 0
    # 8 copies keep their fp32 input; one copy's activations exist again while its backward recomputes them
    assert ckpt[8].terms["activations"] == plain[8].terms["activations"] - 7 * copy + 8 * N * E * 4
    assert ckpt[8].terms["activations"] - ckpt[7].terms["activations"] == N * E * 4  # a block more: its input
    assert ckpt[8].peak < plain[8].peak and ckpt[8].checkpointing and not plain[8].checkpointing
    assert ckpt[8].terms["weights"] == plain[8].terms["weights"]
    # it lowers every strategy's estimate, and the hint stops suggesting it once it is on
    body = big_llama(B=64)
    for strategy in ("ddp", "fsdp"):
        on = per_device({**body, "config": {**body["config"], "activation_checkpointing": True}}, 8, strategy)
        off = per_device(body, 8, strategy)
        assert on.terms["activations"] < off.terms["activations"] / 4
        assert "activation_checkpointing" in memory.hint(off) and "activation_checkpointing" not in memory.hint(on)


def test_one_process_numbers_do_not_depend_on_the_distributed_keys():
    body = canvas(E=64, V=257, blocks=2, B=4, T=32)
    base = estimate_of(body)
    for extra in ({"distributed": "fsdp"}, {"distributed": "ddp"}):
        other = estimate_of({**body, "config": {**body["config"], **extra}})
        assert other.terms == base.terms and other.strategy is None
    assert validate(body, world_size=1).summary.memory == validate(body).summary.memory
    assert list(base.terms) == ["weights", "gradients", "adamw_states", "best_weights", "activations", "loss_head",
                                "weight_casts", "runtime"]
    assert (base.world_size, base.strategy, base.batch_rows, base.demand) == (1, None, 4, base.peak)


def test_choose_strategy_follows_the_limit(monkeypatch):
    from slmb.core.spec import TrainRequest
    from slmb.core.validate import choose_strategy

    body = big_llama(B=8)
    request = TrainRequest.model_validate(body)
    ddp, fsdp = per_device(body, 4, "ddp").peak, per_device(body, 4, "fsdp").peak
    assert fsdp < ddp / 2
    monkeypatch.setenv("SLMB_WORKER_MEMORY", str(ddp))
    assert choose_strategy(request, "cuda", 4) == "ddp"
    one = per_device(body, 1, "ddp").peak  # all 8 rows on one device
    monkeypatch.setenv("SLMB_WORKER_MEMORY", str(one))
    assert choose_strategy(request, "cuda", 1) == "ddp"
    monkeypatch.setenv("SLMB_WORKER_MEMORY", str(fsdp // 2))
    with pytest.raises(memory.MemoryLimitError, match=r"not even FSDP \(full sharding over 1 device\) fits"):
        choose_strategy(request, "cuda", 1)
    monkeypatch.setenv("SLMB_WORKER_MEMORY", str(ddp - 1))
    assert choose_strategy(request, "cuda", 4) == "fsdp"
    monkeypatch.setenv("SLMB_WORKER_MEMORY", str(fsdp))
    assert choose_strategy(request, "cuda", 4) == "fsdp"
    monkeypatch.setenv("SLMB_WORKER_MEMORY", str(fsdp - 1))
    with pytest.raises(memory.MemoryLimitError) as exc:
        choose_strategy(request, "cuda", 4)
    text = str(exc.value)
    assert text.startswith("distributed 'auto': not even FSDP (full sharding over 4 devices) fits: training needs "
                           f"about {memory.human_bytes(fsdp)} of memory on each GPU with FSDP over 4 processes")
    assert f"more than the {memory.human_bytes(fsdp - 1)} a worker may use (SLMB_WORKER_MEMORY)" in text
    assert "To fit: train on more devices" in text and "activation_checkpointing: true" in text
    assert "lower batch_size" in text and "context_length" in text
    for wanted in ("ddp", "fsdp"):  # asked for by name: taken as is (admission judges whether it fits)
        named = TrainRequest.model_validate({**body, "config": {**body["config"], "distributed": wanted}})
        assert choose_strategy(named, "cuda", 4) == wanted


def test_validate_for_several_devices(monkeypatch):
    from slmb.core.spec import TrainRequest
    from slmb.core.validate import memory_refusal

    monkeypatch.delenv("SLMB_WORKER_MEMORY", raising=False)
    body = big_llama(B=8)
    ddp, fsdp = per_device(body, 4, "ddp").peak, per_device(body, 4, "fsdp").peak
    report = validate(body, world_size=4, admit=True, memory_limit=ddp)
    assert report.ok and report.summary.memory["strategy"] == "ddp"
    report = validate(body, world_size=4, admit=True, memory_limit=ddp - 1)
    m = report.summary.memory
    assert report.ok and (m["strategy"], m["world_size"], m["device_batch_size"]) == ("fsdp", 4, 2)
    assert m["training_total"] == fsdp and m["weights_fp32"] == 4 * report.summary.total_parameters
    [error] = validate(body, world_size=4, admit=True, memory_limit=fsdp - 1).errors
    assert error.check == "memory" and error.path == "/model" and "with FSDP over 4 processes" in error.message
    assert error.found == memory.human_bytes(fsdp) and error.hint.startswith("train on more devices")
    # the trainer's own check on one rank, with the strategy it resolved
    request = TrainRequest.model_validate(body)
    monkeypatch.setenv("SLMB_WORKER_MEMORY", str(fsdp - 1))
    refusal = memory_refusal(request, "cuda", world_size=4, strategy="fsdp")
    assert refusal.startswith("training needs about") and ". To fit: train on more devices" in refusal
    assert memory_refusal(request, "cuda", world_size=4) == refusal  # auto: FSDP, the smaller
    monkeypatch.setenv("SLMB_WORKER_MEMORY", str(fsdp))
    assert memory_refusal(request, "cuda", world_size=4, strategy="fsdp") is None
    assert "set distributed: fsdp" in memory_refusal(request, "cuda", world_size=4, strategy="ddp")


def test_cpu_processes_share_the_ram():
    body = canvas(E=128, V=4096, blocks=2)
    one = per_device(body, 2, "ddp")
    assert one.demand == 2 * one.peak
    report = validate({**body, "config": {**body["config"], "distributed": "ddp"}}, world_size=2, admit=True,
                      memory_limit=one.peak + 1)
    [error] = report.errors
    assert error.message.startswith(f"training needs about {memory.human_bytes(one.peak)} of RAM per process with "
                                    "DDP over 2 processes at its peak (weights ")
    assert f"), {memory.human_bytes(2 * one.peak)} for the 2 processes that share this RAM, more than" in error.message
    assert validate(body, world_size=2, admit=True, memory_limit=2 * one.peak).ok


def test_batch_size_must_split_over_the_processes():
    body = canvas(B=6)
    [error] = validate(body, world_size=4).errors
    assert (error.path, error.check, error.found, error.expected) == ("/config/batch_size", "distributed", 6,
                                                                      "a multiple of 4")
    assert "batch_size is the global batch" in error.message and "batch_size / 4 rows each" in error.message
    assert error.hint.startswith("use batch_size 4 or 8")
    assert validate(canvas(B=2), world_size=4).errors[0].hint.startswith("use batch_size 4 (")
    assert validate(body, world_size=3).ok and validate(body, world_size=2).ok and validate(body).ok


def test_http_admission_judges_the_worker_processes(service, monkeypatch):
    from fastapi.testclient import TestClient

    from slmb.api.app import Settings, create_app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)
    monkeypatch.setenv("SLMB_NPROC_PER_NODE", "4")
    body = big_llama(B=8)
    fsdp = per_device(body, 4, "fsdp").peak
    app = create_app(Settings(redis_url=service.redis_url, worker_memory_bytes=fsdp - 1))
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.post("/api/v1/train-complete-model", json=big_llama(B=6))
        assert resp.status_code == 422, resp.text
        assert [(e["path"], e["check"]) for e in resp.json()["errors"]] == [("/config/batch_size", "distributed")]
        resp = client.post("/api/v1/train-complete-model", json=body)
        assert resp.status_code == 422, resp.text
        [error] = resp.json()["errors"]
        assert error["check"] == "memory" and "with FSDP over 4 processes" in error["message"]


def test_distributed_memory_table():
    """bench/distributed_memory.py: the four reference canvases, nine runs each, from the estimator alone."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "distributed_memory.py")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "SLMB_SHARED_DIR": str(shared_dir())}, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split(" | ") for line in out.stdout.splitlines()[2:]]
    assert len(rows) == 4 * 9
    names = [r[0].strip("| ") for r in rows[::9]]
    assert names == ["GPT-2 (0.16 B)", "Qwen3 0.6B (0.60 B)", "Llama 3.2 1B (1.24 B)", "Llama 2 7B (6.74 B)"]
    llama2 = {r[1]: (float(r[3].replace(",", "")), r[4], r[2]) for r in rows[27:]}
    assert llama2["one device"][1] == "✗ ✓" and llama2["FSDP × 2"][1] == "✓ ✓" and llama2["DDP × 8"][2] == "8 × 256"
    for canvas_rows in (rows[i:i + 9] for i in range(0, 36, 9)):
        gib = {r[1]: float(r[3].replace(",", "")) for r in canvas_rows}
        assert gib["FSDP × 8"] < gib["FSDP × 4"] < gib["FSDP × 2"] < gib["DDP × 2"] == gib["DDP × 8"]
