"""The nn building blocks, and one builder per node ``type`` (DESIGN.md §2.2).

Every block takes ``(x, ctx)``: ``ctx`` carries the absolute position of the first token and the KV cache,
so the same modules serve training (ctx.pos == 0, no cache) and cached decoding. Builders are small
functions from resolved node arguments (see ``compiler.plan``) to a module; ``BUILDERS`` maps the node's
``type`` string to its builder.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Ctx:
    """Per-forward state shared by all blocks: where the tokens sit and where keys/values are cached."""

    pos: int = 0
    cache: Any = None  # model.KVCache | None
    rows: Rows | None = None  # batched decoding (SLM.decode_rows): pos and cache are per row, not here


@dataclass
class Rows:
    """Batched decoding: row i of a (B, T) input is the next T tokens of its own sequence (a decode step's one
    token, or a prompt or window of the same length as the other rows'), which start at position ``ctxs[i].pos``;
    the sequence keeps its keys and values in ``ctxs[i].cache`` (a one-sequence ``model.KVCache``).

    ``exact``: the nodes whose results depend on the batch's shape (products: MKL's one-row and many-row kernels
    round differently; attention over each sequence's own cache) compute each row as the sequence alone would,
    so every row is bit-identical to unbatched decoding; the rest (embeddings, norms, residual sums) run once
    for the batch. A product runs as one ``bmm`` over the rows (the weight broadcast) where a probe found that
    call bit-identical to the one-row product on every row (``_rows_product``), else row by row. Not exact: one
    batched product per linear layer (reads each weight once for the batch: the faster choice for large models),
    last bits may differ from a lone sequence's."""

    ctxs: list[Ctx]  # one per row: Ctx(pos=that sequence's position, cache=its KVCache)
    index: torch.Tensor  # (B, T) the positions, on the model's device
    exact: bool = True


def _row(x: torch.Tensor, i: int) -> torch.Tensor:
    """Row i of x (B, ...) as a (1, ...) tensor aligned as a fresh one (some kernels' rounding depends on it)."""
    row = x[i : i + 1]
    return row if row.data_ptr() % 64 == 0 else row.clone()


def _per_row(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(_row(x, i)) for i in range(x.shape[0])])


# Whether a batched product rounds every row as the one-row product does, by (product, weight shape, dtype, device,
# batch size, intra-op threads): found by ``_rows_product``'s probe, once per process.
_BATCH_INVARIANT: dict[tuple, bool] = {}


def _rows_product(key: tuple, single: Callable[[torch.Tensor], torch.Tensor],
                  batched: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Exact batched decoding's product of x (B, T, E): ``single`` is the one-row product a lone sequence's decode
    step computes, ``batched`` one call for all rows. The first time a key meets a batch size, a probe on random
    rows compares the two; the batched call is used only where every row was bit-identical (a kernel's rounding
    depends on the shapes, the batch size and the thread count it was given, not on the values). On an AMD EPYC
    Zen 4 (MKL, AVX-512), ``bmm`` with the weight broadcast matched ``F.linear`` on one row for every shape tried
    (15 shapes, batches of 2-32, 1 and 2 threads); an earlier machine's did not for some (300x900, 3072x768,
    docs/benchmarks.md): where the probe finds a difference, the layer runs row by row."""
    x = x.contiguous()
    k = (*key, *x.shape[:-1], x.dtype, x.device, torch.get_num_threads())
    same = _BATCH_INVARIANT.get(k)
    if same is None:
        draw = torch.Generator(device=x.device).manual_seed(0)  # not the global generator: nobody's seed moves
        probe = torch.randn(x.shape, generator=draw, device=x.device).to(x.dtype)
        same = _BATCH_INVARIANT[k] = torch.equal(batched(probe), _per_row(single, probe))
    return batched(x) if same else _per_row(single, x)


def _rows_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``F.linear`` of a plain nn.Linear for every row of x (B, T, E), each row bit-identical to its one-row
    product (see ``_rows_product``)."""
    w, b = layer.weight, layer.bias

    def batched(rows: torch.Tensor) -> torch.Tensor:
        wt = w.t().expand(rows.shape[0], *w.t().shape)  # (B, E, O), no copy (the bias broadcasts over T)
        return torch.bmm(rows, wt) if b is None else torch.baddbmm(b.expand(rows.shape[0], 1, b.shape[0]), rows, wt)

    return _rows_product(("linear", tuple(w.shape), w.stride(), b is not None), lambda r: F.linear(r, w, b),
                         batched, x)


