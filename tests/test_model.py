"""SLM.loss and the chunked LM-head cross-entropy: equal to full logits + F.cross_entropy, gradients included."""

import pytest
import torch
import torch.nn.functional as F
from toy import toy_request

from slmb.core.compiler import build_model
from slmb.core.model import chunked_cross_entropy
from slmb.core.runtime import cpu_has_native_bf16
from slmb.core.spec import TrainRequest


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64, 1000])  # one row, a ragged last chunk, several chunks, one chunk
def test_chunked_cross_entropy_equals_full_cross_entropy_with_gradients(bias, rows):
    torch.manual_seed(0)
    N, E, V = 300, 32, 1000
    h = torch.randn(N, E, requires_grad=True)
    w = (0.1 * torch.randn(V, E)).requires_grad_()
    b = torch.randn(V).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,))
    params = [h, w, *([b] if bias else [])]

    ref = F.cross_entropy(F.linear(h, w, b), t)
    ref_grads = torch.autograd.grad(3.0 * ref, params)
    got = chunked_cross_entropy(h, w, b, t, chunk_rows=rows)
    got_grads = torch.autograd.grad(3.0 * got, params)  # a non-unit upstream gradient is scaled through

    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_without_grad_only_computes_the_loss():
    torch.manual_seed(0)
    h, w, t = torch.randn(10, 8), torch.randn(50, 8, requires_grad=True), torch.randint(0, 50, (10,))
    with torch.no_grad():
        got = chunked_cross_entropy(h, w, None, t, chunk_rows=3)
    assert not got.requires_grad
    torch.testing.assert_close(got, F.cross_entropy(h @ w.detach().t(), t))


def _toy_model():
    torch.manual_seed(0)
    return build_model(TrainRequest.model_validate(toy_request(d=32, blocks=2)))


def test_slm_loss_equals_cross_entropy_of_the_logits_with_tied_gradients():
    model, ids = _toy_model(), torch.randint(0, 257, (3, 32))
    targets = torch.randint(0, 257, (3, 32))
    ref = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    got = model.loss(ids, targets)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):  # the tied embedding/head weight gets both parts
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_slm_loss_under_bf16_autocast_is_close_to_fp32():
    model, ids = _toy_model(), torch.randint(0, 257, (3, 32))
    targets = torch.randint(0, 257, (3, 32))
    ref = model.loss(ids, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.loss(ids, targets)
        full = F.cross_entropy(model(ids).float().flatten(0, 1), targets.flatten())
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) / ref.item() < 0.01
    assert abs(got.item() - full.item()) / full.item() < 0.005


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_chunked_cross_entropy_gradients_under_bf16_autocast_match_the_autocast_reference():
    torch.manual_seed(0)
    h = torch.randn(200, 64, requires_grad=True)
    w = (0.1 * torch.randn(500, 64)).requires_grad_()
    t = torch.randint(0, 500, (200,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.autograd.grad(F.cross_entropy((h @ w.t()).float(), t), [h, w])
        got = torch.autograd.grad(chunked_cross_entropy(h, w, None, t, chunk_rows=64), [h, w])
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.float32
        assert (g - r).norm() / r.norm() < 0.02


def test_flops_per_token_counts_matrix_products_and_attention(shared):
    # GPT-2 124M (the reference canvas, tied head): 6 x the weights of every product (head 50257 x 768, per block
    # qkv, proj, fc, out) + 12 x heads x head_dim x context per attention layer. Built on the meta device.
    import json

    body = json.loads((shared / "requests" / "gpt2-reference.json").read_text())
    model = build_model(TrainRequest.model_validate(body), device="meta")
    E, L, T, V = 768, 12, 1024, 50257
    per_block = E * 3 * E + E * E + E * 4 * E + 4 * E * E
    assert model.flops_per_token(T) == 6 * (V * E + L * per_block) + L * 12 * E * T == 854_438_400
    # the toy GPT (d=32, 2 heads of 16, hidden 128, vocab 257); the attention term scales with the context given
    toy = build_model(TrainRequest.model_validate(toy_request(d=32, ctx=32)))
    assert toy.flops_per_token(32) == 6 * (32 * 96 + 32 * 32 + 2 * 32 * 128 + 257 * 32) + 12 * 2 * 16 * 32
    assert toy.flops_per_token(16) == toy.flops_per_token(32) - 12 * 2 * 16 * 16


def test_flops_per_token_of_a_gqa_gated_model(shared):
    # The Llama 3 reference canvas: 8 KV heads of 64 (smaller k/v projections), gated SwiGLU, tied head.
    import json

    body = json.loads((shared / "requests" / "llama3-reference.json").read_text())
    model = build_model(TrainRequest.model_validate(body), device="meta")
    E, L, H, KV, hd, F_, V, T = 2048, 16, 32, 8, 64, 8192, 128258, 256
    per_block = (H + 2 * KV) * hd * E + H * hd * E + 3 * E * F_
    assert model.flops_per_token() == 6 * (V * E + L * per_block) + L * 12 * H * hd * T == 7_515_168_768
