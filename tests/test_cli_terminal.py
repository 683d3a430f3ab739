"""The terminal as a new user meets it (issue 14, points 4 and 5): the loss curve as text (`slmb.plot`), the live
display and summary at 80 columns, errors printed once, `--dataset`/`--tokenizer`, runs that cannot resume,
`slmb runs show`, `slmb events --plot`, `slmb rm` and `slmb prune`, and the offline switch."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from toy import toy_request

from slmb.console import ConsoleSink
from slmb.core import events as ev
from slmb.core import store
from slmb.core.control import FileControl
from slmb.plot import curves_of, loss_plot

SLMB = [sys.executable, "-m", "slmb"]
BRAILLE = re.compile("[\u2801-\u28ff]")


def slmb(*args, env=None, input=None, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([*SLMB, *map(str, args)], env=env, capture_output=True, text=True, input=input,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------------------- the plot


def _plot_rows(text: str) -> tuple[list[str], int]:
    """The plot's rows (label column cut off) and the column where the plot area starts."""
    lines = text.splitlines()
    rows = [line for line in lines if re.match(r"^ *[\d.]* [┤│|]", line)]
    start = rows[0].index("┤" if "┤" in rows[0] else "|") + 1
    return [r[start:] for r in rows], start


def test_plot_puts_the_lowest_point_at_its_step_and_labels_the_axes():
    # A valley: loss falls to its lowest, 1.25, at step 600 of 1..1000, then rises again.
    train = [(s, 1.25 + ((s - 600) / 200) ** 2) for s in range(1, 1001, 5)]
    low = min(train, key=lambda p: p[1])
    assert low[0] == 601
    val = [(200, 7.5), (400, 6.0), (800, 2.6), (1000, 5.0)]
    text = loss_plot(train, val, width=80, height=6)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), [len(line) for line in lines]
    rows, start = _plot_rows(text)
    assert len(rows) == 6
    # y axis: the highest value shown on the top row, the lowest on the bottom one.
    top = max(v for _, v in train + val)
    assert lines[0].strip().startswith(f"{top:.2f} ┤")
    assert lines[5].strip().startswith(f"{low[1]:.2f} ┤")
    # x axis: first and last step under the plot, and the word step.
    assert re.match(r"^\s+1\s+step\s+1,000$", lines[7]), lines[7]
    # The bottom row's dots are around the lowest point, and centred on its step.
    bottom = rows[-1]
    dots = [i for i, ch in enumerate(bottom) if BRAILLE.match(ch)]
    cols = 80 - start
    expected = (601 - 1) / (1000 - 1) * (cols - 1)
    assert dots and min(dots) <= expected + 1 and max(dots) >= expected - 1, (dots, expected)
    assert abs(sum(dots) / len(dots) - expected) <= 3
    # No dot anywhere in the bottom row far from the valley.
    assert all(abs(i - expected) < cols / 4 for i in dots)
    # Validation points as markers, the lowest one (2.6 at step 800) named in the legend.
    assert text.count("●") == 4 + 1  # four points and the legend's marker
    assert "lowest 1.25 at step 601" in text and "val loss (lowest 2.60 at step 800)" in text
    marker_row = next(i for i, r in enumerate(rows) if "●" in r and abs(r.index("●") - 399 / 999 * (cols - 1)) < 2)
    assert 0 < marker_row < 5  # 6.0 lies between the extremes, not on an edge row


def test_plot_ascii_fallback_and_degenerate_inputs():
    train = [(s, 3.0 - s / 100) for s in range(0, 101)]
    text = loss_plot(train, [(100, 2.2)], width=60, unicode=False)
    assert text.isascii() and all(len(line) <= 60 for line in text.splitlines())
    rows, _ = _plot_rows(text)
    assert rows[0].startswith("*") and rows[-1].rstrip().endswith("*")  # falls from top-left to bottom-right
    assert "o val loss (lowest 2.20 at step 100)" in text and "* train loss" in text
    assert loss_plot([], []) == ""
    flat = loss_plot([(5, 2.0), (6, 2.0)], None, width=40)
    assert "2.50 ┤" in flat and "1.50 ┤" in flat  # a flat curve sits between labelled bounds
    assert loss_plot([(1, float("nan")), (2, math.inf)], None) == ""


