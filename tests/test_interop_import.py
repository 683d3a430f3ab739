"""Importing Hugging Face checkpoints (slmb/core/interop.py, `slmb import`) and fine-tuning from them (init_from).

Every checkpoint is a tiny random transformers model built from a config object and written with
``save_pretrained`` into a temp dir: nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from slmb.cli import app
from slmb.core import events as ev
from slmb.core.generate import SamplingParams, load_generator, load_model
from slmb.core.interop import InteropError, convert_checkpoint, import_checkpoint, init_from_weights, resolve_source
from slmb.core.spec import TrainRequest
from slmb.core.store import load_completed

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

V, E, CTX = 300, 32, 32
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
NO_SPECIALS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@torch.no_grad()
def _randomize(hf: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of std 0.1 (not HF's 0.02), so logits are far from flat and greedy paths have no near-ties."""
    g = torch.Generator().manual_seed(seed)
    for name, p in hf.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1.0 + 0.2 * noise if p.ndim == 1 and name.endswith("weight") else 0.1 * noise)
    return hf.eval()


def _gpt2(tied: bool = True, vocab: int = V) -> torch.nn.Module:
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=CTX, n_embd=E, n_layer=2, n_head=2,
                                  activation_function="gelu_new", tie_word_embeddings=tied, **NO_SPECIALS)
    return _randomize(transformers.GPT2LMHeadModel(cfg), 1)


def _llama(tied: bool = False) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CTX,
                                   rms_norm_eps=1e-5, rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=tied,
                                   attn_implementation="eager", **NO_SPECIALS)
    return _randomize(transformers.LlamaForCausalLM(cfg), 2)


def _qwen3(tied: bool = True) -> torch.nn.Module:
    cfg = transformers.Qwen3Config(vocab_size=V, hidden_size=E, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=CTX, rms_norm_eps=1e-6,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                                   tie_word_embeddings=tied, attn_implementation="eager", **NO_SPECIALS)
    return _randomize(transformers.Qwen3ForCausalLM(cfg), 3)


MAKERS = {"gpt2": _gpt2, "llama3": _llama, "qwen3": _qwen3}


