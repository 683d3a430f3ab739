"""Loop overhead: ``slmb train`` end to end against the bare training step on the same canvas (issue 15 point 4).

Two measurements, each in fresh processes, alternated round-robin over ``--reps`` rounds, medians reported:

- ``bare``: the trainer's own ``TrainStep`` (same model from the canvas, ``prepare_device``, ``autocast_for``'s
  precision, ``make_optimizer``, the learning-rate schedule, one ``loss.item()`` per step as the loop's loss check)
  in a tight loop over batches made beforehand from the same token stream. Timed: N steps, from before the first
  to after the last.
- ``loop``: ``slmb.core.trainer.train`` with what ``slmb train`` attaches: the JSONL run log, the console sink
  (``ConsoleSink`` drawing its live bar on a forced terminal written to /dev/null; ``--sink json``: the ``--json``
  callback printing every event to /dev/null), the MLflow sink on a sqlite store in a temporary ``SLMB_HOME``,
  evaluation at the default cadence (``eval_every`` and ``eval_batches`` of each split), a checkpoint every
  ``--checkpoint-every`` steps (default 100). Timed: from the ``started`` event (model, token cache, optimizer and
  the peak measurement are done) to the last step's ``progress`` event (after its evaluation), i.e. the same N
  steps plus everything the loop does around them; start-up before ``started`` and the end after the last step
  (saving the completed model, closing the MLflow run) are reported apart, not counted.

Ablations (``--ablate``) switch one part off at a time: ``no-mlflow`` (``track=False``), ``no-eval``
(``eval_every`` past the end: only the final evaluation, 1 batch), ``no-ckpt`` (no periodic checkpoint),
``json`` (the ``--json`` sink instead of the live display), ``no-prefetch`` (batches made in the loop's own thread
when it needs them, as before the prefetcher). Inside each ``loop`` run the parts are also timed directly (waiting
for the prefetched batches, the step, evaluation, checkpoints, event emission, MLflow ``record_step``, the stop
check), as seconds per 100 steps.

    .venv/bin/python bench/loop_overhead.py [--reps 3] [--steps 200] [--ablate]        # GPT-2 benchmark shape
    .venv/bin/python bench/loop_overhead.py --small --steps 20 --reps 1                  # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = ("loop", "no-mlflow", "no-eval", "no-ckpt", "json", "no-prefetch")


def canvas(small: bool, steps: int, batch: int | None, checkpoint_every: int | None, device: str = "auto") -> dict:
    """The GPT-2 benchmark canvas of bench/train.py (vocab 50257, emb 256, 4 blocks, 4 heads, context 128, batch 8,
    dropout 0.1, tied head, dtype auto); ``small``: byte tokenizer, emb 64, 2 blocks, context 64, batch 4."""
    from transformers import GPT2Config

    from slmb.core.interop import gpt2_body

    if small:
        cfg = GPT2Config(vocab_size=257, n_embd=64, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    else:
        cfg = GPT2Config(vocab_size=50257, n_embd=256, n_layer=4, n_head=4, n_positions=128)
    body = gpt2_body(cfg, "gelu_tanh", True, name="loop-overhead")
    config = body["config"]
    config.pop("dtype", None)  # the default, "auto"
    config.update(batch_size=batch or (4 if small else 8), max_steps=steps, epochs=100, device=device)
    if small:
        config["tokenizer"] = "byte"
    if checkpoint_every:
        config["checkpoint_every"] = checkpoint_every
    body["dataset"] = "tiny_shakespeare"
    return body


# ---------------------------------------------------------------------------------------------------- children


def run_bare(body: dict) -> dict:
    import torch

    from slmb.core.compiler import build_model
    from slmb.core.data import WindowLoader, prepare_tokens
    from slmb.core.runtime import autocast_for, prepare_device
    from slmb.core.spec import TrainRequest
    from slmb.core.tokenizers import load_tokenizer
    from slmb.core.trainer import TrainStep, get_lr, make_optimizer, resolve_device

    req = TrainRequest.model_validate(body)
    cfg = req.config
    device = resolve_device(cfg.device)
    prepare_device(device)
    tokenizer = load_tokenizer(cfg.tokenizer_name)
    torch.manual_seed(cfg.seed)
    model = build_model(req, device=device)
    dtype, autocast, _ = autocast_for(cfg.dtype, device, model.num_parameters())
    data = prepare_tokens(req.dataset, req.dataset_config, tokenizer, val_fraction=cfg.val_fraction)
    loader = WindowLoader(data.train, cfg.context_length, cfg.resolved_stride, cfg.batch_size, cfg.seed)
    n = cfg.max_steps
    batches = [loader.batch(*divmod(i, len(loader))) for i in range(n)]
    optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, device)
    step = TrainStep(model, optimizer, autocast, device, grad_clip=cfg.grad_clip, loss_fn=model.loss)
    warmup, min_lr = cfg.resolved_warmup(n), cfg.learning_rate / 10
    model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    each = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        loss, _ = step([batches[i]], get_lr(i, n, cfg.learning_rate, min_lr, warmup, cfg.lr_schedule))
        loss.item()
        each.append(time.perf_counter() - t)
    sync()
    wall = time.perf_counter() - t0
    tokens = n * cfg.batch_size * cfg.context_length
    return {"mode": "bare", "dtype": dtype, "steps": n, "tokens": tokens, "loop_s": wall,
            "tokens_per_s": tokens / wall, "step_median_s": statistics.median(each), "threads": torch.get_num_threads()}


class _Timers:
    """Wraps methods to add up their wall time by part (nested calls are counted in both parts)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.each: dict[str, list[float]] = {}

    def wrap(self, owner: object, name: str, part: str | None = None, when=None) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            key = part if when is None else when()
            if key is None:
                return original(*args, **kwargs)
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                self.seconds[key] = self.seconds.get(key, 0.0) + dt
                self.calls[key] = self.calls.get(key, 0) + 1
                self.each.setdefault(key, []).append(dt)

        setattr(owner, name, timed)


