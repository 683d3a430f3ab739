import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from toy import toy_request

from slmb.core import events as ev
from slmb.core import store

SLMB = [sys.executable, "-m", "slmb"]


@pytest.fixture
def env():
    # One thread: toy models gain nothing from two, and on a busy 2-core machine two OpenMP threads crawl.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def request_file(tmp_path):
    def write(**kw):
        path = tmp_path / "request.json"
        path.write_text(json.dumps(toy_request(**kw)))
        return path
    return write


def slmb(*args, env, timeout=120):
    return subprocess.run([*SLMB, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


def start_training(path, env, *args):
    """Start `slmb train --json` and read its events until the first step; returns (process, events so far)."""
    proc = subprocess.Popen([*SLMB, "train", str(path), "--json", "--no-track", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(ev.parse_event(json.loads(line)))
        if seen[-1].name == "step":
            return proc, seen
    raise AssertionError(f"training ended before its first step: {proc.wait()} {proc.stderr.read()}")


def finish(proc, seen):
    out, err = proc.communicate(timeout=120)
    return seen + [ev.parse_event(json.loads(line)) for line in out.splitlines()], err


def test_train_json_end_to_end_with_list_and_events(request_file, env, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env.pop("MLFLOW_TRACKING_URI", None)
    result = slmb("train", request_file(max_steps=4, eval_every=2), "--json", "--name", "cli-toy", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    events = [ev.parse_event(json.loads(line)) for line in lines]  # stdout is nothing but events
    names = [e.name for e in events]
    assert names[:2] == ["status", "started"] and names[-2:] == ["status", "finished"]
    assert "step" in names and "eval" in names and "warning" not in names
    task_id = events[0].task_id
    assert f"task {task_id}" in result.stderr
    assert events[-1].model_name == "cli-toy" and Path(events[-1].path).is_dir()

    listed = json.loads(slmb("list", "--json", env=env).stdout)
    [model], [run] = listed["models"], listed["tasks"]
    assert model["model_name"] == "cli-toy" and model["task_id"] == task_id and model["mlflow_run_id"]
    assert (run["task_id"], run["model_name"], run["state"], run["step"]) == (task_id, "cli-toy", "finished", 4)
    table = slmb("list", env=env)
    assert "cli-toy" in table.stdout and "byte" in table.stdout
    assert "runs not finished" not in table.stdout  # a finished run is its model's row

    replay = slmb("events", task_id, env=env)
    assert replay.returncode == 0 and replay.stdout.splitlines() == lines


def test_ctrl_c_checkpoints_and_resume_finishes(request_file, env):
    path = request_file(max_steps=100_000)
    proc, seen = start_training(path, env)
    proc.send_signal(signal.SIGINT)
    events, err = finish(proc, seen)
    assert proc.returncode == 3, err
    assert "stopping after this step" in err
    stopped = events[-1]
    assert stopped.name == "stopped" and stopped.reason == "requested"
    assert Path(stopped.checkpoint).is_dir() and stopped.step >= 1
    assert [e.name for e in events[-4:]] == ["stop_requested", "checkpoint", "status", "stopped"]
    task_id = stopped.task_id
    assert f"slmb train --resume {task_id}" in err

    resumed = slmb("train", "--resume", task_id, "--json", "--no-track", "--max-steps", stopped.step + 2, env=env)
    assert resumed.returncode == 0, resumed.stderr
    after = [ev.parse_event(json.loads(line)) for line in resumed.stdout.splitlines()]
    assert after[1].name == "started" and after[1].resumed_from_step == stopped.step
    assert after[-1].name == "finished" and after[-1].step == stopped.step + 2


def test_slmb_stop_from_another_terminal(request_file, env):
    proc, seen = start_training(request_file(max_steps=100_000), env)
    task_id = seen[0].task_id
    follower = subprocess.Popen([*SLMB, "events", task_id, "--follow"], env=env, stdout=subprocess.PIPE, text=True)
    stopping = slmb("stop", task_id, env=env)
    assert stopping.returncode == 0 and "stop requested" in stopping.stdout
    events, err = finish(proc, seen)
    assert proc.returncode == 3, err
    assert events[-1].name == "stopped" and events[-1].checkpoint
    followed, _ = follower.communicate(timeout=60)
    assert follower.returncode == 0
    assert json.loads(followed.splitlines()[-1])["event"] == "stopped"
    assert "already stopped" in slmb("stop", task_id, env=env).stdout

    # `slmb list` shows the stopped run (to resume), and a "running" one whose process is gone as lost.
    from slmb.core.control import FileControl

    gone = subprocess.Popen(["true"])
    gone.wait()
    lost = store.create_run(toy_request(name="lost-one"))
    FileControl().write_status(lost.task_id, "running", step=7)
    store.write_json(lost.pid, {"pid": gone.pid, "start_time": None, "host": socket.gethostname()})
    tasks = {t["task_id"]: t for t in json.loads(slmb("list", "--json", env=env).stdout)["tasks"]}
    assert (tasks[task_id]["state"], tasks[task_id]["step"]) == ("stopped", events[-1].step)
    assert (tasks[lost.task_id]["state"], tasks[lost.task_id]["model_name"]) == ("lost", "lost-one")
    table = slmb("list", env=env).stdout
    assert "runs not finished" in table and task_id in table and "lost" in table


def test_slmb_stop_force_kills_and_still_ends_the_log(request_file, env):
    proc, seen = start_training(request_file(max_steps=100_000, checkpoint_every=1), env)
    task_id = seen[0].task_id
    stopping = slmb("stop", task_id, "--force", env=env)
    assert stopping.returncode == 0 and "killed the training process" in stopping.stdout
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    log = ev.read_events(store.run_dir(task_id).events)
    assert [e.name for e in log[-3:]] == ["stop_forced", "status", "stopped"]
    assert log[-1].reason == "force" and log[-1].checkpoint and Path(log[-1].checkpoint).is_dir()


def test_cli_errors(request_file, env, tmp_path):
    no_file = slmb("train", env=env)
    assert no_file.returncode == 2 and "--resume" in no_file.stderr
    invalid = slmb("train", request_file(vocab=100), "--no-track", env=env)
    assert invalid.returncode == 1 and "vocabulary" in invalid.stderr
    assert slmb("stop", "no-such-task", env=env).returncode == 1
    assert slmb("events", "../etc", env=env).returncode == 1
    assert slmb("events", "no-such-task", env=env).returncode == 1
    assert "no completed models" in slmb("list", env=env).stdout
    assert json.loads(slmb("list", "--json", env=env).stdout) == {"models": [], "tasks": []}
