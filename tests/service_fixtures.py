"""The HTTP service's test stack, from real parts: a redis-server of its own on a free port (never the
system's), ``slmb worker`` subprocesses and the API under ``slmb serve --workers 0``.

The worker and the API have different ``SLMB_HOME``s and share one MLflow store, as on two machines: the API
serves the worker's models by fetching them from MLflow. Test modules load this file as a plugin
(``pytest_plugins = ["service_fixtures"]``), so the session's stack is started once for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import shared_dir

from slmb.api.serve import free_port

TERMINAL = ("finished", "stopped", "error")
# Tight intervals so dead workers, keep-alives and stops show within a second or two.
FAST = {"SLMB_HEARTBEAT_S": "1", "SLMB_REAP_INTERVAL_S": "0.5", "SLMB_SSE_KEEPALIVE": "1",
        "SLMB_STOP_WAIT_S": "15"}


def tiny_request(name: str, max_steps: int = 20, blocks: int = 1) -> dict[str, Any]:
    """The GPT-2 reference canvas as the front end sends it, shrunk to train in seconds on a CPU: width 32,
    2 heads, context 32, the byte tokenizer (vocabulary 257)."""
    body = json.loads((shared_dir() / "requests" / "gpt2-reference.json").read_text())
    dims = {"inDim": 32, "outDim": 32, "embDim": 32, "vocabSize": 257, "ctxLength": 32, "numHeads": 2,
            "numOfBlocks": blocks, "hiddenDim": 64}

    def shrink(nodes: list[dict]) -> None:
        for node in nodes:
            data = node["data"]
            data.update({k: v for k, v in dims.items() if k in data})
            if node["type"] == "linear":
                data["outDim"] = 257
            shrink(node.get("children", []))

    shrink(body["model"])
    body["config"].update(vocab_size=257, context_length=32, stride=32, emb_dim=32, n_heads=2, n_blocks=blocks,
                          dtype="fp32", tokenizer="byte", batch_size=4, max_steps=max_steps, warmup_steps=2,
                          eval_every=max(10, max_steps // 2), eval_batches=2, device="cpu")
    if max_steps > 5_000:  # a long run: max_steps decides, not one epoch (7,842 steps of tiny_shakespeare here)
        body["config"]["epochs"] = 10_000
    body["modelName"] = name
    return body


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------------- SSE


def parse_sse(lines: Iterator[str], on_message: Callable[[dict], bool] | None = None) -> list[dict]:
    """SSE lines -> messages ``{"id", "event", "data"}`` and comments ``{"comment": text}``, until the
    terminal event, the end of the stream, or ``on_message`` returning True."""
    out: list[dict] = []
    fields: dict[str, str] = {}
    for line in lines:
        if line.startswith(":"):
            out.append({"comment": line[1:].strip()})
            continue
        if line:
            name, _, value = line.partition(":")
            fields[name] = fields.get(name, "") + value.removeprefix(" ")
            continue
        if "data" in fields:
            wire = json.loads(fields["data"])
            message = {"id": fields.get("id"), "event": wire["event"], "data": wire["data"]}
            out.append(message)
            if (on_message and on_message(message)) or message["event"] in TERMINAL:
                break
        fields = {}
    return out


def events_of(messages: list[dict]) -> list[dict]:
    return [m for m in messages if "event" in m]


def read_sse(client: httpx.Client, url: str, *, headers: dict | None = None, timeout: float = 120,
             on_message: Callable[[dict], bool] | None = None) -> list[dict]:
    with client.stream("GET", url, headers=headers, timeout=httpx.Timeout(10, read=timeout)) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        return parse_sse(resp.iter_lines(), on_message)


async def aread_sse(client: httpx.AsyncClient, url: str, timeout: float = 120) -> list[dict]:
    async with client.stream("GET", url, timeout=httpx.Timeout(10, read=timeout)) as resp:
        assert resp.status_code == 200
        lines = []
        async for line in resp.aiter_lines():
            lines.append(line)
            if line.startswith("data:") and json.loads(line[5:])["event"] in TERMINAL:
                break
        lines.append("")
        return parse_sse(iter(lines))


def follow_many(url: str, n: int, timeout: float = 120) -> list[list[dict]]:
    """``n`` concurrent SSE clients on ``url``; every client's messages."""
    async def run() -> list[list[dict]]:
        limits = httpx.Limits(max_connections=n + 5)
        async with httpx.AsyncClient(limits=limits) as client:
            return await asyncio.gather(*(aread_sse(client, url, timeout) for _ in range(n)))

    return asyncio.run(run())


