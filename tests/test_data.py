"""Dataset resolution, the token cache and training windows, on real text (../shared/datasets) and tmp files."""

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from slmb.core import data, store
from slmb.core.data import DatasetError, DatasetNotFoundError, WindowLoader, prepare_tokens
from slmb.core.tokenizers import load_tokenizer

EOS = 256  # the byte tokenizer's end-of-text id


def _prep(dataset, tok="byte", val_fraction=0.0, max_rows=None, text_field="text"):
    return prepare_tokens(str(dataset), None, load_tokenizer(tok), val_fraction=val_fraction, max_rows=max_rows,
                          text_field=text_field)


def _all(d):
    return np.concatenate([d.train, d.val]).tolist()


def _no_tokenizing(monkeypatch, tok):
    def boom(*args, **kwargs):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(tok, "encode_batch", boom)
    monkeypatch.setattr(tok, "encode", boom)


# --- tiny_shakespeare and the cache ------------------------------------------------------------------------------


def test_tiny_shakespeare_gpt2(shared):
    tok = load_tokenizer("gpt2")
    t0 = time.perf_counter()
    d = prepare_tokens("tiny_shakespeare", "default", tok, val_fraction=0.1, max_rows=None, text_field="text")
    elapsed = time.perf_counter() - t0
    # Chunked, threaded tokenization equals encoding the whole file at once: 338,025 GPT-2 tokens.
    text = (shared / "datasets/tiny_shakespeare/input.txt").read_text()
    assert d.meta["total_tokens"] == 338025 == len(tok.encode(text))
    assert _all(d) == tok.encode(text)
    assert (len(d.train), len(d.val)) == (338025 - 33802, 33802)
    assert d.train.dtype == np.uint16 and isinstance(d.train, np.memmap)
    assert not d.from_cache and elapsed < 10
    assert d.meta["source"]["path"].endswith("tiny_shakespeare/input.txt")
    assert d.meta["tokenizer"]["name"] == "gpt2" and d.meta["dtype"] == "uint16"
    assert sorted(p.name for p in d.cache_dir.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert d.cache_dir.parent == store.slmb_home() / "cache" / "tokens"


def test_second_prepare_reads_the_cache(monkeypatch):
    tok = load_tokenizer("gpt2")
    first = prepare_tokens("tiny_shakespeare", None, tok, val_fraction=0.1)
    mtime = (first.cache_dir / "meta.json").stat().st_mtime_ns
    _no_tokenizing(monkeypatch, tok)
    second = prepare_tokens("tiny_shakespeare", "default", tok, val_fraction=0.1)
    assert second.from_cache and second.cache_dir == first.cache_dir
    assert (second.cache_dir / "meta.json").stat().st_mtime_ns == mtime
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)


