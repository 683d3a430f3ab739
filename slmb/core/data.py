"""Datasets -> a cached token memmap -> (x, y) training windows (DESIGN.md §3).

Resolution of a dataset name, in order:
  1. a path that exists: a ``.txt``, ``.jsonl``/``.json`` or ``.parquet`` file, or a folder of them (``confined``,
     for requests from the HTTP API: only a relative path inside ``$SLMB_DATA_DIR``, see :func:`path_in_root`);
  2. ``$SLMB_DATA_DIR/<name>`` (``tiny_shakespeare``: ``$SLMB_DATA_DIR/tiny_shakespeare/input.txt``);
  3. the user cache ``~/.cache/slmb/datasets/<name>`` (same layout);
  4. online only: ``tiny_shakespeare`` is downloaded (checksum-pinned) into the user cache; any other name is
     streamed from the Hugging Face hub with a row cap. Nothing touches the network when ``SLMB_OFFLINE``,
     ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set (1/true/yes/on): a miss fails at once with
     ``DatasetNotFoundError``.

Text is tokenized once into ``$SLMB_HOME/cache/tokens/<key>/{train.bin,val.bin,meta.json}``, keyed by a hash of
the source's identity, the tokenizer and the split; later runs (offline too) map those files and never
tokenize again. A hub dataset's key needs no network, so a cached hub dataset also works offline.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmb.core.store import slmb_home
from slmb.core.tokenizers import Tokenizer

CACHE_FORMAT = 1  # bump when the cache layout or the tokenization rules change
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
CHUNK_CHARS = 1 << 16  # text-file chunk handed to one encode call
BATCH_CHARS = 1 << 22  # text per encode_batch call: enough to keep every thread busy, bounded memory
HASH_LIMIT = 256 << 20  # files up to this size are keyed by content, larger ones by size + mtime

# Hub datasets the front end offers, with their default config (used when the request says "default").
HUB_DATASETS: dict[str, str | None] = {
    "mychen76/openwebtext-100k": None,
    "roneneldan/TinyStories": None,
    "allenai/c4": "en",
}
DATASET_NAMES = ("tiny_shakespeare", *HUB_DATASETS)  # the names a confined request may use besides files
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

Chunks = Iterator[tuple[str, bool]]  # (text, the text ends a document)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is nowhere slmb may look; the message lists every place and how to supply it."""


class DatasetRefusedError(DatasetNotFoundError):
    """A confined request named something other than a named dataset or a path inside the data root."""


class DatasetError(ValueError):
    """The dataset was found but cannot be used (missing text field, no tokens, too short for a window)."""


@dataclass(frozen=True)
class TokenData:
    """A tokenized dataset.

    Attributes:
        train: (N_train,) token ids, a read-only memmap (uint16 or uint32).
        val: (N_val,) token ids, the last ``val_fraction`` of the token stream; may be empty.
        meta: the cache's ``meta.json`` (dtype, token counts, source, tokenizer, created, ...).
        cache_dir: the folder holding ``train.bin``, ``val.bin`` and ``meta.json``.
        from_cache: True when nothing was tokenized by this call.
    """

    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]
    cache_dir: Path
    from_cache: bool


@dataclass(frozen=True)
class _Source:
    identity: dict[str, Any]  # what the cache key and meta["source"] are made of
    chunks: Callable[[], Chunks]


OFFLINE_VARS = ("SLMB_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")  # any one set: no network at all


def hub_offline() -> bool:
    """True when no dataset may be fetched from the network (the Hugging Face hub, tiny_shakespeare's URL)."""
    flags = (os.environ.get(v, "").strip().upper() for v in OFFLINE_VARS)
    return any(f in {"1", "ON", "YES", "TRUE"} for f in flags)


def data_root() -> Path | None:
    """``$SLMB_DATA_DIR``, the folder whose files may be named as datasets by confined requests; None if unset."""
    value = os.environ.get("SLMB_DATA_DIR")
    return Path(value).expanduser().absolute() if value else None


