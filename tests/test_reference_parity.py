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
ATOL = 1e-4


@torch.no_grad()
def _randomize(hf: torch.nn.Module, seed: int) -> None:
    """Weights far from HF's N(0, 0.02) init, so attention is peaked and RoPE, norms and biases all matter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in hf.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.ndim == 1 and name.endswith("weight"):  # norm gains
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(0.1 * noise)


def _compare(hf: torch.nn.Module, body: dict, load) -> float:
    """Build ``body``, copy ``hf``'s weights into it, and return the max |logits difference| over two lengths."""
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
        worst = max(worst, (out - ref).abs().max().item())
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


def test_parity_detects_a_wrong_canvas():
    """The tolerance has teeth: dropping the RoPE scaling (~3) or taking the other GELU (~1e-3) is outside it."""
    hf = _llama(LLAMA3_ROPE, KV_HEADS, tied=True)
    body = llama_body(hf.config)
    unscaled = copy.deepcopy(body)
    del unscaled["model"][1]["children"][1]["data"]["ropeConfig"]
    assert _compare(hf, unscaled, load_llama) > 100 * ATOL

    hf = _gpt2("gelu_new", tied=False)
    assert _compare(hf, gpt2_body(hf.config, "GELU", tied=False), load_gpt2) > 5 * ATOL
