"""A hand-written nanoGPT-style GPT-2 (Karpathy's model.py, trimmed): the floor a plain PyTorch model sets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, emb: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln_1, self.ln_2 = nn.LayerNorm(emb), nn.LayerNorm(emb)
        self.c_attn, self.c_proj = nn.Linear(emb, 3 * emb), nn.Linear(emb, emb)
        self.c_fc, self.mlp_proj = nn.Linear(emb, 4 * emb), nn.Linear(4 * emb, emb)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0)
        x = x + self.drop(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.drop(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")))


class GPT(nn.Module):
    def __init__(self, vocab: int, ctx: int, emb: int, layers: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, emb), nn.Embedding(ctx, emb)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(emb, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(emb)
        self.lm_head = nn.Linear(emb, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, V)