def path_in_root(dataset: str, root: Path) -> Path | None:
    """``dataset`` as a relative path inside ``root`` (resolved), or None when it is not one: absolute, ``~``,
    a ``..`` part, or a symlink that leads out. Only the spelling and the links inside ``root`` decide, so the
    answer says nothing about what exists outside it."""
    if not dataset or len(dataset) > 1024 or "\0" in dataset or dataset.startswith("~"):
        return None
    rel = Path(dataset)
    if rel.is_absolute() or ".." in rel.parts or any(len(part) > 255 for part in rel.parts):
        return None
    try:
        root = root.resolve()
        path = (root / rel).resolve()
        path.exists()  # a link loop or an unreadable folder on the way raises here, not later
    except (OSError, RuntimeError):  # RuntimeError: a link loop, on Python < 3.13
        return None
    return path if path == root or path.is_relative_to(root) else None


def refused_dataset(root: Path | None) -> str:
    """The one message for a dataset a confined request may not use, whether or not such a path exists."""
    where = (" or a relative path to a file or folder under the data root ($SLMB_DATA_DIR)" if root
             else "; files are not offered here (there is no data root: SLMB_DATA_DIR, slmb serve --data-dir)")
    return f"the dataset is not available: use a named dataset ({', '.join(DATASET_NAMES)}){where}"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare_tokens(dataset: str, dataset_config: str | None, tokenizer: Tokenizer, *, val_fraction: float = 0.1,
                   max_rows: int | None = None, text_field: str = "text", home: Path | None = None,
                   num_threads: int | None = None, confined: bool = False) -> TokenData:
    """Resolve ``dataset``, tokenize it once (cached) and return the train/val token streams.

    Args:
        dataset: a path, ``tiny_shakespeare``, or a hub id such as ``roneneldan/TinyStories``.
        dataset_config: hub config; None or "default" means the dataset's default (``en`` for allenai/c4).
        tokenizer: the tokenizer; its ``eos_id`` is appended after each document of multi-document sources.
        val_fraction: share of the token stream, taken from its end, that becomes the validation split.
        max_rows: cap on documents (rows, or files of a text folder); None = all.
        text_field: the field holding the text in json/jsonl/parquet/hub rows.
        home: slmb's home (default ``$SLMB_HOME``); the cache lives in ``<home>/cache/tokens``.
        num_threads: tokenizer threads (default: one per CPU core).
        confined: the request comes from someone who does not own this machine (the HTTP API): only a named
            dataset or a relative path inside ``$SLMB_DATA_DIR``, never relative to the working directory.
    """
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    source = _resolve(dataset, dataset_config, text_field, max_rows, confined)
    dtype = token_dtype(tokenizer.vocab_size)
    tok = {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint}
    key_doc = {"format": CACHE_FORMAT, "source": source.identity, "tokenizer": tok, "val_fraction": val_fraction}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:20]
    cache_dir = (home or slmb_home()) / "cache" / "tokens" / key
    if (cached := _open(cache_dir)) is not None:
        return cached
    # A folder that exists but does not open was damaged outside slmb (writes are atomic): rebuild it.
    shutil.rmtree(cache_dir, ignore_errors=True)
    _build(source, tokenizer, dtype, key_doc, cache_dir, num_threads)
    data = _open(cache_dir)
    assert data is not None, f"token cache {cache_dir} did not open right after it was written"
    return TokenData(data.train, data.val, data.meta, cache_dir, from_cache=False)


# --- resolution ------------------------------------------------------------------------------------------------