def _tokenizer_json(path: Path) -> None:
    """A byte-level BPE of exactly V ids (tiny, trained here, topped up with added tokens, so no logit is outside
    the tokenizer and greedy picks can be compared) saved as tokenizer.json, with a tokenizer_config.json."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["To be, or not to be, that is the question: héllo wörld"] * 20, trainer)
    tok.add_special_tokens([f"<|extra_{i}|>" for i in range(V - tok.get_vocab_size())])
    assert tok.get_vocab_size() == V
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def _save(hf: torch.nn.Module, path: Path, shard: bool = False, tokenizer: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(path, max_shard_size="20KB" if shard else "5GB")
    if tokenizer:
        _tokenizer_json(path)
    return path


@pytest.mark.parametrize("arch", ["gpt2", "llama3", "qwen3"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_import_gives_transformers_logits(tmp_path, arch, tied):
    hf = MAKERS[arch](tied=tied)
    conv = convert_checkpoint(_save(hf, tmp_path / "ckpt", tokenizer=False))
    assert conv.parameters == sum(p.numel() for p in hf.parameters())  # every weight mapped once
    slm = load_model(conv.body, conv.state_dict)
    ids = torch.randint(0, V, (2, CTX), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (slm(ids) - hf(input_ids=ids).logits).abs().max().item() < 1e-4


def test_canvas_states_every_value(tmp_path):
    conv = convert_checkpoint(_save(_llama(), tmp_path / "ckpt", tokenizer=False))
    (block,) = [n for n in conv.body["model"] if n["type"] == "transformerBlock"]
    attn = next(n["data"] for n in block["children"] if n["type"] == "gqAttention")
    assert attn["ropeBase"] == 500_000.0 and attn["headDim"] == 8 and attn["numKvGroups"] == 2
    assert attn["ropeConfig"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_context_length": 16}
    assert attn["qkvBias"] is False and attn["projBias"] is False and attn["qkNorm"] is False
    norm = next(n["data"] for n in block["children"] if n["type"] == "normalization")
    assert norm["eps"] == 1e-5
    assert conv.body["model"][-1]["data"]["weightTying"] is False
    gpt2 = convert_checkpoint(_save(_gpt2(), tmp_path / "g", tokenizer=False)).body
    ff = next(n["data"] for n in gpt2["model"][3]["children"] if n["type"] == "feedForward")
    assert ff["actFunc"] == "gelu_tanh" and ff["bias"] is True


def test_sharded_checkpoint_and_greedy_generation_match(tmp_path):
    """A sharded save imports; with its own tokenizer.json, slmb's greedy tokens are transformers' greedy tokens,
    and text round-trips through the imported tokenizer."""
    for arch in ("gpt2", "llama3", "qwen3"):
        hf = MAKERS[arch]()
        src = _save(hf, tmp_path / arch, shard=True)
        assert (src / "model.safetensors.index.json").is_file() and not (src / "model.safetensors").exists()
        path, conv = import_checkpoint(str(src), f"imp-{arch}")
        assert (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()
        _, _, meta = load_completed(f"imp-{arch}")
        assert meta["tokenizer_file"] == "tokenizer.json" and meta["architecture"] == conv.architecture

        gen, _ = load_generator(f"imp-{arch}")
        assert type(gen.tok).__name__ == "HFTokenizer"
        text = "To be, or not héllo"
        assert gen.tok.decode(gen.tok.encode(text)) == text
        prompt = gen.prompt_ids(text)
        out = gen.generate(text, SamplingParams(max_new_tokens=10, temperature=0, stop_at_eos=False))
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10)
        assert out.token_ids == ref[0, len(prompt):].tolist(), arch
        assert out.text == gen.tok.decode(out.token_ids)


def test_cli_import_from_the_local_hf_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snap = hub / "models--tiny-org--tiny-gpt2" / "snapshots" / "abc"
    hf = _gpt2()
    _save(hf, snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert resolve_source("tiny-org/tiny-gpt2") == snap.resolve()
    res = CliRunner().invoke(app, ["import", "tiny-org/tiny-gpt2", "--name", "cached"])
    assert res.exit_code == 0, res.output
    n = sum(p.numel() for p in hf.parameters())
    assert f"{n:,} parameters" in res.output and "completed/cached" in res.output

    res = CliRunner().invoke(app, ["import", "tiny-org/absent", "--name", "x"])
    assert res.exit_code == 1
    assert str(hub / "models--tiny-org--absent" / "snapshots") in res.output and "never downloads" in res.output


@pytest.mark.parametrize(("edit", "field"), [
    (lambda c: c.update(architectures=["FalconForCausalLM"]), "architectures"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     "rope_parameters.rope_type='yarn'"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu'"),
    (lambda c: c.update(attention_bias=True), "attention_bias"),
    (lambda c: c.update(architectures=["MistralForCausalLM"], sliding_window=8), "sliding_window=8"),
])
def test_unsupported_config_names_the_field(tmp_path, edit, field):
    src = _save(_llama(), tmp_path / "ckpt", tokenizer=False)
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InteropError, match=f"config.json {field}".replace("[", r"\[").replace("(", r"\(")):
        convert_checkpoint(src)
    res = CliRunner().invoke(app, ["import", str(src), "--name", "bad"])
    assert res.exit_code == 1 and "config.json" in res.output


def test_a_weight_that_does_not_map_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    src = _save(_gpt2(), tmp_path / "ckpt", tokenizer=False)
    sd = load_file(str(src / "model.safetensors"))
    sd["transformer.h.0.extra.weight"] = torch.zeros(3)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InteropError, match=r"transformer\.h\.0\.extra\.weight"):
        convert_checkpoint(src)


def test_legacy_rope_keys(tmp_path):
    """config.json from transformers 4 (rope_theta + rope_scaling, as the Llama 3.x uploads have) reads the same."""
    hf = _llama()
    src = _save(hf, tmp_path / "ckpt", tokenizer=False)
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (src / "config.json").write_text(json.dumps(cfg))
    conv = convert_checkpoint(src)
    ids = torch.arange(CTX)[None]
    with torch.no_grad():
        assert (load_model(conv.body, conv.state_dict)(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4


def test_gpt2_without_the_transformer_prefix(tmp_path):
    """The original GPT-2 uploads name tensors "h.0.attn.c_attn.weight", with the causal-mask buffers saved."""
    from safetensors.torch import load_file, save_file

    hf = _gpt2()
    src = _save(hf, tmp_path / "ckpt", tokenizer=False)
    sd = {k.removeprefix("transformer."): v for k, v in load_file(str(src / "model.safetensors")).items()}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, CTX, CTX))
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    conv = convert_checkpoint(src)
    ids = torch.arange(CTX)[None]
    with torch.no_grad():
        assert (load_model(conv.body, conv.state_dict)(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4


# ---------------------------------------------------------------- fine-tuning


def _pretrained_gpt2(path: Path) -> tuple[torch.nn.Module, float]:
    """A byte-level GPT-2 (V=257) trained briefly on tiny_shakespeare with transformers, and its loss there."""
    from slmb.core.data import prepare_tokens
    from slmb.core.tokenizers import load_tokenizer

    data = torch.as_tensor(prepare_tokens("tiny_shakespeare", "default", load_tokenizer("byte"),
                                          val_fraction=0.1).train[:200_000].astype("int64"))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=257, n_positions=CTX, n_embd=E, n_layer=2, n_head=2,
                                  activation_function="gelu_new", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                  **NO_SPECIALS)
    hf = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 17, (16,), generator=g)
        x = torch.stack([data[s:s + 17] for s in starts])
        loss = hf(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    hf.eval()
    with torch.no_grad():
        starts = torch.randint(0, len(data) - 17, (64,), generator=g)
        x = torch.stack([data[s:s + 17] for s in starts])
        final = hf(input_ids=x, labels=x).loss.item()
    hf.save_pretrained(path)
    return hf, final


def _finetune_body(name: str, init_from: str, ctx: int = 16, tokenizer: str | None = "byte") -> dict:
    """The imported canvas with dropout 0 and a shorter context (a prefix of the learned positions)."""
    body, _, _ = load_completed(name)
    body = json.loads(json.dumps(body))

    def fix(nodes):
        for n in nodes:
            d = n["data"]
            if "dropoutRate" in d:
                d["dropoutRate"] = 0.0
            if "ctxLength" in d:
                d["ctxLength"] = ctx
            fix(n.get("children", []))

    fix(body["model"])
    body["config"].update(tokenizer=tokenizer, init_from=init_from, context_length=ctx, stride=ctx, batch_size=8,
                          max_steps=3, learning_rate=1e-4, warmup_steps=0, eval_every=1000, eval_batches=1,
                          drop_rate=0.0, max_rows=None)
    body["modelName"] = "tuned"
    return body


def _train(body, **kw):
    from slmb.core.trainer import train

    got = []
    result = train(body, sinks=[ev.CallbackSink(got.append)], step_every_s=0, track=False, **kw)
    return result, [e.loss for e in got if e.name == "step"]


def test_finetune_starts_from_the_imported_loss(tmp_path):
    _, pre_loss = _pretrained_gpt2(tmp_path / "ckpt")
    import_checkpoint(str(tmp_path / "ckpt"), "base")
    assert pre_loss < 0.6 * math.log(257)  # the checkpoint learned something

    result, losses = _train(_finetune_body("base", "base"))
    assert result.state == "finished" and len(losses) == 3
    assert abs(losses[0] - pre_loss) < 0.35 and losses[0] < 0.6 * math.log(257), (losses, pre_loss)

    # The same canvas from noise starts near ln V: the weights, not the canvas, made the difference.
    scratch = _finetune_body("base", "base")
    del scratch["config"]["init_from"]
    _, from_noise = _train(scratch)
    assert from_noise[0] > math.log(257) - 0.5

    # From the CLI, init_from may name the checkpoint directory itself.
    result, losses = _train(_finetune_body("base", str(tmp_path / "ckpt")))
    assert abs(losses[0] - pre_loss) < 0.35


def test_finetuned_model_keeps_the_imported_tokenizer(tmp_path):
    """Without config.tokenizer, a run from an imported model trains with its tokenizer.json and the finished
    model carries its own copy (re-importing the base does not change it). GPT-2's real vocabulary size: the
    request's validation still checks it against the family's tokenizer (config.model "gpt-2")."""
    src = _save(_gpt2(vocab=50257), tmp_path / "ckpt")
    import_checkpoint(str(src), "base")
    body = _finetune_body("base", "base", tokenizer=None)
    body["config"]["max_steps"] = 2
    result, losses = _train(body)
    assert result.state == "finished" and len(losses) == 2
    _, _, meta = load_completed("tuned")
    assert meta["tokenizer"] == meta["tokenizer_file"] == "tokenizer.json"
    assert (Path(result.path) / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    import_checkpoint(str(_save(_qwen3(), tmp_path / "other", tokenizer=False)), "base")
    gen, _ = load_generator("tuned")
    assert type(gen.tok).__name__ == "HFTokenizer" and gen.tok.decode(gen.tok.encode("To be")) == "To be"


def test_mismatched_canvas_lists_every_difference(tmp_path):
    _save(_gpt2(vocab=300), tmp_path / "ckpt", tokenizer=False)
    import_checkpoint(str(tmp_path / "ckpt"), "base")
    body = _finetune_body("base", "base")
    ff = next(n["data"] for n in body["model"][3]["children"] if n["type"] == "feedForward")
    ff["hiddenDim"] = 64  # the checkpoint's is 128
    from slmb.core.compiler import build_model

    model = build_model(TrainRequest.model_validate(body))
    with pytest.raises(InteropError) as exc:
        init_from_weights(model, load_completed("base")[1], "base")
    msg = str(exc.value)
    for i in (0, 1):
        assert f"chain.layers.3.blocks.{i}.layers.5.fc.weight: expected [64, 32], found [128, 32]" in msg
        assert f"chain.layers.3.blocks.{i}.layers.5.out.weight: expected [32, 64], found [32, 128]" in msg
    assert "(6 difference(s))" in msg and "fc.bias: expected [64], found [128]" in msg

    with pytest.raises(Exception, match=r"fc\.weight: expected"):  # through the trainer too
        _train(body)

    # A learned table shorter than the canvas's context is not a prefix: refused.
    long = _finetune_body("base", "base", ctx=CTX * 2)
    with pytest.raises(InteropError, match=r"chain.layers.1.weight: expected \[64, 32\], found \[32, 32\]"):
        init_from_weights(build_model(TrainRequest.model_validate(long)), load_completed("base")[1], "base")


def test_http_takes_store_names_only(tmp_path):
    from slmb.api.trust import request_issues

    src = _save(_gpt2(vocab=300), tmp_path / "ckpt", tokenizer=False)
    import_checkpoint(str(src), "base")
    body = _finetune_body("base", str(src))
    issues = request_issues(TrainRequest.model_validate(body), None)
    assert [i.path for i in issues] == ["/config/init_from"]
    body["config"]["init_from"] = "base"
    assert request_issues(TrainRequest.model_validate(body), None) == []

    body["config"]["init_from"] = str(src)
    with pytest.raises(Exception, match="over HTTP init_from takes store names only"):
        _train(body, confined=True)
    shutil.rmtree(src)
