"""The reliability campaign (issue 11): bounded fuzzing, fault injection and load against a real ``slmb serve``.

It starts ``slmb serve`` (private Redis with its append-only file, one supervised worker) in a temporary
``SLMB_HOME``, then tries, from outside as a client and an operator would:

- fuzz: every route with malformed, hostile and randomly mutated bodies (paths out of the data root, NaN,
  lone surrogates, huge integers, wrong content types, oversized and chunked bodies, bad ids); held = a 4xx
  or a 2xx that serialises, never a 5xx or a dropped connection;
- load: 50 SSE clients on one run (every client the same ordered events, one terminal), 20 concurrent
  generate calls, 5 queued trainings (each finishes);
- faults: SIGKILL of the worker (idle and mid-run), SIGKILL and a restart of the private Redis mid-run,
  a Redis stall (SIGSTOP/SIGCONT), a restart of ``slmb serve`` with a queued run, and an SSE client that
  reconnects with Last-Event-ID at random points; afterwards no MLflow run of an ended task is RUNNING.

Prints a table of cases tried, held and failed (the one in docs/reliability.md) and exits 1 on any failure.

    .venv/bin/python bench/reliability.py              # ~5-10 min on the 2-core dev box
    .venv/bin/python bench/reliability.py --quick      # fewer fuzz cases, shorter stall
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
API = "/api/v1"
TERMINAL = ("finished", "stopped", "error")
FAST = {"SLMB_HEARTBEAT_S": "1", "SLMB_REAP_INTERVAL_S": "0.5", "SLMB_SSE_KEEPALIVE": "1", "SLMB_STOP_WAIT_S": "15"}


# ---------------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError, OSError, ValueError, LookupError):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def tiny_request(name: str, max_steps: int = 12) -> dict[str, Any]:
    """A GPT-2-shaped canvas at toy size: width 32, 1 block, the byte tokenizer, tiny_shakespeare."""
    ln = {"normType": "Layer Normalization"}
    return {
        "config": {"model": "gpt-2", "tokenizer": "byte", "epochs": 1, "batch_size": 4, "context_length": 32,
                   "dtype": "fp32", "device": "cpu", "max_steps": max_steps, "warmup_steps": 2,
                   "eval_every": max(5, max_steps // 2), "eval_batches": 2, "checkpoint_every": 2},
        "model": [
            {"type": "tokenEmbedding", "data": {"id": "tok", "vocabSize": 257, "embDim": 32}},
            {"type": "positionalEmbedding", "data": {"id": "pos", "ctxLength": 32, "embDim": 32}},
            {"type": "transformerBlock", "data": {"id": "blk", "numOfBlocks": 1}, "children": [
                {"type": "normalization", "data": {"id": "ln1", **ln}},
                {"type": "mhAttention", "data": {"id": "att", "numHeads": 2, "ctxLength": 32}},
                {"type": "residual", "data": {"id": "r1", "source": "ln1"}},
                {"type": "normalization", "data": {"id": "ln2", **ln}},
                {"type": "feedForward", "data": {"id": "ff", "hiddenDim": 64, "actFunc": "gelu"}},
                {"type": "residual", "data": {"id": "r2", "source": "ln2"}},
            ]},
            {"type": "normalization", "data": {"id": "lnf", **ln}},
            {"type": "linear", "data": {"id": "head", "inDim": 32, "outDim": 257}},
        ],
        "dataset": "tiny_shakespeare", "dataset_config": "default", "modelName": name,
    }


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    fields: dict[str, str] = {}
    for line in lines:
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(":")
            fields[name] = fields.get(name, "") + value.removeprefix(" ")
            continue
        if "data" in fields:
            wire = json.loads(fields["data"])
            yield {"id": fields.get("id"), "event": wire.get("event"), "data": wire.get("data")}
        fields = {}


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the direct children of ``pid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            ppid = int(text[text.rindex(")") + 2:].split()[1])
            if ppid == pid:
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out.append((int(stat.parent.name), cmd))
    return out


# ---------------------------------------------------------------------------------------------------- the stack


@dataclass
class Serve:
    tmp: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        shared = Path(os.environ.get("SLMB_SHARED_DIR") or ROOT.parent / "shared")
        self.env = {**os.environ, **FAST, "SLMB_HOME": str(self.tmp / "home"), "OMP_NUM_THREADS": "1",
                    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.env.setdefault("SLMB_DATA_DIR", str(shared / "datasets"))
        for key in ("SLMB_REDIS_URL", "MLFLOW_TRACKING_URI", "SLMB_API_TOKEN"):
            self.env.pop(key, None)
        log = open(self.tmp / "serve.log", "ab")  # noqa: SIM115 - the child writes to it until it ends
        self.proc = subprocess.Popen([sys.executable, "-m", "slmb", "serve", "--port", str(self.port), "--workers",
                                      "1", "--log-level", "warning", "--no-mlflow"], env=self.env, cwd=self.tmp,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.wait_healthy(120)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/healthz", timeout=10).json()

    def wait_healthy(self, timeout: float = 90) -> dict[str, Any]:
        return wait_until(lambda: (h := self.health())["redis"]["ok"] and h["workers"].get("count", 0) >= 1 and h,
                          timeout, f"a healthy slmb serve\n{self.log_tail()}", interval=0.3)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.tmp / "serve.log").read_text(errors="replace").splitlines()[-n:])
        return ""

    def child(self, word: str) -> int:
        assert self.proc is not None
        found = [pid for pid, cmd in children(self.proc.pid) if word in cmd]
        if not found:
            raise LookupError(f"no {word} child of slmb serve")
        return found[0]

    def workhorse(self) -> int | None:
        """The training process: a child of the worker."""
        kids = children(self.child("worker"))
        return kids[0][0] if kids else None

    # -- client calls

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=httpx.Timeout(60, read=180))

    def submit(self, body: dict[str, Any]) -> str:
        with self.client() as c:
            resp = c.post(f"{API}/train-complete-model", json=body)
        if resp.status_code != 200:
            raise AssertionError(f"train: {resp.status_code} {resp.text[:300]}")
        return resp.json()["task_id"]

    def events(self, task_id: str, last_event_id: str | None = None, until: Callable[[dict], bool] | None = None,
               timeout: float = 300, limit: int | None = None) -> list[dict[str, Any]]:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        out = []
        with self.client() as c, c.stream("GET", f"{API}/events/{task_id}", headers=headers,
                                          timeout=httpx.Timeout(10, read=timeout)) as resp:
            if resp.status_code != 200:
                raise AssertionError(f"events: {resp.status_code} {resp.read()[:300]!r}")
            for message in parse_sse(resp.iter_lines()):
                out.append(message)
                if message["event"] in TERMINAL or (until and until(message)) or len(out) == limit:
                    break
        return out

    def follow(self, task_id: str, timeout: float = 300) -> list[dict[str, Any]]:
        """Every event of a task to its end, reconnecting with Last-Event-ID when a stream breaks."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = next((m["id"] for m in reversed(seen) if m.get("id") and m["event"] != "connected"), None)
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                got = self.events(task_id, last, timeout=max(5.0, deadline - time.monotonic()))
                seen += [m for m in got if m["event"] != "connected"]
            if seen and seen[-1]["event"] in TERMINAL:
                return seen
            time.sleep(0.5)
        raise TimeoutError(f"task {task_id} did not end in {timeout:g} s")


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class Case:
    group: str
    name: str
    tried: int = 0
    held: int = 0
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, why: str) -> bool:
        self.tried += 1
        if ok:
            self.held += 1
        elif len(self.failures) < 5:
            self.failures.append(why[:300])
        return ok


