"""Hugging Face interop, import direction: a transformers checkpoint becomes an slmb canvas + weights (DESIGN.md §8).

A checkpoint is a directory with ``config.json`` and safetensors weights (``model.safetensors`` or shards listed in
``model.safetensors.index.json``), given as a path or as a model id found in the local Hugging Face cache only:
nothing is ever downloaded. ``config.json`` becomes a canvas body in the front end's format that states every value
explicitly (norm eps, activation, RoPE base and scaling, head dim, qk-norm, biases, tying); anything slmb's nodes
cannot express is refused with the config field and the reason, never approximated. Weights are renamed onto the
compiled module tree through :func:`weight_links`, which the export direction reads backwards.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slmb.core import nodes as N

SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen2ForCausalLM",
                           "MistralForCausalLM")
# Tokenizer files copied beside an imported model, in order of preference for the one slmb loads.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "qwen.tiktoken", "tokenizer.tiktoken")
# Files that travel with them (chat template, special tokens, generation defaults) for export and chat.
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
# Checkpoint tensors that are buffers, not weights (old GPT-2 saves carry the causal mask).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class InteropError(ValueError):
    """A checkpoint cannot be imported (or weights cannot be loaded into a canvas); the message names the config
    field, weight or place looked and why."""


# ---------------------------------------------------------------- source resolution


def hf_cache_dirs() -> list[Path]:
    """Where Hugging Face caches models, in the order transformers consults them: $HF_HUB_CACHE,
    $HF_HOME/hub, ~/.cache/huggingface/hub."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return [d.expanduser() for d in dirs]


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())


def resolve_source(source: str) -> Path:
    """The checkpoint directory ``source`` names: a local directory, or a model id ("org/name") in the local
    Hugging Face cache (the snapshot ``refs/main`` points at, else the newest). Never downloads.

    Raises:
        InteropError: nothing usable was found; the message lists every place looked.
    """
    looked: list[str] = []
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_checkpoint(path):
            return path.resolve()
        raise InteropError(f"{path} is not a transformers checkpoint: it needs config.json and model.safetensors "
                           "(or sharded weights listed in model.safetensors.index.json); .bin weights are not read")
    looked.append(f"{path} (no such directory)")
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        folder = "models--" + source.replace("/", "--")
        for cache in hf_cache_dirs():
            snapshots = cache / folder / "snapshots"
            looked.append(str(snapshots))
            if not snapshots.is_dir():
                continue
            ref = cache / folder / "refs" / "main"
            candidates = [snapshots / ref.read_text().strip()] if ref.is_file() else []
            candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
            for snap in candidates:
                if snap.is_dir() and _is_checkpoint(snap):
                    return snap.resolve()
    places = "\n".join(f"  {p}" for p in looked)
    is_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    advice = (f"Download it first (e.g. `hf download {source}`) or pass its directory" if is_id
              else "Pass a checkpoint directory, or a model id (org/name) that is in the Hugging Face cache")
    raise InteropError(f"no transformers checkpoint {source!r} on this machine (slmb never downloads). Looked at:\n"
                       f"{places}\n{advice}")


def read_hf_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory as a dict."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InteropError(f"{path / 'config.json'} cannot be read: {exc}") from None
    if not isinstance(cfg, dict):
        raise InteropError(f"{path / 'config.json'} is not a JSON object")
    return cfg


def load_hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (one file, or the shards its index lists)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InteropError(f"{index} cannot be read as a shard index: {exc}") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise InteropError(f"shard {f.name} listed in {index.name} is missing from {path}")
        sd.update(load_file(str(f)))
    return sd


# ---------------------------------------------------------------- config.json -> canvas body

_ids = itertools.count(1)


def _node(type_: str, label: str, in_dim: int, out_dim: int, **data: Any) -> dict:
    return {"type": type_, "data": {"id": f"{type_}-{next(_ids)}", "label": label, "inDim": in_dim,
                                    "outDim": out_dim, **data}}


def _body(config: dict, model: list[dict], name: str) -> dict:
    return {"config": {"epochs": 1, "batch_size": 1, "dtype": "fp32", **config}, "model": model,
            "modelName": name, "dataset": "tiny_shakespeare", "dataset_config": "default"}


