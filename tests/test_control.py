import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from slmb.core import events as ev
from slmb.core import store
from slmb.core.control import FileControl, get_control


@pytest.fixture
def run():
    return store.create_run({"modelName": "m"})


def test_cooperative_stop_sets_a_flag_the_trainer_can_poll(run):
    control = get_control()
    assert not control.stop_requested(run.task_id)
    control.write_status(run.task_id, "running", pid=1)
    result = control.request_stop(run.task_id)
    assert result["mode"] == "cooperative_stop" and result["state"] == "running"
    assert control.stop_requested(run.task_id)
    # Another process (a fresh control object) sees it too, and a resume clears it.
    assert FileControl().stop_requested(run.task_id)
    control.clear_stop(run.task_id)
    assert not control.stop_requested(run.task_id)


def test_status_merges_info_and_records_the_state(run):
    control = FileControl()
    assert control.read_status(run.task_id) is None
    control.write_status(run.task_id, "running", model_name="m", step=0)
    control.write_status(run.task_id, "finished", step=10)
    status = control.read_status(run.task_id)
    assert status["state"] == "finished" and status["step"] == 10 and status["model_name"] == "m"
    assert status["task_id"] == run.task_id


def test_stopping_a_finished_or_unknown_run(run):
    control = FileControl()
    control.write_status(run.task_id, "finished")
    result = control.request_stop(run.task_id, force=True)
    assert result["state"] == "finished" and "already finished" in result["message"]
    assert not control.stop_requested(run.task_id)
    with pytest.raises(store.StoreError, match="no run"):
        control.request_stop("does-not-exist")


def test_force_before_any_process_started_leaves_the_flag(run):
    result = FileControl().request_stop(run.task_id, force=True)
    assert result["mode"] == "force_kill" and "no training process" in result["message"]
    assert FileControl().stop_requested(run.task_id)


TRAINER = textwrap.dedent("""
    import signal, sys, time
    from slmb.core import events as ev, store
    from slmb.core.control import FileControl
    if sys.argv[2] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run = store.run_dir(sys.argv[1])
    control = FileControl()
    control.register_process(run.task_id)
    control.write_status(run.task_id, "running")
    sink = ev.JsonlSink(run.events)
    sink.emit(ev.Status(task_id=run.task_id, state="running"))
    ckpt = run.checkpoints / "step-3"
    ckpt.mkdir()
    store.write_json(ckpt / "trainer.json", {})  # what makes a checkpoint whole
    for step in range(1, 6):
        sink.emit(ev.Step(task_id=run.task_id, step=step, total_steps=100, epoch=0, loss=1.0, lr=0.1))
        if step == 3:
            sink.emit(ev.Checkpoint(task_id=run.task_id, step=3, path=str(ckpt)))
    print("ready", flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("mode", ["plain", "ignore-term"])
def test_force_stop_kills_the_process_and_ends_the_log_with_stopped(run, mode):
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, run.task_id, mode], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        control = FileControl(grace_s=0.5)
        t0 = time.monotonic()
        result = control.request_stop(run.task_id, force=True)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait(30)
    assert result["mode"] == "force_kill" and result["state"] == "stopped"
    expected = "SIGKILL" if mode == "ignore-term" else "SIGTERM"
    assert expected in result["message"]
    assert elapsed < 5
    assert proc.returncode == -(signal.SIGKILL if mode == "ignore-term" else signal.SIGTERM)
    events = ev.read_events(run.events)
    assert [e.name for e in events[-3:]] == ["stop_forced", "status", "stopped"]
    stopped = events[-1]
    assert stopped.reason == "force" and stopped.step == 5 and stopped.checkpoint == str(run.checkpoints / "step-3")
    status = control.read_status(run.task_id)
    assert status["state"] == "stopped" and status["step"] == 5
    # A second force stop finds the run done and appends nothing.
    assert "already stopped" in control.request_stop(run.task_id, force=True)["message"]
    assert len(ev.read_events(run.events)) == len(events)


def test_force_stop_of_a_dead_process_still_closes_the_log(run):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    control = FileControl()
    control.register_process(run.task_id, proc.pid)
    control.write_status(run.task_id, "running")
    result = control.request_stop(run.task_id, force=True)
    assert "already exited" in result["message"]
    assert ev.read_events(run.events)[-1].name == "stopped"


def test_a_recycled_pid_is_not_killed(run):
    # The pid file names this very test process but with another start time: it must not be signalled.
    control = FileControl()
    store.write_json(run.pid, {"pid": os.getpid(), "start_time": "1", "host": socket.gethostname()})
    control.write_status(run.task_id, "running")
    result = control.request_stop(run.task_id, force=True)
    assert "already exited" in result["message"]