def _plain(*layers: nn.Module) -> bool:
    """Whether every layer is a plain nn.Linear (``_rows_linear`` applies; a user's replacement runs row by row)."""
    return all(type(m) is nn.Linear for m in layers)


def _rows_activation(act: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """An elementwise activation of h (B, T, D) that rounds each row as the one-row call does. CPU kernels run
    vector blocks (up to 2 x 16 floats) from the start of each thread's chunk, then a scalar tail whose rounding
    (erf, tanh, exp) can differ: batched is the same when D is a multiple of 64 and the tensor is one chunk."""
    if h.device.type != "cpu" or (h.shape[-1] % 64 == 0 and h.numel() <= 32768):  # 32768: at::internal::GRAIN_SIZE
        return act(h)
    return _per_row(act, h)


class Dropout(nn.Dropout):
    """Inverted dropout. On the CPU the mask comes from ``torch.rand`` (keep where u >= p, the same Bernoulli(1 - p)
    as ``F.dropout``): its ``bernoulli_`` is twice as slow there, ~9% of a bf16 training step of the benchmark's
    GPT-2 shape. On GPUs, ``F.dropout``'s fused kernel."""

    def forward(self, x: torch.Tensor, ctx: Ctx | None = None) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * keep * (1.0 / (1.0 - self.p))


class TokenEmbedding(nn.Embedding):
    def forward(self, ids: torch.Tensor, ctx: Ctx | None = None) -> torch.Tensor:
        return super().forward(ids)  # (B, T) -> (B, T, E)


class LearnedPositional(nn.Module):
    def __init__(self, ctx_length: int, emb_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ctx_length, emb_dim))

    def forward(self, x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        if ctx.rows is not None:
            return x + self.weight[ctx.rows.index].to(x.dtype)  # (B, T, E)
        T = x.shape[1]
        _check_window(ctx.pos + T, self.weight.shape[0])
        return x + self.weight[ctx.pos : ctx.pos + T].to(x.dtype)


class SinusoidalPositional(nn.Module):
    """Fixed sin/cos table of Vaswani et al.; even channels sin, odd channels cos."""

    def __init__(self, ctx_length: int, emb_dim: int):
        super().__init__()
        self.ctx_length, self.emb_dim = ctx_length, emb_dim
        self.register_buffer("table", torch.empty(ctx_length, emb_dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the table in place: after ``to_empty`` a loaded model's buffers hold garbage."""
        with torch.device(self.table.device):
            self.table.copy_(self._table())

    def _table(self) -> torch.Tensor:
        pos = torch.arange(self.ctx_length, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, self.emb_dim, 2, dtype=torch.float32) * (-math.log(10000.0) / self.emb_dim))
        table = torch.zeros(self.ctx_length, self.emb_dim)
        table[:, 0::2] = torch.sin(pos * div)
        table[:, 1::2] = torch.cos(pos * div)[:, : self.emb_dim // 2]
        return table

    def forward(self, x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        if ctx.rows is not None:
            return x + self.table[ctx.rows.index].to(x.dtype)  # (B, T, E)
        T = x.shape[1]
        _check_window(ctx.pos + T, self.ctx_length)
        return x + self.table[ctx.pos : ctx.pos + T].to(x.dtype)


class Marker(nn.Module):
    """Rotary and relative position nodes own no weights: they switch on behaviour in later attention nodes."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor, ctx: Ctx | None = None) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return self.mode


def _check_window(end: int, limit: int) -> None:
    if end > limit:
        raise ValueError(f"sequence reaches position {end} but the model's context length is {limit}")


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 and cast back, so bf16 activations keep full-precision statistics."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor, ctx: Ctx | None = None) -> torch.Tensor:
        w, b = self.weight, self.bias
        if x.dtype == w.dtype == torch.float32:  # the common case, without four no-op casts (decode speed)
            return torch.layer_norm(x, w.shape, w, b, self.eps)
        b = b.float() if b is not None else None
        return F.layer_norm(x.float(), w.shape, w.float(), b, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm in fp32 (as Llama and Qwen compute it), then cast back and scaled."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ctx: Ctx | None = None) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def rope_inv_freq(head_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    """RoPE inverse frequencies, with Llama-3 scaling when ``scaling`` has its four keys."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_context_length"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by the factor, short ones kept, the band between interpolated smoothly.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """cos/sin tables for rotate-half RoPE; one instance is shared by all attention nodes with equal settings."""

    def __init__(self, head_dim: int, ctx_length: int, base: float, scaling: dict | None):
        super().__init__()
        self.head_dim, self.ctx_length, self.base, self.scaling = head_dim, ctx_length, base, scaling
        self.register_buffer("cos", torch.empty(ctx_length, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(ctx_length, head_dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        with torch.device(self.cos.device):
            inv_freq = rope_inv_freq(self.head_dim, self.base, self.scaling)
            freqs = torch.outer(torch.arange(self.ctx_length, dtype=torch.float32), inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
            self.cos.copy_(emb.cos())
            self.sin.copy_(emb.sin())

    def forward(self, q: torch.Tensor, k: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = q.shape[-2]
        _check_window(pos + T, self.ctx_length)
        cos, sin = self.cos[pos : pos + T], self.sin[pos : pos + T]  # (T, hd)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class RelativeBias(nn.Module):
    """T5-style learned relative-position bias: causal log-spaced buckets, one scalar per (bucket, head)."""

    def __init__(self, num_heads: int, max_distance: int, num_buckets: int = 32):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.weight = nn.Parameter(torch.empty(num_buckets, num_heads))

    def buckets(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        n = (q_pos[:, None] - k_pos[None, :]).clamp(min=0)  # (Tq, Tk) distance back in time
        exact = self.num_buckets // 2
        log_ratio = torch.log(n.float().clamp(min=1) / exact) / math.log(max(self.max_distance / exact, 1.0 + 1e-6))
        large = (exact + log_ratio * (self.num_buckets - exact)).long().clamp(max=self.num_buckets - 1)
        return torch.where(n < exact, n, large)

    def forward(self, pos: int, Tq: int, Tk: int) -> torch.Tensor:
        dev = self.weight.device
        q_pos = torch.arange(pos, pos + Tq, device=dev)
        k_pos = torch.arange(Tk, device=dev)
        bias = self.weight[self.buckets(q_pos, k_pos)]  # (Tq, Tk, H)
        return bias.permute(2, 0, 1)  # (H, Tq, Tk)


class Attention(nn.Module):
    """Causal self-attention for MHA and GQA, with optional qk-norm, RoPE and relative-position bias.

    ::

        x ─ qkv ─┬─ q (H heads)  ─ qk-norm ─ RoPE ─┐
                 ├─ k (KV heads) ─ qk-norm ─ RoPE ─┼─ SDPA (each KV head serves H/KV query heads) ─ proj
                 └─ v (KV heads) ──────────────────┘
    """

    def __init__(self, emb_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *, qkv_bias: bool,
                 proj_bias: bool, dropout: float, qk_norm: bool, qk_norm_eps: float, rotary: Rotary | None,
                 relative: RelativeBias | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.qkv = nn.Linear(emb_dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, emb_dim, bias=proj_bias)
        self.proj.residual_out = True
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm else None
        self.rotary = rotary
        self.relative = relative
        self.dropout = dropout
        self.layer_idx = -1  # set by the compiler: this node's slot in the KV cache

    def forward(self, x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        if ctx.rows is not None:
            return self._forward_rows(x, ctx.rows)
        B, T, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        # [q heads | k heads | v heads] along the features: one view, one transpose, one split (decode speed)
        qkv = _linear(self.qkv, x).view(B, T, H + 2 * KV, hd).transpose(1, 2)  # (B, H + 2KV, T, hd)
        y = self._attend(qkv, ctx)  # (B, H, T, hd)
        return _linear(self.proj, y.transpose(1, 2).reshape(B, T, H * hd))

    def _attend(self, qkv: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        """(B, H + 2KV, T, hd) projected heads -> (B, H, T, hd) attention output, caching keys and values."""
        H, KV, T = self.num_heads, self.num_kv_heads, qkv.shape[2]
        q, k, v = qkv.split([H, KV, KV], dim=1)  # (B, H, T, hd), (B, KV, T, hd), (B, KV, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # Qwen3: per-head RMSNorm before RoPE
        if self.rotary is not None:
            q, k = self.rotary(q, k, ctx.pos)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v, ctx.pos)  # (B, KV, pos+T, hd)
        Tk = k.shape[2]
        mask, causal = None, Tk > 1 and T > 1
        if self.relative is not None:
            mask = self.relative(ctx.pos, T, Tk).to(q.dtype)  # (H, T, Tk)
            mask = mask.masked_fill(~_causal(ctx.pos, T, Tk, q.device), float("-inf"))
            causal = False
        elif causal and Tk != T:
            mask, causal = _causal(ctx.pos, T, Tk, q.device), False  # cached prefill after earlier tokens
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              dropout_p=self.dropout if self.training else 0.0,
                                              enable_gqa=KV != H)  # (B, H, T, hd)

    def _forward_rows(self, x: torch.Tensor, rows: Rows) -> torch.Tensor:
        """Batched decoding (see ``Rows``): each row attends over its own sequence's cache."""
        (B, T), H, KV, hd = x.shape[:2], self.num_heads, self.num_kv_heads, self.head_dim
        if rows.exact:  # each row's products as alone (see _rows_product), its attention over its own cache
            if not _plain(self.qkv, self.proj):
                return torch.cat([self.forward(_row(x, i), c) for i, c in enumerate(rows.ctxs)])
            qkv = _rows_linear(self.qkv, x).view(B, T, H + 2 * KV, hd).transpose(1, 2)  # (B, H + 2KV, T, hd)
            y = torch.cat([self._attend(_row(qkv, i), c) for i, c in enumerate(rows.ctxs)])  # (B, H, T, hd)
            return _rows_linear(self.proj, y.transpose(1, 2).reshape(B, T, H * hd))
        qkv = _linear(self.qkv, x).view(B, T, H + 2 * KV, hd).transpose(1, 2)  # (B, H + 2KV, T, hd)
        y = torch.cat([self._attend(qkv[i : i + 1], c) for i, c in enumerate(rows.ctxs)])  # (B, H, T, hd)
        return _linear(self.proj, y.transpose(1, 2).reshape(B, T, H * hd))


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; a plain nn.Linear is applied without its module call (hook checks cost ~3 µs of a decode
    step's ~15 µs product). Any other module (a user's replacement, say) is called as usual."""
    if type(layer) is nn.Linear:
        return F.linear(x, layer.weight, layer.bias)
    return layer(x)


def _causal(pos: int, Tq: int, Tk: int, device: torch.device) -> torch.Tensor:
    q_pos = torch.arange(pos, pos + Tq, device=device)
    return torch.arange(Tk, device=device)[None, :] <= q_pos[:, None]  # (Tq, Tk) True = may attend


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "swiglu": F.silu,  # SwiGLU = the gated form with SiLU
    "leaky": F.leaky_relu,
    "mish": F.mish,
}


class FeedForward(nn.Module):
    """Standard: out(act(in(x))). Gated: down(act(gate(x)) * up(x))."""

    def __init__(self, emb_dim: int, hidden_dim: int, act: str, gated: bool, bias: bool):
        super().__init__()
        self.act_name, self.act, self.gated = act, ACTIVATIONS[act], gated
        if gated:
            self.gate = nn.Linear(emb_dim, hidden_dim, bias=bias)
            self.up = nn.Linear(emb_dim, hidden_dim, bias=bias)
            self.down = nn.Linear(hidden_dim, emb_dim, bias=bias)
            self.down.residual_out = True
        else:
            self.fc = nn.Linear(emb_dim, hidden_dim, bias=bias)
            self.out = nn.Linear(hidden_dim, emb_dim, bias=bias)
            self.out.residual_out = True

    def forward(self, x: torch.Tensor, ctx: Ctx | None = None) -> torch.Tensor:
        if ctx is not None and ctx.rows is not None and ctx.rows.exact:  # as each sequence alone (see Rows)
            if not _plain(*((self.gate, self.up, self.down) if self.gated else (self.fc, self.out))):
                return _per_row(self.forward, x)
            if self.gated:
                h = _rows_activation(self.act, _rows_linear(self.gate, x)) * _rows_linear(self.up, x)
                return _rows_linear(self.down, h)
            return _rows_linear(self.out, _rows_activation(self.act, _rows_linear(self.fc, x)))
        if self.gated:
            return _linear(self.down, self.act(_linear(self.gate, x)) * _linear(self.up, x))
        return _linear(self.out, self.act(_linear(self.fc, x)))

    def extra_repr(self) -> str:
        return f"act={self.act_name}, gated={self.gated}"


class Linear(nn.Linear):
    """A chain-level linear (usually the LM head).

    Cached decoding multiplies one token's vector by the whole (V, E) weight; in nn.Linear's layout that
    runs at a third of the speed of the same product with the weight stored (E, V). Decoding keeps such a
    copy, made again whenever the weight changes (its version counter moves), so results stay identical.
    """

    _decode_key: tuple | None = None

    def forward(self, x: torch.Tensor, ctx: Ctx | None = None) -> torch.Tensor:
        if ctx is not None and (ctx.cache is not None or ctx.rows is not None) and not torch.is_grad_enabled():
            if ctx.rows is not None and ctx.rows.exact:  # as each sequence alone (see Rows)
                w = self._decode_w(x.dtype)

                def batched(rows: torch.Tensor) -> torch.Tensor:
                    y = torch.bmm(rows, w.expand(rows.shape[0], *w.shape))
                    return y + self.bias.to(x.dtype) if self.bias is not None else y

                return _rows_product(("head", tuple(w.shape), self.bias is not None), self._decode, batched, x)
            return self._decode(x)
        return super().forward(x)

    def _decode_w(self, dtype: torch.dtype) -> torch.Tensor:
        """The (E, V) copy of the weight, made again when the weight has changed."""
        w = self.weight
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if self._decode_key != key:
            self._decode_weight = w.detach().t().contiguous()  # (E, V)
            self._decode_key = key
        return self._decode_weight.to(dtype)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self._decode_w(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


class Residual(nn.Module):
    """h = h + skip; the enclosing chain supplies ``skip`` (a tapped input or output of an earlier node)."""

    def __init__(self, index: int, which: str):
        super().__init__()
        self.index, self.which = index, which

    def extra_repr(self) -> str:
        return f"source={self.index}:{self.which}"


class Chain(nn.Module):
    """A scope: nodes applied in order, with residual taps on inputs/outputs of earlier nodes.

    ::

        h ─┬─ node i ──── ... ── residual(i:in) ──> h + h_i_in
           └──────── tap ─────────────┘
    """

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        sources = {(m.index, m.which) for m in layers if isinstance(m, Residual)}
        self.tap_in = frozenset(i for i, w in sources if w == "in")
        self.tap_out = frozenset(i for i, w in sources if w == "out")
        # The walk, decided once: (layer, residual source or None, tap input?, tap output?, identity in eval?).
        # A decode step runs ~10 nodes per block for one token, so per-node Python work is a large share of it.
        self._steps = tuple(
            (layer, (layer.index, layer.which) if isinstance(layer, Residual) else None, i in self.tap_in,
             i in self.tap_out, isinstance(layer, Dropout | Marker)) for i, layer in enumerate(layers))

    def forward(self, h: torch.Tensor, ctx: Ctx, end: int | None = None) -> torch.Tensor:
        """Apply the nodes in order; ``end`` stops before node ``end`` (``SLM.loss`` runs all but the head)."""
        taps: dict[tuple[int, str], torch.Tensor] = {}
        for i, (layer, source, tap_in, tap_out, identity) in enumerate(self._steps[:end]):
            if tap_in:
                taps[(i, "in")] = h
            if source is not None:
                h = h + taps[source]
            elif not (identity and not layer.training):  # dropout in eval mode and markers pass h through
                h = layer.forward(h, ctx)  # not layer(...): nn.Module.__call__'s hook checks cost ~2 µs a node
            if tap_out:
                taps[(i, "out")] = h
        return h


class Repeat(nn.Module):
    """``numOfBlocks`` independent copies of a chain (own weights), applied in sequence.

    ``call_hooks``: call each block through ``nn.Module.__call__``, so hooks registered on it run (FSDP2 gathers a
    sharded block's weights in its pre-forward hook). ``checkpointing``: recompute each block's activations in the
    backward pass instead of keeping them (activation checkpointing; training only)."""

    def __init__(self, blocks: list[Chain]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.call_hooks = False
        self.checkpointing = False

    def forward(self, h: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        if not (self.call_hooks or self.checkpointing):
            for block in self.blocks:
                h = block.forward(h, ctx)  # as Chain does: no per-call hook checks
            return h
        recompute = self.checkpointing and torch.is_grad_enabled() and ctx.cache is None
        for block in self.blocks:
            if recompute:
                h = torch.utils.checkpoint.checkpoint(block, h, ctx, use_reentrant=False)
            else:
                h = block(h, ctx)
        return h


class BuildContext:
    """What builders share: rotary tables, keyed by their settings, and the count of attention nodes."""

    def __init__(self) -> None:
        self.rotaries: dict[tuple, Rotary] = {}
        self.attention_count = 0

    def rotary(self, head_dim: int, ctx_length: int, base: float, scaling: dict | None) -> Rotary:
        key = (head_dim, ctx_length, base, tuple(sorted(scaling.items())) if scaling else None)
        if key not in self.rotaries:
            self.rotaries[key] = Rotary(head_dim, ctx_length, base, scaling)
        return self.rotaries[key]


def build_token_embedding(a: dict, b: BuildContext) -> nn.Module:
    return TokenEmbedding(a["vocab_size"], a["emb_dim"])


def build_positional(a: dict, b: BuildContext) -> nn.Module:
    if a["mode"] == "learned":
        return LearnedPositional(a["ctx_length"], a["emb_dim"])
    if a["mode"] == "sinusoidal":
        return SinusoidalPositional(a["ctx_length"], a["emb_dim"])
    return Marker(a["mode"])


def build_norm(a: dict, b: BuildContext) -> nn.Module:
    if a["norm_type"] == "rmsnorm":
        return RMSNorm(a["dim"], a["eps"])
    return LayerNorm(a["dim"], a["eps"], a["bias"])


def build_attention(a: dict, b: BuildContext) -> nn.Module:
    rotary = b.rotary(a["head_dim"], a["ctx_length"], a["rope_base"], a["rope_scaling"]) if a["rope"] else None
    relative = RelativeBias(a["num_heads"], a["ctx_length"]) if a["relative"] else None
    attn = Attention(a["emb_dim"], a["num_heads"], a["num_kv_heads"], a["head_dim"], qkv_bias=a["qkv_bias"],
                     proj_bias=a["proj_bias"], dropout=a["dropout"], qk_norm=a["qk_norm"],
                     qk_norm_eps=a["qk_norm_eps"], rotary=rotary, relative=relative)
    attn.layer_idx = b.attention_count
    b.attention_count += 1
    return attn


def build_feed_forward(a: dict, b: BuildContext) -> nn.Module:
    return FeedForward(a["emb_dim"], a["hidden_dim"], a["act"], a["gated"], a["bias"])


def build_linear(a: dict, b: BuildContext) -> nn.Module:
    return Linear(a["in_dim"], a["out_dim"], bias=a["bias"])


def build_dropout(a: dict, b: BuildContext) -> nn.Module:
    return Dropout(a["rate"])


def build_residual(a: dict, b: BuildContext) -> nn.Module:
    return Residual(a["index"], a["which"])


# transformerBlock is built by the compiler (it recurses into its children); every other type is here.
BUILDERS: dict[str, Callable[[dict, BuildContext], nn.Module]] = {
    "tokenEmbedding": build_token_embedding,
    "positionalEmbedding": build_positional,
    "normalization": build_norm,
    "mhAttention": build_attention,
    "gqAttention": build_attention,
    "feedForward": build_feed_forward,
    "linear": build_linear,
    "dropout": build_dropout,
    "residual": build_residual,
}
