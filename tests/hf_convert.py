"""Canvas bodies equivalent to Hugging Face GPT-2 / Llama / Qwen3 configs, and weight copies into slmb models.

The bodies are slmb.core.interop's (what ``slmb import`` writes), in the ReactFlow front end's format (``type`` +
``data`` with ``id``, ``label``, ``inDim``/``outDim`` and camelCase keys; see ``shared/requests/*-reference.json``),
so the parity tests also exercise the request parser. The copies map Hugging Face state-dict keys onto the compiled
module tree.
"""

from __future__ import annotations

import torch

from slmb.core import interop
from slmb.core import nodes as N
from slmb.core.model import SLM


def gpt2_body(hf_cfg, act: str, tied: bool) -> dict:
    """GPT-2 canvas (slmb.core.interop's, which ``slmb import`` writes)."""
    return interop.gpt2_body(hf_cfg, act, tied, name="parity-gpt2")


def llama_body(hf_cfg, *, attention: str = "gqAttention", qk_norm: bool = False, model_family: str = "llama3") -> dict:
    """Llama 2/3 and Qwen3 canvas (slmb.core.interop's); ``attention="mhAttention"``: the Llama 2 form with a
    rotary positional node followed by MH attention nodes without an ``isRoPE`` key."""
    return interop.llama_body(hf_cfg, attention=attention, qk_norm=qk_norm, model_family=model_family,
                              name=f"parity-{model_family}")


def _parts(slm: SLM):
    """(token embedding, learned positions or None, blocks, final norm, head) of a single-stack model."""
    layers = list(slm.chain.layers)
    (stack,) = [m for m in layers if isinstance(m, N.Repeat)]
    after = layers[layers.index(stack) + 1 :]
    tok = next(m for m in layers if isinstance(m, N.TokenEmbedding))
    pos = next((m for m in layers if isinstance(m, N.LearnedPositional)), None)
    norm = next(m for m in after if isinstance(m, N.LayerNorm | N.RMSNorm))
    head = next(m for m in after if isinstance(m, N.Linear))
    return tok, pos, list(stack.blocks), norm, head


def _block_parts(block: N.Chain):
    norms = [m for m in block.layers if isinstance(m, N.LayerNorm | N.RMSNorm)]
    (attn,) = [m for m in block.layers if isinstance(m, N.Attention)]
    (ff,) = [m for m in block.layers if isinstance(m, N.FeedForward)]
    return norms, attn, ff


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    assert dst.shape == src.shape, f"{tuple(dst.shape)} != {tuple(src.shape)}"
    dst.copy_(src)


@torch.no_grad()
def load_gpt2(slm: SLM, hf) -> None:
    """GPT2LMHeadModel -> slmb. GPT-2's Conv1D stores (in, out): transpose into nn.Linear's (out, in)."""
    sd = hf.state_dict()
    tok, pos, blocks, norm, head = _parts(slm)
    _copy(tok.weight, sd["transformer.wte.weight"])
    _copy(pos.weight, sd["transformer.wpe.weight"])
    for i, block in enumerate(blocks):
        p = f"transformer.h.{i}."
        (ln1, ln2), attn, ff = _block_parts(block)
        for ln, name in ((ln1, "ln_1"), (ln2, "ln_2")):
            _copy(ln.weight, sd[p + name + ".weight"])
            _copy(ln.bias, sd[p + name + ".bias"])
        for lin, name in ((attn.qkv, "attn.c_attn"), (attn.proj, "attn.c_proj"), (ff.fc, "mlp.c_fc"),
                          (ff.out, "mlp.c_proj")):
            _copy(lin.weight, sd[p + name + ".weight"].t())
            _copy(lin.bias, sd[p + name + ".bias"])
    _copy(norm.weight, sd["transformer.ln_f.weight"])
    _copy(norm.bias, sd["transformer.ln_f.bias"])
    _copy(head.weight, sd["lm_head.weight"])


@torch.no_grad()
def load_llama(slm: SLM, hf) -> None:
    """LlamaForCausalLM / Qwen3ForCausalLM -> slmb: q, k, v rows concatenated into the fused qkv."""
    sd = hf.state_dict()
    tok, _, blocks, norm, head = _parts(slm)
    _copy(tok.weight, sd["model.embed_tokens.weight"])
    for i, block in enumerate(blocks):
        p = f"model.layers.{i}."
        (n1, n2), attn, ff = _block_parts(block)
        _copy(n1.weight, sd[p + "input_layernorm.weight"])
        _copy(n2.weight, sd[p + "post_attention_layernorm.weight"])
        qkv = [sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]
        _copy(attn.qkv.weight, torch.cat(qkv, dim=0))
        _copy(attn.proj.weight, sd[p + "self_attn.o_proj.weight"])
        if attn.q_norm is not None:
            _copy(attn.q_norm.weight, sd[p + "self_attn.q_norm.weight"])
            _copy(attn.k_norm.weight, sd[p + "self_attn.k_norm.weight"])
        for lin, name in ((ff.gate, "gate_proj"), (ff.up, "up_proj"), (ff.down, "down_proj")):
            _copy(lin.weight, sd[p + f"mlp.{name}.weight"])
    _copy(norm.weight, sd["model.norm.weight"])
    _copy(head.weight, sd["lm_head.weight"])