CASES: list[Case] = []


def case(group: str, name: str) -> Case:
    CASES.append(Case(group, name))
    return CASES[-1]


def run_case(c: Case, fn: Callable[[Case], None]) -> None:
    t0 = time.monotonic()
    try:
        fn(c)
    except Exception as exc:  # a campaign reports, it does not stop at the first failure
        c.check(False, f"{type(exc).__name__}: {exc}")
    print(f"  {c.group:7} {c.name:58} {c.held}/{c.tried} held ({time.monotonic() - t0:.0f} s)", flush=True)


def one_terminal(events: list[dict[str, Any]]) -> str | None:
    """None when the events end in exactly one terminal event and no id repeats; else what is wrong."""
    names = [m["event"] for m in events]
    ends = [n for n in names if n in TERMINAL]
    ids = [m["id"] for m in events if m.get("id")]
    if len(ends) != 1 or names[-1] not in TERMINAL:
        return f"terminal events {ends} (last {names[-1:]})"
    if len(ids) != len(set(ids)):
        return "an event id repeats"
    if ids != sorted(ids, key=lambda i: tuple(int(p) for p in i.split("-"))):
        return "event ids out of order"
    return None


# ---------------------------------------------------------------------------------------------------- fuzz

HOSTILE_STRINGS = ["../../../../etc", "/etc/passwd", "~/.ssh", "tiny_shakespeare/../../../etc", "\ud800", "x" * 5000,
                   "", "-", "..", "/", "C:\\Windows", "%2e%2e/%2e%2e", "tiny_shakespeare\x00", "\u202e", "😀" * 50]