def test_cache_key_follows_inputs(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello there\n")
    base = _prep(f).cache_dir
    assert _prep(f, val_fraction=0.5).cache_dir != base
    assert _prep(f, tok="gpt2").cache_dir != base
    f.write_text("changed text\n")
    changed = _prep(f)
    assert changed.cache_dir != base and not changed.from_cache
    assert _all(changed) == list(b"changed text\n")


def test_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    f = tmp_path / "a.txt"
    f.write_text("some text\n")
    tok = load_tokenizer("byte")

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-tokenization")
    with monkeypatch.context() as m:
        m.setattr(tok, "encode_batch", crash)
        with pytest.raises(RuntimeError):
            _prep(f)
    tokens_root = store.slmb_home() / "cache" / "tokens"
    assert list(tokens_root.iterdir()) == []  # neither a half cache nor a temp folder
    assert not _prep(f).from_cache


def test_damaged_cache_is_rebuilt(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("abcdefgh\n" * 10)
    d = _prep(f, val_fraction=0.2)
    (d.cache_dir / "train.bin").write_bytes(b"\x00\x00")
    again = _prep(f, val_fraction=0.2)
    assert not again.from_cache and _all(again) == list(b"abcdefgh\n" * 10)


def test_dtype_follows_vocabulary(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("Hello world\n")
    assert _prep(f, tok="byte").train.dtype == np.uint16
    qwen = _prep(f, tok="qwen3")
    assert qwen.train.dtype == np.uint32 and qwen.meta["dtype"] == "uint32"
    assert _all(qwen) == [9707, 1879, 198]


def test_val_split_is_the_tail(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("0123456789")
    d = _prep(f, val_fraction=0.3)
    assert bytes(d.train.tolist()) == b"0123456" and bytes(d.val.tolist()) == b"789"
    empty_val = _prep(f, val_fraction=0.0)
    assert len(empty_val.val) == 0 and len(empty_val.train) == 10


# --- local files -------------------------------------------------------------------------------------------------


def test_single_text_file_has_no_eos(tmp_path):
    f = tmp_path / "story.txt"
    text = "Once upon a time 😀\r\nthe end\n" * 5000  # > one chunk: exercises the chunk cuts
    f.write_text(text, newline="")
    assert _all(_prep(f)) == list(text.encode())
    gpt2 = load_tokenizer("gpt2")
    assert _all(_prep(f, tok="gpt2")) == gpt2.encode(text)


def test_jsonl_rows_end_with_eos(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "ab", "id": 1}\n\n{"text": "c"}\n{"text": "d"}\n')
    assert _all(_prep(f)) == [97, 98, EOS, 99, EOS, 100, EOS]
    assert _all(_prep(f, max_rows=2)) == [97, 98, EOS, 99, EOS]


def test_json_array_and_text_field(tmp_path):
    f = tmp_path / "rows.json"
    f.write_text(json.dumps([{"story": "x"}, {"story": "yz"}]))
    assert _all(_prep(f, text_field="story")) == [120, EOS, 121, 122, EOS]
    with pytest.raises(DatasetError, match=r"no text field 'text'.*story.*text_field"):
        _prep(f)


def test_parquet(tmp_path):
    f = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["hi", "yo"], "n": [1, 2]}), f)
    assert _all(_prep(f)) == [104, 105, EOS, 121, 111, EOS]
    with pytest.raises(DatasetError, match="no column 'body'"):
        _prep(f, text_field="body")


def test_folder_of_files(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("A")
    (root / "b.jsonl").write_text('{"text": "B"}\n{"text": "C"}\n')
    pq.write_table(pa.table({"text": ["D"]}), root / "sub" / "c.parquet")
    (root / ".hidden.txt").write_text("never")
    (root / "notes.md").write_text("ignored")
    d = _prep(root)
    assert _all(d) == [65, EOS, 66, EOS, 67, EOS, 68, EOS]
    assert d.meta["documents"] == 4
    assert _all(_prep(root, max_rows=2)) == [65, EOS, 66, EOS]


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="holds no"):
        _prep(tmp_path / "empty")
    with pytest.raises(DatasetNotFoundError) as err:
        _prep(tmp_path / "nope.txt")
    assert str(tmp_path / "nope.txt") in str(err.value) and "Hugging Face" not in str(err.value)


def test_named_dataset_found_under_data_dir(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "roneneldan" / "TinyStories"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"text": "Tom had a dog."}\n')
    monkeypatch.setenv("SLMB_DATA_DIR", str(tmp_path / "data"))
    assert _all(_prep("roneneldan/TinyStories")) == [*b"Tom had a dog.", EOS]


# --- offline behaviour -------------------------------------------------------------------------------------------


@pytest.mark.timeout(5)
@pytest.mark.parametrize("name", ["roneneldan/TinyStories", "mychen76/openwebtext-100k", "allenai/c4"])
def test_offline_hub_dataset_fails_fast(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SLMB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    t0 = time.perf_counter()
    with pytest.raises(DatasetNotFoundError) as err:
        prepare_tokens(name, "en" if name == "allenai/c4" else "default", load_tokenizer("byte"),
                       val_fraction=0.1, max_rows=100, text_field="text")
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert str(tmp_path / "data" / name) in msg
    assert str(tmp_path / "home" / ".cache" / "slmb" / "datasets" / name) in msg
    assert "offline" in msg and "SLMB_DATA_DIR" in msg


@pytest.mark.timeout(5)
def test_offline_tiny_shakespeare_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(DatasetNotFoundError) as err:
        _prep("tiny_shakespeare")
    assert str(tmp_path / "data" / "tiny_shakespeare" / "input.txt") in str(err.value)


def test_hub_dataset_cached_once_works_offline(monkeypatch):
    """A hub dataset's cache key needs no network: once tokenized, it loads with the hub unreachable."""
    calls = []

    def fake_hub(name, config, field, looked):
        calls.append((name, config))
        yield from ["one", "two", "three"]
    monkeypatch.setattr(data, "_hub_texts", fake_hub)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    online = _prep("allenai/c4", max_rows=2)
    assert calls == [("allenai/c4", "en")]  # the "default" config maps to c4's "en"
    assert _all(online) == [*b"one", EOS, *b"two", EOS]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = _prep("allenai/c4", max_rows=2)
    assert offline.from_cache and len(calls) == 1


# --- windows -----------------------------------------------------------------------------------------------------


def _loader(n=100, T=8, stride=4, B=3, seed=0, **kw):
    return WindowLoader(np.arange(n, dtype=np.uint16), T, stride, B, seed, **kw)


def test_windows_shapes_and_contents():
    loader = _loader()
    assert loader.num_windows == 23  # starts 0, 4, ..., 88: the last window ends at token 96
    assert len(loader) == 7
    seen = []
    for i in range(len(loader)):
        x, y = loader.batch(0, i)
        assert x.shape == y.shape == (3, 8) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # y is x shifted by one token
        assert torch.equal(x, x[:, :1] + torch.arange(8))
        assert (x[:, 0] % 4 == 0).all()
        seen += x[:, 0].tolist()
    assert len(set(seen)) == 21 and set(seen) <= set(range(0, 89, 4))


def test_windows_read_a_memmap(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("abcdefghijklmnopqrstuvwxyz")
    tokens = _prep(f).train
    x, y = WindowLoader(tokens, 5, 5, 2, seed=0, shuffle=False).batch(0, 0)
    assert x.tolist() == [list(b"abcde"), list(b"fghij")] and y.tolist() == [list(b"bcdef"), list(b"ghijk")]


def test_batches_are_deterministic_per_epoch():
    a, b = _loader(seed=7), _loader(seed=7)
    for epoch, index in [(0, 0), (0, 6), (3, 2), (0, 1)]:
        assert all(torch.equal(u, v) for u, v in zip(a.batch(epoch, index), b.batch(epoch, index), strict=True))
    order = [_loader(seed=7).batch(e, 0)[0][:, 0].tolist() + _loader(seed=7).batch(e, 1)[0][:, 0].tolist()
             for e in range(3)]
    assert order[0] != order[1] != order[2]
    assert _loader(seed=8).batch(0, 0)[0].tolist() != a.batch(0, 0)[0].tolist()


def test_resume_mid_epoch_matches():
    loader = _loader()
    full = list(loader.epoch(2))
    resumed = list(_loader().epoch(2, start=4))
    assert all(torch.equal(u[0], v[0]) for u, v in zip(full[4:], resumed, strict=True))


def test_no_shuffle_is_stream_order():
    x, _ = _loader(shuffle=False).batch(0, 1)
    assert x[:, 0].tolist() == [12, 16, 20]


def test_eval_batches_are_fixed():
    loader = _loader()
    first, second = loader.eval_batches(4), loader.eval_batches(4)
    assert len(first) == 4 and all(x.shape == (3, 8) for x, _ in first)
    assert all(torch.equal(u[0], v[0]) for u, v in zip(first, second, strict=True))
    starts = torch.cat([x[:, 0] for x, _ in first]).tolist()
    assert starts[0] == 0 and starts[-1] == 88  # spread over the whole split


def test_small_splits():
    few = _loader(n=20, T=8, stride=4, B=16)  # 3 windows < batch size: one smaller batch
    assert (len(few), few.batch(0, 0)[0].shape) == (1, (3, 8))
    with pytest.raises(IndexError):
        few.batch(0, 1)
    with pytest.raises(DatasetError, match=r"val split has 8 tokens.*context_length 8 needs at least 9"):
        WindowLoader(np.arange(8, dtype=np.uint16), 8, 8, 1, seed=0, split="val")
