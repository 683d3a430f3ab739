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
pytest_plugins = ["service_fixtures"]


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


def start_training(path, env, *args, until="step"):
    """Start `slmb train --json` and read its events until the first ``until`` event; returns (process, events
    so far)."""
    proc = subprocess.Popen([*SLMB, "train", str(path), "--json", "--no-track", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(ev.parse_event(json.loads(line)))
        if seen[-1].name == until:
            return proc, seen
    raise AssertionError(f"training ended before its first {until}: {proc.wait()} {proc.stderr.read()}")


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
    # Killed before its first checkpoint, a run has none to name: wait for one, however slow the machine.
    proc, seen = start_training(request_file(max_steps=100_000, checkpoint_every=1), env, until="checkpoint")
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


def test_compile_option(request_file, env):
    wrong = slmb("train", request_file(max_steps=1), "--no-track", "--compile", "sometimes", env=env)
    assert wrong.returncode == 1 and 'compile must be true, false or "auto"' in wrong.stderr
    assert "/config/compile" in wrong.stderr
    on = slmb("train", request_file(max_steps=2), "--no-track", "--json", "--compile", "on", env=env, timeout=300)
    assert on.returncode == 0, on.stderr
    started = next(e for e in map(json.loads, on.stdout.splitlines()) if e["event"] == "started")["data"]
    estimate = started["compile"].pop("estimated_eager_s")
    assert started["compile"] == {"enabled": True, "mode": "default", "cuda_graphs": False, "reason": "compile: true"}
    assert estimate > 0


def test_a_force_stop_between_checkpoints_names_the_checkpoint_on_disk():
    """A trainer publishes step-N+1, deletes step-N, and only then logs N+1's ``checkpoint``. Killed in between (a
    busy machine widens that gap), its log's last checkpoint is gone while N+1 is whole on disk: the ``stopped``
    that ``stop --force`` appends must name N+1, the one ``--resume`` continues from."""
    from slmb.core.control import FileControl

    run = store.create_run(toy_request())
    sink = ev.JsonlSink(run.events)
    sink.emit(ev.Step(task_id=run.task_id, step=4, total_steps=100, epoch=0, loss=5.0, lr=1e-3))
    sink.emit(ev.Checkpoint(task_id=run.task_id, step=4, path=str(run.checkpoints / "step-00000004")))
    sink.close()
    whole = run.checkpoints / "step-00000005"
    whole.mkdir()
    store.write_json(whole / "trainer.json", {"state": {"step": 5}})
    (run.checkpoints / ".tmp-step-00000006-123").mkdir()  # a save the kill interrupted: not a checkpoint
    FileControl().write_status(run.task_id, "running")
    gone = subprocess.Popen(["true"])
    gone.wait()
    store.write_json(run.pid, {"pid": gone.pid, "start_time": None, "host": socket.gethostname()})

    FileControl().request_stop(run.task_id, force=True)
    stopped = ev.read_events(run.events)[-1]
    assert (stopped.name, stopped.checkpoint, stopped.step) == ("stopped", str(whole), 5)
    assert FileControl().read_status(run.task_id)["checkpoint"] == str(whole)


def test_slmb_list_tells_the_truth_about_the_service_tasks_queued_from_this_home(service, monkeypatch):
    """The API records each task in its SLMB_HOME, a worker in another home runs it: without SLMB_REDIS_URL,
    `slmb list` there reads the state from the Redis the run names (never a false "queued"), and says "unknown"
    and why when that Redis does not answer."""
    from service_fixtures import read_sse, submit_and_wait, tiny_request

    home = service.tmp / "home-api"
    env = {**service.env, "SLMB_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("SLMB_REDIS_URL")
    with service.client() as client:
        finished = submit_and_wait(client, tiny_request("listed-finished", max_steps=4), until="finished")
        stopped = submit_and_wait(client, tiny_request("listed-stopped", max_steps=100_000))
        assert client.post("/api/v1/stop-training", json={"task_id": stopped}).status_code == 200
        assert read_sse(client, f"/api/v1/events/{stopped}")[-1]["event"] == "stopped"
    assert not (home / "runs" / finished / "events.jsonl").exists()  # the worker's log is in its own home

    # A task whose Redis is gone (a service since moved or stopped).
    from slmb.api.serve import free_port

    monkeypatch.setenv("SLMB_HOME", str(home))
    orphan = store.create_run({"modelName": "orphan"}, service={"redis_url": f"redis://127.0.0.1:{free_port()}/0",
                                                                "queue": "slmb"}).task_id

    tasks = {t["task_id"]: t for t in json.loads(slmb("list", "--json", env=env).stdout)["tasks"]}
    assert (tasks[finished]["state"], tasks[finished]["step"], tasks[finished]["model_name"]) == (
        "finished", 4, "listed-finished")
    assert tasks[finished]["service"] == {"redis_url": service.redis_url, "queue": "slmb"}
    assert tasks[stopped]["state"] == "stopped" and tasks[stopped]["step"] >= 1
    assert tasks[orphan]["state"] == "unknown" and "does not answer: set SLMB_REDIS_URL" in tasks[orphan]["message"]

    table = slmb("list", env=env).stdout
    assert stopped in table and orphan in table and finished not in table  # the table shows runs not finished
    assert "unknown: a task of the HTTP service, whose Redis" in table
    refused = slmb("stop", orphan, env=env)
    assert refused.returncode == 1 and "is a task of the HTTP service: stop it there" in refused.stderr

    # `slmb events` reads a service task's events from the Redis its run dir names, or says where they are.
    events = [json.loads(line)["event"] for line in slmb("events", finished, env=env).stdout.splitlines()]
    assert events[0] == "queued" and events[-1] == "finished" and "step" in events
    # ...and `slmb runs show` / `slmb events --plot` draw it from there.
    shown = slmb("runs", "show", finished, env=env)
    assert shown.returncode == 0 and "finished" in shown.stdout and "listed-finished" in shown.stdout, shown.stderr
    assert "train loss (per step; lowest" in shown.stdout
    assert "train loss (per step; lowest" in slmb("events", finished, "--plot", env=env).stdout
    refused = slmb("events", orphan, env=env)
    assert refused.returncode == 1 and "ran on the HTTP service; its events are in its Redis" in refused.stderr