def _resolve(dataset: str, config: str | None, text_field: str, max_rows: int | None, confined: bool) -> _Source:
    name = dataset.strip().strip("/")
    path = Path(dataset).expanduser()
    looked = []
    if confined and name not in DATASET_NAMES:
        root = data_root()
        inside = path_in_root(dataset, root) if root else None
        if inside is None:
            raise DatasetRefusedError(refused_dataset(root))
        if not inside.exists():
            raise DatasetNotFoundError(f"dataset {dataset!r} is not under the data root ($SLMB_DATA_DIR)")
        return _local(inside, text_field, max_rows, root)
    if not confined:
        if path.exists():
            return _local(path, text_field, max_rows)
        looked.append(f"{path.resolve()} (the dataset as a path)")
    rel = Path("tiny_shakespeare/input.txt") if name == "tiny_shakespeare" else Path(name)
    data_dir = os.environ.get("SLMB_DATA_DIR")
    if data_dir:
        roots = [Path(data_dir).expanduser()]
    else:
        looked.append("$SLMB_DATA_DIR/... (SLMB_DATA_DIR is not set)")
        roots = []
    roots.append(Path.home() / ".cache" / "slmb" / "datasets")
    for root in roots:
        candidate = root / rel
        if candidate.exists():
            return _local(candidate, text_field, max_rows)
        looked.append(str(candidate))

    if path.suffix in SUFFIXES or dataset.startswith((".", "/", "~")):
        raise DatasetNotFoundError(_not_found(dataset, looked, hub=False))
    if name == "tiny_shakespeare":
        if hub_offline():
            raise DatasetNotFoundError(_not_found(
                dataset, [*looked, f"{TINY_SHAKESPEARE_URL}: skipped, offline ({_offline_set()} set)"]))
        try:
            return _local(_download_tiny_shakespeare(roots[-1] / rel), text_field, max_rows)
        except OSError as e:
            raise DatasetNotFoundError(_not_found(dataset, [*looked, f"{TINY_SHAKESPEARE_URL}: {e}"])) from e

    if config in (None, "", "default"):
        config = HUB_DATASETS.get(name)
    identity = {"kind": "hub", "name": name, "config": config, "text_field": text_field, "max_rows": max_rows}

    def chunks() -> Chunks:
        # Checked only on a cache miss, so a hub dataset tokenized once keeps working offline.
        if hub_offline():
            raise DatasetNotFoundError(_not_found(
                dataset, [*looked, f"the Hugging Face hub: skipped, offline ({_offline_set()} set)"]))
        return _cap(((t, True) for t in _hub_texts(name, config, text_field, looked)), max_rows)

    return _Source(identity, chunks)


def _offline_set() -> str:
    return "/".join(v for v in OFFLINE_VARS if os.environ.get(v, "").strip())


def _not_found(dataset: str, looked: list[str], hub: bool = True) -> str:
    places = "\n".join(f"  {p}" for p in looked)
    online = (f"; or go online (unset {', '.join(OFFLINE_VARS)}) to fetch it once, after which the "
              "tokens are cached" if hub else "")
    return (f"dataset {dataset!r} was not found. slmb looked at:\n{places}\n"
            f"Supply it as a local {'/'.join(SUFFIXES)} file or a folder of them (give its path as the dataset), "
            f"or place it at $SLMB_DATA_DIR/<name> (tiny_shakespeare: $SLMB_DATA_DIR/tiny_shakespeare/input.txt)"
            f"{online}")


def _download_tiny_shakespeare(dest: Path) -> Path:
    with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as r:
        raw = r.read()
    if hashlib.sha256(raw).hexdigest() != TINY_SHAKESPEARE_SHA256:
        raise DatasetError(f"{TINY_SHAKESPEARE_URL} returned unexpected content (sha256 mismatch)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, dest)
    return dest


def _hub_texts(name: str, config: str | None, field: str, looked: list[str]) -> Iterator[str]:
    import datasets  # slow to import; only hub sources need it

    try:
        rows = datasets.load_dataset(name, config, split="train", streaming=True)
        for i, row in enumerate(rows):
            yield _text_of(row, field, f"{name} row {i}")
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DatasetNotFoundError(_not_found(name, [*looked, f"the Hugging Face hub: {e}"])) from e


# --- local files -------------------------------------------------------------------------------------------------


def dataset_files(path: Path, root: Path | None = None) -> list[Path]:
    """The data files of ``path``: the file itself, or the folder's ``SUFFIXES`` files (hidden ones left out).
    With ``root``, a folder holding a link that leads out of it is refused (:class:`DatasetRefusedError`)."""
    path = path.resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if root is not None and any(path_in_root(str(f.relative_to(root.resolve())), root) is None for f in files):
            raise DatasetRefusedError(refused_dataset(root))
        if not files:
            raise DatasetNotFoundError(f"folder {path} holds no {'/'.join(SUFFIXES)} files")
        return files
    if path.suffix in SUFFIXES:
        return [path]
    raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")


def _local(path: Path, text_field: str, max_rows: int | None, root: Path | None = None) -> _Source:
    path = path.resolve()
    files = dataset_files(path, root)
    identity = {"kind": "local", "path": str(path), "text_field": text_field, "max_rows": max_rows,
                "files": [[str(f.relative_to(path)) if f != path else f.name, *_file_id(f)] for f in files]}
    # A single text file is one stream; every other source is documents, each closed by EOS.
    single_text = files == [path] and path.suffix == ".txt"

    def chunks() -> Chunks:
        return _cap(itertools.chain.from_iterable(_file_chunks(f, text_field, not single_text) for f in files),
                    max_rows)

    return _Source(identity, chunks)


def _file_id(path: Path) -> list[Any]:
    st = path.stat()
    if st.st_size <= HASH_LIMIT:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return [st.st_size, digest.hexdigest()]
    return [st.st_size, st.st_mtime_ns]


def _file_chunks(path: Path, field: str, end_docs: bool) -> Chunks:
    if path.suffix == ".txt":
        yield from _text_file_chunks(path, end_docs)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise DatasetError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names}); set text_field")
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            yield from ((t or "", True) for t in batch.column(0).to_pylist())
    else:
        for i, row in enumerate(_json_rows(path)):
            yield _text_of(row, field, f"{path} row {i}"), True


