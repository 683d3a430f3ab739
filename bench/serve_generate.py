"""Concurrent generation through the HTTP service: requests/s, tokens/s and latency percentiles, batched beside
unbatched (issue 15.2).

The tiny model of bench/reliability.py (width 32, 1 block, context 32, byte tokenizer, trained a few steps on
tiny_shakespeare) is served by the real app under uvicorn in a subprocess of its own (so the clients do not share
its interpreter), once per mode:

- "unbatched": ``SLMB_GENERATE_BATCH=0``, each request decodes alone in the thread pool, as before batching;
- "unbatched-1t": the same with one intra-op thread per process (``OMP_NUM_THREADS=1``), to tell the gain of
  batching from that of the batched path's single-threaded ops on small models;
- "batched": ``SLMB_GENERATE_BATCH=32``, exact rows (the default);
- "batched-fast": batched with ``SLMB_GENERATE_EXACT=0`` (one product per layer for the batch; its texts may in
  principle differ from the others', so it is left out of the equality check).

Clients post the reliability benchmark's request (``ROMEO:``, 32 new tokens, temperature 0.7, top_k 40, a seed
per request) to ``/api/v1/generate-text``: first one client alone, then ``--clients`` clients at once, each sending
``--rounds`` requests back to back. Each request's text is checked against the other modes' for the same seed
(batched decoding must not change it).

Each server is warmed first (a lone client, then one concurrent burst: the first calls of a fresh process are slow,
and more so on a busy machine), the modes alternate (``--reps`` fresh servers each) and the table shows each
mode's median run (by requests/s). ``server CPU ms/req`` is the server process's CPU time (user + system) per
request during the concurrent phase: on a shared machine, where other work steals cores and wall-clock numbers
swing, it is the steadier measure of the work each request costs.

    .venv/bin/python bench/serve_generate.py [--clients 20] [--rounds 5] [--lone 20] [--reps 3] [--json]
    .venv/bin/python bench/serve_generate.py --url http://127.0.0.1:8000 --model NAME   # a running service

``--step`` measures the decoding thread alone, in this process, without HTTP: ``--clients`` requests submitted
together to one ``BatchedGenerator`` (the same model shape, untrained, and the same request), ``--reps`` times;
it reports the wall time per batch of requests, per decoding step, and the part spent sampling (timed around the
generator's sampling call).

    .venv/bin/python bench/serve_generate.py --step [--clients 20] [--new 32] [--reps 15] [--exact 0|1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

API = "/api/v1"
BENCH = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(port: int) -> None:
    """The server process: the app as ``slmb serve`` builds it, without Redis-backed training (not used here)."""
    import logging

    import uvicorn

    from slmb.api.app import Settings, create_app

    logging.getLogger("slmb.api").setLevel(logging.ERROR)  # no Redis on purpose: not its reconciler's warnings
    app = create_app(Settings.from_env(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    for (name, _), gen in app.state.models._items.items():  # how full the batches were
        if hasattr(gen, "steps"):
            print(f"server: {name}: {gen.steps} batched steps, {gen.batched_rows / max(1, gen.steps):.1f} rows "
                  "per step", file=sys.stderr)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process (Linux), 0 when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0


@contextlib.contextmanager
def server(home: Path, batch: int, threads: int | None = None, exact: bool = True):
    port = free_port()
    env = {**os.environ, "SLMB_HOME": str(home), "SLMB_GENERATE_BATCH": str(batch),
           "SLMB_GENERATE_EXACT": "1" if exact else "0"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/api/v1/completed-models", timeout=5).status_code < 500:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.3)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def body(model: str, seed: int, new: int) -> dict[str, Any]:
    return {"model_name": model, "input_text": "ROMEO:", "max_length": new, "seed": seed}


async def load(url: str, model: str, clients: int, rounds: int, new: int, seed0: int, pid: int | None = None
               ) -> dict[str, Any]:
    """``clients`` clients, each sending ``rounds`` requests back to back (after a warm-up burst of one request
    each); latencies, the texts by seed, and the server's CPU time per request when ``pid`` is given."""
    latencies: list[float] = []
    texts: dict[int, str] = {}
    tokens = 0

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for r in range(rounds):
            seed = seed0 + c * rounds + r
            t0 = time.perf_counter()
            resp = await http.post(f"{API}/generate-text", json=body(model, seed, new))
            latencies.append(time.perf_counter() - t0)
            resp.raise_for_status()
            texts[seed] = resp.json()["generated_text"]
            tokens += resp.json()["new_tokens"]

    limits = httpx.Limits(max_connections=clients + 5)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await client(0, http)  # warm: the model loads
        await asyncio.gather(*(http.post(f"{API}/generate-text", json=body(model, 99_999, new))
                               for _ in range(clients)))
        latencies.clear()
        texts.clear()
        tokens = 0
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "wall_s": wall, "req_s": len(latencies) / wall,
            "server_cpu_ms_per_req": 1000 * cpu / len(latencies) if pid else None,
            "tokens_s": tokens / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
            "max_s": latencies[-1], "texts": texts}


def train_model(home: Path, name: str) -> None:
    os.environ["SLMB_HOME"] = str(home)
    sys.path.insert(0, str(BENCH))
    from reliability import tiny_request

    from slmb.core.trainer import train

    train(tiny_request(name, max_steps=20), track=False)