def _get(hf: Mapping[str, Any], field: str, *alts: str, default: Any = ...) -> Any:
    for key in (field, *alts):
        if hf.get(key) is not None:
            return hf[key]
    if default is ...:
        raise InteropError(f"config.json has no {field!r}, which slmb needs to build the canvas")
    return default


def _attr(cfg: Any, field: str, *alts: str, default: Any = ...) -> Any:
    """A config value from a dict (config.json) or a transformers config object."""
    return _get(cfg if isinstance(cfg, Mapping) else cfg.to_dict(), field, *alts, default=default)


def _gpt2_act(hf_act: str) -> str:
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": None, "gelu": "GELU",
            "relu": "ReLU", "silu": "SiLU", "swish": "SiLU"}
    act = acts.get(hf_act)
    if act is None:
        raise InteropError(f"config.json activation_function={hf_act!r}: slmb has no such activation "
                           f"(supported: {', '.join(k for k, v in acts.items() if v)})")
    return act


def gpt2_body(hf_cfg: Any, act: str | None = None, tied: bool | None = None, name: str = "gpt2") -> dict:
    """GPT-2 canvas: learned positions, pre-LN blocks whose residuals name the LayerNorm by bare id. ``hf_cfg``
    is config.json as a dict or a ``GPT2Config``; ``act``/``tied`` override what it says."""
    E, V = _attr(hf_cfg, "n_embd"), _attr(hf_cfg, "vocab_size")
    C, H, L = _attr(hf_cfg, "n_positions"), _attr(hf_cfg, "n_head"), _attr(hf_cfg, "n_layer")
    act = act or _gpt2_act(_attr(hf_cfg, "activation_function", default="gelu_new"))
    tied = _attr(hf_cfg, "tie_word_embeddings", default=True) if tied is None else tied
    if _attr(hf_cfg, "scale_attn_by_inverse_layer_idx", default=False):
        raise InteropError("config.json scale_attn_by_inverse_layer_idx=true: slmb's attention scales by "
                           "1/sqrt(head_dim) only")
    if not _attr(hf_cfg, "scale_attn_weights", default=True):
        raise InteropError("config.json scale_attn_weights=false: slmb's attention always scales by 1/sqrt(head_dim)")
    inner = _attr(hf_cfg, "n_inner", default=None) or 4 * E
    ln = dict(normType="Layer Normalization", eps=float(_attr(hf_cfg, "layer_norm_epsilon", default=1e-5)))
    norm1 = _node("normalization", "Normalization", E, E, **ln)
    norm2 = _node("normalization", "Normalization", E, E, **ln)
    block = [
        norm1,
        _node("mhAttention", "MH Attention", E, E, numHeads=H, ctxLength=C, dropoutRate=0.1,
              qkvBias=True, projBias=True, isRoPE=False, ropeBase=10000),
        _node("dropout", "Dropout", E, E, dropoutRate=0.1),
        _node("residual", "Residual", E, E, source=norm1["data"]["id"]),
        norm2,
        _node("feedForward", "Feed Forward", E, E, hiddenDim=inner, feedForwardType="Standard", actFunc=act,
              bias=True),
        _node("dropout", "Dropout", E, E, dropoutRate=0.1),
        _node("residual", "Residual", E, E, source=norm2["data"]["id"]),
    ]
    model = [
        _node("tokenEmbedding", "Token Embedding", E, E, vocabSize=V, embDim=E),
        _node("positionalEmbedding", "Positional Embedding", E, E, ctxLength=C,
              posType="Learned Positional Embedding", vocabSize=V, embDim=E),
        _node("dropout", "Dropout", E, E, dropoutRate=0.1),
        {**_node("transformerBlock", "Transformer Block", E, E, numOfBlocks=L), "children": block},
        _node("normalization", "Normalization", E, E, **ln),
        _node("linear", "Linear", E, V, bias=False, weightTying=bool(tied)),
    ]
    config = dict(model="gpt-2", vocab_size=V, context_length=C, stride=C, emb_dim=E, n_heads=H,
                  n_blocks=L, drop_rate=0.1, qkv_bias=True)
    return _body(config, model, name)