def _thread_cpu() -> dict[int, float]:
    """CPU seconds of every Python thread of this process but the main one (MLflow's, the live display's), by
    thread id, from /proc (Linux; empty elsewhere)."""
    out = {}
    for thread in threading.enumerate():  # Python threads only: torch's OpenMP workers are the step itself
        if thread is threading.main_thread() or thread.native_id is None:
            continue
        try:
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        out[thread.native_id] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return out


def run_loop(body: dict, variant: str, sink_kind: str) -> dict:
    import torch
    from rich.console import Console

    from slmb.console import ConsoleSink
    from slmb.core import data
    from slmb.core import events as ev
    from slmb.core import trainer as T
    from slmb.core.control import FileControl
    from slmb.core.spec import Config
    from slmb.core.tracking import MlflowSink

    config, default = body["config"], Config()
    if variant == "no-eval":
        config.update(eval_every=10 * config["max_steps"], eval_batches=1)
    if variant == "no-ckpt":
        config.pop("checkpoint_every", None)
    if variant == "json":
        sink_kind = "json"
    if variant == "no-prefetch":
        class Inline:  # Prefetcher's interface, each step's batches made when asked for
            def __init__(self, fetch, start, stop, **_):
                self.fetch, self.index = fetch, start

            def next(self):
                self.index += 1
                return self.fetch(self.index - 1)

            def close(self):
                pass

        data.Prefetcher = Inline  # type: ignore[misc,assignment]
    timers = _Timers()
    timers.wrap(data.Prefetcher, "next", "data")  # the main thread's wait: batches are made by its thread
    timers.wrap(T.TrainStep, "__call__", "step")
    timers.wrap(T.TrainStep, "loss", when=lambda: None if torch.is_grad_enabled() else "eval")
    timers.wrap(T._Loop, "_checkpoint", "checkpoint")
    timers.wrap(ev.Emitter, "emit", "events")
    timers.wrap(MlflowSink, "record_step", "mlflow_record_step")
    timers.wrap(FileControl, "stop_requested", "stop_check")

    devnull = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    if sink_kind == "json":
        shown = ev.CallbackSink(lambda e: print(e.to_json(), file=devnull))
    else:
        shown = ConsoleSink(Console(file=devnull, force_terminal=True, width=120),
                            Console(file=devnull, force_terminal=True, width=120))
    marks: dict[str, float] = {}
    total = config["max_steps"]

    def mark(e: ev.Event) -> None:
        if e.name == "started":
            marks["started"] = time.perf_counter()
            timers.seconds.clear()
            timers.calls.clear()
            timers.each.clear()
            marks["threads"] = _thread_cpu()  # type: ignore[assignment]
        elif e.name == "progress" and e.step == total:
            marks["last_step"] = time.perf_counter()
            marks["parts"] = dict(timers.seconds)  # type: ignore[assignment]
            before = marks["threads"]
            marks["background"] = sum(cpu - before.get(tid, 0.0)  # type: ignore[union-attr]
                                      for tid, cpu in _thread_cpu().items())

    t0 = time.perf_counter()
    result = T.train(body, sinks=[shown, ev.CallbackSink(mark)], track=variant != "no-mlflow")
    t_end = time.perf_counter()
    assert result.state == "finished" and result.step == total, result
    wall = marks["last_step"] - marks["started"]
    tokens = total * config["batch_size"] * config["context_length"]
    parts = marks["parts"]
    per100 = {k: v * 100 / total for k, v in sorted(parts.items())}  # type: ignore[union-attr]
    per100["background threads (CPU)"] = marks["background"] * 100 / total
    return {"mode": variant, "sink": sink_kind, "steps": total, "tokens": tokens, "loop_s": wall,
            "tokens_per_s": tokens / wall, "startup_s": marks["started"] - t0, "end_s": t_end - marks["last_step"],
            "step_median_s": statistics.median(timers.each["step"][:total]), "step_share": parts["step"] / wall,
            "parts_s_per_100_steps": per100, "calls": dict(timers.calls),
            "threads": torch.get_num_threads(),
            "checkpoint_every": config.get("checkpoint_every"),
            "eval_every": config.get("eval_every", default.eval_every),
            "eval_batches": config.get("eval_batches", default.eval_batches), "val_loss": result.val_loss}


