"""Helpers for tests/test_distributed.py: start distributed runs the way users do (the venv's ``slmb`` with
``--nproc-per-node``, or torchrun directly), read their event logs, find their rank processes, and build the
one-process runs and published models they are compared with.

Every process writes its stdout to a file (never a pipe the test might stop reading: a full pipe would block rank
0 mid-step), and the tests poll that file or the run's events.jsonl instead of sleeping.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slmb.core import events as ev
from slmb.core import store

SLMB = str(Path(sys.executable).with_name("slmb"))  # the console script users run, from this venv
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# How long a test waits for anything a run should do by itself (start, step, stop, exit) before it fails: generous,
# because CI runs this on a loaded 2-core box, but bounded, so a hang is a failure rather than a stuck job.
WAIT_S = 180.0


@contextlib.contextmanager
def module_env(home: Path) -> Iterator[None]:
    """The environment conftest gives each test, with ``home`` as SLMB_HOME, for a module-scoped fixture: those
    run before the per-test environment exists."""
    import pytest
    from conftest import shared_dir

    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"SLMB_HOME": home, "SLMB_TOKENIZER_DIR": shared_dir() / "tokenizers",
                           "SLMB_DATA_DIR": shared_dir() / "datasets", "HF_HUB_OFFLINE": 1,
                           "HF_DATASETS_OFFLINE": 1}.items():
            mp.setenv(key, str(value))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


def cli_env(home: Path) -> dict[str, str]:
    """The test's environment (tokenizer and data dirs, offline hub) with ``home`` as SLMB_HOME: runs of one test
    module share a home, so the token cache is built once. No MLflow server: the default sqlite store in ``home``."""
    env = {**os.environ, "SLMB_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("OMP_NUM_THREADS", None)  # the launcher's rank_env gives each of the 2 ranks 1 of the 2 cores
    return env


@dataclass
class Proc:
    """A started command whose stdout (events, with --json) and stderr go to files."""

    popen: subprocess.Popen
    out: Path
    err: Path

    def events(self) -> list[ev.Event]:
        """The complete event lines printed so far (a half-written last line is left out)."""
        return ev.read_events(self.out)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_for(self, name: str, timeout_s: float = WAIT_S) -> list[ev.Event]:
        """Poll stdout until an event ``name`` has been printed; returns the events so far. Fails at once if the
        process ends first, and after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            events = self.events()
            if any(e.name == name for e in events):
                return events
            if self.popen.poll() is not None:
                raise AssertionError(f"exited {self.popen.returncode} before a {name!r} event: "
                                     f"{[e.name for e in events]}\n{self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name!r} event after {timeout_s} s: {[e.name for e in events]}")
            time.sleep(0.05)

    def wait(self, timeout_s: float = WAIT_S) -> int:
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout_s} s:\n{self.stderr()[-3000:]}") from None

    def kill(self) -> None:
        """Kill the command and what it started (tests that fail must not leave ranks behind)."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def start(args: list[str], home: Path, workdir: Path, tag: str) -> Proc:
    """Start ``args`` with SLMB_HOME=``home``; stdout/stderr go to ``workdir``/``tag``.{out,err}."""
    out, err = workdir / f"{tag}.out", workdir / f"{tag}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        popen = subprocess.Popen(args, env=cli_env(home), stdout=o, stderr=e, stdin=subprocess.DEVNULL)
    return Proc(popen, out, err)


def run(args: list[str], home: Path, workdir: Path, tag: str, timeout_s: float = WAIT_S) -> tuple[int, Proc]:
    """Run ``args`` to the end: (exit code, the finished Proc)."""
    proc = start(args, home, workdir, tag)
    return proc.wait(timeout_s), proc


def write_request(path: Path, body: dict[str, Any]) -> Path:
    path.write_text(json.dumps(body))
    return path


def run_log(task_id: str) -> list[ev.Event]:
    """The run's events.jsonl under $SLMB_HOME/runs/<task_id>/ (the test's SLMB_HOME must be the runs' home)."""
    return ev.read_events(store.run_dir(task_id).events)


def evals(events: list[ev.Event]) -> dict[int, tuple[float, float]]:
    """{step: (eval train loss, val loss)}: with eval_every=1 a per-step loss curve, on fixed batches."""
    return {e.step: (e.train_loss, e.val_loss) for e in events if e.name == "eval"}


def step_losses(events: list[ev.Event]) -> dict[int, float]:
    return {e.step: e.loss for e in events if e.name == "step"}


def assert_curves_match(got: dict[int, Any], want: dict[int, Any], *, rel: float, what: str) -> None:
    """Every step of ``got`` is in ``want`` with the same numbers to ``rel`` (and 1e-6 absolute)."""
    import pytest

    missing = sorted(set(got) - set(want))
    assert not missing, f"{what}: steps {missing[:5]} have no reference"
    for step in sorted(got):
        assert got[step] == pytest.approx(want[step], rel=rel, abs=1e-6), f"{what}: step {step}"


# ---------------------------------------------------------------------------------------------------- processes


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def task_processes(task_id: str) -> dict[int, list[str]]:
    """{pid: argv} of the live processes that run ``task_id``: torchrun and its ranks (both have ``--task-id ID``
    on their command line). A zombie has an empty command line, so only processes still running count."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = _cmdline(int(entry.name))
            if any(a == "--task-id" and b == task_id for a, b in itertools.pairwise(argv)):
                found[int(entry.name)] = argv
    return found


def rank_pids(task_id: str) -> dict[int, int]:
    """{RANK: pid} of the rank processes of ``task_id`` (not torchrun's agent), from each one's environment."""
    ranks = {}
    for pid, argv in task_processes(task_id).items():
        if "torch.distributed.run" in argv:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(item.decode(errors="replace").split("=", 1) for item in environ if b"=" in item)
        if "RANK" in env:
            ranks[int(env["RANK"])] = pid
    return ranks


def kill_task(task_id: str) -> None:
    """Clean-up after a failed test: SIGKILL whatever still runs ``task_id`` (processes this test started)."""
    for pid in task_processes(task_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------- references


def one_process(body: dict[str, Any], **kwargs: Any) -> tuple[Any, list[ev.Event]]:
    """Train ``body`` in this process (one process, every step reported): (TrainResult, events). One thread, as
    each of the 2 ranks has: the reductions in a matmul then run in the same order."""
    from slmb.core.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    got: list[ev.Event] = []
    try:
        result = train(body, sinks=[ev.CallbackSink(got.append)], track=False, step_every_s=0, **kwargs)
    finally:
        torch.set_num_threads(threads)
    return result, got


PROBE = torch.tensor([list(b"To be, or not to be, that is the"), list(b"ROMEO:\nBut soft, what light thro")])  # (2, 32)


def published_logits(name: str) -> torch.Tensor:
    """The completed model ``name``'s logits (2, 32, V) on a fixed input, loaded as `slmb generate` loads it."""
    from slmb.core.generate import load_model

    request, state, _ = store.load_completed(name)
    with torch.no_grad():
        return load_model(request, state)(PROBE)


def weight_names(name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} in the completed model's model.safetensors, read from the file itself."""
    from safetensors import safe_open

    path = store.get_model(name).path / store.WEIGHTS
    with safe_open(str(path), "pt") as f:
        return {k: (str(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
