"""Correctness by reference (DESIGN.md §2.2): canvases compiled by slmb give Hugging Face's logits.

Each test builds a tiny random GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM, writes the equivalent
canvas body in the front end's format, copies the weights across and compares fp32 logits on random ids,
for a short sequence and for one that fills the whole context.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_convert import gpt2_body, llama_body, load_gpt2, load_llama

from slmb.core.compiler import build_model
from slmb.core.spec import TrainRequest

transformers = pytest.importorskip("transformers")

V, E, LAYERS, HEADS, KV_HEADS, CTX = 1000, 64, 2, 4, 2, 48
# fp32, weights of std 0.1 and norm gains 1 ± 0.2 (logits within ±4.4): measured 1.4e-6 (GPT-2) to 3.3e-6 (Llama 3,
# 4 seeds each); the README states this bound. The difference grows with the logits' scale (sums in another
# order), so larger weights are checked against the largest logit instead (RTOL).
ATOL = 1e-5
# Norm gains 3 ± 0.6 (logits up to ±12, as trained models have): measured at most 2.5e-6 of the largest logit.
RTOL = 1e-5


@torch.no_grad()
def _randomize(hf: torch.nn.Module, seed: int, gain: float = 1.0) -> None:
    """Weights far from HF's N(0, 0.02) init, so attention is peaked and RoPE, norms and biases all matter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in hf.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.ndim == 1 and name.endswith("weight"):  # norm gains
            p.copy_(gain * (1.0 + 0.2 * noise))
        else:
            p.copy_(0.1 * noise)


def _compare(hf: torch.nn.Module, body: dict, load, relative: bool = False) -> float:
    """Build ``body``, copy ``hf``'s weights into it, and return the max |logits difference| over two lengths
    (``relative``: divided by the largest |logit| of the reference)."""
    slm = build_model(TrainRequest.model_validate(body)).eval()
    load(slm, hf)
    assert slm.num_parameters() == sum(p.numel() for p in hf.parameters())  # every weight mapped once
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for T in (17, CTX):
        ids = torch.randint(0, V, (2, T), generator=g)
        with torch.no_grad():
            ref = hf(input_ids=ids).logits
            out = slm(ids)
        assert out.shape == ref.shape == (2, T, V)
        diff = (out - ref).abs().max().item()
        worst = max(worst, diff / ref.abs().max().item() if relative else diff)
    return worst


def _gpt2(act: str, tied: bool) -> torch.nn.Module:
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=CTX, n_embd=E, n_layer=LAYERS, n_head=HEADS,
                                  activation_function=act, tie_word_embeddings=tied, bos_token_id=None,
                                  eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    _randomize(hf, seed=1)
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == tied
    return hf


def _llama(rope: dict, kv_heads: int, tied: bool) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=176, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=kv_heads,
                                   max_position_embeddings=CTX, rms_norm_eps=1e-5, rope_parameters=rope,
                                   tie_word_embeddings=tied, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    _randomize(hf, seed=2)
    return hf


def _qwen3(tied: bool) -> torch.nn.Module:
    cfg = transformers.Qwen3Config(vocab_size=V, hidden_size=E, intermediate_size=160, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=32,
                                   max_position_embeddings=CTX, rms_norm_eps=1e-6,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                                   tie_word_embeddings=tied, attn_implementation="eager")
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    _randomize(hf, seed=3)
    return hf


# Llama 3 scaling with an original context of 16: of head_dim 16's eight frequencies, one falls in the smoothed
# band (wavelength 6.3 lies between 16/4 and 16/1) and the rest are divided by the factor.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
LLAMA2_ROPE = {"rope_type": "default", "rope_theta": 10_000.0}


@pytest.mark.parametrize(("hf_act", "act"), [("gelu_new", "gelu_tanh"), ("gelu", "GELU")])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gpt2(hf_act, act, tied):
    hf = _gpt2(hf_act, tied)
    assert _compare(hf, gpt2_body(hf.config, act, tied), load_gpt2) < ATOL


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama3_gqa_rope_scaling(tied):
    hf = _llama(LLAMA3_ROPE, KV_HEADS, tied)
    assert _compare(hf, llama_body(hf.config), load_llama) < ATOL


@pytest.mark.parametrize("attention", ["gqAttention", "mhAttention"])
def test_llama2_mha_plain_rope(attention):
    """Llama 2: no scaling, KV heads = heads; as GQA nodes, or as a rotary positional node + MH attention."""
    hf = _llama(LLAMA2_ROPE, HEADS, tied=False)
    assert _compare(hf, llama_body(hf.config, attention=attention, model_family="llama2"), load_llama) < ATOL


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen3_qk_norm_wide_heads(tied):
    """Qwen3: heads·head_dim (128) differs from the width (64); per-head RMSNorm on q and k before RoPE."""
    hf = _qwen3(tied)
    assert _compare(hf, llama_body(hf.config, qk_norm=True, model_family="qwen3"), load_llama) < ATOL


@pytest.mark.parametrize("arch", ["gpt2", "llama2", "llama3", "qwen3"])
def test_parity_at_the_logit_scale_of_trained_models(arch):
    """Norm gains of 3 make logits of ±12: the difference stays within RTOL of the largest logit."""
    hf, body, load = {
        "gpt2": lambda: (h := _gpt2("gelu_new", tied=True), gpt2_body(h.config, "gelu_tanh", True), load_gpt2),
        "llama2": lambda: (h := _llama(LLAMA2_ROPE, HEADS, tied=False),
                           llama_body(h.config, model_family="llama2"), load_llama),
        "llama3": lambda: (h := _llama(LLAMA3_ROPE, KV_HEADS, tied=True), llama_body(h.config), load_llama),
        "qwen3": lambda: (h := _qwen3(tied=False), llama_body(h.config, qk_norm=True, model_family="qwen3"),
                          load_llama),
    }[arch]()
    _randomize(hf, seed=4, gain=3.0)
    with torch.no_grad():
        assert hf(input_ids=torch.arange(CTX)[None]).logits.abs().max() > 8  # the scale under test
    assert _compare(hf, body, load, relative=True) < RTOL


def test_parity_detects_a_wrong_canvas():
    """The tolerance has teeth: dropping the RoPE scaling (~3) or taking the other GELU (~1e-3) is outside it."""
    hf = _llama(LLAMA3_ROPE, KV_HEADS, tied=True)
    body = llama_body(hf.config)
    unscaled = copy.deepcopy(body)
    del unscaled["model"][1]["children"][1]["data"]["ropeConfig"]
    assert _compare(hf, unscaled, load_llama) > 100 * ATOL

    hf = _gpt2("gelu_new", tied=False)
    assert _compare(hf, gpt2_body(hf.config, "GELU", tied=False), load_gpt2) > 5 * ATOL
