"""The compiled module and its KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slmb.core import nodes as N


class SLM(nn.Module):
    """The compiled model: ``forward(ids, cache=None) -> logits`` over the top-level chain."""

    def __init__(self, chain: N.Chain, vocab_size: int, context_length: int):
        super().__init__()
        self.chain = chain
        self.vocab_size = vocab_size
        self.context_length = context_length

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, targets: torch.Tensor | None = None
                ) -> torch.Tensor:
        """ids (B, T) int64 -> logits (B, T, V). With a cache, ids continue the cached sequence. With ``targets``
        (B, T), the mean loss instead (``loss``): the entry a DDP or FSDP wrapper calls, so its hooks run."""
        if targets is not None:
            return self.loss(ids, targets)
        pos = cache.pos if cache is not None else 0
        logits = self.chain(ids, N.Ctx(pos=pos, cache=cache))
        if cache is not None:
            cache.pos = pos + ids.shape[1]
        return logits

    def decode_rows(self, ids: torch.Tensor, caches: list[KVCache], exact: bool = True) -> torch.Tensor:
        """One decoding step for B sequences at once: ids (B, T), the next T tokens of each (one token, or prompts
        or windows of one length); ``caches[i]`` is sequence i's own one-sequence cache (its position, its keys and
        values), which this advances by T. Returns logits (B, T, V). ``exact``: every row bit-identical to
        ``self(ids[i:i+1], caches[i])`` (see ``nodes.Rows``)."""
        T = ids.shape[1]
        pos = [c.pos for c in caches]
        if any(p + T > c.max_len for p, c in zip(pos, caches, strict=True)):
            raise ValueError("a sequence's KV cache is full: re-encode its window alone")
        index = torch.tensor(pos, device=ids.device)[:, None] + torch.arange(T, device=ids.device)  # (B, T)
        rows = N.Rows([N.Ctx(pos=p, cache=c) for p, c in zip(pos, caches, strict=True)], index, exact)
        logits = self.chain(ids, N.Ctx(rows=rows))
        for c in caches:
            c.pos += T
        return logits

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ids (B, T) against targets (B, T), as the trainer computes it.

        When the chain ends in a linear head (every LM canvas does), the trunk runs once and the head's
        cross-entropy is computed in row chunks by ``chunked_cross_entropy``, so the (B, T, V) logits (200 MB
        in fp32 for GPT-2's vocabulary at batch 8 x 128) never exist. Otherwise, and for small logits on a GPU in
        eager mode (``CUDA_FULL_LOGITS_MAX``): full logits, then F.cross_entropy.
        """
        head = self.chain.layers[-1]
        if not isinstance(head, N.Linear):
            logits = self(ids)  # (B, T, V)
        else:
            h = self.chain(ids, N.Ctx(), end=-1)  # (B, T, E)
            small_on_gpu = h.is_cuda and h.shape[0] * h.shape[1] * head.weight.shape[0] <= CUDA_FULL_LOGITS_MAX
            if not small_on_gpu or torch.compiler.is_compiling():
                return chunked_cross_entropy(h.flatten(0, 1), head.weight, head.bias, targets.flatten())
            logits = head(h)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def attention_layers(self) -> list[N.Attention]:
        """Attention nodes in cache-slot order (the order the compiler numbered them)."""
        return sorted((m for m in self.modules() if isinstance(m, N.Attention)), key=lambda m: m.layer_idx)

    def flops_per_token(self, context_length: int | None = None) -> int:
        """Training FLOPs per token, forward and backward: PaLM's estimate, as nanoGPT's ``estimate_mfu``.

        6 per weight of every matrix product (the LM head included, embedding lookups not) plus 12·H·hd·T per
        attention node for the scores and the weighted sum over T positions."""
        T = context_length or self.context_length
        weights = {id(m.weight): m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear)}
        return 6 * sum(weights.values()) + sum(12 * a.num_heads * a.head_dim * T for a in self.attention_layers())

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
        ck, cv = self.k[idx], self.v[idx]
        ck.narrow(2, pos, end - pos).copy_(k)
        cv.narrow(2, pos, end - pos).copy_(v)
        return ck.narrow(2, 0, end), cv.narrow(2, 0, end)

    def reset(self) -> None:
        self.pos = 0


# Logits per chunk: 128 MB in fp32. Smaller chunks cost fp32 speed on the CPU (each one re-reads and re-writes
# the fp32 dL/dW: 676 tokens/s at 333 rows of GPT-2's vocabulary vs 705 at 512 rows, 720 unchunked).
CE_CHUNK_ELEMENTS = 1 << 25
# On a GPU: 1 GiB of fp32 logits per chunk. Memory is plentiful there and every chunk costs a dozen kernel launches
# (eager) or an unrolled copy of its code (compiled): at the GPT-2 reference canvas's batch 64 x 1024 the CPU's
# chunk would make 98 chunks, this one 13.
CE_CHUNK_ELEMENTS_CUDA = 1 << 28


