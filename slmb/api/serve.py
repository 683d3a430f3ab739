"""``slmb serve``: the whole service on one machine in one command (DESIGN.md §5).

Without a Redis URL it starts a private ``redis-server`` (free port, temporary directory, no persistence);
it starts ``workers`` worker processes (``slmb worker``) and runs the API with uvicorn in this process. On
Ctrl-C or SIGTERM, uvicorn stops serving, the trainings our workers run are asked to stop cooperatively
(they checkpoint), the workers get a warm shutdown and, after a grace period, SIGKILL; then Redis stops.
The children also die with this process if it is killed outright (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("slmb.serve")
STOP_GRACE_S = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _child(argv: list[str], sig: int, **kwargs: Any) -> subprocess.Popen:
    from slmb.api.worker import die_with_parent

    # A session of its own: the terminal's Ctrl-C reaches only `serve`, which stops the children in order.
    return subprocess.Popen(argv, start_new_session=True, preexec_fn=lambda: die_with_parent(sig), **kwargs)


def _stop(proc: subprocess.Popen, grace_s: float, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def private_redis(timeout_s: float = 10.0) -> Iterator[str]:
    """A throwaway ``redis-server`` on a free local port; yields its URL."""
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (e.g. apt-get install redis-server), "
                           "or pass --redis-url to use a running Redis")
    workdir = tempfile.mkdtemp(prefix="slmb-redis-")
    port = free_port()
    proc = _child([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", workdir, "--daemonize", "no", "--loglevel", "warning"], signal.SIGKILL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.05)
        client.close()
        log.info("private Redis at %s", url)
        yield url
    finally:
        _stop(proc, 5.0)
        shutil.rmtree(workdir, ignore_errors=True)


def start_workers(redis_url: str, n: int, queue: str) -> list[tuple[str, subprocess.Popen]]:
    names = [f"slmb-serve-{os.getpid()}-{i}" for i in range(n)]
    return [(name, _child([sys.executable, "-m", "slmb", "worker", "--redis-url", redis_url, "--queue", queue,
                           "--name", name], signal.SIGKILL)) for name in names]


def stop_workers(redis_url: str, workers: list[tuple[str, subprocess.Popen]], queue: str,
                 grace_s: float = STOP_GRACE_S) -> None:
    """Ask the trainings on these workers to stop (they checkpoint), then shut the workers down."""
    if not workers:
        return
    from rq import Worker

    from slmb.api import redis_events as rev
    from slmb.api.worker import get_queue

    names = {name for name, _ in workers}
    try:
        conn = rev.connect(redis_url)
        for w in Worker.all(connection=conn, queue=get_queue(conn, queue)):
            job_id = w.get_current_job_id() if w.name in names else None
            if job_id:
                log.info("asking task %s to stop", job_id)
                rev.RedisControl(conn).request_stop(job_id)
    except Exception as exc:  # Redis is gone: the workers are stopped all the same
        log.warning("could not ask running trainings to stop: %s", exc)
    for _, proc in workers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # RQ's warm shutdown: the current job ends first
    deadline = time.monotonic() + grace_s
    for _, proc in workers:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()  # its work-horse dies with it
            proc.wait()


def serve(host: str = "127.0.0.1", port: int = 8000, redis_url: str | None = None, workers: int = 1,
          log_level: str = "info") -> None:
    import uvicorn

    from slmb.api.app import Settings, create_app

    with contextlib.ExitStack() as stack:
        if redis_url is None:
            redis_url = stack.enter_context(private_redis())
        # Every process of the stack (and `slmb train --queue` run from this shell's children) finds Redis here.
        os.environ["SLMB_REDIS_URL"] = redis_url
        settings = Settings.from_env(redis_url=redis_url)
        procs = start_workers(redis_url, workers, settings.queue)
        stack.callback(stop_workers, redis_url, procs, settings.queue)
        log.info("API on http://%s:%d, %d worker(s), Redis %s", host, port, workers, redis_url)
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port, log_level=log_level))
        # uvicorn re-raises the signal that stopped it once it has shut down; SIGTERM's default action would
        # end the process before the workers and Redis are stopped, so make it an exception like Ctrl-C.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        server.run()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
