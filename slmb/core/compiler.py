"""Spec -> nn.Module (DESIGN.md §2.2).

Two steps. ``plan`` walks the nodes once and resolves every argument a builder needs (defaults, values
inferred from the hidden width or the config, residual targets) into plain dicts, without judging them:
validation runs its named checks over the plan, and the output shapes and parameter counts it reports
come from it. ``build_model`` then turns a plan that passed validation into modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slmb.core import nodes as N
from slmb.core.model import SLM
from slmb.core.spec import GQAttentionData, TrainRequest


@dataclass
class PlanNode:
    """One node with its resolved builder arguments. ``None`` in ``args`` means "could not be resolved"."""

    ptr: str  # JSON pointer of the node in the request, e.g. /model/3/children/1
    type: str
    spec: Any
    args: dict[str, Any]
    in_width: int | None  # hidden width entering the node (None before the token embedding)
    out_width: int | None
    children: list[PlanNode] = field(default_factory=list)
    repeat: int = 1


@dataclass
class Plan:
    request: TrainRequest
    nodes: list[PlanNode]

    def walk(self, nodes: list[PlanNode] | None = None):
        """Every node, depth first, with the list (scope) it sits in."""
        for node in self.nodes if nodes is None else nodes:
            yield node
            yield from self.walk(node.children)

    def count(self, type_name: str, nodes: list[PlanNode] | None = None) -> int:
        """How many instances of a type the built model has (blocks expanded)."""
        total = 0
        for node in self.nodes if nodes is None else nodes:
            total += node.type == type_name
            total += node.repeat * self.count(type_name, node.children)
        return total

    @property
    def vocab_size(self) -> int | None:
        """The logits width: what the last node produces."""
        return self.nodes[-1].out_width if self.nodes else None

    @property
    def context_length(self) -> int:
        """The most tokens one forward may see: the smallest window any positional or attention node allows."""
        lengths = [n.args["ctx_length"] for n in self.walk() if n.args.get("ctx_length") and n.args.get("windowed")]
        return min(lengths, default=self.request.config.context_length)


@dataclass
class _State:
    width: int | None = None  # None until the token embedding has run
    rotary: bool = False
    relative: bool = False
    started: bool = False  # a token embedding has turned ids into hidden states


def plan(request: TrainRequest) -> Plan:
    return Plan(request, _plan_chain(request.model, "/model", _State(), request))


def _plan_chain(specs: list, prefix: str, state: _State, req: TrainRequest) -> list[PlanNode]:
    out: list[PlanNode] = []
    ids: dict[str, int] = {}
    for i, spec in enumerate(specs):
        ptr = f"{prefix}/{i}"
        w = state.width
        if spec.type == "transformerBlock":
            children = _plan_chain(spec.children, f"{ptr}/children", state, req)
            node = PlanNode(ptr, spec.type, spec, {}, w, state.width, children, spec.data.num_blocks)
        else:
            args = _RESOLVERS[spec.type](spec.data, state, req.config)
            if spec.type == "residual":
                target, which = spec.data.target()
                args.update(target=target, which=which, index=ids.get(target))
            node = PlanNode(ptr, spec.type, spec, args, w, state.width)
        if spec.data.id is not None:
            ids.setdefault(spec.data.id, i)
        out.append(node)
    return out


def _tok(d, s: _State, c) -> dict:
    a = {"vocab_size": d.vocab_size or c.vocab_size, "emb_dim": d.emb_dim or c.emb_dim}
    s.width, s.started = a["emb_dim"], True
    return a


def _pos(d, s: _State, c) -> dict:
    a = {"mode": d.mode, "ctx_length": d.ctx_length or c.context_length, "emb_dim": d.emb_dim or s.width,
         "declared_emb_dim": d.emb_dim, "windowed": d.mode in ("learned", "sinusoidal")}
    s.rotary |= d.mode == "rotary"
    s.relative |= d.mode == "relative"
    return a


def _norm(d, s: _State, c) -> dict:
    return {"norm_type": d.norm_type, "dim": s.width, "eps": d.resolved_eps, "bias": d.bias}


def _attn(d, s: _State, c) -> dict:
    gqa = isinstance(d, GQAttentionData)
    heads = d.num_heads or c.n_heads
    kv = (d.num_kv_groups or c.n_kv_groups or heads) if gqa else heads
    head_dim = d.head_dim if gqa and d.head_dim else (s.width // heads if s.width and heads else None)
    # MHA applies RoPE only where a rotary positional node came first (or isRoPE says so); GQA by default.
    rope = d.is_rope if d.is_rope is not None else (True if gqa else s.rotary)
    scaling = None
    if rope and d.rope_config is not None and d.rope_config.is_llama3:
        rc = d.rope_config
        scaling = {"factor": rc.factor, "low_freq_factor": rc.low_freq_factor,
                   "high_freq_factor": rc.high_freq_factor, "original_context_length": rc.original_context_length}
    return {"emb_dim": s.width, "num_heads": heads, "num_kv_heads": kv, "head_dim": head_dim,
            "ctx_length": d.ctx_length or c.context_length, "windowed": True, "dropout": d.dropout,
            "qkv_bias": d.qkv_bias, "proj_bias": d.resolved_proj_bias, "qk_norm": getattr(d, "qk_norm", False),
            "qk_norm_eps": getattr(d, "qk_norm_eps", 1e-6), "rope": rope, "rope_base": d.rope_base,
            "rope_scaling": scaling, "rope_config": d.rope_config, "relative": s.relative}


def _ff(d, s: _State, c) -> dict:
    hidden = d.hidden_dim or c.hidden_dim or (4 * s.width if s.width else None)
    return {"emb_dim": s.width, "hidden_dim": hidden, "act": d.act, "gated": d.ff_type == "gated",
            "bias": d.bias}


def _linear(d, s: _State, c) -> dict:
    a = {"in_dim": d.in_dim or s.width, "declared_in_dim": d.in_dim, "out_dim": d.out_dim or c.vocab_size,
         "bias": d.bias, "weight_tying": d.weight_tying}
    s.width = a["out_dim"]
    return a


def _dropout(d, s: _State, c) -> dict:
    return {"rate": d.rate}


def _residual(d, s: _State, c) -> dict:
    return {}


_RESOLVERS = {"tokenEmbedding": _tok, "positionalEmbedding": _pos, "normalization": _norm, "mhAttention": _attn,
              "gqAttention": _attn, "feedForward": _ff, "linear": _linear, "dropout": _dropout,
              "residual": _residual}


def build_model(request_or_plan: TrainRequest | Plan, device: torch.device | str | None = None,
                init: bool = True) -> SLM:
    """Build the module for a validated request. ``device="meta"`` builds shapes only, allocating nothing;
    ``init=False`` leaves the weights uninitialised for a caller that loads them."""
    p = request_or_plan if isinstance(request_or_plan, Plan) else plan(request_or_plan)
    device = torch.device(device or "cpu")
    bctx = N.BuildContext()
    with torch.device(device if init else "meta"):
        chain = _build_chain(p.nodes, bctx)
        model = SLM(chain, p.vocab_size, p.context_length)
        _tie_weights(model, p)
    if device.type == "meta":
        return model
    if init:
        init_weights(model, p.count("residual"))
        return model
    model.to_empty(device=device)  # storage without the cost of a random init
    _tie_weights(model, p)  # to_empty gives each name its own new tensor
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()
    return model


def _build_chain(pnodes: list[PlanNode], bctx: N.BuildContext) -> N.Chain:
    layers = []
    for pn in pnodes:
        if pn.type == "transformerBlock":
            layers.append(N.Repeat([_build_chain(pn.children, bctx) for _ in range(pn.repeat)]))
        else:
            layers.append(N.BUILDERS[pn.type](pn.args, bctx))
    return N.Chain(layers)


def _tie_weights(model: SLM, p: Plan) -> None:
    embeddings = [m for m in model.modules() if isinstance(m, N.TokenEmbedding)]
    for pn, m in zip(_flat(p.nodes), _flat_modules(model.chain), strict=True):
        if pn.type == "linear" and pn.args["weight_tying"]:
            m.weight = embeddings[0].weight


def _flat(pnodes: list[PlanNode]):
    for pn in pnodes:
        if pn.type == "transformerBlock":
            for _ in range(pn.repeat):
                yield from _flat(pn.children)
        else:
            yield pn


def _flat_modules(chain: N.Chain):
    for layer in chain.layers:
        if isinstance(layer, N.Repeat):
            for block in layer.blocks:
                yield from _flat_modules(block)
        else:
            yield layer


@torch.no_grad()
def init_weights(model: nn.Module, num_residual: int) -> None:
    """GPT-2 initialisation: N(0, 0.02), residual-branch output projections scaled by 1/sqrt(#residuals).

    nanoGPT scales by 1/sqrt(2 * n_layer) because each block closes two residual branches; counting the
    residual nodes generalises that to any canvas. Small logits at start give a first loss close to ln V.
    """
    std_out = 0.02 / math.sqrt(num_residual) if num_residual else 0.02
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std_out if getattr(m, "residual_out", False) else 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding | N.LearnedPositional):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, N.RelativeBias):
            nn.init.zeros_(m.weight)