def test_curves_of_reads_parsed_and_wire_events():
    events = [ev.Step(task_id="t", step=3, total_steps=9, epoch=0, loss=2.5, lr=1e-3),
              ev.Eval(task_id="t", step=3, train_loss=2.4, val_loss=2.6)]
    assert curves_of(events) == ([(3, 2.5)], [(3, 2.6)])
    assert curves_of([e.to_wire() for e in events]) == ([(3, 2.5)], [(3, 2.6)])


# ----------------------------------------------------------------------------------------- display at 80 columns


def _feed(sink: ConsoleSink, path: str, total: int = 3000) -> None:
    t = "task-80"
    sink.emit(ev.Started(task_id=t, model_name="narrow", total_steps=total, epochs=3, steps_per_epoch=total // 3,
                         batch_size=4, context_length=32, parameters=12345, device="cpu", dtype="fp32",
                         tokenizer="byte", dataset="tiny_shakespeare"))
    for s in range(1, total + 1, 100):
        loss = 8 * math.exp(-s / 700) + 2
        sink.emit(ev.Step(task_id=t, step=s, total_steps=total, epoch=0, loss=loss, lr=3e-4))
        sink.emit(ev.Progress(task_id=t, step=s, total_steps=total, progress=100 * s / total, epoch=0, epochs=3,
                              loss=loss, loss_ema=loss + 0.25, val_loss=loss + 0.5, lr=3e-4, tokens_per_sec=12345.0,
                              mfu=0.12, elapsed_s=s / 10, eta_s=(total - s) / 10))
        sink.progress.refresh()
        if s % 1000 == 1:
            sink.emit(ev.Eval(task_id=t, step=s, train_loss=loss, val_loss=loss + 0.5, best_val_loss=loss + 0.5))
    sink.emit(ev.Finished(task_id=t, model_name="narrow", step=total, train_loss=2.31, val_loss=2.77, path=path,
                          elapsed_s=300.0))


def test_live_display_keeps_step_and_bar_at_80_columns_and_the_summary_never_cuts_a_path():
    out = io.StringIO()
    console = Console(width=80, file=out, force_terminal=True, color_system=None, record=True)
    sink = ConsoleSink(console, Console(width=80, file=io.StringIO()))
    path = "/home/someone/projects/" + "long-directory-name/" * 4 + ".slmb/completed/narrow"
    assert len(path) > 80
    _feed(sink, path)
    text = console.export_text()
    # Every frame of the live line has the bar, step n/N and the smoothed loss, labelled as such, in 80 columns.
    frames = re.findall(r"train (━*╸?\s*) +(\d+)/3000 (.*?)(?=train |step |narrow: finished|\n|$)", text)
    frames = [f for f in frames if f[1] != "0"]  # (drawn once before the first step's numbers)
    assert len(frames) >= 10
    for bar, step, rest in frames:
        assert len(bar) >= 13  # the bar's place (bar_width(80)), filled as far as the run got
        assert bar.count("━") >= int(int(step) / 3000 * 13) - 1
        assert len(f"train {bar} {step}/3000 {rest}".rstrip()) <= 80, rest
        assert re.search(r"(^| )loss \(EMA\) \d+\.\d{4} ", rest), rest
        assert "ETA " in rest
    assert not any("MFU" in rest for _, _, rest in frames)  # the least important field gave way first
    # The summary: both losses named for what they are, the path whole on one line.
    assert re.search(r"loss \(EMA\), last step\s+│ 2\.\d{4}", text)
    assert re.search(r"train loss, last eval\s+│ 2\.3100", text)
    assert f"model: {path}" in text
    # ...and the loss curve, in the console's width, from the events it saw.
    assert "┤" in text and "lowest" in text and re.search(r"^\s+1\s+step\s+2,901$", text, re.M)
    plot_lines = text.split(f"model: {path}\n")[1].splitlines()
    assert len(plot_lines) >= 9 and all(len(line) <= 80 for line in plot_lines)