def _rope(hf_cfg: Any) -> dict[str, Any]:
    """The RoPE parameters, from transformers 5's ``rope_parameters`` or the older ``rope_theta`` +
    ``rope_scaling``."""
    rope = _attr(hf_cfg, "rope_parameters", default=None)
    if rope is None:
        rope = {**(_attr(hf_cfg, "rope_scaling", default=None) or {}),
                "rope_theta": _attr(hf_cfg, "rope_theta", default=10000.0)}
    rope = dict(rope)
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def llama_body(hf_cfg: Any, *, attention: str = "gqAttention", qk_norm: bool = False,
               model_family: str = "llama3", qkv_bias: bool = False, name: str | None = None) -> dict:
    """Llama 2/3, Qwen2/3 and Mistral canvas: RMSNorm pre-norm blocks, ``<normId>:in`` residuals, gated SwiGLU.

    ``attention="mhAttention"`` writes the Llama 2 form the canvas also allows: a rotary positional node
    followed by MH attention nodes without an ``isRoPE`` key. ``qkv_bias``: q, k, v projections with biases
    and an output projection without (Qwen2).
    """
    E, V = _attr(hf_cfg, "hidden_size"), _attr(hf_cfg, "vocab_size")
    C, H, L = _attr(hf_cfg, "max_position_embeddings"), _attr(hf_cfg, "num_attention_heads"), \
        _attr(hf_cfg, "num_hidden_layers")
    KV = _attr(hf_cfg, "num_key_value_heads", default=None) or H
    hd = _attr(hf_cfg, "head_dim", default=None) or E // H
    eps = float(_attr(hf_cfg, "rms_norm_eps", default=1e-6))
    tied = bool(_attr(hf_cfg, "tie_word_embeddings", default=False))
    rope = _rope(hf_cfg)
    theta = float(rope.get("rope_theta", 10000.0))
    rms = dict(normType="RMS Normalization", eps=eps)
    norm1 = _node("normalization", "Normalization", E, E, **rms)
    norm2 = _node("normalization", "Normalization", E, E, **rms)
    if attention == "mhAttention":
        if KV != H or hd != E // H or rope["rope_type"] != "default":
            raise InteropError("the MH attention form needs KV heads = heads, head_dim = hidden/heads, no scaling")
        attn = _node("mhAttention", "MH Attention", E, E, numHeads=H, ctxLength=C, dropoutRate=0, qkvBias=False,
                     ropeBase=theta)
    else:
        extra: dict[str, Any] = {}
        if rope["rope_type"] == "llama3":
            extra["ropeConfig"] = {"factor": rope["factor"], "low_freq_factor": rope["low_freq_factor"],
                                   "high_freq_factor": rope["high_freq_factor"],
                                   "original_context_length": rope["original_max_position_embeddings"]}
        attn = _node("gqAttention", "GQ Attention", E, E, numHeads=H, ctxLength=C, dropoutRate=0, qkvBias=qkv_bias,
                     projBias=False, isRoPE=True, ropeBase=theta, numKvGroups=KV, headDim=hd, qkNorm=qk_norm,
                     qkNormEps=eps, **extra)
    block = [
        norm1,
        attn,
        _node("residual", "Residual", E, E, source=f"{norm1['data']['id']}:in"),
        norm2,
        _node("feedForward", "Feed Forward", E, E, hiddenDim=_attr(hf_cfg, "intermediate_size"),
              feedForwardType="Gated", actFunc="SwiGLU", bias=False),
        _node("residual", "Residual", E, E, source=f"{norm2['data']['id']}:in"),
    ]
    model = [_node("tokenEmbedding", "Token Embedding", E, E, vocabSize=V, embDim=E)]
    if attention == "mhAttention":
        model.append(_node("positionalEmbedding", "Positional Embedding", E, E, ctxLength=C,
                           posType="Rotary Positional Embedding", vocabSize=V, embDim=E))
    model += [
        {**_node("transformerBlock", "Transformer Block", E, E, numOfBlocks=L), "children": block},
        _node("normalization", "Normalization", E, E, **rms),
        _node("linear", "Linear", E, V, bias=False, weightTying=tied),
    ]
    config = dict(model=model_family, vocab_size=V, context_length=C, stride=C, emb_dim=E, n_heads=H,
                  n_blocks=L, hidden_dim=_attr(hf_cfg, "intermediate_size"), n_kv_groups=KV, rope_base=theta,
                  head_dim=hd, qk_norm=qk_norm, qk_norm_eps=eps, qkv_bias=qkv_bias)
    if "ropeConfig" in attn["data"]:
        config["rope_freq"] = attn["data"]["ropeConfig"]
    return _body(config, model, name or f"{model_family}")


