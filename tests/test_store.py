import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from toy import toy_request

from slmb.core import store


def req(name: str = "toy") -> dict:
    """A valid request (the store checks that structure.json is one); the weights saved with it need not fit it."""
    return toy_request(name=name)


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
    request = req("m1")
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
    store.save_completed("tied", req(), model.state_dict(), {})
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
    store.save_completed("m", req("v1"), {"w": torch.zeros(3)}, {"v": 1})
    store.save_completed("m", req("v2"), {"w": torch.ones(3)}, {"v": 2})
    request, state, meta = store.load_completed("m")
    assert request == req("v2") and meta["v"] == 2 and torch.equal(state["w"], torch.ones(3))
    versions = list((store.slmb_home() / "completed" / ".versions" / "m").iterdir())
    assert len(versions) == 1
    assert [e.name for e in store.list_models()] == ["m"]


def test_list_is_sorted_skips_stray_files_and_shows_a_half_model_broken():
    for name in ("zeta", "alpha"):
        store.save_completed(name, req(), {"w": torch.zeros(1)}, {})
    root = store.slmb_home() / "completed"
    (root / "half").mkdir()  # not a save of slmb's (those publish whole versions), but a name that is there
    (root / "half" / store.WEIGHTS).write_bytes(b"")
    (root / "notes.txt").write_text("hi")
    entries = store.list_models()
    assert [(e.name, e.error) for e in entries] == [
        ("alpha", None), ("half", "structure.json and metadata.json are missing"), ("zeta", None)]
    with pytest.raises(store.BrokenModelError, match=r"'half' is broken: structure\.json and metadata\.json are"):
        store.load_completed("half")
    with pytest.raises(store.StoreError, match=r"no completed model named 'notes.txt'.*alpha, half, zeta"):
        store.load_completed("notes.txt")
    with pytest.raises(store.StoreError, match="invalid model name"):
        store.load_completed("../zeta")


def test_weights_files_are_safetensors_not_pickles():
    store.save_completed("m", req(), Tied().state_dict(), {})
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
    store.save_completed("m", req("old"), {"w": torch.arange(4.0)}, {"version": "old"})
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
    assert request == req("old") and torch.equal(state["w"], torch.arange(4.0))

    # The next save of the name publishes and removes the orphan the killed saver left.
    store.save_completed("m", req("newer"), {"w": torch.ones(2)}, {"version": "newer"})
    assert store.load_completed("m")[0] == req("newer")
    assert len(list(versions.iterdir())) == 1
    assert not any(Path(p).name.endswith(".tmp") for p in (store.slmb_home() / "completed").iterdir())


# ---------------------------------------------------------------------------------------------------- broken models


def _weights(path: Path) -> Path:
    return path / store.WEIGHTS


def _truncate(path: Path) -> None:
    data = _weights(path).read_bytes()
    _weights(path).write_bytes(data[: len(data) - 100])


def _random(path: Path) -> None:
    import random

    _weights(path).write_bytes(random.Random(7).randbytes(_weights(path).stat().st_size))


def _junk_header(path: Path) -> None:
    _weights(path).write_bytes((16).to_bytes(8, "little") + b"{not json at all" + bytes(64))


def _trailing(path: Path) -> None:
    with open(_weights(path), "ab") as f:
        f.write(b"\0" * 5)