HOSTILE_NUMBERS: list[Any] = [math.nan, math.inf, -math.inf, 2**70, -(2**70), 10**6, -1, 0, 1e308, 0.5, True, None]


def mutate(value: Any, rng: random.Random, depth: int = 0) -> Any:
    """One random change somewhere inside ``value``."""
    if isinstance(value, dict) and value and depth < 6:
        key = rng.choice(sorted(value))
        out = dict(value)
        out[key] = mutate(value[key], rng, depth + 1) if rng.random() < 0.8 else rng.choice(
            HOSTILE_STRINGS + HOSTILE_NUMBERS + [[], {}])
        return out
    if isinstance(value, list) and value and depth < 6:
        out = list(value)
        i = rng.randrange(len(out))
        out[i] = mutate(out[i], rng, depth + 1)
        return out
    return rng.choice(HOSTILE_STRINGS + HOSTILE_NUMBERS + [[], {}, [1] * 3, {"a": {"b": None}}])


def dumps(obj: Any) -> bytes:
    """JSON as a hostile client writes it: NaN and Infinity literals, lone surrogates passed through."""
    return json.dumps(obj, allow_nan=True, ensure_ascii=True).encode()


def fuzz(serve: Serve, n: int, seed: int) -> None:
    rng = random.Random(seed)
    base = tiny_request("fuzz", max_steps=1)
    gen_base = {"model_name": "rel-gen", "input_text": "ROMEO:", "max_length": 8, "temperature": 0.7, "top_k": 40}
    routes = {
        "train": (f"{API}/train-complete-model", base),
        "generate": (f"{API}/generate-text", gen_base),
        "generate/stream": (f"{API}/generate-text/stream", gen_base),
        "stop": (f"{API}/stop-training", {"task_id": "no-such-task", "force_kill": False}),
    }
    with serve.client() as client:
        for route, (path, body) in routes.items():
            c = case("fuzz", f"POST {route}: {n} mutated bodies")

            def one(c: Case, path: str = path, body: dict = body, route: str = route) -> None:
                for _ in range(n):
                    mutated = mutate(copy.deepcopy(body), rng)
                    try:
                        resp = client.post(path, content=dumps(mutated), headers={"Content-Type": "application/json"})
                        text = resp.text  # a streamed route must end its stream, not drop it
                    except httpx.HTTPError as exc:
                        c.check(False, f"{route}: {type(exc).__name__} for {str(mutated)[:120]}")
                        continue
                    if resp.status_code == 200 and route == "train":  # valid after all: cancel it while queued
                        client.post(f"{API}/stop-training", json={"task_id": resp.json()["task_id"]})
                    if route == "generate/stream" and resp.status_code == 200:
                        ok = '"event": "done"' in text or '"event":"done"' in text
                        c.check(ok, f"stream did not end with done: {text[-200:]}")
                        continue
                    c.check(resp.status_code < 500, f"{route}: {resp.status_code} for {str(mutated)[:160]}")

            run_case(c, one)

        c = case("fuzz", "hostile requests (paths, types, sizes, ids)")

        def hostile(c: Case) -> None:
            train = f"{API}/train-complete-model"
            attacks: list[tuple[str, str, dict[str, Any]]] = []
            for ds in ("../../../../etc", "/etc", "/etc/passwd", "~", "tiny_shakespeare/../../.."):
                attacks.append(("POST", train, {"json": {**base, "dataset": ds}}))
            for tok in ("/etc/passwd", "../../tokenizers/llama2/tokenizer.model", "~/x.model"):
                attacks.append(("POST", train, {"json": {**base, "config": {**base["config"], "tokenizer": tok}}}))
            form = {"data": {"x": "1"}}
            attacks += [("POST", train, {"content": json.dumps(base), "headers": {"Content-Type": "text/plain"}}),
                        ("POST", train, form), ("POST", f"{API}/generate-text", form),
                        ("POST", f"{API}/stop-training", {"content": "{}", "headers": {"Content-Type": "text/plain"}}),
                        ("POST", train, {"content": b"{" * 100_000, "headers": {"Content-Type": "application/json"}}),
                        ("POST", f"{API}/generate-text", {"content": b"[" + b" " * (40 << 20) + b"]",
                                                         "headers": {"Content-Type": "application/json"}}),
                        ("POST", f"{API}/generate-text", {"content": iter([b"[" + b" " * (1 << 20)] * 40 + [b"]"]),
                                                         "headers": {"Content-Type": "application/json"}}),
                        ("GET", f"{API}/events/..%2F..%2Fetc", {}), ("GET", f"{API}/events/no-such-task", {}),
                        ("GET", f"{API}/events/x", {"headers": {"Last-Event-ID": "not-an-id"}}),
                        ("POST", f"{API}/generate-text", {"json": {**gen_base, "model_name": "../../etc/passwd"}})]
            as_json = {"Content-Type": "application/json"}
            for value in (math.nan, math.inf, 2**70, "\ud800"):
                for key in ("seed", "learning_rate", "batch_size"):
                    body = {**base, "config": {**base["config"], key: value}}
                    attacks.append(("POST", train, {"content": dumps(body), "headers": as_json}))
                for key in ("top_p", "temperature", "seed", "input_text"):
                    body = {**gen_base, key: value}
                    attacks.append(("POST", f"{API}/generate-text", {"content": dumps(body), "headers": as_json}))
            leaks = [str(serve.tmp), serve.env["SLMB_DATA_DIR"], str(Path.home())]
            for method, path, kwargs in attacks:
                try:
                    resp = client.request(method, path, **kwargs)
                except httpx.HTTPError as exc:
                    c.check(False, f"{method} {path}: {type(exc).__name__}")
                    continue
                leaked = [p for p in leaks if p and p in resp.text]
                c.check(400 <= resp.status_code < 500 and not leaked,
                        f"{method} {path} {str(kwargs)[:100]}: {resp.status_code} {resp.text[:160]} leaked={leaked}")

        run_case(c, hostile)


