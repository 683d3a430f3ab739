import json
import subprocess
import sys
import threading
import time

import pytest

from slmb.core import events as ev


def test_wire_shape_round_trips_every_event():
    samples = [
        ev.Started(task_id="t", model_name="m", total_steps=10, epochs=1, steps_per_epoch=10, batch_size=2,
                   context_length=32, parameters=1000, device="cpu", dtype="fp32", tokenizer="byte",
                   dataset="tiny_shakespeare"),
        ev.Step(task_id="t", step=1, total_steps=10, epoch=0, loss=5.5, lr=1e-3, grad_norm=0.5, tokens_per_sec=100.0),
        ev.Progress(task_id="t", step=1, total_steps=10, progress=10.0, epoch=0, epochs=1, loss=5.5, loss_ema=5.5,
                    elapsed_s=1.0, eta_s=9.0),
        ev.Eval(task_id="t", step=5, train_loss=4.0, val_loss=4.2, best_val_loss=4.2),
        ev.Checkpoint(task_id="t", step=5, path="/x"),
        ev.Status(task_id="t", state="running"),
        ev.StopRequested(task_id="t"),
        ev.StopForced(task_id="t", pid=12),
        ev.Stopped(task_id="t", step=5, checkpoint="/x", reason="requested"),
        ev.Finished(task_id="t", model_name="m", step=10, train_loss=3.0, val_loss=3.1, path="/m", elapsed_s=2.0),
        ev.Error(task_id="t", message="boom", type="RuntimeError"),
        ev.Warning(task_id="t", message="careful", source="x"),
        ev.Connected(task_id="t"), ev.Queued(task_id="t"), ev.Epoch(task_id="t", epoch=0, step=10, epoch_loss=3.3),
    ]
    assert {e.name for e in samples} == set(ev.EVENT_TYPES)
    for event in samples:
        wire = json.loads(event.to_json())
        assert set(wire) == {"event", "data"}
        assert wire["event"] == event.name
        assert wire["data"]["task_id"] == "t" and isinstance(wire["data"]["ts"], float)
        assert ev.parse_event(wire) == event
    assert [e.name for e in samples if e.terminal] == ["stopped", "finished", "error"]


def test_parse_keeps_extra_keys_and_rejects_unknown_names():
    event = ev.parse_event({"event": "step", "data": {"task_id": "t", "ts": 1.0, "step": 1, "total_steps": 2,
                                                      "epoch": 0, "loss": 1.0, "lr": 0.1, "mfu": 0.3}})
    assert event.to_wire()["data"]["mfu"] == 0.3
    with pytest.raises(ValueError, match="unknown event 'nope'"):
        ev.parse_event({"event": "nope", "data": {}})


class Boom:
    def __init__(self):
        self.calls = 0

    def emit(self, event):
        self.calls += 1
        raise ConnectionError("server down")

    def close(self):
        raise AssertionError("a disabled sink is never closed")


def test_failing_sink_becomes_one_warning_and_is_disabled():
    got = []
    boom = Boom()
    emitter = ev.Emitter([boom, ev.CallbackSink(got.append)])
    for step in range(3):
        emitter.emit(ev.Step(task_id="t", step=step, total_steps=3, epoch=0, loss=1.0, lr=0.1))
    emitter.close()
    assert boom.calls == 1
    assert [e.name for e in got] == ["warning", "step", "step", "step"]
    assert got[0].source == "Boom" and "server down" in got[0].message and got[0].task_id == "t"


def test_failing_close_becomes_a_warning():
    got = []

    class BadClose:
        def emit(self, event):
            pass

        def close(self):
            raise OSError("disk full")

    emitter = ev.Emitter([BadClose(), ev.CallbackSink(got.append)])
    emitter.emit(ev.Status(task_id="t", state="running"))
    emitter.close()
    assert [e.name for e in got] == ["status", "warning"]
    assert "disk full" in got[1].message


def test_jsonl_sink_writes_one_flushed_line_per_event(tmp_path):
    path = tmp_path / "run" / "events.jsonl"
    sink = ev.JsonlSink(path)
    sink.emit(ev.Status(task_id="t", state="running"))
    # Visible to another reader before close: every event is written straight to the file.
    assert [e.name for e in ev.read_events(path)] == ["status"]
    sink.emit(ev.Finished(task_id="t", model_name="m", step=1, path="/m", elapsed_s=1.0))
    sink.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["status", "finished"]
    with pytest.raises(ValueError, match="closed"):
        sink.emit(ev.Status(task_id="t", state="running"))


def test_read_events_skips_a_half_written_last_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(ev.Status(task_id="t", state="running").to_json() + "\n" + '{"event": "st')
    assert [e.name for e in ev.read_events(path)] == ["status"]
    assert ev.read_events(tmp_path / "missing.jsonl") == []


def test_follow_events_tails_another_process_until_the_terminal_event(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = (
        "import sys, time\n"
        "from slmb.core import events as ev\n"
        "sink = ev.JsonlSink(sys.argv[1])\n"
        "time.sleep(0.3)\n"
        "for i in range(5):\n"
        "    sink.emit(ev.Step(task_id='t', step=i, total_steps=5, epoch=0, loss=1.0, lr=0.1)); time.sleep(0.05)\n"
        "sink.emit(ev.Stopped(task_id='t', step=4))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path)])
    try:
        names = [e.name for e in ev.follow_events(path, poll_s=0.02, timeout_s=30)]
    finally:
        proc.wait(30)
    assert names == ["step"] * 5 + ["stopped"]


def test_follow_events_reads_past_a_stop_that_was_resumed(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = ev.JsonlSink(path)
    for event in (ev.Status(task_id="t", state="running"), ev.Stopped(task_id="t", step=3),
                  ev.Status(task_id="t", state="running"),
                  ev.Finished(task_id="t", model_name="m", step=9, path="/m", elapsed_s=1.0)):
        sink.emit(event)
    sink.close()
    names = [e.name for e in ev.follow_events(path, poll_s=0.02, timeout_s=5)]
    assert names == ["status", "stopped", "status", "finished"]


def test_follow_events_gives_up_after_timeout(tmp_path):
    t0 = time.monotonic()
    assert list(ev.follow_events(tmp_path / "never.jsonl", poll_s=0.02, timeout_s=0.2)) == []
    assert time.monotonic() - t0 < 2


def test_concurrent_writers_never_interleave_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    long = "x" * 20000  # longer than one stdio buffer

    def write(n):
        sink = ev.JsonlSink(path)
        for i in range(50):
            sink.emit(ev.Warning(task_id="t", message=f"{n}-{i}-{long}"))
        sink.close()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ev.read_events(path)) == 150
