"""What the README's command table promises, through the real CLI in subprocesses: the `slmb train` overrides,
the `slmb generate` flags, and the shipped examples validated exactly as they are."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import shared_dir
from toy import toy_request

from slmb.core import events as ev

REPO = Path(__file__).resolve().parent.parent
SLMB = [sys.executable, "-m", "slmb"]
PROMPT = "ROMEO:"


def slmb(*args, env, timeout=180, **kw):
    return subprocess.run([*SLMB, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture
def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_train_overrides_reach_the_run(env, tmp_path):
    """--epochs, --batch-size, --device and --dtype replace the file's values: in the `started` event, the run's
    request.json and its MLflow params. The file's device would fail on a CPU-only machine."""
    env.pop("MLFLOW_TRACKING_URI", None)
    path = tmp_path / "request.json"
    path.write_text(json.dumps(toy_request(name="overridden", epochs=1, batch_size=4, device="cuda:7",
                                           dtype="bf16")))
    done = slmb("train", path, "--json", "--epochs", 3, "--batch-size", 3, "--device", "cpu", "--dtype", "fp32",
                "--max-steps", 3, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    events = [ev.parse_event(json.loads(line)) for line in done.stdout.splitlines()]
    [started] = [e for e in events if e.name == "started"]
    assert (started.epochs, started.batch_size, started.device, started.dtype) == (3, 3, "cpu", "fp32")
    assert events[-1].name == "finished" and events[-1].step == 3

    from slmb.core import store

    config = json.loads(store.run_dir(started.task_id).request.read_text())["config"]
    assert {k: config[k] for k in ("epochs", "batch_size", "device", "dtype", "max_steps")} == {
        "epochs": 3, "batch_size": 3, "device": "cpu", "dtype": "fp32", "max_steps": 3}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{Path(env['SLMB_HOME']) / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("slmb")
    [run] = client.search_runs([experiment.experiment_id], f"tags.task_id = '{started.task_id}'")
    params = run.data.params
    assert {k: params[k] for k in ("epochs", "batch_size", "device", "dtype")} == {
        "epochs": "3", "batch_size": "3", "device": "cpu", "dtype": "fp32"}


# ---------------------------------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def model_env(tmp_path_factory):
    """A home with one completed toy model, "toy-gen" (byte tokenizer, 40 steps: not yet fluent, so sampled
    continuations differ from seed to seed)."""
    home = tmp_path_factory.mktemp("generate-home")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLMB_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "SLMB_DATA_DIR": str(shared_dir() / "datasets")}
    path = home / "request.json"
    path.write_text(json.dumps(toy_request(name="toy-gen", max_steps=40)))
    done = slmb("train", path, "--json", "--no-track", env=env)
    assert done.returncode == 0, done.stderr
    return env


def generate(env, *flags) -> str:
    done = slmb("generate", "toy-gen", PROMPT, *flags, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


SAMPLED = ("-n", 80, "--temperature", 1.0, "--seed", 1)
GREEDY = ("-n", 80, "--temperature", 0)


@pytest.fixture(scope="module")
def runs(model_env) -> dict[str, dict]:
    """`slmb generate --json` with each flag under test (a few at a time: each process takes seconds to start)."""
    from concurrent.futures import ThreadPoolExecutor

    flags = {"sampled": SAMPLED, "same seed": SAMPLED, "other seed": (*SAMPLED[:-1], 2), "greedy": GREEDY,
             "tiny nucleus": (*SAMPLED, "--top-p", 1e-6), "penalised": (*GREEDY, "--repetition-penalty", 3.0)}
    with ThreadPoolExecutor(3) as pool:
        outputs = dict(zip(flags, pool.map(lambda f: generate(model_env, *f, "--json"), flags.values()), strict=True))
    return {name: json.loads(out) for name, out in outputs.items()}


def test_seed_makes_sampling_repeatable(runs):
    assert runs["sampled"]["output_text"] == runs["same seed"]["output_text"]
    assert runs["sampled"]["new_tokens"] == 80
    assert runs["other seed"]["output_text"] != runs["sampled"]["output_text"]


def test_top_p_and_repetition_penalty_reach_the_sampler(runs):
    greedy = runs["greedy"]["output_text"]
    # A nucleus this small keeps only the most likely token: sampling becomes greedy decoding.
    assert runs["sampled"]["output_text"] != greedy and runs["tiny nucleus"]["output_text"] == greedy

    def repeats(text: str) -> int:
        new = text[len(PROMPT):]
        return len(new) - len(set(new))

    penalised = runs["penalised"]["output_text"]
    assert penalised != greedy and repeats(penalised) < repeats(greedy)


def test_stop_ends_the_output_before_the_stop_string(runs, model_env):
    new = runs["sampled"]["output_text"][len(PROMPT):]
    stop = re.search(r"[a-z]{2}", new[20:]).group()
    cut = json.loads(generate(model_env, *SAMPLED, "--stop", stop, "--json"))
    assert cut["output_text"] == PROMPT + new[:new.index(stop)]
    assert cut["finish_reason"] == "stop" and stop not in cut["output_text"][len(PROMPT):]


def _chunks(argv: list[str], env: dict) -> tuple[list[tuple[bytes, bool]], int]:
    """Run ``argv`` and read its stdout as it comes: every chunk, and whether the process was still running
    after it had been read."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    fd, chunks = proc.stdout.fileno(), []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 1)[0]:
            continue
        data = os.read(fd, 1 << 20)
        if not data:
            break
        chunks.append((data, proc.poll() is None))
    return chunks, proc.wait(60)


def test_stream_prints_as_it_goes_and_no_stream_once_at_the_end(model_env):
    """Both print the same text for the same seed; --stream writes the prompt before generating (while the
    process still runs), --no-stream writes the whole text in one piece when generation is over."""
    flags = ["--temperature", "1.0", "--top-k", "0", "--seed", "9"]
    n = 6000  # ~3 s of generation: the first chunk comes long before the end
    streamed, rc = _chunks([*SLMB, "generate", "toy-gen", PROMPT, "-n", str(n), *flags], model_env)
    assert rc == 0
    assert streamed[0][0].startswith(PROMPT.encode()) and streamed[0][1], streamed[:2]
    assert len(streamed) > 1
    text = b"".join(c for c, _ in streamed)

    once, rc = _chunks([*SLMB, "generate", "toy-gen", PROMPT, "-n", str(n), *flags, "--no-stream"], model_env)
    assert rc == 0
    assert b"".join(c for c, _ in once) == text
    # One write of everything: no chunk ends before the whole text has been written.
    assert once[0][0].startswith(PROMPT.encode()) and len(once[0][0]) > 1000


# ---------------------------------------------------------------------------------------------------- examples


def readme_parameters() -> dict[str, str]:
    """The README's example table: file -> parameters column (e.g. "6.8 M")."""
    rows = re.findall(r"^\| (\w+\.json) \|[^|]*\| ([\d.]+ M) \|", (REPO / "README.md").read_text(), re.M)
    return dict(rows)


def test_readme_lists_every_example():
    assert sorted(readme_parameters()) == sorted(p.name for p in (REPO / "examples").glob("*.json"))


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "examples").glob("*.json")))
def test_shipped_example_is_valid_as_is(name, env):
    """`slmb validate examples/<name>` exits 0 on the file as shipped, and its parameter count is the README's."""
    path = REPO / "examples" / name
    done = slmb("validate", path, "--json", env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    report = json.loads(done.stdout)
    assert report["valid"] and not report["errors"]
    assert f"{report['summary']['total_parameters'] / 1e6:.1f} M" == readme_parameters()[name]