# ---------------------------------------------------------------------------------------------------- load


def load(serve: Serve) -> None:
    c = case("load", "50 SSE clients on one run: same ordered events")

    def sse_clients(c: Case) -> None:
        task_id = serve.submit(tiny_request("rel-gen", max_steps=20))

        async def run() -> list[list[dict]]:
            async def one(client: httpx.AsyncClient) -> list[dict]:
                lines = []
                async with client.stream("GET", f"{API}/events/{task_id}",
                                         timeout=httpx.Timeout(10, read=300)) as resp:
                    async for line in resp.aiter_lines():
                        lines.append(line)
                        if line.startswith("data:") and json.loads(line[5:]).get("event") in TERMINAL:
                            break
                return list(parse_sse(iter([*lines, ""])))

            async with httpx.AsyncClient(base_url=serve.url, limits=httpx.Limits(max_connections=60)) as client:
                return await asyncio.gather(*(one(client) for _ in range(50)))

        streams = asyncio.run(run())
        reference = [(m["id"], m["event"]) for m in streams[0]]
        for s in streams:
            got = [(m["id"], m["event"]) for m in s]
            c.check(got == reference and one_terminal(s) is None and s[-1]["event"] == "finished",
                    f"a client saw {len(got)} events ending {got[-1:]} vs {len(reference)}")

    run_case(c, sse_clients)

    c = case("load", "20 concurrent generate calls")

    def generate(c: Case) -> None:
        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=serve.url, timeout=120) as client:
                return await asyncio.gather(*(client.post(f"{API}/generate-text", json={
                    "model_name": "rel-gen", "input_text": "ROMEO:", "max_length": 32, "seed": i})
                    for i in range(20)))

        for resp in asyncio.run(run()):
            c.check(resp.status_code == 200 and resp.json()["output_text"].startswith("ROMEO:"),
                    f"{resp.status_code} {resp.text[:200]}")

    run_case(c, generate)

    c = case("load", "5 queued trainings all finish")

    def queued(c: Case) -> None:
        ids = [serve.submit(tiny_request(f"rel-q{i}", max_steps=6)) for i in range(5)]
        for task_id in ids:
            events = serve.follow(task_id)
            c.check(events[-1]["event"] == "finished" and one_terminal(events) is None,
                    f"{task_id}: {[m['event'] for m in events][-3:]}")

    run_case(c, queued)


