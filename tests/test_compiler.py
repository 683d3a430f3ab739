"""Compiler semantics that the reference-parity tests do not reach: every positional mode, activation,
residual scope and init rule, checked by numbers against hand-written PyTorch."""

import math

import pytest
import torch
import torch.nn.functional as F

from slmb.core import nodes as N
from slmb.core.compiler import build_model, plan
from slmb.core.spec import TrainRequest

E, V, T = 32, 97, 16


def body(*nodes, config=None):
    return {"config": {"context_length": T, "tokenizer": "byte", **(config or {})}, "model": list(nodes),
            "modelName": "t"}


def n(type_, id_=None, children=None, **data):
    out = {"type": type_, "data": {"id": id_ or type_, **data}}
    if children is not None:
        out["children"] = children
    return out


def build(*nodes, config=None, seed=0):
    torch.manual_seed(seed)
    model = build_model(TrainRequest.model_validate(body(*nodes, config=config)))
    return model.eval()


EMB = n("tokenEmbedding", vocabSize=V, embDim=E)
HEAD = n("linear", "head", inDim=E, outDim=V)


def ids(B=2, t=T):
    return torch.randint(0, V, (B, t), generator=torch.Generator().manual_seed(1))


def test_learned_and_sinusoidal_positions_add_the_right_table():
    learned = build(EMB, n("positionalEmbedding", ctxLength=T, embDim=E, posType="learned"))
    x = ids()
    h = learned.chain(x, N.Ctx())
    emb, pos = learned.chain.layers[0].weight, learned.chain.layers[1].weight
    torch.testing.assert_close(h, emb[x] + pos[:T])

    sinus = build(EMB, n("positionalEmbedding", ctxLength=T, embDim=E, posType="Sinusoidal Positional Embedding"))
    table = sinus.chain.layers[1].table
    assert table.shape == (T, E)
    assert table[0, 0] == 0 and table[0, 1] == 1  # sin(0), cos(0)
    assert math.isclose(table[3, 2].item(), math.sin(3 / 10000 ** (2 / E)), rel_tol=1e-5)
    assert sum(p.numel() for p in sinus.parameters()) == V * E  # the table is not a parameter


def test_rotary_marker_switches_rope_on_for_later_mha_only_without_explicit_false():
    attn = {"numHeads": 4, "ctxLength": T}
    model = build(EMB, n("positionalEmbedding", posType="rotary"), n("mhAttention", "a1", **attn),
                  n("mhAttention", "a2", isRoPE=False, **attn), HEAD)
    a1, a2 = (m for m in model.modules() if isinstance(m, N.Attention))
    assert a1.rotary is not None and a2.rotary is None
    no_marker = build(EMB, n("mhAttention", **attn), HEAD)
    assert next(m for m in no_marker.modules() if isinstance(m, N.Attention)).rotary is None
    gqa_default = build(EMB, n("gqAttention", numHeads=4, numKvGroups=2, ctxLength=T), HEAD)
    assert next(m for m in gqa_default.modules() if isinstance(m, N.Attention)).rotary is not None


def test_relative_mode_adds_a_learned_causal_bias_per_head():
    model = build(EMB, n("positionalEmbedding", posType="Relative Positional Embedding"),
                  n("mhAttention", numHeads=4, ctxLength=T), HEAD)
    attn = next(m for m in model.modules() if isinstance(m, N.Attention))
    assert attn.relative is not None and attn.relative.weight.shape == (32, 4)
    b = attn.relative.buckets(torch.arange(T), torch.arange(T))
    assert b[5, 5] == 0 and b[5, 2] == 3 and b[15, 0] == 15  # exact buckets for short distances
    assert b.max() < 32
    far = attn.relative.buckets(torch.tensor([10_000]), torch.tensor([0]))
    assert far.item() == 31
    # The bias changes the output, and stays causal: the first token's output ignores later tokens.
    x = ids(1)
    before = model(x)
    with torch.no_grad():
        attn.relative.weight.normal_()
    after = model(x)
    assert not torch.allclose(before, after)
    y = x.clone()
    y[0, 1:] = (y[0, 1:] + 1) % V
    torch.testing.assert_close(model(y)[0, 0], after[0, 0])


@pytest.mark.parametrize(("name", "fn"), [
    ("relu", F.relu), ("GELU", F.gelu), ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    ("SiLU", F.silu), ("swish", F.silu), ("leaky", F.leaky_relu), ("Mish", F.mish)])
def test_standard_feed_forward_activations(name, fn):
    model = build(EMB, n("feedForward", hiddenDim=48, actFunc=name, bias=True), HEAD)
    ff = model.chain.layers[1]
    x = torch.randn(2, 3, E)
    torch.testing.assert_close(ff(x), ff.out(fn(ff.fc(x))))


@pytest.mark.parametrize(("name", "fn"), [("SwiGLU", F.silu), ("gelu", F.gelu), ("relu", F.relu)])
def test_gated_feed_forward(name, fn):
    model = build(EMB, n("feedForward", hiddenDim=48, feedForwardType="Gated", actFunc=name), HEAD)
    ff = model.chain.layers[1]
    x = torch.randn(2, 3, E)
    torch.testing.assert_close(ff(x), ff.down(fn(ff.gate(x)) * ff.up(x)))
    assert ff.gate.bias is None