def ce_chunk_rows(n_rows: int, vocab: int, cuda: bool) -> int:
    """Rows per chunk of ``chunked_cross_entropy``: equal chunks of at most ``CE_CHUNK_ELEMENTS`` logits
    (``CE_CHUNK_ELEMENTS_CUDA`` on a GPU)."""
    n_chunks = -(-n_rows * vocab // (CE_CHUNK_ELEMENTS_CUDA if cuda else CE_CHUNK_ELEMENTS))
    return max(1, -(-n_rows // max(1, n_chunks)))
# On a GPU, eager training with small logits is bound by kernel launches, not memory: full logits and one fused
# cross-entropy beat the chunked function's extra kernels there (H200, GPT-2 benchmark shape at batch 8 x 128 =
# 51 M logits, bf16: 128-135k tokens/s against 89-118k; docs/benchmarks.md). Compiled, the chunked loss was the
# faster one measured (156k), so it stays.
CUDA_FULL_LOGITS_MAX = 1 << 26


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                          chunk_rows: int | None = None) -> torch.Tensor:
    """mean(CE(h @ weight.T + bias, targets)) without materialising the (N, V) logits.

    Args:
        h: (N, E) hidden states entering the head.
        weight: (V, E) head weight (tied or not); bias: (V,) or None.
        targets: (N,) int64 class ids.
        chunk_rows: rows per chunk (default: ``ce_chunk_rows``).

    Returns:
        The scalar mean loss in fp32. Under autocast the head products run in the autocast dtype and the
        softmax in fp32, as autocast would do for the full product.
    """
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    want_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad))
    rows = chunk_rows or ce_chunk_rows(h.shape[0], weight.shape[0], h.is_cuda)
    with torch.autocast(device, enabled=False):
        return _ChunkedCrossEntropy.apply(h, weight, bias, targets, rows, dtype, want_grad)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward and backward of the LM-head cross-entropy, one chunk of rows at a time.

    The gradient dL/dlogits is computed during the forward pass, from each chunk's softmax while it is at hand
    (as Liger-Kernel does): the same three products as an unchunked head (logits, dL/dh, dL/dW), no recompute,
    and never the (N, V) fp32 logits. In fp32 each chunk's dL/dh and dL/dW products are done at once (dL/dW
    accumulated in place by addmm). Under bf16 autocast the (N, V) gradient is kept in bf16 (a quarter of what
    full logits + log-softmax + their gradients take) and the two backward products run once at full size: the
    CPU has no bf16 x bf16 -> fp32 product to accumulate into, and per-chunk fp32 accumulation costs more than
    it saves. Backward only scales the stored gradients.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, rows, dtype, want_grad):
        n_rows, vocab = h.shape[0], weight.shape[0]
        low = dtype != torch.float32
        columns = not low and h.device.type == "cpu"  # fp32 on the CPU: logits computed as (V, n), see below
        hc, wc = h.to(dtype), weight.to(dtype)  # (N, E), (V, E)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = grad_w = grad_b = grad_logits = None
        if want_grad:
            if low:
                grad_logits = torch.empty(n_rows, vocab, dtype=dtype, device=h.device)  # (N, V)
            else:
                grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)
            if bias is not None:
                grad_b = torch.zeros_like(bias, dtype=torch.float32)
        for s in range(0, n_rows, rows):
            x, t = hc[s : s + rows], targets[s : s + rows, None]  # (n, E), (n, 1)
            # (n, V). fp32 on the CPU: computed as (W @ xᵀ)ᵀ, a (V, n) product seen transposed. MKL's sgemm runs
            # it 1.4-1.8x faster than x @ Wᵀ at GPT-2's head shape (512 x 256 x 50257, AVX2 EPYC); the row
            # reductions below then stride, which costs back about a fifth of that. Whole fp32 step on that
            # CPU: +6% tokens/s at 1 thread, +14% at 2 (docs/benchmarks.md, machine C).
            logits = (wc @ x.t()).t() if columns else (x @ wc.t()).float()
            if bias is not None:
                logits += bias
            picked = logits.gather(1, t)  # (n, 1)
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # unnormalised, in place of the logits: one exp pass for both uses
            norm = probs.sum(dim=-1, keepdim=True)
            total += (top + norm.log() - picked).sum()  # logsumexp - target logit
            if not want_grad:
                continue
            probs.div_(norm).scatter_add_(1, t, torch.full_like(picked, -1.0))  # dCE/dlogits = p - onehot (x N)
            if grad_b is not None:
                grad_b += probs.sum(0)
            if low:
                grad_logits[s : s + rows] = probs
            else:
                grad_h[s : s + rows] = probs @ wc  # (n, E)
                grad_w.addmm_(probs.t(), x)  # (V, E)
        if grad_logits is not None:
            grad_h = (grad_logits @ wc).to(h.dtype)  # (N, E)
            grad_w = (grad_logits.t() @ hc).to(weight.dtype)  # (V, E)
        ctx.n_rows = n_rows
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total / n_rows

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out / ctx.n_rows  # the mean's 1/N, applied once here rather than to every chunk
        return (grad_h * scale, grad_w * scale, grad_b * scale if grad_b is not None else None,
                None, None, None, None)