def _check_llama_family(hf: Mapping[str, Any], arch: str) -> None:
    """Refuse what slmb's nodes cannot express, naming the config field."""
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise InteropError(f"config.json hidden_act={act!r}: slmb's gated feed-forward is SwiGLU (silu) only")
    rope = _rope(hf)
    if rope["rope_type"] not in ("default", "llama3"):
        field = "rope_parameters" if hf.get("rope_parameters") is not None else "rope_scaling"
        raise InteropError(f"config.json {field}.rope_type={rope['rope_type']!r}: slmb implements no scaling "
                           "('default') or Llama 3's ('llama3') only")
    if hf.get("mlp_bias"):
        raise InteropError("config.json mlp_bias=true: slmb's gated feed-forward has no biases")
    if arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM") and hf.get("attention_bias"):
        raise InteropError("config.json attention_bias=true: slmb's attention node puts biases on q, k, v and the "
                           "output together (MH attention) or on q, k, v alone (GQ attention), not this mix")
    ctx = hf.get("max_position_embeddings")
    window = hf.get("sliding_window")
    uses_window = arch == "MistralForCausalLM" or hf.get("use_sliding_window")
    if uses_window and window is not None and ctx is not None and window < ctx:
        raise InteropError(f"config.json sliding_window={window} < max_position_embeddings={ctx}: slmb's attention "
                           "is full causal attention and has no sliding window")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types) and uses_window:
        raise InteropError("config.json layer_types: some layers use sliding-window attention, which slmb has not")


def hf_config_to_body(hf: Mapping[str, Any], name: str = "imported") -> tuple[dict, str]:
    """(canvas body, architecture) for a checkpoint's config.json. Raises :class:`InteropError` naming the field
    that does not map."""
    archs = hf.get("architectures") or []
    if len(archs) != 1:
        raise InteropError(f"config.json architectures={archs!r}: slmb needs exactly one of "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InteropError(f"config.json architectures=[{arch!r}]: slmb imports {', '.join(SUPPORTED_ARCHITECTURES)}")
    if arch == "GPT2LMHeadModel":
        return gpt2_body(hf, name=name), arch
    _check_llama_family(hf, arch)
    if arch == "LlamaForCausalLM":
        family = "llama2" if hf.get("vocab_size") == 32000 else "llama3"
        return llama_body(hf, model_family=family, name=name), arch
    if arch == "MistralForCausalLM":
        return llama_body(hf, model_family="llama2", name=name), arch
    if arch == "Qwen2ForCausalLM":
        return llama_body(hf, model_family="qwen3", qkv_bias=True, name=name), arch
    return llama_body(hf, model_family="qwen3", qk_norm=True, name=name), arch


# ---------------------------------------------------------------- weight names


@dataclass(frozen=True)
class WeightLink:
    """One slmb tensor and the checkpoint tensors it is made of.

    ``op``: "copy" (same tensor), "transpose" (GPT-2's Conv1D stores (in, out)), or "concat" (rows of ``hf``
    stacked in order along dim 0: q, k, v into the fused qkv). Export reads it backwards (split by the hf
    tensors' row counts)."""

    slmb: str
    hf: tuple[str, ...]
    op: str = "copy"


def _single_stack(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Module]], str, list, list]:
    """(top-level layers with names, stack name, its blocks with names, layers after the stack) of a model that is
    embeddings, one transformer-block stack, a final norm and a head."""
    layers = list(model.chain.layers.named_children())
    stacks = [(n, m) for n, m in layers if isinstance(m, N.Repeat)]
    if len(stacks) != 1:
        raise InteropError(f"the canvas has {len(stacks)} transformer-block stacks; the Hugging Face families have one")
    stack_name, stack = stacks[0]
    after = layers[[n for n, _ in layers].index(stack_name) + 1:]
    return layers, stack_name, list(stack.blocks.named_children()), after


