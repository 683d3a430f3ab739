"""Tokenizers against the real files in ../shared/tokenizers (ids from shared/README.md)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmb.core.tokenizers import (
    KNOWN_VOCAB_SIZES,
    Tokenizer,
    TokenizerError,
    TokenizerNotFoundError,
    VocabMismatchError,
    canonical_tokenizer_name,
    check_vocab,
    load_tokenizer,
)

NAMES = ["gpt2", "llama2", "llama3", "qwen3", "byte"]
TEXT = "Héllo wörld!  Ünïcödé 😀🚀 中文字符 日本語 한국어\n\n\ttabs  and   spaces 12345 <|endoftext|> end "


@pytest.mark.parametrize(("name", "ids"), [
    ("gpt2", [15496, 995]),
    ("llama2", [15043, 3186]),
    ("llama3", [9906, 1917]),
    ("qwen3", [9707, 1879]),
    ("byte", list(b"Hello world")),
])
def test_known_ids(name, ids):
    tok = load_tokenizer(name)
    assert tok.encode("Hello world") == ids
    assert tok.decode(ids) == "Hello world"


@pytest.mark.parametrize("name", NAMES)
def test_vocab_size_matches_table(name):
    tok = load_tokenizer(name)
    assert isinstance(tok, Tokenizer)
    assert tok.name == name
    assert tok.vocab_size == KNOWN_VOCAB_SIZES[name]
    assert max(tok.special_tokens.values()) < tok.vocab_size
    assert tok.token_bytes(tok.vocab_size - 1) is not None


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_unicode(name):
    tok = load_tokenizer(name)
    assert tok.decode(tok.encode(TEXT)) == TEXT


@pytest.mark.parametrize("name", NAMES)
def test_token_bytes_join_to_utf8(name):
    tok = load_tokenizer(name)
    joined = b"".join(tok.token_bytes(i) for i in tok.encode(TEXT))
    # SentencePiece prepends a dummy-prefix space to the text; decode() strips it.
    expected = (" " + TEXT if name == "llama2" else TEXT).encode()
    assert joined == expected


def test_token_bytes_split_characters_stream_cleanly():
    """An emoji spans several byte tokens; joining bytes before decoding never yields U+FFFD."""
    tok = load_tokenizer("byte")
    ids = tok.encode("a😀")
    assert len(ids) == 5
    assert [tok.token_bytes(i) for i in ids[1:]] == list(map(bytes, zip("😀".encode(), strict=True)))
    assert b"".join(map(tok.token_bytes, ids)).decode() == "a😀"


@pytest.mark.parametrize("name", NAMES)
def test_encode_batch_equals_encode(name):
    tok = load_tokenizer(name)
    texts = ["Hello world", TEXT, "", "x" * 1000]
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]


def test_special_tokens():
    gpt2, llama2, llama3, qwen3, byte = map(load_tokenizer, NAMES)
    assert (gpt2.eos_id, gpt2.bos_id, gpt2.special_tokens) == (50256, None, {"<|endoftext|>": 50256})
    assert (llama2.bos_id, llama2.eos_id) == (1, 2)
    assert (llama3.bos_id, llama3.eos_id) == (128000, 128001)
    s = llama3.special_tokens
    assert len(s) == 256
    assert (s["<|begin_of_text|>"], s["<|end_of_text|>"], s["<|start_header_id|>"], s["<|end_header_id|>"],
            s["<|eot_id|>"]) == (128000, 128001, 128006, 128007, 128009)
    assert (s["<|reserved_special_token_0|>"], s["<|reserved_special_token_4|>"],
            s["<|reserved_special_token_250|>"]) == (128002, 128008, 128255)
    q = qwen3.special_tokens
    assert (qwen3.eos_id, qwen3.bos_id) == (151643, None)
    assert (q["<|endoftext|>"], q["<|im_start|>"], q["<|im_end|>"], q["<think>"], q["</think>"]) == (
        151643, 151644, 151645, 151667, 151668)
    assert sorted(q.values()) == list(range(151643, 151669))
    assert (byte.eos_id, byte.token_bytes(256)) == (256, b"<|endoftext|>")
    assert llama3.token_bytes(128009) == b"<|eot_id|>"


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen3", "byte"])
def test_special_text_in_input_is_ordinary_text(name):
    tok = load_tokenizer(name)
    ids = tok.encode("<|endoftext|>")
    assert tok.eos_id not in ids
    assert tok.decode(ids) == "<|endoftext|>"


def test_qwen_splits_digits_one_by_one():
    assert len(load_tokenizer("qwen3").encode("12345")) == 5
    assert len(load_tokenizer("llama3").encode("12345")) == 2  # "123" "45"


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
@settings(max_examples=150, deadline=None)
def test_round_trip_any_text(text):
    for name in ("gpt2", "llama3", "qwen3", "byte"):
        tok = load_tokenizer(name)
        assert tok.decode(tok.encode(text)) == text
        assert b"".join(map(tok.token_bytes, tok.encode(text))) == text.encode()


def test_aliases_and_cache():
    assert load_tokenizer("GPT-2") is load_tokenizer("gpt2")
    assert load_tokenizer("qwen") is load_tokenizer("qwen3")
    assert load_tokenizer("Llama-3") is load_tokenizer("llama3")
    for alias, canonical in [("gpt-2", "gpt2"), ("GPT2", "gpt2"), ("llama2", "llama2"), ("llama_3", "llama3"),
                             ("qwen", "qwen3"), ("Qwen3", "qwen3"), ("byte", "byte")]:
        assert canonical_tokenizer_name(alias) == canonical
    assert canonical_tokenizer_name("/some/tokenizer.model") is None
    assert canonical_tokenizer_name("bert") is None


def test_load_by_path_sniffs_format(shared):
    llama2 = load_tokenizer(str(shared / "tokenizers/llama2/tokenizer.model"))
    assert llama2.encode("Hello world") == [15043, 3186]
    # Ranks files are recognised by their size: Qwen's gets Qwen's pattern and specials, Llama 3's Meta's.
    qwen = load_tokenizer(str(shared / "tokenizers/qwen/qwen.tiktoken"))
    assert (qwen.encode("Hello world"), qwen.vocab_size, qwen.eos_id) == ([9707, 1879], 151669, 151643)
    llama3 = load_tokenizer(str(shared / "tokenizers/llama3/tokenizer.model"))
    assert (llama3.encode("Hello world"), llama3.vocab_size) == ([9906, 1917], 128256)
    assert qwen.name.endswith("qwen.tiktoken")


def test_missing_file_names_every_place(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("SLMB_TOKENIZER_DIR", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name, file in [("llama3", "tokenizer.model"), ("qwen3", "qwen.tiktoken"), ("llama2", "tokenizer.model")]:
        with pytest.raises(TokenizerNotFoundError) as err:
            load_tokenizer(name)
        msg = str(err.value)
        assert str(empty / name / file) in msg
        assert str(tmp_path / "slmb-home" / "tokenizers") in msg
        assert str(tmp_path / "home" / ".cache" / "slmb" / "tokenizers") in msg
        assert "SLMB_TOKENIZER_DIR" in msg and file in msg
    assert isinstance(err.value, FileNotFoundError)


def test_files_found_under_slmb_home(tmp_path, monkeypatch, shared):
    folder = tmp_path / "slmb-home" / "tokenizers" / "qwen"
    folder.mkdir(parents=True)
    (folder / "qwen.tiktoken").symlink_to(shared / "tokenizers/qwen/qwen.tiktoken")
    monkeypatch.setenv("SLMB_TOKENIZER_DIR", str(tmp_path / "nothing-here"))
    assert load_tokenizer("qwen3").encode("Hello world") == [9707, 1879]


def test_wrong_format_for_family(tmp_path, monkeypatch):
    (tmp_path / "llama2").mkdir()
    (tmp_path / "llama2" / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")
    monkeypatch.setenv("SLMB_TOKENIZER_DIR", str(tmp_path))
    with pytest.raises(TokenizerError, match="SentencePiece"):
        load_tokenizer("llama2")


def test_unknown_name_lists_known_ones():
    with pytest.raises(TokenizerNotFoundError, match=r"gpt2.*llama2.*llama3.*qwen3"):
        load_tokenizer("bert-base")


def test_check_vocab():
    tok = load_tokenizer("gpt2")
    check_vocab(50257, tok)
    check_vocab(50304, tok)  # padded to a multiple of 64: fine
    with pytest.raises(VocabMismatchError, match=r"50000.*50257"):
        check_vocab(50000, tok)
