import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# `slmb serve` in tests starts no MLflow UI (port 5000, seconds of start-up) unless the test asks for one
# (tests/test_serve_mlflow.py), and no UI named in the developer's shell is taken for the tests' own.
os.environ["SLMB_SERVE_MLFLOW"] = "0"
os.environ.pop("SLMB_MLFLOW_UI", None)


def shared_dir() -> Path:
    """The project's shared reference data (tokenizers, datasets, requests), never copied into the repo."""
    return Path(os.environ.get("SLMB_SHARED_DIR", REPO.parent / "shared")).resolve()


# What the suite reads from the shared data: the front end's reference requests, tiny_shakespeare and the Llama
# and Qwen tokenizer files. None of it is in the repository, and nothing is downloaded.
SHARED_NEEDS = ("requests/gpt2-reference.json", "datasets/tiny_shakespeare/input.txt", "tokenizers/llama2",
                "tokenizers/llama3", "tokenizers/qwen")


def pytest_report_header(config) -> str:
    return f"shared test data: {shared_dir()} (SLMB_SHARED_DIR)"


def pytest_sessionstart(session) -> None:
    """Stop at once, saying where the data was looked for, rather than fail hundreds of tests one by one."""
    path = shared_dir()
    missing = [need for need in SHARED_NEEDS if not (path / need).exists()]
    if missing:
        where = "$SLMB_SHARED_DIR" if "SLMB_SHARED_DIR" in os.environ else f"{REPO.parent / 'shared'} (the default)"
        pytest.exit(f"the tests need the project's shared data (tokenizers, datasets, requests), looked for at "
                    f"{path} from {where}; missing: {', '.join(missing)}. Set SLMB_SHARED_DIR to the folder "
                    "that holds them (`make test` sets it to ../shared).", returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not (path / "requests").is_dir():
        pytest.fail(f"shared reference data not found at {path}; set SLMB_SHARED_DIR")
    return path


@pytest.fixture(autouse=True)
def _restored_environ():
    """The environment as it was before each test: CLI commands run in-process (CliRunner) put their options in
    os.environ for the processes they start (``--max-memory``, ``serve --data-dir``), and monkeypatch only undoes
    what it set itself. A leaked SLMB_WORKER_MEMORY of 500 MiB once refused every later training."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _isolated_home(_restored_environ, tmp_path, monkeypatch):
    """Every test gets its own SLMB_HOME so runs and models never leak between tests."""
    monkeypatch.setenv("SLMB_HOME", str(tmp_path / "slmb-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("SLMB_TOKENIZER_DIR", str(shared_dir() / "tokenizers"))
    monkeypatch.setenv("SLMB_DATA_DIR", str(shared_dir() / "datasets"))


@pytest.fixture
def one_thread(monkeypatch):
    """Toy models gain nothing from a second thread, and on a shared 2-core machine OpenMP threads that wait on
    each other make steps 50x slower. OMP_NUM_THREADS set tells the trainer to leave the count alone."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
