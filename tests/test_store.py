import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from slmb.core import store


class Tied(nn.Module):
    def __init__(self, vocab=50, dim=8):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight


def test_home_comes_from_the_environment(tmp_path, monkeypatch):
    assert store.slmb_home() == tmp_path / "slmb-home"
    monkeypatch.delenv("SLMB_HOME")
    monkeypatch.chdir(tmp_path)
    assert store.slmb_home() == tmp_path / ".slmb"


@pytest.mark.parametrize("name", ["gpt2-small", "a", "My.Model_v2", "x" * 64])
def test_good_model_names(name):
    assert store.check_model_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "..", "../evil", "a/b", "a\\b", "x" * 65, "-lead", "sp ace",
                                  "new\nline", "é"])
def test_bad_model_names_are_refused_before_touching_files(name):
    with pytest.raises(store.StoreError, match="invalid model name"):
        store.save_completed(name, {}, {}, {})
    assert not (store.slmb_home() / "completed").exists() or not any((store.slmb_home() / "completed").iterdir())


def test_save_list_load_round_trip():
    model = Tied()
    request = {"config": {"epochs": 1}, "model": [{"type": "tokenEmbedding"}], "modelName": "m1"}
    path = store.save_completed("m1", request, model.state_dict(), {"tokenizer": "byte", "task_id": "t1",
                                                                    "metrics": {"val_loss": 1.5}})
    assert path == store.slmb_home() / "completed" / "m1"
    [entry] = store.list_models()
    assert entry.name == "m1" and entry.metadata["tokenizer"] == "byte" and entry.metadata["task_id"] == "t1"
    assert entry.metadata["slmb_version"] and entry.metadata["created"]
    assert entry.to_dict()["has_structure"] is True
    got_request, state, meta = store.load_completed("m1")
    assert got_request == request
    assert json.loads(entry.structure_file.read_text()) == request
    assert meta["metrics"] == {"val_loss": 1.5}
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)


def test_tied_weights_save_once_and_stay_tied_after_loading():
    model = Tied()
    store.save_completed("tied", {}, model.state_dict(), {})
    _, state, meta = store.load_completed("tied")
    assert meta["weight_aliases"] == {"head.weight": "tok.weight"}
    assert state["head.weight"] is state["tok.weight"]
    fresh = Tied()
    fresh.load_state_dict(state)
    assert fresh.head.weight is fresh.tok.weight
    assert torch.equal(fresh.tok.weight, model.tok.weight)
    # One copy on disk: the file is about the size of the untied parameters.
    size = (store.slmb_home() / "completed" / "tied" / store.WEIGHTS).stat().st_size
    assert size < 50 * 8 * 4 * 1.5


def test_overlapping_views_are_saved_as_copies(tmp_path):
    base = torch.arange(12.0)
    state = {"a": base[:6], "b": base[3:9], "c": base[:6]}
    aliases = store.save_weights(tmp_path / "w.safetensors", state)
    assert aliases == {"c": "a"}
    got = store.load_weights(tmp_path / "w.safetensors")
    assert torch.equal(got["b"], base[3:9]) and got["c"] is got["a"]


def test_saving_a_name_again_replaces_it_and_cleans_up():
    store.save_completed("m", {"v": 1}, {"w": torch.zeros(3)}, {"v": 1})
    store.save_completed("m", {"v": 2}, {"w": torch.ones(3)}, {"v": 2})
    request, state, meta = store.load_completed("m")
    assert request == {"v": 2} and meta["v"] == 2 and torch.equal(state["w"], torch.ones(3))
    versions = list((store.slmb_home() / "completed" / ".versions" / "m").iterdir())
    assert len(versions) == 1
    assert [e.name for e in store.list_models()] == ["m"]


def test_list_is_sorted_and_skips_incomplete_entries():
    for name in ("zeta", "alpha"):
        store.save_completed(name, {}, {"w": torch.zeros(1)}, {})
    root = store.slmb_home() / "completed"
    (root / "half").mkdir()
    (root / "half" / store.WEIGHTS).write_bytes(b"")
    (root / "notes.txt").write_text("hi")
    assert [e.name for e in store.list_models()] == ["alpha", "zeta"]
    with pytest.raises(store.StoreError, match=r"no completed model named 'half'.*alpha, zeta"):
        store.load_completed("half")
    with pytest.raises(store.StoreError, match="invalid model name"):
        store.load_completed("../zeta")


def test_weights_files_are_safetensors_not_pickles():
    store.save_completed("m", {}, Tied().state_dict(), {})
    raw = (store.slmb_home() / "completed" / "m" / store.WEIGHTS).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    assert "tok.weight" in header and header["__metadata__"]["model_name"] == "m"


def test_run_directories():
    run = store.create_run({"modelName": "m"})
    assert run.path == store.slmb_home() / "runs" / run.task_id
    assert run.checkpoints.is_dir() and json.loads(run.request.read_text()) == {"modelName": "m"}
    assert store.run_dir(run.task_id) == run
    with pytest.raises(store.StoreError, match="invalid task id"):
        store.run_dir("../../etc")


def test_write_json_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "status.json"
    store.write_json(target, {"a": 1})
    store.write_json(target, {"a": 2})
    assert store.read_json(target) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


SAVER = textwrap.dedent("""
    import sys, torch
    from slmb.core import store
    state = {f"layer{i}.weight": torch.full((512, 512), float(i)) for i in range(16)}  # 16 MiB
    store.save_completed("m", {"version": "new"}, state, {"version": "new"})
    print("saved", flush=True)
""")


def test_a_save_killed_midway_leaves_the_previous_version_listed(tmp_path):
    store.save_completed("m", {"version": "old"}, {"w": torch.arange(4.0)}, {"version": "old"})
    env = {**os.environ, store.SAVE_PAUSE_ENV: "60"}
    proc = subprocess.Popen([sys.executable, "-c", SAVER], env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stderr.readline()
        assert "paused" in line, line + proc.stderr.read()
        # The new weights are on disk in an unpublished version directory when the saver dies.
        versions = store.slmb_home() / "completed" / ".versions" / "m"
        assert any((p / store.WEIGHTS).is_file() and p.resolve() != (store.slmb_home() / "completed" / "m").resolve()
                   for p in versions.iterdir())
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL

    [entry] = store.list_models()
    assert entry.metadata["version"] == "old"
    request, state, _ = store.load_completed("m")
    assert request == {"version": "old"} and torch.equal(state["w"], torch.arange(4.0))

    # The next save of the name publishes and removes the orphan the killed saver left.
    store.save_completed("m", {"version": "newer"}, {"w": torch.ones(2)}, {"version": "newer"})
    assert store.load_completed("m")[0] == {"version": "newer"}
    assert len(list(versions.iterdir())) == 1
    assert not any(Path(p).name.endswith(".tmp") for p in (store.slmb_home() / "completed").iterdir())
