"""Generation: cached decoding equals uncached decoding, sampling controls, UTF-8-safe streaming, the CLI."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slmb.core.compiler import build_model
from slmb.core.generate import Generator, SamplingParams, _TextStream, load_generator, load_model
from slmb.core.model import KVCache
from slmb.core.spec import TrainRequest
from slmb.core.store import save_completed
from slmb.core.tokenizers import load_tokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
V, E, T = 300, 32, 24


def tiny(example: str, **config) -> dict:
    """A reference architecture from examples/, shrunk to test size (same node types and options)."""
    body = copy.deepcopy(json.loads((EXAMPLES / example).read_text()))

    def shrink(nodes):
        for node in nodes:
            d = node["data"]
            for key, value in (("vocabSize", V), ("embDim", E), ("ctxLength", T), ("hiddenDim", 64),
                               ("numOfBlocks", 2), ("inDim", E)):
                if key in d:
                    d[key] = value
            if node["type"] == "linear":
                d["outDim"] = V
            if "headDim" in d:
                d["headDim"] = 16
            if isinstance(d.get("ropeConfig"), dict):
                d["ropeConfig"]["original_context_length"] = 8
            shrink(node.get("children", []))

    shrink(body["model"])
    body["config"] = {"context_length": T, "tokenizer": "byte", **config}
    return body


def with_positions(mode: str) -> dict:
    body = tiny("gpt2.json")
    body["model"][1]["data"]["posType"] = mode
    return body


ARCHITECTURES = {
    "gpt2": lambda: tiny("gpt2.json"),
    "llama2": lambda: tiny("llama2.json"),
    "llama3": lambda: tiny("llama3.json"),
    "qwen3": lambda: tiny("qwen3.json"),
    "sinusoidal": lambda: with_positions("Sinusoidal Positional Embedding"),
    "relative": lambda: with_positions("Relative Positional Embedding"),
    "rotary-mha": lambda: with_positions("Rotary Positional Embedding"),
}


def make(body: dict, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(TrainRequest.model_validate(body)).eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_logits_equal_uncached_at_every_step(arch):
    model = make(ARCHITECTURES[arch]())
    if arch == "relative":  # a zero-initialised bias would hide position mistakes
        for m in model.modules():
            if hasattr(m, "buckets"):
                torch.nn.init.normal_(m.weight)
    ids = torch.randint(0, V, (1, 7), generator=torch.Generator().manual_seed(3))
    cache = KVCache(model, 1, T)
    worst = 0.0
    with torch.no_grad():
        step_logits = model(ids, cache)[0, -1]
        for _ in range(T - ids.shape[1]):
            full = model(ids)[0, -1]
            worst = max(worst, (full - step_logits).abs().max().item())
            nxt = step_logits.argmax().view(1, 1)
            ids = torch.cat([ids, nxt], dim=1)
            if ids.shape[1] == T:
                break
            step_logits = model(nxt, cache)[0, -1]
    assert ids.shape[1] == T
    assert worst < 1e-4, worst


@pytest.mark.parametrize("arch", ["gpt2", "llama3"])
def test_generator_with_cache_matches_without_past_the_window(arch):
    model = make(ARCHITECTURES[arch]())
    tok = load_tokenizer("byte")
    params = SamplingParams(max_new_tokens=3 * T, temperature=0, stop_at_eos=False)
    prompt = "To be, or not"  # 13 byte tokens, then 72 new ones: the window of 24 slides many times
    cached = Generator(model, tok).generate(prompt, params)
    plain = Generator(model, tok, use_cache=False).generate(prompt, params)
    assert len(cached.token_ids) == 3 * T
    assert cached.token_ids == plain.token_ids
    # The sliding window is exactly "the last T tokens": replay it by hand.
    ids = tok.encode(prompt)
    with torch.no_grad():
        for _ in range(3 * T):
            ids.append(int(model(torch.tensor([ids[-T:]]))[0, -1, :257].argmax()))
    assert cached.token_ids == ids[len(tok.encode(prompt)):]


@pytest.fixture(scope="module")
def gpt2_model():
    return make(tiny("gpt2.json"))


def test_same_seed_same_text_and_different_seed_differs(gpt2_model):
    gen = Generator(gpt2_model, load_tokenizer("byte"))
    p = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=0, seed=7, stop_at_eos=False)
    a, b = gen.generate("hi", p), gen.generate("hi", p)
    c = gen.generate("hi", p.model_copy(update={"seed": 8}))
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_greedy_top_k_1_and_tiny_top_p_agree(gpt2_model):
    gen = Generator(gpt2_model, load_tokenizer("byte"))
    greedy = gen.generate("abc", SamplingParams(max_new_tokens=20, temperature=0, stop_at_eos=False))
    top1 = gen.generate("abc", SamplingParams(max_new_tokens=20, temperature=1.0, top_k=1, seed=1,
                                              stop_at_eos=False))
    nucleus = gen.generate("abc", SamplingParams(max_new_tokens=20, temperature=1.0, top_k=0, top_p=1e-6, seed=2,
                                                 stop_at_eos=False))
    assert greedy.token_ids == top1.token_ids == nucleus.token_ids


def test_bf16_decode_weights_are_a_copy_and_track_fp32_logits(gpt2_model):
    gen = Generator(gpt2_model, load_tokenizer("byte"), dtype=torch.bfloat16)
    assert {p.dtype for p in gen.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in gpt2_model.parameters()} == {torch.float32}  # the caller's model is untouched
    ids = torch.tensor([list(b"hello world")])
    with torch.no_grad():
        ref, got = gpt2_model(ids)[0, -1], gen.model(ids)[0, -1].float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert len(gen.generate("hi", SamplingParams(max_new_tokens=8, temperature=0, stop_at_eos=False)).token_ids) == 8


def test_padded_vocabulary_is_never_sampled(gpt2_model):
    model = copy.deepcopy(gpt2_model)
    head = model.chain.layers[-1]
    with torch.no_grad():
        head.weight[257:] = 0
        head.bias = torch.nn.Parameter(torch.zeros(V))
        head.bias[257:] = 1e4  # the padded ids (257..299) would win every time
    gen = Generator(model, load_tokenizer("byte"))
    for temperature in (0.0, 1.0):
        out = gen.generate("x", SamplingParams(max_new_tokens=30, temperature=temperature, top_k=0, seed=0,
                                               stop_at_eos=False))
        assert max(out.token_ids) < 257


def test_repetition_penalty_discourages_seen_tokens(gpt2_model):
    gen = Generator(gpt2_model, load_tokenizer("byte"))
    plain = gen.generate("aaaa", SamplingParams(max_new_tokens=60, temperature=0, stop_at_eos=False))
    penal = gen.generate("aaaa", SamplingParams(max_new_tokens=60, temperature=0, repetition_penalty=5.0,
                                                stop_at_eos=False))
    assert len(set(penal.token_ids)) > len(set(plain.token_ids))


def test_eos_and_stop_strings_end_generation(gpt2_model):
    model = copy.deepcopy(gpt2_model)
    head = model.chain.layers[-1]
    tok = load_tokenizer("byte")
    with torch.no_grad():
        head.weight.zero_()
        head.bias = torch.nn.Parameter(torch.zeros(V))
        head.bias[tok.eos_id] = 10.0
    out = Generator(model, tok).generate("q", SamplingParams(max_new_tokens=10, temperature=0))
    assert out.finish_reason == "eos" and out.token_ids == [] and out.output_text == "q"

    with torch.no_grad():
        head.bias.zero_()
        head.bias[ord("z")] = 10.0
    gen = Generator(model, tok)
    out = gen.generate("q", SamplingParams(max_new_tokens=10, temperature=0, stop=["zzz"]))
    assert out.finish_reason == "stop" and out.text == ""
    out = gen.generate("q", SamplingParams(max_new_tokens=4, temperature=0))
    assert out.finish_reason == "length" and out.text == "zzzz" and out.output_text == "qzzzz"


def test_text_stream_never_splits_utf8_and_holds_back_stop_prefixes():
    text = "héllo wörld 😀 日本"
    stream = _TextStream([])
    deltas = [stream.feed(bytes([b]))[0] for b in text.encode()]
    deltas.append(stream.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d) == len(text)  # one whole character at a time

    stream = _TextStream(["END"])
    deltas, stopped = [], False
    for c in "abcENxEND tail":
        delta, stopped = stream.feed(c.encode())
        deltas.append(delta)
        if stopped:
            break
    assert stopped and "".join(deltas) == "abcENx"
    assert deltas[3:5] == ["", ""]  # "E", "EN" held back until "x" shows they start no stop string
    assert deltas[5] == "ENx"


def test_store_round_trip_and_cli_generate(tmp_path, gpt2_model):
    body = tiny("gpt2.json")
    save_completed("tiny-gpt2", body, gpt2_model.state_dict(), {"tokenizer": "byte"})
    gen, meta = load_generator("tiny-gpt2")
    assert meta["tokenizer"] == "byte"
    loaded = gen.model
    x = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gpt2_model(x))
    args = [sys.executable, "-m", "slmb", "generate", "tiny-gpt2", "Once", "-n", "12", "--temperature", "0"]
    res = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    expect = gen.generate("Once", SamplingParams(max_new_tokens=12, temperature=0))
    assert out["output_text"] == expect.output_text and out["output_text"].startswith("Once")
    assert out["new_tokens"] == len(expect.token_ids)
    streamed = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert streamed.returncode == 0 and streamed.stdout.rstrip("\n") == expect.output_text
    missing = subprocess.run([sys.executable, "-m", "slmb", "generate", "nope", "x"], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 1 and "no completed model named 'nope'" in missing.stderr


def test_load_model_restores_tied_weights_without_random_init():
    body = tiny("qwen3.json")
    model = make(body)
    loaded = load_model(body, model.state_dict())
    assert loaded.chain.layers[-1].weight is loaded.chain.layers[0].weight
    x = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
