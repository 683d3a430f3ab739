import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The project's shared reference data (tokenizers, datasets, requests), never copied into the repo."""
    return Path(os.environ.get("SLMB_SHARED_DIR", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not (path / "requests").is_dir():
        pytest.fail(f"shared reference data not found at {path}; set SLMB_SHARED_DIR")
    return path


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own SLMB_HOME so runs and models never leak between tests."""
    monkeypatch.setenv("SLMB_HOME", str(tmp_path / "slmb-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("SLMB_TOKENIZER_DIR", str(shared_dir() / "tokenizers"))
    monkeypatch.setenv("SLMB_DATA_DIR", str(shared_dir() / "datasets"))