def _json_rows(path: Path) -> Iterator[Any]:
    """Rows of a JSON-lines file, or of a .json file that holds one array."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            yield from json.load(f)
            return
        for line in f:
            if line.strip():
                yield json.loads(line)


def _text_of(row: Any, field: str, where: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and field in row and isinstance(row[field], str | None):
        return row[field] or ""
    fields = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise DatasetError(f"{where}: no text field {field!r} (found: {fields}); set text_field")


def _text_file_chunks(path: Path, end_doc: bool) -> Chunks:
    """~CHUNK_CHARS pieces of a text file, cut only after a lone line break between non-space characters. No
    split pattern of gpt2/llama3/qwen joins across such a point, so chunked tokenization equals whole-file
    tokenization (SentencePiece adds its dummy-prefix space at each chunk start, a negligible difference)."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        carry = ""
        while block := f.read(CHUNK_CHARS):
            text = carry + block
            cut = _safe_cut(text)
            if cut == 0 and len(text) >= 16 * CHUNK_CHARS:
                cut = len(text)  # one huge line: cut anyway rather than hold the whole file in memory
            carry = text[cut:]
            if cut:
                yield text[:cut], False
        if carry or end_doc:
            yield carry, end_doc


def _safe_cut(text: str) -> int:
    # A lone "\n" between non-space characters: a longer whitespace run at a chunk's end would become one
    # token (gpt2's ``\s++$``) where the whole text splits it.
    i = text.rfind("\n", 1, len(text) - 1)
    while i != -1 and (text[i - 1].isspace() or text[i + 1].isspace()):
        i = text.rfind("\n", 1, i)
    return i + 1


def _cap(chunks: Iterable[tuple[str, bool]], max_rows: int | None) -> Chunks:
    """Stop after ``max_rows`` documents."""
    done = 0
    for text, ends in chunks:
        yield text, ends
        done += ends
        if max_rows is not None and done >= max_rows:
            return


# --- the token cache ---------------------------------------------------------------------------------------------