# ---------------------------------------------------------------------------------------------------- processes


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (scripts/system-deps.sh installs it)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--daemonize", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_until(up, 10, "redis-server")
    client.close()
    return proc, url


def stop_process(proc: subprocess.Popen, grace_s: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Stack:
    tmp: Path
    redis_url: str
    env: dict[str, str]
    api_url: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def mlflow_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, timeout=60, **kwargs)

    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the child writes to it until it ends
        proc = subprocess.Popen(argv, env={**self.env, **env}, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def start_worker(self, name: str = "worker", queue: str = "slmb", home: str = "home-worker") -> subprocess.Popen:
        return self.start(name, [sys.executable, "-m", "slmb", "worker", "--redis-url", self.redis_url,
                                 "--queue", queue, "--name", f"{name}-{os.getpid()}"],
                          SLMB_HOME=str(self.tmp / home))

    def wait_for_workers(self, queue: str, n: int, timeout: float = 60) -> None:
        from rq import Queue, Worker

        conn = self.redis()
        wait_until(lambda: len(Worker.all(connection=conn, queue=Queue(queue, connection=conn))) >= n,
                   timeout, f"{n} worker(s) on queue {queue!r}\n{log_tail(self.tmp / 'worker.log')}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, grace_s=3)  # a worker's warm shutdown would wait for its running job


@pytest.fixture(scope="session")
def service(tmp_path_factory) -> Iterator[Stack]:
    """Redis, one worker (home A) and the API (home B) sharing one MLflow store."""
    tmp = tmp_path_factory.mktemp("service")
    redis_proc, url = start_redis(tmp)
    # One OpenMP thread: toy models gain nothing from two, and on a busy 2-core machine two threads crawl.
    env = {**os.environ, **FAST, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1",
           "SLMB_TOKENIZER_DIR": str(shared_dir() / "tokenizers"), "SLMB_DATA_DIR": str(shared_dir() / "datasets"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "SLMB_REDIS_URL": url}
    env.pop("SLMB_API_TOKEN", None)
    # The experiment's artifacts go under tmp: with MLFLOW_TRACKING_URI set, MLflow would otherwise put them in
    # ./mlruns of whichever process creates the experiment first (an in-process test app: the repository).
    from mlflow.tracking import MlflowClient

    MlflowClient(env["MLFLOW_TRACKING_URI"]).create_experiment("slmb", (tmp / "mlartifacts").as_uri())
    stack = Stack(tmp, url, env)
    try:
        port = free_port()
        stack.api_url = f"http://127.0.0.1:{port}"
        stack.start("api", [sys.executable, "-m", "slmb", "serve", "--redis-url", url, "--workers", "0",
                            "--port", str(port), "--log-level", "warning"],
                    SLMB_HOME=str(tmp / "home-api"), SLMB_MAX_BODY_BYTES="200000", SLMB_MAX_NEW_TOKENS="256")
        stack.start_worker()
        with httpx.Client() as client:
            def healthy() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    body = client.get(f"{stack.api_url}/healthz").json()
                    return body["status"] == "ok"
                return False

            wait_until(healthy, 90, f"a healthy service\n{log_tail(tmp / 'api.log')}\n"
                                    f"{log_tail(tmp / 'worker.log')}", interval=0.25)
        yield stack
    finally:
        stack.stop()
        stop_process(redis_proc)


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free port in a thread of this process; yields its base URL."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=3))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def submit_and_wait(client: httpx.Client, body: dict, until: str = "step", timeout: float = 90) -> str:
    """POST a training request and follow its events until the first ``until`` event. Returns the task id."""
    resp = client.post("/api/v1/train-complete-model", json=body)
    assert resp.status_code == 200, resp.text
    task_id = resp.json()["task_id"]
    seen = read_sse(client, f"/api/v1/events/{task_id}", timeout=timeout,
                    on_message=lambda m: m["event"] == until)
    assert seen[-1].get("event") == until, seen
    return task_id