def decode_steps(clients: int, new: int, reps: int, exact: bool) -> dict[str, Any]:
    """``--step``: the decoding thread of a ``BatchedGenerator``, in process (see the module's docstring)."""
    import torch

    sys.path.insert(0, str(BENCH))
    from reliability import tiny_request

    from slmb.core.compiler import build_model
    from slmb.core.generate import BatchedGenerator, Generator, SamplingParams
    from slmb.core.spec import TrainRequest
    from slmb.core.tokenizers import load_tokenizer

    torch.manual_seed(0)
    model = build_model(TrainRequest.model_validate(tiny_request("step"))).eval()
    gen = Generator(model, load_tokenizer("byte"))
    name = "_sample_rows" if hasattr(gen, "_sample_rows") else "_sample"  # (an older checkout samples per row)
    sample, sampling = getattr(gen, name), [0.0]

    def timed(*a: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return sample(*a)
        finally:
            sampling[0] += time.perf_counter() - t0

    setattr(gen, name, timed)
    batcher = BatchedGenerator(gen, max_batch=max(32, clients), exact=exact)
    params = [SamplingParams(max_new_tokens=new, temperature=0.7, top_k=40, seed=i) for i in range(clients)]
    walls, shares, per_step = [], [], []
    for rep in range(reps + 1):  # the first is a warm-up
        sampling[0] = 0.0
        t0 = time.perf_counter()
        with batcher._cond:  # all submitted before the decoding thread looks at any
            handles = [batcher.submit("ROMEO:", p) for p in params]
        for handle in handles:
            for _ in handle:
                pass
        wall = time.perf_counter() - t0
        if rep:
            walls.append(wall)
            shares.append(sampling[0] / wall)
            per_step.append(wall / new)
    batcher.close()
    return {"clients": clients, "new_tokens": new, "reps": reps, "exact": exact, "sampling_call": name,
            "wall_s": statistics.median(walls), "wall_min_s": min(walls), "step_ms": 1000 * statistics.median(per_step),
            "sampling_share": statistics.median(shares), "batched_steps": batcher.steps // (reps + 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="requests per client, back to back")
    ap.add_argument("--lone", type=int, default=20, help="requests of the lone client")
    ap.add_argument("--new", type=int, default=32, help="max_length of each request")
    ap.add_argument("--reps", type=int, help="fresh servers per mode, alternating (default 3); --step: batches (15)")
    ap.add_argument("--batch", type=int, default=32, help="SLMB_GENERATE_BATCH of the batched server")
    ap.add_argument("--url", help="drive this running service (one mode: whatever it is set to)")
    ap.add_argument("--model", default="bench-gen")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--step", action="store_true", help="time the decoding thread in process (no HTTP)")
    ap.add_argument("--exact", type=int, default=1, help="--step: exact rows (1) or batched products (0)")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve)
    if args.step:
        r = decode_steps(args.clients, args.new, args.reps or 15, bool(args.exact))
        r["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        r["load_average"] = os.getloadavg()
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['date']}: {r['clients']} requests x {r['new_tokens']} tokens together, exact={r['exact']}: "
                  f"{r['wall_s']:.4f} s median (min {r['wall_min_s']:.4f}) over {r['reps']}, {r['step_ms']:.2f} ms "
                  f"per step, sampling {100 * r['sampling_share']:.0f}% ({r['sampling_call']}); load average "
                  + " ".join(f"{x:.2f}" for x in r["load_average"]))
        return

    def measure(url: str, pid: int | None = None) -> dict[str, Any]:
        lone = asyncio.run(load(url, args.model, 1, args.lone, args.new, 10_000, pid))
        many = asyncio.run(load(url, args.model, args.clients, args.rounds, args.new, 0, pid))
        return {"lone": lone, "concurrent": many}

    if args.url:
        modes = {"service": measure(args.url)}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            home = Path(tmp) / "home"
            train_model(home, args.model)
            settings = {"unbatched": (0, None, True), "unbatched-1t": (0, 1, True), "batched": (args.batch, None, True),
                        "batched-fast": (args.batch, None, False)}
            runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in settings}
            for _ in range(args.reps or 3):
                for mode, (batch, threads, exact) in settings.items():
                    with server(home, batch, threads, exact) as (url, pid):
                        runs[mode].append(measure(url, pid))
            modes = {m: {k: sorted((r[k] for r in rs), key=lambda x: x["req_s"])[len(rs) // 2]
                         for k in ("lone", "concurrent")} for m, rs in runs.items()}
            exact_runs = [rs for m, rs in runs.items() if settings[m][2]]
            same = all(r[k]["texts"] == rs[0][k]["texts"] for rs in exact_runs for r in rs
                       for k in ("lone", "concurrent")) and \
                all(runs["unbatched"][0][k]["texts"] == runs["batched"][0][k]["texts"] for k in ("lone", "concurrent"))
    if args.url:
        same = None
    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "same_texts": same,
            "modes": {m: {k: {f: v for f, v in r.items() if f != "texts"} for k, r in d.items()}
                      for m, d in modes.items()}}
    if args.json:
        print(json.dumps(info))
        return
    print(f"{info['date']}, {info['cpus']} CPUs; {args.new} new tokens per request; texts equal across modes: {same}")
    print(f"{'mode':<10} {'clients':>7} {'requests':>8} {'req/s':>7} {'tokens/s':>9} {'p50 s':>7} {'p95 s':>7} "
          f"{'max s':>7} {'server CPU ms/req':>17}")
    for mode, d in modes.items():
        for r in (d["lone"], d["concurrent"]):
            cpu = r["server_cpu_ms_per_req"]
            print(f"{mode:<10} {r['clients']:>7} {r['requests']:>8} {r['req_s']:>7.1f} {r['tokens_s']:>9.0f} "
                  f"{r['p50_s']:>7.3f} {r['p95_s']:>7.3f} {r['max_s']:>7.3f} {cpu if cpu is not None else 0:>17.1f}")
    if same is False:
        sys.exit("batched and unbatched texts differ for the same seeds")


if __name__ == "__main__":
    main()
