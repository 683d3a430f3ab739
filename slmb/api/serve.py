"""``slmb serve``: the whole service on one machine in one command (DESIGN.md §5).

Without a Redis URL it starts a private ``redis-server`` on 127.0.0.1 whose data lives in ``$SLMB_HOME/redis``
(an append-only file), so a restart of Redis or of ``slmb serve`` keeps queued jobs, events and statuses; its URL
is written to ``$SLMB_HOME/redis/url``. It starts ``workers`` worker processes (``slmb worker``), the MLflow UI
(``mlflow server`` on the tracking store, 127.0.0.1:5000 by default; none with ``--no-mlflow`` or when
``MLFLOW_TRACKING_URI`` names a server) and runs the API with uvicorn in this process. The UI's address goes into
``$SLMB_MLFLOW_UI`` for the API and the workers, so the ``mlflow_url`` links point at it.

What it starts it supervises: a child that exits is logged with its exit status or signal and started again
after a backoff that doubles from ``SLMB_RESTART_BACKOFF_S`` up to ``SLMB_RESTART_BACKOFF_MAX_S`` and starts over
once a child has run ``SLMB_RESTART_STABLE_S`` seconds. Redis comes back on the same port with its data; a
worker comes back under a new name (RQ refuses a name whose registration has not expired). ``/healthz`` shows
each child's restarts and last exit.

On Ctrl-C or SIGTERM, uvicorn stops serving, the trainings our workers run are asked to stop cooperatively
(they checkpoint), the workers get a warm shutdown and, after a grace period, SIGKILL; then the MLflow UI and
Redis stop.
The children also die with this process if it is killed outright (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("slmb.serve")
STOP_GRACE_S = 30.0
# A child that exits is started again after a backoff that doubles from the first to the cap, and starts over once
# the child has run for the stable period.
BACKOFF_ENV, DEFAULT_BACKOFF_S = "SLMB_RESTART_BACKOFF_S", 1.0
BACKOFF_MAX_ENV, DEFAULT_BACKOFF_MAX_S = "SLMB_RESTART_BACKOFF_MAX_S", 30.0
STABLE_ENV, DEFAULT_STABLE_S = "SLMB_RESTART_STABLE_S", 60.0
REDIS_DIR = "redis"  # under $SLMB_HOME


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _popen(argv: list[str], sig: int, **kwargs: Any) -> subprocess.Popen:
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


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


class Child:
    """One process that ``slmb serve`` keeps running. ``argv(n)`` gives the command of its ``n``-th start."""

    def __init__(self, name: str, argv: Callable[[int], list[str]], on_exit: Callable[[Child], None] | None = None,
                 env: dict[str, str] | None = None, on_start: Callable[[Child], None] | None = None):
        self.name, self.argv, self.on_exit, self.env, self.on_start = name, argv, on_exit, env, on_start
        self.proc: subprocess.Popen | None = None
        self.cmd: list[str] = []
        self.restarts = 0
        self.started_at = 0.0
        self.last_exit: str | None = None
        self.last_exit_at: float | None = None
        self.backoff_s = 0.0
        self.next_start: float | None = None
        self.gate: threading.Event | None = None  # a child added to start later starts once this is set

    def start(self) -> None:
        self.cmd = self.argv(self.restarts)
        self.proc = _popen(self.cmd, signal.SIGKILL, env=None if self.env is None else {**os.environ, **self.env})
        self.started_at, self.next_start = time.monotonic(), None
        if self.on_start is not None:
            self.on_start(self)

    def describe(self) -> dict[str, Any]:
        alive = self.proc is not None and self.proc.poll() is None
        return {"name": self.name, "alive": alive, "restarts": self.restarts,
                "uptime_s": round(time.monotonic() - self.started_at, 1) if alive else None,
                "last_exit": self.last_exit,
                "last_exit_s_ago": None if self.last_exit_at is None else round(time.time() - self.last_exit_at, 1)}


class Supervisor:
    """Restarts the children that exit, with capped exponential backoff, from a thread of its own.

    The thread lives as long as the process: Linux's parent-death signal, which takes the children down with
    ``serve``, fires when the *thread* that started a child ends. :meth:`stop` only ends the restarts."""

    def __init__(self, interval_s: float = 0.25):
        self.children: list[Child] = []
        self.backoff_s = _env_float(BACKOFF_ENV, DEFAULT_BACKOFF_S)
        self.backoff_max_s = _env_float(BACKOFF_MAX_ENV, DEFAULT_BACKOFF_MAX_S)
        self.stable_s = _env_float(STABLE_ENV, DEFAULT_STABLE_S)
        self.interval_s = interval_s
        self._stopping = False
        self._lock = threading.Lock()  # held while a child is checked and restarted
        self._thread = threading.Thread(target=self._run, name="slmb-supervisor", daemon=True)

    def add(self, child: Child, when: threading.Event | None = None) -> Child:
        """Start ``child`` now, or from the supervisor's thread once ``when`` is set."""
        if when is None:
            child.start()
        child.gate = when
        with self._lock:
            self.children.append(child)
        return child

    def run_in_background(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No more restarts from now on (the children are stopped by whoever started the service)."""
        with self._lock:
            self._stopping = True

    def state(self) -> list[dict[str, Any]]:
        return [c.describe() for c in self.children]

    def _run(self) -> None:
        while True:
            time.sleep(self.interval_s)
            with self._lock:
                for child in [] if self._stopping else self.children:
                    try:
                        self.check(child)
                    except Exception:  # a failed start is retried after the longest backoff; the thread lives on
                        log.exception("supervising %s failed", child.name)
                        child.proc, child.next_start = None, time.monotonic() + self.backoff_max_s

    def check(self, child: Child) -> None:
        now = time.monotonic()
        if child.proc is None and child.next_start is None:  # added to start later
            if child.gate is not None and child.gate.is_set():
                child.start()
                log.info("%s started (pid %d)", child.name, child.proc.pid)
            return
        if child.next_start is None and child.proc is not None and child.proc.poll() is not None:
            ran_s = now - child.started_at
            child.last_exit, child.last_exit_at = describe_exit(child.proc.returncode), time.time()
            child.backoff_s = (self.backoff_s if ran_s >= self.stable_s or not child.backoff_s
                               else min(child.backoff_s * 2, self.backoff_max_s))
            child.next_start = now + child.backoff_s
            log.warning("%s (pid %d) %s after %.1f s; restarting it in %.1f s", child.name, child.proc.pid,
                        child.last_exit, ran_s, child.backoff_s)
            if child.on_exit is not None:
                child.on_exit(child)
        if child.next_start is not None and now >= child.next_start:
            child.restarts += 1
            child.start()
            log.warning("%s restarted (restart %d, pid %d)", child.name, child.restarts, child.proc.pid)


# ---------------------------------------------------------------------------------------------------- Redis


def _wait_for_redis(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.BusyLoadingError:  # replaying its append-only file
                pass
            except redis.ConnectionError:
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited ({describe_exit(proc.returncode)}) on {url}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on {url} within {timeout_s:g} s")
            time.sleep(0.05)
    finally:
        client.close()


def _port_of_last_run(url_file: Any) -> int | None:
    """The port Redis had last time, if it is free: clients that kept ``SLMB_REDIS_URL`` find it again."""
    with contextlib.suppress(OSError, ValueError):
        port = int(url_file.read_text().strip().rsplit(":", 1)[1].split("/")[0])
        with socket.socket() as s:
            # As redis-server binds: the last run's connections may linger in TIME_WAIT on the port.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        return port
    return None


@contextlib.contextmanager
def private_redis(supervisor: Supervisor, timeout_s: float = 60.0) -> Iterator[str]:
    """A supervised ``redis-server`` on 127.0.0.1 keeping its data in ``$SLMB_HOME/redis``; yields its URL.

    ``appendfsync everysec``: a kill or a crash can lose about the last second of writes (Redis may answer while a
    slow background fsync holds its write back). The event sinks re-send events a restarted Redis lost and
    reconciliation ends tasks whose job was lost; ``always`` would add an fsync to every event and heartbeat."""
    from slmb.core.store import slmb_home

    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (e.g. apt-get install redis-server), "
                           "or pass --redis-url to use a running Redis")
    workdir = slmb_home() / REDIS_DIR
    workdir.mkdir(parents=True, exist_ok=True)
    lock = open(workdir / "lock", "w")  # noqa: SIM115 - held, and so locked, while this service runs
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RuntimeError(f"another slmb serve is using the Redis data in {workdir}; stop it, or give this one "
                           "another SLMB_HOME or --redis-url") from None
    url_file = workdir / "url"
    port = _port_of_last_run(url_file) or free_port()
    url = f"redis://127.0.0.1:{port}/0"
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no", "--loglevel", "warning"]
    child = supervisor.add(Child("redis", lambda _: argv))
    try:
        _wait_for_redis(url, child.proc, timeout_s)
        url_file.write_text(url + "\n")
        log.info("private Redis at %s, data in %s", url, workdir)
        yield url
    finally:
        supervisor.stop()
        if child.proc is not None:
            _stop(child.proc, 10.0)  # SIGTERM: Redis flushes its append-only file
        lock.close()


# ---------------------------------------------------------------------------------------------------- workers


def _forget_worker(redis_url: str, name: str) -> None:
    """Unregister a dead worker at once, rather than when its registration expires (a minute): /healthz and
    stop_workers then see only the workers that run."""
    import redis
    from rq import Worker

    conn = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + name, connection=conn)
        if worker is not None:
            worker.register_death()
    except redis.RedisError as exc:
        log.warning("could not unregister the dead worker %s: %s", name, exc)
    finally:
        conn.close()


def start_workers(supervisor: Supervisor, redis_url: str, n: int, queue: str,
                  nproc_per_node: int | None = None) -> list[Child]:
    nproc = [] if nproc_per_node is None else ["--nproc-per-node", str(nproc_per_node)]

    def argv(i: int) -> Callable[[int], list[str]]:
        return lambda restarts: [sys.executable, "-m", "slmb", "worker", "--redis-url", redis_url, "--queue", queue,
                                 *nproc, "--name", worker_name(i, restarts)]

    return [supervisor.add(Child(f"worker-{i}", argv(i), on_exit=lambda c: _forget_worker(redis_url, c.cmd[-1])))
            for i in range(n)]


def worker_name(i: int, restarts: int) -> str:
    return f"slmb-serve-{os.getpid()}-{i}" + (f".{restarts}" if restarts else "")


def stop_workers(redis_url: str, workers: list[Child], queue: str, grace_s: float = STOP_GRACE_S) -> None:
    """Ask the trainings on these workers to stop (they checkpoint), then shut the workers down."""
    procs = [c.proc for c in workers if c.proc is not None]
    if not procs:
        return
    from rq import Worker

    from slmb.api import redis_events as rev
    from slmb.api.worker import get_queue

    names = {c.cmd[-1] for c in workers}  # a worker's command ends with its name
    try:
        conn = rev.connect(redis_url)
        for w in Worker.all(connection=conn, queue=get_queue(conn, queue)):
            job_id = w.get_current_job_id() if w.name in names else None
            if job_id:
                log.info("asking task %s to stop", job_id)
                rev.RedisControl(conn).request_stop(job_id)
    except Exception as exc:  # Redis is gone: the workers are stopped all the same
        log.warning("could not ask running trainings to stop: %s", exc)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # RQ's warm shutdown: the current job ends first
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()  # its work-horse dies with it
            proc.wait()


# ---------------------------------------------------------------------------------------------------- MLflow UI

MLFLOW_PORT = 5000
UI_ENV = "SLMB_MLFLOW_UI"  # the UI's address, for the links in responses and in `slmb train`'s output
MLFLOW_READY_TIMEOUT_S = 300.0  # how long the log waits for the UI to answer before it says it did not
# MLflow's job runner (GenAI evaluation jobs, a dozen huey processes that outlive the server) is not needed here.
MLFLOW_CHILD_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
UI_GROUP_FILE = "mlflow-ui.pgid"  # under $SLMB_HOME: "<process group> <port>" of the UI last started there


def mlflow_executable() -> str:
    """The ``mlflow`` command beside this Python (the virtual environment slmb runs in), else on the PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mlflow")
    found = beside if os.access(beside, os.X_OK) else shutil.which("mlflow")
    if found is None:
        raise RuntimeError("the mlflow command is not installed beside this Python; install mlflow, or start "
                           "slmb serve with --no-mlflow")
    return found


def _port_taken(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be listened on (as uvicorn binds: TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _reachable_host(host: str) -> str:
    """How a client reaches a server listening on ``host``: for every interface, the host of $SLMB_PUBLIC_URL, else
    this machine's loopback."""
    if host in ("0.0.0.0", "::", ""):
        from urllib.parse import urlsplit

        host = urlsplit(os.environ.get("SLMB_PUBLIC_URL") or "").hostname or "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def mlflow_server_argv(host: str, port: int) -> list[str]:
    """``mlflow server`` on the tracking store. Artifacts: slmb's experiment keeps them in the local
    ``$SLMB_HOME/mlartifacts`` (a ``file:`` location), which the server reads and serves to its UI itself; an
    experiment made in the UI gets ``mlflow-artifacts:``, proxied to the same folder (``--serve-artifacts``)."""
    from slmb.core.store import slmb_home
    from slmb.core.tracking import tracking_uri

    return [mlflow_executable(), "server", "--backend-store-uri", tracking_uri(), "--host", host,
            "--port", str(port), "--workers", "1", "--uvicorn-opts", "--no-access-log",
            "--serve-artifacts", "--artifacts-destination", (slmb_home() / "mlartifacts").as_uri()]


def _kill_group(child: Child) -> None:
    """``mlflow server`` runs its web server as a child of its own, in the session ``serve`` gave it: when the
    mlflow command is killed, that server would linger and keep the port. End what is left of the group."""
    if child.proc is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGKILL)


def _group_file() -> Path:
    from slmb.core.store import slmb_home

    return slmb_home() / UI_GROUP_FILE


def _note_group(child: Child) -> None:
    with contextlib.suppress(OSError):
        _group_file().write_text(f"{child.proc.pid} {child.cmd[child.cmd.index('--port') + 1]}\n")


def _running(pid: int, settle_s: float = 2.0) -> bool:
    """Whether ``pid`` runs: not gone, nor a zombie left for init to reap (a process just killed: give it a moment)."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if state in ("Z", "X"):
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)


def _end_orphaned_ui(port: int, host: str) -> bool:
    """End the UI web server a ``slmb serve`` of this ``$SLMB_HOME`` left on ``port`` when it was killed outright
    (SIGKILL): its ``mlflow`` command died with ``serve``, the grandchild did not. Only a group whose leader is
    gone and whose processes are MLflow's is touched; returns whether the port is free now."""
    try:
        pgid, noted_port = map(int, _group_file().read_text().split())
    except (OSError, ValueError):
        return False
    if noted_port != port or _running(pgid):  # another port, or its `mlflow` command still runs
        log.debug("port %d: the UI noted in %s (group %d, port %d) is not an orphan", port, UI_GROUP_FILE, pgid,
                  noted_port)
        return False
    members = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                members.append((entry / "cmdline").read_bytes())
    members = [cmdline for cmdline in members if cmdline]  # a zombie (the killed `mlflow`) has none
    if not members or not all(b"mlflow" in cmdline for cmdline in members):
        log.debug("port %d: group %d holds %s, not only MLflow's server", port, pgid, members)
        return False
    log.warning("ending the MLflow UI (process group %d) that a killed slmb serve left on port %d", pgid, port)
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _port_taken(host, port):
                return True
            time.sleep(0.2)
    return False


def _announce_ui(url: str, probe: str, child: Child, timeout_s: float) -> None:
    """Log the UI's address once it answers (``mlflow server`` takes seconds to start; the API does not wait)."""
    from slmb.core.tracking import ui_answers

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ui_answers(probe, 1.0):
            log.info("MLflow UI on %s", url)
            return
        time.sleep(0.5)
    log.warning("the MLflow UI did not answer on %s within %g s (%s); GET /healthz shows its process", probe,
                timeout_s, child.last_exit or "still starting")


def _open_store(done: threading.Event) -> None:
    from slmb.core import tracking

    try:
        tracking.client()
    except Exception as exc:  # the UI starts all the same, and says what is wrong with the store
        log.warning("could not open the MLflow store %s: %s: %s", tracking.tracking_uri(), type(exc).__name__, exc)
    finally:
        done.set()


class MlflowUI:
    """What ``slmb serve`` does about the MLflow UI, decided before anything starts (so a taken port fails at once):
    ``url`` is where the links point (None: none), ``argv`` the server to start (None: none)."""

    def __init__(self, enabled: bool, host: str, port: int):
        from slmb.core import tracking

        self.host, self.port, self.url, self.argv = host, port, None, None
        uri = tracking.tracking_uri()
        if uri.startswith(("http://", "https://")):  # a tracking server is its own UI: the links point there
            self.url = tracking.mlflow_ui_base()
            return
        if not enabled:
            self.url = tracking.mlflow_ui_base()  # $SLMB_MLFLOW_UI if set (a UI run elsewhere), else none
            return
        if _port_taken(host, port) and not _end_orphaned_ui(port, host):
            raise RuntimeError(f"port {port} on {host} for the MLflow UI is taken (another mlflow ui or slmb serve?): "
                               "give it another with --mlflow-port N, or start none with --no-mlflow")
        self.argv = mlflow_server_argv(host, port)
        # The UI's own address unless the user named one (a proxy in front of it, say).
        self.url = (os.environ.get(UI_ENV) or f"http://{_reachable_host(host)}:{port}").rstrip("/")

    @contextlib.contextmanager
    def run(self, supervisor: Supervisor, ready_timeout_s: float = MLFLOW_READY_TIMEOUT_S) -> Iterator[str | None]:
        """Start the supervised UI (if any) and put its address in $SLMB_MLFLOW_UI for this process and the workers
        it starts; yields the address the links use."""
        if self.argv is None:
            log.info("MLflow UI: %s", self.url or "none (slmb serve --no-mlflow); responses carry no MLflow link")
            yield self.url
            return
        os.environ[UI_ENV] = self.url
        argv, store_open = self.argv, threading.Event()
        # MLflow does not lock the making of a new sqlite store's tables: the UI starts once this process has made
        # them (or failed to), from the supervisor's thread; the API does not wait for either.
        threading.Thread(target=_open_store, args=(store_open,), name="slmb-mlflow-store", daemon=True).start()
        child = supervisor.add(Child("mlflow", lambda _: argv, on_exit=_kill_group, env=MLFLOW_CHILD_ENV,
                                     on_start=_note_group), when=store_open)
        local = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        probe = f"http://{f'[{local}]' if ':' in local else local}:{self.port}"
        threading.Thread(target=_announce_ui, args=(self.url, probe, child, ready_timeout_s), name="slmb-mlflow-ui",
                         daemon=True).start()
        try:
            yield self.url
        finally:
            supervisor.stop()
            if child.proc is not None:
                _stop(child.proc, 10.0)  # SIGTERM: mlflow passes it on to its web server
                _kill_group(child)


def serve(host: str = "127.0.0.1", port: int = 8000, redis_url: str | None = None, workers: int = 1,
          log_level: str = "info", nproc_per_node: int | None = None, mlflow: bool = True,
          mlflow_port: int = MLFLOW_PORT, mlflow_host: str = "127.0.0.1") -> None:
    """Run the stack (see the module docstring). ``nproc_per_node``: each worker trains every run on that many
    processes (``slmb worker --nproc-per-node``), and the API admits runs by it. ``mlflow``: start the MLflow UI
    on ``mlflow_host:mlflow_port`` (not when ``MLFLOW_TRACKING_URI`` names a server, which is its own UI)."""
    import uvicorn

    from slmb.api.app import Settings, create_app

    ui = MlflowUI(mlflow, mlflow_host, mlflow_port)  # a taken port fails here, before anything starts
    supervisor = Supervisor()
    with contextlib.ExitStack() as stack:
        if redis_url is None:
            redis_url = stack.enter_context(private_redis(supervisor))
        ui_url = stack.enter_context(ui.run(supervisor))  # before the workers: they inherit $SLMB_MLFLOW_UI
        # Every process of the stack (and `slmb train --queue` run from this shell's children) finds Redis here.
        os.environ["SLMB_REDIS_URL"] = redis_url
        if nproc_per_node is not None:
            # The API's admission judges one device's share of a run, and a batch_size that splits over them.
            from slmb.api.worker import NPROC_ENV

            os.environ[NPROC_ENV] = str(nproc_per_node)
        settings = Settings.from_env(redis_url=redis_url)
        children = start_workers(supervisor, redis_url, workers, settings.queue, nproc_per_node)
        # Runs after the supervisor has stopped (callbacks run last-in first-out): no worker is restarted then.
        stack.callback(stop_workers, redis_url, children, settings.queue)
        stack.callback(supervisor.stop)
        supervisor.run_in_background()
        log.info("dashboard and API on http://%s:%d/, %d worker(s)%s, Redis %s, MLflow UI %s", host, port, workers,
                 f" of {nproc_per_node} process(es) each" if nproc_per_node else "", redis_url,
                 ui_url if ui.argv is None else f"starting on {ui_url}")
        app = create_app(settings)
        app.state.supervisor = supervisor
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
        # uvicorn re-raises the signal that stopped it once it has shut down; SIGTERM's default action would
        # end the process before the workers and Redis are stopped, so make it an exception like Ctrl-C.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        server.run()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