def test_residual_sources_bare_in_and_out():
    norm = n("normalization", "ln")
    drop = n("dropout", dropoutRate=0.0)
    for source, expect in (("ln", "in"), ("ln:in", "in"), ("ln:out", "out")):
        model = build(EMB, norm, drop, n("residual", "r", source=source), HEAD)
        h0 = model.chain.layers[0](ids())
        h1 = model.chain.layers[1](h0)
        got = model.chain.layers[:4]
        out = h0 if expect == "in" else h1
        chain = N.Chain(list(got))
        torch.testing.assert_close(chain(ids(), N.Ctx()), h1 + out)


def test_transformer_block_copies_have_independent_weights_and_local_residuals():
    children = [n("normalization", "ln"), n("feedForward", "ff", hiddenDim=64), n("residual", source="ln")]
    model = build(EMB, n("transformerBlock", numOfBlocks=3, children=children), HEAD)
    blocks = model.chain.layers[1].blocks
    assert len(blocks) == 3
    w = [b.layers[1].fc.weight for b in blocks]
    assert w[0].data_ptr() != w[1].data_ptr() and not torch.equal(w[0], w[1])
    h = model.chain.layers[0](ids())
    expect = h
    for b in blocks:
        expect = expect + b.layers[1](b.layers[0](expect))
    torch.testing.assert_close(model.chain.layers[1](h, N.Ctx()), expect)


def test_weight_tying_shares_storage_and_counts_once():
    tied = build(EMB, n("linear", inDim=E, outDim=V, weightTying=True))
    emb, head = tied.chain.layers[0], tied.chain.layers[1]
    assert head.weight is emb.weight
    assert tied.num_parameters() == V * E
    untied = build(EMB, HEAD)
    assert untied.num_parameters() == 2 * V * E


def test_padded_vocabulary_and_first_loss_close_to_ln_v():
    Vp = 128
    children = [n("normalization", "ln1"), n("mhAttention", numHeads=4, ctxLength=T), n("residual", source="ln1"),
                n("normalization", "ln2"), n("feedForward", hiddenDim=4 * E), n("residual", source="ln2")]
    model = build(n("tokenEmbedding", vocabSize=Vp, embDim=E), n("positionalEmbedding", ctxLength=T, embDim=E),
                  n("transformerBlock", numOfBlocks=2, children=children), n("normalization"),
                  n("linear", inDim=E, outDim=Vp))
    x = torch.randint(0, 97, (8, T))
    logits = model(x)
    assert logits.shape == (8, T, Vp)
    loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
    assert abs(loss.item() - math.log(Vp)) < 0.1 * math.log(Vp)


def test_residual_output_projections_are_scaled_by_the_number_of_residuals():
    children = [n("normalization", "ln1"), n("mhAttention", numHeads=4, ctxLength=T), n("residual", source="ln1"),
                n("normalization", "ln2"), n("feedForward", hiddenDim=512), n("residual", source="ln2")]
    model = build(EMB, n("transformerBlock", numOfBlocks=8, children=children), HEAD)
    attn = next(m for m in model.modules() if isinstance(m, N.Attention))
    ff = next(m for m in model.modules() if isinstance(m, N.FeedForward))
    want = 0.02 / math.sqrt(16)
    assert abs(attn.proj.weight.std().item() - want) < 0.2 * want
    assert abs(ff.out.weight.std().item() - want) < 0.1 * want
    assert abs(ff.fc.weight.std().item() - 0.02) < 0.1 * 0.02


def test_norms_compute_in_fp32_and_cast_back():
    ln, rms = N.LayerNorm(E), N.RMSNorm(E)
    x = (torch.randn(2, 3, E) * 100).bfloat16()
    for norm, ref in ((ln, lambda v: F.layer_norm(v, (E,), eps=1e-5)),
                      (rms, lambda v: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6))):
        out = norm(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, ref(x.float()).bfloat16())


def test_plan_infers_widths_and_defaults_from_the_chain_and_config():
    req = TrainRequest.model_validate(body(
        n("tokenEmbedding"), n("mhAttention"), n("feedForward"), n("linear"),
        config={"vocab_size": V, "emb_dim": E, "n_heads": 4, "hidden_dim": 80}))
    p = plan(req)
    tok, attn, ff, head = p.nodes
    assert (tok.args["vocab_size"], tok.args["emb_dim"]) == (V, E)
    assert (attn.args["num_heads"], attn.args["head_dim"], attn.args["ctx_length"]) == (4, 8, T)
    assert attn.args["proj_bias"] is False and attn.args["rope"] is False
    assert ff.args["hidden_dim"] == 80 and ff.args["act"] == "gelu"
    assert (head.args["in_dim"], head.args["out_dim"]) == (E, V)
    assert p.vocab_size == V and p.context_length == T


def test_forward_longer_than_the_window_is_a_clear_error():
    model = build(EMB, n("positionalEmbedding", ctxLength=T, embDim=E), HEAD)
    with pytest.raises(ValueError, match="context length is 16"):
        model(torch.zeros(1, T + 1, dtype=torch.long))


def test_dropout_keeps_one_minus_p_of_the_values_and_rescales_them():
    d = N.Dropout(0.25)
    x = torch.ones(200_000, requires_grad=True)
    torch.manual_seed(0)
    y = d(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005  # Bernoulli(1 - p): 0.75 ± 3.5 sigma
    assert torch.all(y[kept] == 1 / 0.75)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same mask and scale
    torch.manual_seed(0)
    assert torch.equal(d(x), y)  # the mask comes from torch's generator: seeded runs repeat (exact resume)
    assert d(x.bfloat16()).dtype == torch.bfloat16
    d.eval()
    assert d(x) is x
    assert N.Dropout(0.0)(x) is x