def _build(source: _Source, tokenizer: Tokenizer, dtype: np.dtype, key_doc: dict[str, Any], cache_dir: Path,
           num_threads: int | None) -> None:
    """Tokenize into a temp folder beside ``cache_dir``, then rename it into place: the rename is atomic, so a
    crash leaves only a temp folder, never a cache that looks complete."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    try:
        t0 = time.perf_counter()
        n, docs = _write_tokens(source.chunks(), tokenizer, dtype, tmp / "tokens.bin", num_threads)
        if n == 0:
            raise DatasetError(f"dataset {source.identity.get('name') or source.identity['path']} produced no tokens")
        n_val = int(n * key_doc["val_fraction"])
        _split(tmp / "tokens.bin", tmp / "train.bin", tmp / "val.bin", (n - n_val) * dtype.itemsize)
        meta = {**key_doc, "dtype": dtype.name, "train_tokens": n - n_val, "val_tokens": n_val, "total_tokens": n,
                "documents": docs, "eos_id": tokenizer.eos_id, "seconds": round(time.perf_counter() - t0, 3),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _write_synced(tmp / "meta.json", json.dumps(meta, indent=2).encode())
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            if _open(cache_dir) is None:  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_tokens(chunks: Chunks, tokenizer: Tokenizer, dtype: np.dtype, path: Path,
                  num_threads: int | None) -> tuple[int, int]:
    """Stream ``chunks`` through ``encode_batch`` into a flat binary file. Returns (tokens, documents)."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    n = docs = 0
    with open(path, "wb") as f:
        for batch in _batches(chunks):
            ids = tokenizer.encode_batch([text for text, _ in batch], num_threads=num_threads)
            pieces = [np.asarray(t + eos if ends else t, dtype=dtype) for t, (_, ends) in zip(ids, batch, strict=True)]
            arr = np.concatenate(pieces)
            arr.tofile(f)
            n += arr.size
            docs += sum(ends for _, ends in batch)
        f.flush()
        os.fsync(f.fileno())
    return n, docs