# ---------------------------------------------------------------------------------------------------- faults


def finishes(serve: Serve, name: str, c: Case) -> None:
    events = serve.follow(serve.submit(tiny_request(name, max_steps=6)))
    c.check(events[-1]["event"] == "finished" and one_terminal(events) is None,
            f"{name}: ended with {[m['event'] for m in events][-3:]}")


def mlflow_runs(serve: Serve) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{serve.tmp / 'home' / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("slmb").experiment_id], max_results=1000)


def mlflow_status(serve: Serve, model_name: str) -> str | None:
    return next((r.info.status for r in mlflow_runs(serve) if r.data.tags.get("model_name") == model_name), None)


def faults(serve: Serve, stall_s: float, rng: random.Random) -> None:
    c = case("fault", "SIGKILL the idle worker: replaced, next run finishes")

    def kill_idle_worker(c: Case) -> None:
        old = serve.child("worker")
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: serve.child("worker") != old and serve.health()["workers"]["count"] >= 1, 120,
                   "a new worker")
        finishes(serve, "rel-after-worker-kill", c)

    run_case(c, kill_idle_worker)

    c = case("fault", "SIGKILL the worker mid-run: one error event, MLflow FAILED")

    def kill_busy_worker(c: Case) -> None:
        task_id = serve.submit(tiny_request("rel-busy-kill", max_steps=2000))
        serve.events(task_id, until=lambda m: m["event"] == "step")
        os.kill(serve.child("worker"), signal.SIGKILL)
        events = serve.follow(task_id)
        c.check(events[-1]["event"] == "error" and one_terminal(events) is None,
                f"ended with {[m['event'] for m in events][-3:]}")
        status = wait_until(lambda: (s := mlflow_status(serve, "rel-busy-kill")) != "RUNNING" and s, 60,
                            "the MLflow run to be closed")
        c.check(status == "FAILED", f"MLflow run {status}")
        serve.wait_healthy(120)
        finishes(serve, "rel-after-busy-kill", c)

    run_case(c, kill_busy_worker)

    c = case("fault", "SIGKILL Redis mid-run: back with its data, run ends once")

    def kill_redis(c: Case) -> None:
        task_id = serve.submit(tiny_request("rel-redis-kill", max_steps=40))
        first = serve.events(task_id, until=lambda m: m["event"] == "step")
        os.kill(serve.child("redis-server"), signal.SIGKILL)
        events = serve.follow(task_id)
        ids = [m["id"] for m in first if m["event"] != "connected"]
        c.check([m["id"] for m in events][:len(ids)] == ids, "events before the kill were lost or changed")
        c.check(events[-1]["event"] in TERMINAL and one_terminal(events) is None,
                f"ended with {[m['event'] for m in events][-3:]}")
        serve.wait_healthy(120)
        finishes(serve, "rel-after-redis-kill", c)

    run_case(c, kill_redis)

    c = case("fault", f"Redis stalled {stall_s:g} s (SIGSTOP/SIGCONT): workers recover")

    def stall_redis(c: Case) -> None:
        task_id = serve.submit(tiny_request("rel-stall", max_steps=40))
        serve.events(task_id, until=lambda m: m["event"] == "step")
        pid = serve.child("redis-server")
        os.kill(pid, signal.SIGSTOP)
        time.sleep(stall_s)  # the fault itself: a stall of this length
        os.kill(pid, signal.SIGCONT)
        events = serve.follow(task_id)
        c.check(events[-1]["event"] in TERMINAL and one_terminal(events) is None,
                f"ended with {[m['event'] for m in events][-3:]}")
        serve.wait_healthy(120)
        finishes(serve, "rel-after-stall", c)

    run_case(c, stall_redis)

    c = case("fault", "SSE client reconnecting at random points: each event once")

    def reconnects(c: Case) -> None:
        task_id = serve.submit(tiny_request("rel-reconnect", max_steps=30))
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["event"] not in TERMINAL:
            last = seen[-1]["id"] if seen else None
            got = serve.events(task_id, last, limit=rng.randint(2, 6))  # leave after a few messages
            seen += [m for m in got if m["event"] != "connected"]
        full = [m for m in serve.events(task_id) if m["event"] != "connected"]
        c.check([m["id"] for m in seen] == [m["id"] for m in full], "reconnected view differs from the full replay")
        c.check(one_terminal(seen) is None, str(one_terminal(seen)))

    run_case(c, reconnects)

    c = case("fault", "restart slmb serve with a queued run: it runs")

    def restart(c: Case) -> None:
        busy = serve.submit(tiny_request("rel-restart-busy", max_steps=2000))
        serve.events(busy, until=lambda m: m["event"] == "step")
        queued = serve.submit(tiny_request("rel-restart-queued", max_steps=6))
        serve.stop()  # the busy run is asked to stop; the queued one stays in Redis's append-only file
        serve.start()
        c.check(serve.follow(busy)[-1]["event"] in ("stopped", "error"), "the busy run did not end")
        events = serve.follow(queued)
        c.check(events[-1]["event"] == "finished", f"queued run ended with {[m['event'] for m in events][-3:]}")

    run_case(c, restart)

    c = case("fault", "no MLflow run of an ended task is RUNNING")

    def mlflow_states(c: Case) -> None:
        with contextlib.suppress(TimeoutError):  # reconciliation may still be closing the last ones
            wait_until(lambda: not any(r.info.status == "RUNNING" for r in mlflow_runs(serve)), 60,
                       "MLflow runs to settle", interval=1)
        for run in mlflow_runs(serve):
            c.check(run.info.status != "RUNNING", f"{run.data.tags.get('model_name')}: RUNNING")

    run_case(c, mlflow_states)