def test_the_summary_plot_falls_back_to_ascii_when_the_terminal_is_not_utf8():
    out = io.BytesIO()
    console = Console(width=80, file=io.TextIOWrapper(out, encoding="latin-1", errors="strict"),
                      force_terminal=False, color_system=None)
    assert not console.encoding.lower().startswith("utf")
    sink = ConsoleSink(console, Console(width=80, file=io.StringIO()))
    sink.emit(ev.Started(task_id="t", model_name="plain", total_steps=10, epochs=1, steps_per_epoch=10,
                         batch_size=1, context_length=8, parameters=1, device="cpu", dtype="fp32", tokenizer="byte",
                         dataset="x"))
    for s in range(1, 11):
        sink.emit(ev.Step(task_id="t", step=s, total_steps=10, epoch=0, loss=5.0 - s / 5, lr=1e-3))
    sink.emit(ev.Stopped(task_id="t", step=10, checkpoint=None, reason="requested"))
    console.file.flush()
    text = out.getvalue().decode("latin-1")
    assert "checkpoint: none (nothing to resume)" in text
    assert "* train loss (per step; lowest 3.00 at step 10)" in text
    assert not BRAILLE.search(text)


# ----------------------------------------------------------------------------------------------- slmb train errors


def test_a_runtime_error_is_printed_once_on_stderr_with_the_option_that_fixes_it(tmp_path):
    path = tmp_path / "request.json"
    path.write_text(json.dumps(toy_request(dataset="no_such_dataset", max_steps=2)))
    result = slmb("train", path, "--no-track")
    assert result.returncode == 1
    assert "no_such_dataset" not in result.stdout and "DatasetNotFoundError" not in result.stdout
    assert result.stderr.count("DatasetNotFoundError") == 1, result.stderr
    assert result.stderr.count("was not found") == 1
    assert "--dataset NAME|PATH" in result.stderr
    # A long path in the message is never cut at 80 columns.
    assert str(Path(os.environ["SLMB_DATA_DIR"]) / "no_such_dataset") in result.stderr


