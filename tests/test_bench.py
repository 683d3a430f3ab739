"""The benchmark scripts under bench/ run end to end (tiny step counts) and their tables compute the right ratios.

Speed itself is never asserted here (docs/benchmarks.md has the numbers); these tests keep the scripts that
produce those numbers working, on the CPU and, for the table logic, with the CUDA row set too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import run_all  # noqa: E402


def _run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _fake_run(tps: float, dtype: str = "bf16", cuda: bool = False, batch: int = 8) -> dict:
    return {"tokens_per_s": tps, "flops_per_s": tps * 1e5, "dtype": dtype, "batch": batch,
            "peak_gpu_mb" if cuda else "peak_rss_mb": 1000.0}


@pytest.mark.parametrize("cuda", [False, True])
def test_train_table_ratios_against_the_hf_default_row(cuda):
    configs = run_all.CUDA_TRAIN if cuda else run_all.CPU_TRAIN
    baseline = run_all.BASELINE_CUDA if cuda else run_all.BASELINE_CPU
    assert baseline in [label for label, _ in configs]  # the ratio column has a row to divide by
    slmb_label = configs[0][0]
    runs = {label: [] for label, _ in configs}
    runs[slmb_label] = [_fake_run(t, cuda=cuda) for t in (1900, 2000, 2100)]
    runs[baseline] = [_fake_run(t, "fp32", cuda) for t in (990, 1000, 1020)]
    peak = {"bf16_flops": 4e8, "fp32_flops": 2e8}
    table = run_all.train_table(runs, peak, [baseline], cuda).splitlines()
    assert len(table) == 4  # header, rule, and only the two rows that ran
    assert ("peak GPU MB" if cuda else "peak RSS MB") in table[0]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in table[2:])}
    assert rows[slmb_label] == ["bf16", "2,000", "1,900-2,100", "2.00x", "0.2", "50%", "1,000"]
    # fp32 rows divide by the fp32 peak
    assert rows[baseline][0] == "fp32" and rows[baseline][3:6] == ["1.00x", "0.1", "50%"]


def test_cuda_table_divides_each_row_by_the_hf_default_at_its_own_batch():
    labels = [label for label, _ in run_all.CUDA_TRAIN]
    assert run_all.BASELINE_CUDA in labels and run_all.BASELINE_CUDA_64 in labels
    runs = {run_all.BASELINE_CUDA: [_fake_run(100_000, "fp32", True)],
            run_all.BASELINE_CUDA_64: [_fake_run(300_000, "fp32", True, batch=64)],
            "slmb bf16 + compile": [_fake_run(150_000, cuda=True)],
            "slmb bf16 + compile, batch 64": [_fake_run(900_000, cuda=True, batch=64)],
            "slmb, batch 16": [_fake_run(200_000, cuda=True, batch=16)]}
    peak = {"bf16_flops": 1e12, "fp32_flops": 1e11}
    table = run_all.train_table(runs, peak, [run_all.BASELINE_CUDA, run_all.BASELINE_CUDA_64], True)
    ratio = {cells[0]: cells[4] for cells in ([c.strip() for c in r.strip("|").split("|")]
                                              for r in table.splitlines()[2:])}
    assert ratio == {run_all.BASELINE_CUDA: "1.00x", run_all.BASELINE_CUDA_64: "1.00x",
                     "slmb bf16 + compile": "1.50x", "slmb bf16 + compile, batch 64": "3.00x",
                     "slmb, batch 16": "(no baseline run)"}


def test_train_table_without_a_baseline_run_says_so():
    runs = {run_all.CPU_TRAIN[0][0]: [_fake_run(1000)]}
    table = run_all.train_table(runs, {"bf16_flops": 1e9, "fp32_flops": 1e9}, [run_all.BASELINE_CPU], False)
    assert "(no baseline run)" in table and "nan" not in table


@pytest.mark.parametrize("peer", ["slmb", "hf", "nano"])
def test_train_benchmark_runs_each_peer(peer):
    from slmb.core.runtime import autocast_for

    proc = _run("train.py", "--peer", peer, "--steps", "1", "--warmup", "1", "--batch", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["peer"] == peer and out["batch"] == 1 and out["threads"] == 1
    assert out["tokens_per_s"] > 0 and out["flops_per_s"] == pytest.approx(out["tokens_per_s"] * out["flops_per_token"])
    # same model size on every peer: 6N + 12·L·E·T with N = 16.03 M (tied head, no position table)
    assert out["flops_per_token"] == 6 * 16_025_344 + 12 * 4 * 256 * 128
    # a freshly initialised model with vocab 50257 starts near ln(50257) = 10.8
    assert all(abs(loss - math.log(50257)) < 1.0 for loss in out["losses"])
    expected = autocast_for("auto", torch.device("cpu"), 16_000_000)[0] if peer == "slmb" else "fp32"
    assert out["dtype"] == expected
    assert out["alloc"] == ("mallopt" if peer == "slmb" else "default")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_train_benchmark_on_cuda_without_a_gpu_is_a_clear_error():
    proc = _run("train.py", "--device", "cuda", "--steps", "1")
    assert proc.returncode != 0
    assert "CUDA is not available here" in proc.stderr


def test_generate_benchmark_paths_produce_identical_tokens():
    proc = _run("generate.py", "--new", "8", "--reps", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["identical"] is True and out["new_tokens"] == 8
    assert set(out["seconds"]) == {"slmb (KV cache)", "slmb (no cache)", "HF generate (cache)",
                                   "slmb (KV cache, bf16 weights)"}
    assert all(len(ts) == 1 and ts[0] > 0 for ts in out["seconds"].values())


def test_loop_overhead_benchmark_times_the_bare_step_and_the_whole_loop(tmp_path):
    raw = tmp_path / "runs.json"
    proc = _run("loop_overhead.py", "--small", "--steps", "20", "--reps", "1", "--checkpoint-every", "10",
                "--json", str(raw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| bare |" in out and "| loop |" in out
    for part in ("data", "step", "eval", "checkpoint", "events", "mlflow_record_step", "background threads (CPU)"):
        assert f"| {part} |" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary["summary"]) == {"bare", "loop"} and all(v > 0 for v in summary["summary"].values())
    assert summary["ratio"] == pytest.approx(summary["summary"]["loop"] / summary["summary"]["bare"])
    assert 0 < summary["step_share"] <= 1
    runs = json.loads(raw.read_text())
    (bare,), (loop,) = runs["bare"], runs["loop"]
    assert bare["steps"] == loop["steps"] == 20 and bare["tokens"] == loop["tokens"] == 20 * 4 * 64
    assert bare["threads"] == loop["threads"] == 1
    # The loop did what slmb train does: a batch and a step each step, the final evaluation (eval_batches of each
    # split, forward passes only), the periodic checkpoint at step 10 (none at the last step: the model is saved).
    from slmb.core.spec import Config

    calls = loop["calls"]
    assert calls["step"] == calls["data"] == calls["stop_check"] == calls["mlflow_record_step"] == 20
    assert calls["eval"] == 2 * Config().eval_batches and calls["checkpoint"] == 1
    assert calls["events"] >= 4  # started is before the clock; step + progress for the first and last, eval, ...
    assert loop["parts_s_per_100_steps"]["step"] <= loop["loop_s"] * 100 / 20
    assert loop["val_loss"] is not None and 0 < loop["val_loss"] < math.log(257) + 1


def _step(step: int, steps: int, seconds: float, ts: float) -> dict:
    """A step event whose tokens/s covers ``steps`` steps of 256 tokens in ``seconds``, stamped ``ts``."""
    return {"event": "step", "data": {"step": step, "tokens_per_sec": steps * 256 / seconds, "ts": ts,
                                      "loss": 10.0 - step / 10}}


def test_gpu_training_steady_numbers_leave_out_the_compile_and_the_evaluation():
    import gpu_training

    started = {"batch_size": 4, "context_length": 64, "flops_per_token": 1000, "peak_flops": 1e6,
               "parameters": 10, "dtype": "bf16", "device": "cpu", "compile": {"enabled": True}}
    events = [{"event": "started", "data": started},
              _step(1, 1, 10.0, 100.0),  # the compile: 10 s for the first step
              _step(5, 4, 0.4, 100.5), _step(10, 5, 0.5, 101.0), _step(15, 5, 0.5, 101.5),
              {"event": "eval", "data": {"ts": 104.0}},  # the last step's event comes after the evaluation (2 s)
              _step(20, 5, 0.5, 104.0)]
    s = gpu_training.slmb_stats(events, skip=5)
    assert s["steady_steps"] == 15 and s["steps"] == 20
    assert s["tokens_per_s_busy"] == pytest.approx(2560)
    # wall clock from the event of step 5 to that of step 15 (the evaluation stays out): 10 steps in 1 s
    assert s["tokens_per_s_wall"] == pytest.approx(2560) and s["tokens_per_s"] == s["tokens_per_s_wall"]
    assert s["step_s"] == pytest.approx(0.1) and s["first_step_s"] == pytest.approx(10.0)
    assert s["compile_s"] == pytest.approx(9.9) and s["warmup_extra_s"] == pytest.approx(9.9)
    assert s["final_eval_s"] == pytest.approx(2.0)
    assert s["loss_first"] == 9.9 and s["loss_last"] == 8.0
    eager = {"status": "ok", "step_s": 0.2, "warmup_extra_s": 0.5, "final_eval_s": 1.0}
    # 10.4 s more warm-up and evaluation, 0.1 s saved a step: the compiled run is ahead from step 104 on
    assert gpu_training.break_even({**s, "status": "ok"}, eager) == 104
    assert gpu_training.break_even({**s, "status": "ok"}, {**eager, "step_s": 0.05}) == "never"
    assert gpu_training.break_even({**s, "status": "failed"}, eager) is None


def test_gpu_training_steps_the_batch_down_after_a_memory_failure_only():
    import gpu_training

    calls = []

    def fake(variant, batch, timeout):
        calls.append((variant, batch))
        if variant == "eager" and batch == 64:  # refused by the estimate at start-up
            return {"batch": batch, "status": "failed", "error": "exit 1: training needs about 150 GiB of GPU"}
        if variant == "graphs" and batch == 32:
            return {"batch": batch, "status": "failed", "error": "exit 1: torch.OutOfMemoryError: CUDA out of memory"}
        if variant == "compile":
            return {"batch": batch, "status": "failed", "error": "exit 1: InductorError: something else"}
        return {"batch": batch, "status": "ok", "tokens_per_s": 1000.0}

    timeouts = dict.fromkeys(gpu_training.LABELS, 60)
    results = gpu_training.run_all(["eager", "nano", "graphs", "compile"], [64, 32, 16], fake, timeouts, 600)
    # eager finds 32; the others start there; graphs runs out of memory and retries at 16; compile fails for
    # another reason and is not retried
    assert calls == [("eager", 64), ("eager", 32), ("nano", 32), ("graphs", 32), ("graphs", 16), ("compile", 32)]
    assert {v: (r["status"], r["batch"]) for v, r in results.items()} == {
        "eager": ("ok", 32), "nano": ("ok", 32), "graphs": ("ok", 16), "compile": ("failed", 32)}
    assert gpu_training.run_all(["eager"], [64], fake, timeouts, 5)["eager"]["error"] == "no time left in --budget"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_gpu_training_a_run_past_its_timeout_is_ended_with_its_children(tmp_path):
    import gpu_training

    pid_file = tmp_path / "grandchild.pid"
    res = gpu_training.run(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; echo started; wait"], dict(os.environ),
                           2, tmp_path / "slow")
    assert res["rc"] is None and res["wall_s"] < 30 and res["stdout"] == "started\n"
    assert gpu_training.failure(res, 2) == "timed out after 2 s"
    grandchild = int(pid_file.read_text())  # the process group went with it (a zombie at most, until reaped)
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)
    done = gpu_training.run([sys.executable, "-c", "import sys; print('x', file=sys.stderr); sys.exit(3)"],
                            dict(os.environ), 30, tmp_path / "fails")
    assert gpu_training.failure(done, 30) == "exit 3: x"


def test_gpu_training_smoke_runs_every_variant_side_by_side(tmp_path):
    """bench/gpu_training.py --smoke: the GPU session's flow on the CPU at a toy shape (about two minutes)."""
    out = tmp_path / "gpu_training.json"
    proc = _run("gpu_training.py", "--smoke", "--batches", "60000,4", "--json", str(out),
                "--logs", str(tmp_path / "logs"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "partial" not in data  # the file written after each variant is replaced by the whole run's
    # the memory estimate refuses 60,000 rows of context 64 on this machine; 4 fits
    from slmb.core.memory import machine_memory

    assert data["batch_candidates"] == [4] and data["estimated_peak_mib"]["60000"] > machine_memory() / 2**20
    results = data["results"]
    assert list(results) == ["eager", "nano", "graphs", "compile"]
    for variant, r in results.items():
        assert r["status"] == "ok", (variant, r)
        assert r["batch"] == 4 and r["context_length"] == 64 and r["dtype"] == "bf16" and r["device"] == "cpu"
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["flops_per_token"] > 0 and 0 < r["loss_last"] < math.log(50257) + 1
    for variant in ("eager", "graphs", "compile"):
        r = results[variant]
        assert r["steps"] == 30 and r["steady_steps"] >= 1 and r["first_step_s"] > 0
        assert r["compile"]["enabled"] is (variant != "eager")
        assert r["tokens_per_s_busy"] > 0
    assert results["nano"]["steady_steps"] == 30 - 6 and results["nano"]["compile"]["enabled"] is False
    assert all(isinstance(results[v]["pays_after_steps"], int) or results[v]["pays_after_steps"] == "never"
               for v in ("graphs", "compile"))
    assert data["peak_flops"] > 0
    # one table row per variant, each with its numbers; the ratio column divides by the nanoGPT-style peer
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in data["table"].splitlines()[2:])}
    labels = ["slmb train, eager", "nanoGPT-style peer", "slmb train, compile + CUDA graphs", "slmb train, compile"]
    assert list(rows) == labels
    nano_tps = results["nano"]["tokens_per_s"]
    for label, variant in zip(labels, results, strict=True):
        r = results[variant]
        batch, tps, flops, mfu, ratio = rows[label][:5]
        assert batch == "4" and tps == f"{r['tokens_per_s']:,.0f}"
        assert flops == f"{r['tokens_per_s'] * r['flops_per_token'] / 1e9:.1f}"
        assert ratio == f"{r['tokens_per_s'] / nano_tps:.2f}x"
        share = r["tokens_per_s"] * r["flops_per_token"] / data["peak_flops"]
        assert mfu == (f"{share:.1%}" if share <= 1 else ">100% (peak measured low)")
    assert data["table"] in proc.stdout
    assert sorted(p.name for p in (tmp_path / "logs").glob("*.out")) == [
        "compile-b4.out", "eager-b4.out", "graphs-b4.out", "nano-b4.out"]