def weight_links(model: torch.nn.Module, arch: str, tied: bool) -> list[WeightLink]:
    """How each tensor of a compiled slmb ``model`` (built from :func:`hf_config_to_body`'s canvas) is named in a
    ``arch`` checkpoint. ``tied``: the head shares the token embedding (its tensor is the embedding's)."""
    layers, stack_name, blocks, after = _single_stack(model)
    pre = "chain.layers."
    tok = next(n for n, m in layers if isinstance(m, N.TokenEmbedding))
    pos = next((n for n, m in layers if isinstance(m, N.LearnedPositional)), None)
    norm = next(n for n, m in after if isinstance(m, N.LayerNorm | N.RMSNorm))
    head = next(n for n, m in after if isinstance(m, N.Linear))
    gpt2 = arch == "GPT2LMHeadModel"
    links: list[WeightLink] = []
    if gpt2:
        links.append(WeightLink(f"{pre}{tok}.weight", ("transformer.wte.weight",)))
        if pos is not None:
            links.append(WeightLink(f"{pre}{pos}.weight", ("transformer.wpe.weight",)))
    else:
        links.append(WeightLink(f"{pre}{tok}.weight", ("model.embed_tokens.weight",)))
    for i, block in blocks:
        b = f"{pre}{stack_name}.blocks.{i}.layers."
        named = list(block.layers.named_children())
        norms = [n for n, m in named if isinstance(m, N.LayerNorm | N.RMSNorm)]
        (attn_n, attn), = [(n, m) for n, m in named if isinstance(m, N.Attention)]
        (ff_n, _), = [(n, m) for n, m in named if isinstance(m, N.FeedForward)]
        if gpt2:
            p = f"transformer.h.{i}."
            for n, hf_name in zip(norms, ("ln_1", "ln_2"), strict=True):
                links += [WeightLink(f"{b}{n}.{w}", (f"{p}{hf_name}.{w}",)) for w in ("weight", "bias")]
            for sl, hf_name in ((f"{attn_n}.qkv", "attn.c_attn"), (f"{attn_n}.proj", "attn.c_proj"),
                                (f"{ff_n}.fc", "mlp.c_fc"), (f"{ff_n}.out", "mlp.c_proj")):
                links.append(WeightLink(f"{b}{sl}.weight", (f"{p}{hf_name}.weight",), "transpose"))
                links.append(WeightLink(f"{b}{sl}.bias", (f"{p}{hf_name}.bias",)))
        else:
            p = f"model.layers.{i}."
            for n, hf_name in zip(norms, ("input_layernorm", "post_attention_layernorm"), strict=True):
                links.append(WeightLink(f"{b}{n}.weight", (f"{p}{hf_name}.weight",)))
            links.append(WeightLink(f"{b}{attn_n}.qkv.weight",
                                    tuple(f"{p}self_attn.{x}_proj.weight" for x in "qkv"), "concat"))
            if attn.qkv.bias is not None:
                links.append(WeightLink(f"{b}{attn_n}.qkv.bias",
                                        tuple(f"{p}self_attn.{x}_proj.bias" for x in "qkv"), "concat"))
            links.append(WeightLink(f"{b}{attn_n}.proj.weight", (f"{p}self_attn.o_proj.weight",)))
            if attn.q_norm is not None:
                links.append(WeightLink(f"{b}{attn_n}.q_norm.weight", (f"{p}self_attn.q_norm.weight",)))
                links.append(WeightLink(f"{b}{attn_n}.k_norm.weight", (f"{p}self_attn.k_norm.weight",)))
            for sl, hf_name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                links.append(WeightLink(f"{b}{ff_n}.{sl}.weight", (f"{p}mlp.{hf_name}.weight",)))
    final = "transformer.ln_f" if gpt2 else "model.norm"
    links.append(WeightLink(f"{pre}{norm}.weight", (f"{final}.weight",)))
    if gpt2:
        links.append(WeightLink(f"{pre}{norm}.bias", (f"{final}.bias",)))
    embed = "transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"
    links.append(WeightLink(f"{pre}{head}.weight", (embed,) if tied else ("lm_head.weight",)))
    return links