def _lying_shape(path: Path) -> None:
    """A header that gives a tensor more elements than its bytes hold: safetensors itself would refuse it."""
    raw = _weights(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["tok.weight"]["shape"] = [51, 8]
    text = json.dumps(header).encode()
    _weights(path).write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


CORRUPTIONS = {
    "truncated": (_truncate, r"^model\.safetensors is truncated: its header lists 1,664 bytes of tensor data, "
                             r"the file holds 1,564$"),
    "zero-byte": (lambda p: _weights(p).write_bytes(b""), r"^model\.safetensors is empty \(0 bytes\)$"),
    "random": (_random, r"^model\.safetensors is truncated or not a safetensors file: its header needs [\d,]+ bytes, "
                        r"the file holds [\d,]+$"),
    "shorter than a header": (lambda p: _weights(p).write_bytes(b"abc"), r"^model\.safetensors is truncated: 3 bytes"),
    "junk header": (_junk_header, r"^model\.safetensors is not a safetensors file: its header is not JSON$"),
    "trailing bytes": (_trailing, r"^model\.safetensors has 5 bytes past its tensor data$"),
    "lying shape": (_lying_shape, r"^model\.safetensors: tensor 'tok\.weight' \(F32 \[51, 8\]\) needs 1,632 bytes, "
                                  r"its data holds 1,600$"),
    "missing weights": (lambda p: _weights(p).unlink(), r"^model\.safetensors is missing$"),
    "junk structure": (lambda p: (p / store.STRUCTURE).write_text("{junk"),
                       r"^structure\.json is not valid JSON: Expecting property name"),
    "structure not a request": (lambda p: (p / store.STRUCTURE).write_text('{"model": [], "config": 3}'),
                                r"^structure\.json is not a valid request: /config: "),
    "missing structure": (lambda p: (p / store.STRUCTURE).unlink(), r"^structure\.json is missing$"),
    "junk metadata": (lambda p: (p / store.METADATA).write_bytes(b"\xff\xfe junk"),
                      r"^metadata\.json is not valid JSON: "),
    "metadata not an object": (lambda p: (p / store.METADATA).write_text("[1, 2]"),
                               r"^metadata\.json is not a JSON object$"),
    "version directory gone": (lambda p: shutil.rmtree(p.resolve()), r"^the model's directory is missing$"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_corrupt_model_is_listed_as_broken_and_refused_with_the_reason(kind):
    corrupt, reason = CORRUPTIONS[kind]
    store.save_completed("good", req(), Tied().state_dict(), {"tokenizer": "byte"})
    path = store.save_completed("bad", req("bad"), Tied().state_dict(), {"tokenizer": "byte"})
    corrupt(path)

    bad, good = store.list_models()
    assert (good.name, good.error, good.to_dict()["status"]) == ("good", None, "ok")
    assert bad.name == "bad" and re.search(reason, bad.error), bad.error
    listed = bad.to_dict()
    assert listed["status"] == "broken" and listed["error"] == bad.error
    assert str(store.slmb_home()) not in bad.error and "/" not in bad.error.split(":")[0]  # no server paths
    with pytest.raises(store.BrokenModelError) as refused:
        store.load_completed("bad")
    assert refused.value.reason == bad.error and str(refused.value) == f"model 'bad' is broken: {bad.error}"
    assert isinstance(refused.value, store.StoreError)  # the CLI's and the API's model errors
    store.load_completed("good")


def test_the_header_check_agrees_with_safetensors():
    """Every file the listing calls whole, safetensors loads; every one it calls broken, safetensors refuses."""
    from safetensors import SafetensorError

    for kind, (corrupt, _) in CORRUPTIONS.items():
        if kind in ("missing weights", "version directory gone") or "structure" in kind or "metadata" in kind:
            continue
        path = store.save_completed("m", req(), Tied().state_dict(), {})
        corrupt(path)
        assert store.list_models()[0].error, kind
        with pytest.raises((SafetensorError, ValueError, OSError)):
            store.load_weights(_weights(path))


def test_a_broken_model_is_whole_again_once_saved_again():
    path = store.save_completed("m", req(), Tied().state_dict(), {})
    _truncate(path)
    assert store.list_models()[0].error
    store.save_completed("m", req(), Tied().state_dict(), {})
    assert store.list_models()[0].error is None and store.load_completed("m")


def test_a_file_that_cannot_be_opened_is_broken_not_an_exception():
    path = store.save_completed("m", req(), Tied().state_dict(), {})
    os.chmod(path / store.WEIGHTS, 0)
    try:
        if os.access(path / store.WEIGHTS, os.R_OK):
            pytest.skip("running as root: permissions do not apply")
        [entry] = store.list_models()
        assert entry.error == "its files cannot be read: Permission denied"
    finally:
        os.chmod(path / store.WEIGHTS, 0o644)