def child(args: argparse.Namespace) -> None:
    body = canvas(args.small, args.steps, args.batch, args.checkpoint_every, args.device)
    out = run_bare(body) if args.child == "bare" else run_loop(body, args.child, args.sink)
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------------- parent


def run_child(args: argparse.Namespace, mode: str, env: dict[str, str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--steps", str(args.steps),
           "--sink", args.sink, "--checkpoint-every", str(args.checkpoint_every or 0), "--device", args.device,
           *(["--small"] if args.small else []), *(["--batch", str(args.batch)] if args.batch else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(runs: dict[str, list[dict]]) -> str:
    """Markdown: median tokens/s and spread per mode, the ratio to the bare step's median."""
    bare = statistics.median(r["tokens_per_s"] for r in runs["bare"]) if runs.get("bare") else None
    lines = ["| run | tokens/s (median) | spread | vs bare step | loop s (median) | median step s | "
             "step's share of the loop |", "|---|---:|---:|---:|---:|---:|---:|"]
    for mode, rs in runs.items():
        if not rs:
            continue
        tps = [r["tokens_per_s"] for r in rs]
        med = statistics.median(tps)
        ratio = f"{med / bare:.3f}" if bare else "-"
        share = f"{100 * statistics.median(r['step_share'] for r in rs):.1f}%" if "step_share" in rs[0] else "(all)"
        lines.append(f"| {mode} | {med:,.0f} | {min(tps):,.0f}-{max(tps):,.0f} | {ratio} | "
                     f"{statistics.median(r['loop_s'] for r in rs):.1f} | "
                     f"{statistics.median(r['step_median_s'] for r in rs):.4f} | {share} |")
    return "\n".join(lines)


def parts_table(runs: list[dict]) -> str:
    """Markdown: where a loop run's time goes, seconds per 100 steps (medians), and the share of the loop."""
    keys = sorted({k for r in runs for k in r["parts_s_per_100_steps"]})
    loop100 = statistics.median(r["loop_s"] * 100 / r["steps"] for r in runs)
    lines = [f"| part (per 100 steps; loop {loop100:.2f} s) | seconds | share of the loop |", "|---|---:|---:|"]
    for k in keys:
        s = statistics.median(r["parts_s_per_100_steps"].get(k, 0.0) for r in runs)
        lines.append(f"| {k} | {s:.3f} | {100 * s / loop100:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200, help="steps per run (a multiple of 100 sees whole cadences)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--small", action="store_true", help="a tiny canvas (byte tokenizer, emb 64, 2 blocks)")
    ap.add_argument("--checkpoint-every", type=int, default=100, help="0: no periodic checkpoints")
    ap.add_argument("--sink", choices=["console", "json"], default="console")
    ap.add_argument("--device", default="auto", help="the request's device (auto: CUDA > MPS > CPU)")
    ap.add_argument("--ablate", action="store_true", help="also run each part switched off: " + ", ".join(VARIANTS[1:]))
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run (default: all cores)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", type=Path, default=None, help="also write the raw runs here")
    ap.add_argument("--child", choices=["bare", *VARIANTS], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    modes = ["bare", *(VARIANTS if args.ablate else VARIANTS[:1])]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="slmb-loop-") as home:
        # One home for all runs: the token cache is made once; MLflow is a sqlite store in it.
        env = {**os.environ, "SLMB_HOME": home, "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
               "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        for rep in range(args.reps):
            for mode in modes:
                r = run_child(args, mode, env)
                runs[mode].append(r)
                print(f"<!-- rep {rep + 1}: {mode}: {r['tokens_per_s']:,.0f} tokens/s, loop {r['loop_s']:.1f} s -->",
                      flush=True)
                if args.json:
                    args.json.write_text(json.dumps(runs, indent=1))
    shape = "small canvas" if args.small else "GPT-2 benchmark shape (V 50257, E 256, 4 blocks, T 128)"
    first = runs["loop"][0]
    print(f"\n{shape}, batch {first['tokens'] // first['steps'] // (64 if args.small else 128)}, {args.steps} steps, "
          f"{first['threads']} threads, dtype {runs['bare'][0]['dtype']}, eval every {first['eval_every']} "
          f"({first['eval_batches']} batches per split), checkpoint every {first['checkpoint_every'] or '-'}, "
          f"{first['sink']} sink; {args.reps} fresh processes per row, alternated\n")
    print(table(runs))
    print()
    print(parts_table(runs["loop"]))
    print(json.dumps({"summary": {m: statistics.median(r["tokens_per_s"] for r in rs) for m, rs in runs.items()},
                      "ratio": statistics.median(r["tokens_per_s"] for r in runs["loop"])
                      / statistics.median(r["tokens_per_s"] for r in runs["bare"]),
                      "step_share": statistics.median(r["step_share"] for r in runs["loop"])}))


if __name__ == "__main__":
    main()
