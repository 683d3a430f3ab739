"""Canvas bodies equivalent to Hugging Face GPT-2 / Llama / Qwen3 configs, and weight copies into slmb models.

The bodies are written the way the ReactFlow front end sends them (``type`` + ``data`` with ``id``, ``label``,
``inDim``/``outDim`` and camelCase keys; see ``shared/requests/*-reference.json``), so the parity tests also
exercise the request parser. The copies map Hugging Face state-dict keys onto the compiled module tree.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from slmb.core import nodes as N
from slmb.core.model import SLM

_ids = itertools.count(1758820556650)


def _node(type_: str, label: str, in_dim: int, out_dim: int, **data: Any) -> dict:
    return {"type": type_, "data": {"id": f"{type_}-{next(_ids)}", "label": label, "inDim": in_dim,
                                    "outDim": out_dim, **data}}


def _body(config: dict, model: list[dict], name: str) -> dict:
    return {"config": {"epochs": 1, "batch_size": 1, "dtype": "fp32", **config}, "model": model,
            "modelName": name, "dataset": "tiny_shakespeare", "dataset_config": "default"}


def gpt2_body(hf_cfg, act: str, tied: bool) -> dict:
    """GPT-2 canvas: learned positions, pre-LN blocks whose residuals name the LayerNorm by bare id."""
    E, V, C = hf_cfg.n_embd, hf_cfg.vocab_size, hf_cfg.n_positions
    ln = dict(normType="Layer Normalization", eps=hf_cfg.layer_norm_epsilon)
    norm1 = _node("normalization", "Normalization", E, E, **ln)
    norm2 = _node("normalization", "Normalization", E, E, **ln)
    block = [
        norm1,
        _node("mhAttention", "MH Attention", E, E, numHeads=hf_cfg.n_head, ctxLength=C, dropoutRate=0.1,
              qkvBias=True, isRoPE=False, ropeBase=10000),
        _node("dropout", "Dropout", E, E, dropoutRate=0.1),
        _node("residual", "Residual", E, E, source=norm1["data"]["id"]),
        norm2,
        _node("feedForward", "Feed Forward", E, E, hiddenDim=hf_cfg.n_inner or 4 * E, feedForwardType="Standard",
              actFunc=act, bias=True),
        _node("dropout", "Dropout", E, E, dropoutRate=0.1),
        _node("residual", "Residual", E, E, source=norm2["data"]["id"]),
    ]
    model = [
        _node("tokenEmbedding", "Token Embedding", E, E, vocabSize=V, embDim=E),
        _node("positionalEmbedding", "Positional Embedding", E, E, ctxLength=C,
              posType="Learned Positional Embedding", vocabSize=V, embDim=E),
        _node("dropout", "Dropout", E, E, dropoutRate=0.1),
        {**_node("transformerBlock", "Transformer Block", E, E, numOfBlocks=hf_cfg.n_layer), "children": block},
        _node("normalization", "Normalization", E, E, **ln),
        _node("linear", "Linear", E, V, bias=False, weightTying=tied),
    ]
    config = dict(model="gpt-2", vocab_size=V, context_length=C, stride=C, emb_dim=E, n_heads=hf_cfg.n_head,
                  n_blocks=hf_cfg.n_layer, drop_rate=0.1, qkv_bias=True)
    return _body(config, model, "parity-gpt2")


def llama_body(hf_cfg, *, attention: str = "gqAttention", qk_norm: bool = False, model_family: str = "llama3") -> dict:
    """Llama 2/3 and Qwen3 canvas: RMSNorm pre-norm blocks, ``<normId>:in`` residuals, gated SwiGLU.

    ``attention="mhAttention"`` writes the Llama 2 form the canvas also allows: a rotary positional node
    followed by MH attention nodes without an ``isRoPE`` key.
    """
    E, V, C = hf_cfg.hidden_size, hf_cfg.vocab_size, hf_cfg.max_position_embeddings
    H, KV, hd = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads, hf_cfg.head_dim
    rope = hf_cfg.rope_parameters
    rms = dict(normType="RMS Normalization", eps=hf_cfg.rms_norm_eps)
    norm1 = _node("normalization", "Normalization", E, E, **rms)
    norm2 = _node("normalization", "Normalization", E, E, **rms)
    if attention == "mhAttention":
        assert KV == H and hd == E // H and rope.get("rope_type", "default") == "default"
        attn = _node("mhAttention", "MH Attention", E, E, numHeads=H, ctxLength=C, dropoutRate=0, qkvBias=False,
                     ropeBase=rope["rope_theta"])
    else:
        extra = {}
        if rope.get("rope_type") == "llama3":
            extra["ropeConfig"] = {"factor": rope["factor"], "low_freq_factor": rope["low_freq_factor"],
                                   "high_freq_factor": rope["high_freq_factor"],
                                   "original_context_length": rope["original_max_position_embeddings"]}
        if hd != E // H:
            extra["headDim"] = hd
        attn = _node("gqAttention", "GQ Attention", E, E, numHeads=H, ctxLength=C, dropoutRate=0, qkvBias=False,
                     isRoPE=True, ropeBase=rope["rope_theta"], numKvGroups=KV, qkNorm=qk_norm,
                     qkNormEps=hf_cfg.rms_norm_eps, **extra)
    block = [
        norm1,
        attn,
        _node("residual", "Residual", E, E, source=f"{norm1['data']['id']}:in"),
        norm2,
        _node("feedForward", "Feed Forward", E, E, hiddenDim=hf_cfg.intermediate_size, feedForwardType="Gated",
              actFunc="SwiGLU", bias=False),
        _node("residual", "Residual", E, E, source=f"{norm2['data']['id']}:in"),
    ]
    model = [_node("tokenEmbedding", "Token Embedding", E, E, vocabSize=V, embDim=E)]
    if attention == "mhAttention":
        model.append(_node("positionalEmbedding", "Positional Embedding", E, E, ctxLength=C,
                           posType="Rotary Positional Embedding", vocabSize=V, embDim=E))
    model += [
        {**_node("transformerBlock", "Transformer Block", E, E, numOfBlocks=hf_cfg.num_hidden_layers),
         "children": block},
        _node("normalization", "Normalization", E, E, **rms),
        _node("linear", "Linear", E, V, bias=False, weightTying=hf_cfg.tie_word_embeddings),
    ]
    config = dict(model=model_family, vocab_size=V, context_length=C, stride=C, emb_dim=E, n_heads=H,
                  n_blocks=hf_cfg.num_hidden_layers, hidden_dim=hf_cfg.intermediate_size, n_kv_groups=KV,
                  rope_base=rope["rope_theta"], head_dim=hd, qk_norm=qk_norm, qk_norm_eps=hf_cfg.rms_norm_eps)
    if "ropeConfig" in attn["data"]:
        config["rope_freq"] = attn["data"]["ropeConfig"]
    return _body(config, model, f"parity-{model_family}")


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