def test_dataset_and_tokenizer_options_override_the_request(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question. " * 400)
    body = toy_request(dataset="no_such_dataset", max_steps=2, eval_every=1000)
    body["config"]["tokenizer"] = "qwen3"  # a 257-entry vocabulary does not fit it: invalid as written
    path = tmp_path / "request.json"
    path.write_text(json.dumps(body))
    assert slmb("train", path, "--no-track").returncode == 1
    os.chdir(tmp_path)  # a relative --dataset is a path from here, stored absolute
    result = slmb("train", path, "--no-track", "--json", "--dataset", "corpus.txt", "--tokenizer", "byte")
    assert result.returncode == 0, result.stderr
    events = [ev.parse_event(json.loads(line)) for line in result.stdout.splitlines()]
    started = next(e for e in events if e.name == "started")
    assert started.tokenizer == "byte" and started.dataset == str(corpus)
    stored = json.loads(store.run_dir(started.task_id).request.read_text())
    assert stored["dataset"] == str(corpus) and stored["config"]["tokenizer"] == "byte"


def test_resume_of_a_missing_run_prints_no_banner():
    result = slmb("train", "--resume", "nonexistent")
    assert result.returncode == 1
    assert "task" not in result.stdout and "task nonexistent" not in result.stderr
    assert result.stderr.startswith("error: no run 'nonexistent'")


def _run_in_state(state: str, *, checkpoint: bool = False, name: str = "m", age_s: float = 0.0, **kw) -> str:
    run = store.create_run(toy_request(name=name, max_steps=5))
    FileControl().write_status(run.task_id, state, step=3, **kw)
    if checkpoint:
        (run.checkpoints / "step-00000003").mkdir()
        store.write_json(run.checkpoints / "step-00000003" / "trainer.json", {"state": {"step": 3}})
    if age_s:
        status = store.read_json(run.status)
        status["updated"] = time.time() - age_s
        store.write_json(run.status, status)
    return run.task_id


def test_a_stopped_run_without_a_checkpoint_is_listed_and_refused_as_not_resumable():
    bare = _run_in_state("stopped", name="bare")
    saved = _run_in_state("stopped", checkpoint=True, name="saved")
    tasks = {t["task_id"]: t for t in json.loads(slmb("list", "--json").stdout)["tasks"]}
    assert (tasks[bare]["state"], tasks[bare]["resumable"], tasks[bare]["checkpoint"]) == ("stopped", False, None)
    assert tasks[saved]["resumable"] is True and tasks[saved]["checkpoint"].endswith("step-00000003")
    table = slmb("list", env={"COLUMNS": "200"}).stdout
    assert re.search(rf"{bare}\s*│ bare\s*│ stopped, no checkpoint", table), table
    assert re.search(rf"{saved}\s*│ saved\s*│ stopped\s*│", table), table
    assert "1 of these can never become a model" in table and "`slmb prune` removes them" in table

    refused = slmb("train", "--resume", bare)
    assert refused.returncode == 1 and "task" not in refused.stdout
    assert f"run {bare} (stopped) has no checkpoint to resume from" in refused.stderr
    assert f"slmb train {store.run_dir(bare).request}" in refused.stderr  # how to start it over

    shown = slmb("runs", "show", bare)
    assert shown.returncode == 0 and "stopped, no checkpoint (cannot resume)" in shown.stdout
    shown = json.loads(slmb("runs", "show", saved, "--json").stdout)
    assert shown["resumable"] is True and shown["state"] == "stopped"


def test_runs_show_and_events_plot_draw_a_finished_run(tmp_path):
    path = tmp_path / "request.json"
    path.write_text(json.dumps(toy_request(name="shown", max_steps=12, eval_every=4)))
    result = slmb("train", path, "--no-track", "--json")
    assert result.returncode == 0, result.stderr
    events = [ev.parse_event(json.loads(line)) for line in result.stdout.splitlines()]
    task_id, finished = events[0].task_id, events[-1]
    evals = [e for e in events if e.name == "eval"]
    assert [e.step for e in evals] == [4, 8, 12]
    best = min(evals, key=lambda e: e.val_loss)

    shown = slmb("runs", "show", task_id)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert re.search(r"state\s+│ finished", out) and re.search(r"model\s+│ shown", out)
    assert re.search(r"steps\s+│ 12 / 12", out)
    assert re.search(rf"val loss, last eval\s+│ {finished.val_loss:.4f}", out)
    assert f"model path: {finished.path}" in out and str(store.run_dir(task_id).path) in out
    assert f"val loss (lowest {best.val_loss:.2f} at step {best.step})" in out
    assert re.search(r"^\s+1\s+step\s+12$", out, re.M)

    plot = slmb("events", task_id, "--plot")
    assert plot.returncode == 0 and plot.stdout.count("●") == 3 + 1
    assert f"val loss (lowest {best.val_loss:.2f} at step {best.step})" in plot.stdout
    assert slmb("events", task_id, "--plot", "--follow").returncode == 2
    assert slmb("runs", "show", "no-such-run").returncode == 1


def test_generate_help_reads_well():
    text = slmb("generate", "--help", env={"COLUMNS": "120"}).stdout
    assert "list[str]" not in text
    assert re.search(r"--stop TEXT\s+end the text before TEXT; repeat for several", text)


@pytest.mark.parametrize("command", ["train", "generate", "serve", "validate", "prune"])
def test_options_show_placeholders_not_python_types(command):
    """typer prints an option's type (`--device <str>`, `--epochs <int range>`); slmb names a placeholder."""
    text = slmb(command, "--help", env={"COLUMNS": "120"}).stdout
    options = text[text.index("Options:"):]
    assert not re.search(r"<(str|int|float|path|int range|float range|list\[str\])>", options), options
    if command == "train":
        assert re.search(r"--epochs N\s", options) and re.search(r"--device DEVICE\s", options)
    if command == "serve":
        assert re.search(r"--redis-url URL\s", options) and re.search(r"--port N\s", options)


# ---------------------------------------------------------------------------------------------------- rm, prune


def _model(name: str) -> Path:
    import torch

    return store.save_completed(name, toy_request(name=name), {"w": torch.zeros(3)}, {"tokenizer": "byte"})


def test_rm_removes_runs_and_models_after_confirmation_and_refuses_a_running_run():
    failed = _run_in_state("error", name="failed")
    running = _run_in_state("running", name="busy")
    FileControl().register_process(running)  # this live process
    link = _model("keeper")
    version_dir = link.resolve()

    asked = slmb("rm", failed, "keeper", input="n\n")
    assert asked.returncode == 1 and "remove 2 item(s)" in asked.stdout
    assert store.run_dir(failed).exists() and link.is_symlink()

    busy = slmb("rm", running, "--yes")
    assert busy.returncode == 1 and "running: stop it first" in busy.stderr
    assert store.run_dir(running).exists()

    done = slmb("rm", failed, "keeper", input="y\n")
    assert done.returncode == 0, done.stderr
    assert f"removed run {failed}" in done.stdout and "removed model keeper" in done.stdout
    assert not store.run_dir(failed).exists() and not link.exists() and not link.is_symlink()
    assert not version_dir.exists() and [m.name for m in store.list_models()] == []
    assert slmb("rm", "keeper", "--yes").returncode == 1  # gone
    assert slmb("rm", "../outside", "--yes").returncode == 1


def test_rm_never_follows_a_link_out_of_slmb_home(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    home = Path(os.environ["SLMB_HOME"])
    (home / "runs").mkdir(parents=True)
    task = "linked-run"
    os.symlink(outside, home / "runs" / task)
    store.write_json(outside / "request.json", toy_request(name="linked"))  # looks like a run through the link
    FileControl().write_status(task, "error")
    assert slmb("rm", task, "--yes").returncode == 0
    assert not (home / "runs" / task).is_symlink() and (outside / "keep.txt").read_text() == "mine"
    with pytest.raises(store.StoreError, match="not inside"):
        store.remove_tree(outside)
    with pytest.raises(store.StoreError, match="not inside"):
        store.remove_tree(home)


def test_prune_removes_only_runs_that_can_never_become_a_model():
    failed = _run_in_state("error", name="failed", age_s=3 * 86400)
    fresh_failure = _run_in_state("error", name="fresh")
    bare = _run_in_state("stopped", name="bare", age_s=3 * 86400)
    resumable = _run_in_state("stopped", checkpoint=True, name="resumable", age_s=3 * 86400)
    finished = _run_in_state("finished", name="finished", age_s=3 * 86400)
    running = _run_in_state("running", name="running")
    FileControl().register_process(running)
    lost = _run_in_state("running", name="lost", age_s=3 * 86400)
    gone = subprocess.Popen(["true"])
    gone.wait()
    FileControl().register_process(lost, gone.pid)

    dry = slmb("prune", "--older-than", "2d", "--dry-run")
    assert dry.returncode == 0 and "would remove 3 run(s)" in dry.stdout
    listed = set(re.findall(r"^run (\S+) \(", dry.stdout, re.M))
    assert listed == {failed, bare, lost}
    assert all(store.run_dir(t).exists() for t in listed)

    assert slmb("prune", "--older-than", "2d", input="n\n").returncode == 1
    assert all(store.run_dir(t).exists() for t in listed)
    done = slmb("prune", "--older-than", "2d", input="y\n")
    assert done.returncode == 0 and "removed 3 run(s)" in done.stdout
    assert not any(store.run_dir(t).exists() for t in listed)
    kept = {fresh_failure, resumable, finished, running}
    assert all(store.run_dir(t).exists() for t in kept)

    everything = slmb("prune", "--yes")
    assert "removed 1 run(s)" in everything.stdout and not store.run_dir(fresh_failure).exists()
    assert slmb("prune", "--yes").stdout.strip() == "nothing to prune"
    assert slmb("prune", "--older-than", "soon").returncode == 2


# ------------------------------------------------------------------------------------------------------ offline


def test_slmb_offline_keeps_every_dataset_fetch_off_the_network(tmp_path, monkeypatch):
    import urllib.request

    from slmb.core import data
    from slmb.core.tokenizers import load_tokenizer

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLMB_OFFLINE", "1")
    monkeypatch.setenv("SLMB_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("slmb went online with SLMB_OFFLINE=1")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    tok = load_tokenizer("byte")
    with pytest.raises(data.DatasetNotFoundError, match=r"skipped, offline \(SLMB_OFFLINE set\)"):
        data.prepare_tokens("tiny_shakespeare", None, tok)
    with pytest.raises(data.DatasetNotFoundError, match=r"hub: skipped, offline \(SLMB_OFFLINE set\)"):
        data.prepare_tokens("roneneldan/TinyStories", None, tok, max_rows=3)