def hf_to_slmb_state_dict(model: torch.nn.Module, arch: str, tied: bool, hf_sd: Mapping[str, torch.Tensor]
                          ) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors renamed (and transposed / concatenated) into ``model``'s state dict, fp32.

    Raises :class:`InteropError` naming a missing tensor, a shape that differs, or a checkpoint tensor that has
    no place in the canvas."""
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for link in weight_links(model, arch, tied):
        missing = [k for k in link.hf if k not in hf_sd]
        if missing and tied is False and link.hf == ("lm_head.weight",):
            raise InteropError("the checkpoint has no lm_head.weight and config.json tie_word_embeddings=false")
        if missing:
            raise InteropError(f"the checkpoint has no tensor {missing[0]!r}, which the {arch} layout needs")
        parts = [hf_sd[k] for k in link.hf]
        t = torch.cat(parts, dim=0) if link.op == "concat" else parts[0].t() if link.op == "transpose" else parts[0]
        want = tuple(expected[link.slmb].shape)
        if tuple(t.shape) != want:
            raise InteropError(f"checkpoint tensor {' + '.join(link.hf)} has shape {list(t.shape)}; config.json "
                               f"implies {list(want)} for it")
        out[link.slmb] = t.to(torch.float32).contiguous()
        used.update(link.hf)
    if tied and "lm_head.weight" in hf_sd:
        used.add("lm_head.weight")  # saved alongside the embedding it is tied to
        emb = "transformer.wte.weight" if arch == "GPT2LMHeadModel" else "model.embed_tokens.weight"
        if not torch.equal(hf_sd["lm_head.weight"], hf_sd[emb]):
            raise InteropError("config.json tie_word_embeddings=true, but lm_head.weight differs from the embedding")
    unused = sorted(k for k in hf_sd if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if unused:
        more = f" and {len(unused) - 1} more" if len(unused) > 1 else ""
        raise InteropError(f"checkpoint tensor {unused[0]!r}{more} has no place in the {arch} canvas slmb builds")
    # A tied head is the embedding's tensor itself, as the compiled model shares them.
    return out


# ---------------------------------------------------------------- import


@dataclass(frozen=True)
class Converted:
    """A checkpoint in slmb's terms: the canvas body, the state dict, and what metadata records."""

    body: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    architecture: str
    source: Path
    tokenizer_file: str | None
    parameters: int


def find_tokenizer_file(path: Path) -> str | None:
    """The tokenizer file slmb will load from a checkpoint directory (tokenizer.json first), or None."""
    return next((f for f in TOKENIZER_FILES if (path / f).is_file()), None)


def convert_checkpoint(source: str | Path, name: str = "imported") -> Converted:
    """Read a checkpoint (see :func:`resolve_source`) and convert it; nothing is written."""
    from slmb.core.compiler import build_model
    from slmb.core.spec import TrainRequest

    path = resolve_source(str(source))
    hf = read_hf_config(path)
    body, arch = hf_config_to_body(hf, name)
    tied = bool(body["model"][-1]["data"]["weightTying"])
    try:
        model = build_model(TrainRequest.model_validate(body), device="meta")
    except Exception as exc:  # a value the canvas validator refuses (too large, out of range)
        raise InteropError(f"config.json gives a canvas slmb cannot build: {exc}") from None
    hf_sd = load_hf_state_dict(path)
    if arch == "GPT2LMHeadModel" and "wte.weight" in hf_sd and "transformer.wte.weight" not in hf_sd:
        # The original GPT-2 uploads name the GPT2Model's tensors without the "transformer." prefix.
        hf_sd = {k if k.startswith("lm_head.") else f"transformer.{k}": v for k, v in hf_sd.items()}
    sd = hf_to_slmb_state_dict(model, arch, tied, hf_sd)
    if tied:  # the compiled model's state dict names the shared tensor under both keys
        links = weight_links(model, arch, tied)
        sd[links[-1].slmb] = sd[links[0].slmb]
    params = sum(t.numel() for k, t in sd.items() if not (tied and k == weight_links(model, arch, tied)[-1].slmb))
    return Converted(body, sd, arch, path, find_tokenizer_file(path), params)


def import_checkpoint(source: str | Path, name: str) -> tuple[Path, Converted]:
    """Import a checkpoint into the store as the completed model ``name``: the canvas as its structure, the
    weights, and the checkpoint's tokenizer files beside them (metadata ``tokenizer_file`` names the one slmb
    loads). Returns (the model's directory, the conversion)."""
    from slmb.core.store import check_model_name, save_completed

    check_model_name(name)
    conv = convert_checkpoint(source, name)
    files = {f: conv.source / f for f in (*TOKENIZER_FILES, *COMPANION_FILES) if (conv.source / f).is_file()}
    metadata: dict[str, Any] = {
        "source": str(source), "source_path": str(conv.source), "architecture": conv.architecture,
        "parameters": conv.parameters, "vocab_size": conv.body["config"]["vocab_size"],
        "context_length": conv.body["config"]["context_length"], "imported": True,
    }
    if conv.tokenizer_file:
        metadata["tokenizer"] = conv.tokenizer_file
        metadata["tokenizer_file"] = conv.tokenizer_file
    path = save_completed(name, conv.body, conv.state_dict, metadata, extra_files=files)
    return path, conv



