"""The compiled module and its KV cache."""

from __future__ import annotations

import torch
from torch import nn

from slmb.core import nodes as N


class SLM(nn.Module):
    """The compiled model: ``forward(ids, cache=None) -> logits`` over the top-level chain."""

    def __init__(self, chain: N.Chain, vocab_size: int, context_length: int):
        super().__init__()
        self.chain = chain
        self.vocab_size = vocab_size
        self.context_length = context_length

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """ids (B, T) int64 -> logits (B, T, V). With a cache, ids continue the cached sequence."""
        pos = cache.pos if cache is not None else 0
        logits = self.chain(ids, N.Ctx(pos=pos, cache=cache))
        if cache is not None:
            cache.pos = pos + ids.shape[1]
        return logits

    def attention_layers(self) -> list[N.Attention]:
        """Attention nodes in cache-slot order (the order the compiler numbered them)."""
        return sorted((m for m in self.modules() if isinstance(m, N.Attention)), key=lambda m: m.layer_idx)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters counted once even when tied."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class KVCache:
    """Keys and values of every attention node, preallocated for ``max_len`` positions.

    ``pos`` is how many positions are filled; ``SLM.forward`` advances it. Each attention node writes its new
    keys/values at [pos, pos + T) and attends over [0, pos + T).
    """

    def __init__(self, model: SLM, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        param = next(model.parameters())
        dtype, device = dtype or param.dtype, device or param.device
        self.max_len, self.pos = max_len, 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for attn in model.attention_layers():
            shape = (batch_size, attn.num_kv_heads, max_len, attn.head_dim)  # (B, KV, L, hd)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))

    def update(self, idx: int, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[idx][:, :, pos:end] = k
        self.v[idx][:, :, pos:end] = v
        return self.k[idx][:, :, :end], self.v[idx][:, :, :end]

    def reset(self) -> None:
        self.pos = 0