def _batches(chunks: Chunks) -> Iterator[list[tuple[str, bool]]]:
    batch: list[tuple[str, bool]] = []
    size = 0
    for chunk in chunks:
        batch.append(chunk)
        size += len(chunk[0]) + 1
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _split(tokens: Path, train: Path, val: Path, train_bytes: int) -> None:
    """Move the tail of ``tokens`` (from ``train_bytes``) to ``val`` and keep the head as ``train``, streaming."""
    with open(tokens, "r+b") as f, open(val, "wb") as out:
        f.seek(train_bytes)
        shutil.copyfileobj(f, out)
        out.flush()
        os.fsync(out.fileno())
        f.truncate(train_bytes)
    os.rename(tokens, train)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _open(cache_dir: Path) -> TokenData | None:
    """Map a finished cache; None if it is absent or does not match its meta.json."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        splits = {s: (cache_dir / f"{s}.bin", meta[f"{s}_tokens"]) for s in ("train", "val")}
        if meta.get("format") != CACHE_FORMAT or any(p.stat().st_size != n * dtype.itemsize
                                                    for p, n in splits.values()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # np.memmap cannot map an empty file; an empty split is a plain empty array.
    train, val = (np.memmap(p, dtype=dtype, mode="r", shape=(n,)) if n else np.empty(0, dtype)
                  for p, n in splits.values())
    return TokenData(train, val, meta, cache_dir, from_cache=True)


# --- windows -----------------------------------------------------------------------------------------------------


class WindowLoader:
    """Training windows over a token stream: window i covers ``tokens[i*stride : i*stride + T + 1]``,
    ``x = window[:-1]``, ``y = window[1:]``.

    An epoch visits every window once, in a permutation seeded by (seed, epoch), so ``batch(epoch, index)`` is
    the same in any process and a resumed run continues exactly where it stopped. The last incomplete batch of
    an epoch is dropped; a split with fewer windows than ``batch_size`` gives one smaller batch.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int, batch_size: int, seed: int,
                 shuffle: bool = True, split: str = "train") -> None:
        """Args:
            tokens: (N,) token ids (a memmap is fine: batches are gathered from it, never copied whole).
            context_length: T, tokens per sample.
            stride: tokens between window starts (= T for non-overlapping windows).
            batch_size: B, windows per batch.
            seed: seeds the per-epoch permutation.
            shuffle: False keeps windows in stream order.
            split: name used in error messages.
        """
        if context_length < 1 or stride < 1 or batch_size < 1:
            raise ValueError("context_length, stride and batch_size must be >= 1")
        if len(tokens) < context_length + 1:
            raise DatasetError(
                f"the {split} split has {len(tokens)} tokens, but context_length {context_length} needs at least "
                f"{context_length + 1} (one window of context_length + 1 tokens); use more data, a smaller "
                "context_length or a different val_fraction")
        self.tokens, self.context_length, self.seed, self.shuffle = tokens, context_length, seed, shuffle
        self.starts = np.arange(0, len(tokens) - context_length, stride, dtype=np.int64)  # (W,)
        self.batch_size = min(batch_size, len(self.starts))
        self._offsets = np.arange(context_length + 1, dtype=np.int64)  # (T+1,)
        self._order_epoch, self._order = -1, self.starts

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.starts) // self.batch_size

    def batch(self, epoch: int, index: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of ``epoch``: (x, y), int64 tensors of shape (B, T), y shifted one token ahead of x.

        With ``world_size`` > 1, only rank ``rank``'s share of it: rows [rank·B/W, (rank+1)·B/W) of the global
        batch, so the ranks of a distributed run read disjoint windows whose union is the one-process batch
        (B must be a multiple of W)."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range: an epoch has {len(self)} batches")
        starts = self._epoch_order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]  # (B,)
        if world_size > 1:
            share = self.batch_size // world_size
            starts = starts[rank * share:(rank + 1) * share]  # (B/W,)
        return self._gather(starts)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` from batch ``start`` on (``start`` > 0 resumes mid-epoch)."""
        for index in range(start, len(self)):
            yield self.batch(epoch, index)

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` fixed batches of windows spread evenly over the split: the same every call, so losses from
        different evaluations compare. Windows repeat only when the split has fewer than n*B of them."""
        idx = np.linspace(0, len(self.starts) - 1, n * self.batch_size).round().astype(np.int64)
        starts = self.starts[idx].reshape(n, self.batch_size)  # (n, B)
        return [self._gather(s) for s in starts]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.starts
        if epoch != self._order_epoch:  # one permutation per epoch, not per batch
            rng = np.random.default_rng([self.seed, epoch])
            self._order, self._order_epoch = self.starts[rng.permutation(len(self.starts))], epoch
        return self._order

    def _gather(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # One fancy index reads all B windows from the memmap at once.
        windows = self.tokens[starts[:, None] + self._offsets].astype(np.int64)  # (B, T+1)
        x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))  # (B, T)
        y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))  # (B, T)
        return x, y


Batches = list[tuple[torch.Tensor, torch.Tensor]]


class Prefetcher:
    """The next optimizer steps' batches, made by a background thread while the device works on the current step.

    ``fetch(i)`` returns the micro-batches of step ``i`` (a pure function of ``i``: ``WindowLoader.batch`` is, so a
    resumed run reads exactly what an uninterrupted one would). The thread calls it for ``start``, ``start + 1``,
    ... ``stop - 1``, at most ``depth`` steps ahead of the consumer, and with ``pin`` copies each batch into
    page-locked memory, from which a ``.to(device, non_blocking=True)`` is an asynchronous DMA that the host does not
    wait for. ``next()`` hands the batches over in order; an exception in ``fetch`` is raised there. ``close()``
    ends the thread (also when the consumer stops early).
    """

    def __init__(self, fetch: Callable[[int], Batches], start: int, stop: int, *, pin: bool = False,
                 depth: int = 2, name: str = "slmb-prefetch") -> None:
        import queue
        import threading

        self._fetch, self._pin, self._next, self._stop = fetch, pin, start, stop
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(start,), name=name, daemon=True)
        self._thread.start()

    def _work(self, index: int) -> None:
        import queue

        while index < self._stop and not self._closed.is_set():
            try:
                batches = self._fetch(index)
                if self._pin:
                    batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
                item: Any = (index, batches, None)
            except BaseException as exc:  # handed to the consumer, which raises it
                item = (index, None, exc)
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            index += 1

    def next(self) -> Batches:
        """The batches of the next step (waits for the thread when it is behind)."""
        import queue

        if self._next >= self._stop:
            raise IndexError(f"the prefetcher's steps end at {self._stop}")
        while True:
            try:
                index, batches, exc = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the batch prefetching thread ended unexpectedly") from None
        if exc is not None:
            raise exc
        assert index == self._next, (index, self._next)
        self._next += 1
        return batches

    def close(self) -> None:
        import queue

        self._closed.set()
        while True:  # unblock a put() that waits for room
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
