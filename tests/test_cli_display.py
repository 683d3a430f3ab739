"""`slmb train` in a terminal: the live display of a successful run, and Ctrl-C pressed twice. The command runs
in a pseudo-terminal of its own (as under a shell), so rich draws its live bar and Ctrl-C is a typed ^C."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time
from pathlib import Path

import pytest
from toy import toy_request

from slmb.core import events as ev
from slmb.core import store

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """``slmb`` ARGS on a 160-column pseudo-terminal; everything it draws is kept in ``raw``."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            try:
                os.execve(sys.executable, [sys.executable, "-m", "slmb", *args], env)
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        self.raw, self.status = b"", None

    @property
    def text(self) -> str:
        return ANSI.sub(b"", self.raw).decode(errors="replace")

    def read_until(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (found := re.search(pattern, self.text)):
            if time.monotonic() > deadline or not self._read(deadline - time.monotonic()):
                raise AssertionError(f"no {pattern!r} on the terminal after {timeout:g} s:\n{self.text[-3000:]}")
        return found

    def _read(self, timeout: float) -> bool:
        if select.select([self.fd], [], [], max(0.0, min(timeout, 1.0)))[0]:
            try:
                data = os.read(self.fd, 1 << 16)
            except OSError:  # EIO: the child has closed the terminal
                return False
            self.raw += data
            return bool(data)
        return True

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.2)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self._read(0.1) and select.select([self.fd], [], [], 0)[0]:
                    pass
                os.close(self.fd)
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
        raise AssertionError(f"slmb still running after {timeout:g} s:\n{self.text[-3000:]}")

    def kill(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self.fd)


@pytest.fixture
def terminal_env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"}
    for name in ("NO_COLOR", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env


@pytest.fixture
def run_terminal():
    started: list[Terminal] = []

    def start(args: list[str], env: dict[str, str]) -> Terminal:
        started.append(Terminal(args, env))
        return started[-1]

    yield start
    for term in started:
        term.kill()


def test_live_display_of_a_successful_run(tmp_path, terminal_env, run_terminal):
    path = tmp_path / "request.json"
    path.write_text(json.dumps(toy_request(name="shown", max_steps=300, eval_every=150)))
    term = run_terminal(["train", str(path), "--no-track"], terminal_env)
    assert term.wait(240) == 0, term.text[-3000:]
    text = term.text
    task_id = re.search(r"task (\S+) \(from another terminal: slmb stop \1\)", text).group(1)
    assert re.search(r"shown: [\d,]+ parameters on cpu \(fp32\); tiny_shakespeare .* with byte; 300 steps", text)
    # The bar is redrawn in place (rich erases the line each time), not printed line by line.
    assert term.raw.count(b"\x1b[2K") >= 3
    frames = re.findall(r"train\s*\S*\s+(\d+)/300 epoch 1/1 loss \(EMA\) ([\d.]+) val (\S+) lr (\S+) ([\d,]+) tok/s "
                        r"MFU ([\d.]+)% ETA (\d+:\d\d)", text)
    steps = [int(f[0]) for f in frames]
    # (the first step's line is drawn at once; then rich redraws twice a second from a thread of its own: which
    # later steps it catches depends on the machine)
    assert min(steps) < 300 and steps[-1] == 300 and steps == sorted(steps), steps
    assert float(frames[-1][2]) > 0  # the val loss, once evaluated
    assert frames[-1][6] == "0:00"
    assert re.search(r"step 150: train loss [\d.]+, val loss [\d.]+", text)
    # The summary table when the run ends.
    assert "shown: finished" in text
    assert re.search(r"steps\s+│ 300 / 300", text) and re.search(r"best val loss\s+│ \d\.\d{4}", text)
    assert re.search(r"loss \(EMA\), last step\s+│ \d\.\d{4}", text)
    assert re.search(r"train loss, last eval\s+│ \d\.\d{4}", text)
    assert re.search(r"^model: \S*completed/shown\r?$", text, re.M), text[-2000:]
    assert re.search(r"^\s+1\s+step\s+300\r?$", text, re.M) and "val loss (lowest" in text  # the loss curve
    assert ev.read_events(store.run_dir(task_id).events)[-1].name == "finished"


def test_second_ctrl_c_quits_at_once_without_a_model(tmp_path, terminal_env, run_terminal):
    """The first ^C asks for a checkpoint at the end of the step; a second one, typed before that step ends,
    quits at once (exit 130): the run is left `stopped` (interrupted), with no checkpoint and no model."""
    # Steps of a second or more on one thread, so the second ^C lands while the first one's step still runs.
    path = tmp_path / "request.json"
    path.write_text(json.dumps(toy_request(name="interrupted", d=256, blocks=4, ctx=128, batch_size=16,
                                           max_steps=100_000)))
    term = run_terminal(["train", str(path), "--no-track"], terminal_env)
    task_id = term.read_until(r"task (\S+) \(from", 120).group(1)
    term.read_until(r"\b[1-9]\d*/\d+ epoch", 240)
    term.type(b"\x03")
    term.read_until("stopping after this step", 60)
    t0 = time.monotonic()
    term.type(b"\x03")
    assert term.wait(60) == 130, term.text[-3000:]
    took = time.monotonic() - t0

    events = ev.read_events(store.run_dir(task_id).events)
    assert [e.name for e in events[-2:]] == ["status", "stopped"], [e.name for e in events]
    stopped = events[-1]
    assert stopped.reason == "interrupted" and stopped.checkpoint is None
    assert "checkpoint" not in [e.name for e in events]
    assert not list(store.run_dir(task_id).checkpoints.glob("step-*"))
    assert not (Path(os.environ["SLMB_HOME"]) / "completed" / "interrupted").exists()
    assert [m.name for m in store.list_models()] == []
    from slmb.core.control import get_control

    assert get_control().read_status(task_id)["state"] == "stopped"
    assert took < 30

    # Listed as stopped without a checkpoint, and --resume says why it cannot, before any banner.
    from slmb.core.control import list_runs, resume_problem

    [listed] = list_runs()
    assert (listed["state"], listed["resumable"]) == ("stopped", False)
    assert "has no checkpoint to resume from: it was stopped before saving one" in resume_problem(task_id)
    term = run_terminal(["train", "--resume", task_id, "--no-track"], terminal_env)
    assert term.wait(60) == 1
    assert "no checkpoint to resume from" in term.text and f"task {task_id}" not in term.text


def test_utilisation_shows_model_flops_and_never_an_mfu_above_100_percent():
    from slmb.console import fmt_flops, fmt_utilisation

    assert fmt_flops(3.4e9) == "3.4 GFLOP/s" and fmt_flops(3.12e14) == "312 TFLOP/s" and fmt_flops(None) == "-"
    assert fmt_utilisation(0.25, 1e11, 4e11) == "25% (100 GFLOP/s of 400 GFLOP/s peak)"
    assert fmt_utilisation(0.05, 2e10, None) == "5.0% (20 GFLOP/s)"
    # No trusted peak (MFU None: it would have passed 100%): the model's FLOP/s alone, said why.
    assert fmt_utilisation(None, 5e11, 1e11) == "500 GFLOP/s (peak not trusted yet)"
    assert fmt_utilisation(None, None) == "-"