# ---------------------------------------------------------------------------------------------------- main


def table() -> str:
    rows = ["| group | case | tried | held | failed |", "|---|---|---:|---:|---:|"]
    rows += [f"| {c.group} | {c.name} | {c.tried} | {c.held} | {c.tried - c.held} |" for c in CASES]
    tried, held = sum(c.tried for c in CASES), sum(c.held for c in CASES)
    rows.append(f"| **all** | | **{tried}** | **{held}** | **{tried - held}** |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer fuzz cases and a shorter Redis stall")
    ap.add_argument("--fuzz", type=int, default=None, help="mutated bodies per route (default 60, quick 15)")
    ap.add_argument("--stall", type=float, default=None, help="seconds Redis is stalled (default 20, quick 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the cases as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary SLMB_HOME and logs")
    args = ap.parse_args()
    n = args.fuzz or (15 if args.quick else 60)
    stall = args.stall or (5.0 if args.quick else 20.0)
    if shutil.which("redis-server") is None:
        print("redis-server is not installed (scripts/system-deps.sh installs it)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="slmb-reliability-"))
    serve = Serve(tmp)
    t0 = time.monotonic()
    print(f"slmb serve in {tmp}", flush=True)
    try:
        serve.start()
        load(serve)  # trains rel-gen first: the fuzzer's generate cases use it
        fuzz(serve, n, args.seed)
        faults(serve, stall, random.Random(args.seed))
    finally:
        serve.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    minutes = (time.monotonic() - t0) / 60
    print(f"\n{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, {minutes:.1f} min, "
          f"fuzz {n}/route, stall {stall:g} s, seed {args.seed}\n")
    print(table())
    for c in CASES:
        for why in c.failures:
            print(f"FAILED {c.group}/{c.name}: {why}")
    if args.json:
        args.json.write_text(json.dumps([c.__dict__ for c in CASES], indent=2))
    return 1 if any(c.failures or c.tried == 0 for c in CASES) else 0


if __name__ == "__main__":
    sys.exit(main())