# ---------------------------------------------------------------- fine-tuning: config.init_from


def load_init_weights(source: str, *, confined: bool) -> dict[str, torch.Tensor]:
    """The state dict ``config.init_from`` names: a completed model in the store, else (``confined=False``, the
    CLI) a checkpoint directory or cached Hugging Face id, converted as ``slmb import`` would. ``confined`` (an
    HTTP request) takes store names only."""
    from slmb.core.spec import MODEL_NAME_RE
    from slmb.core.store import StoreError, get_model, load_completed

    in_store = False
    if MODEL_NAME_RE.match(source):
        try:
            get_model(source)
            in_store = True
        except StoreError:
            in_store = False
    if in_store:
        return load_completed(source)[1]
    if confined:
        raise InteropError(f"config.init_from {source[:80]!r} is not a completed model in the store; over HTTP "
                           "init_from takes store names only (import a checkpoint with `slmb import` first)")
    try:
        return convert_checkpoint(source).state_dict
    except InteropError as exc:
        raise InteropError(f"config.init_from {source!r} is neither a completed model in the store nor an "
                           f"importable checkpoint: {exc}") from None


@torch.no_grad()
def init_from_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``weights`` into ``model`` after checking them shape for shape.

    Allowed differences: a learned positional table longer than the canvas's context (its first rows are used);
    anything without weights (dropout, RoPE's context). Raises :class:`InteropError` listing every mismatch
    (name, expected shape, found shape), every missing and every unexpected tensor."""
    expected = model.state_dict()
    learned = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, N.LearnedPositional)}
    problems: list[str] = []
    ready: dict[str, torch.Tensor] = {}
    for key, want in expected.items():
        got = weights.get(key)
        if got is None:
            problems.append(f"  {key}: expected {list(want.shape)}, missing from {source}")
            continue
        if key in learned and got.ndim == 2 and got.shape[1] == want.shape[1] and got.shape[0] >= want.shape[0]:
            got = got[: want.shape[0]]  # the canvas uses a prefix of the positional table
        if got.shape != want.shape:
            problems.append(f"  {key}: expected {list(want.shape)}, found {list(got.shape)}")
            continue
        ready[key] = got
    problems += [f"  {key}: found {list(t.shape)}, the canvas has no such tensor"
                 for key, t in weights.items() if key not in expected]
    if problems:
        raise InteropError(f"config.init_from {source!r}: the canvas does not match its weights "
                           f"({len(problems)} difference(s)):\n" + "\n".join(problems))
    for key, t in ready.items():
        target = expected[key]
        if target.is_meta:
            raise InteropError("config.init_from cannot load into a model built on the meta device")
        target.copy_(t.to(target.dtype))


def init_tokenizer_files(source: str, *, confined: bool) -> dict[str, Path]:
    """The tokenizer files of the model ``config.init_from`` names (file name -> path; the first is the one slmb
    loads, the rest travel with it), so a fine-tuned model keeps its base's tokenizer; {} when it has none of its
    own (a model trained in slmb records a tokenizer name instead)."""
    from slmb.core.spec import MODEL_NAME_RE
    from slmb.core.store import StoreError, get_model

    folder: Path | None = None
    own: str | None = None
    if MODEL_NAME_RE.match(source):
        try:
            entry = get_model(source)
        except StoreError:
            entry = None
        if entry is not None:
            own = entry.metadata.get("tokenizer_file")
            folder = entry.path.resolve()
            if not isinstance(own, str) or Path(own).name != own:
                return {}
    if folder is None and not confined:
        folder = resolve_source(source)
        own = find_tokenizer_file(folder)
    if folder is None or own is None or not (folder / own).is_file():
        return {}
    files = {own: folder / own}
    files.update({f: folder / f for f in COMPANION_FILES if (folder / f).is_file()})
    return files
