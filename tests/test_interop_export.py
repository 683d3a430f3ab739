"""Export (DESIGN.md §8): a completed slmb model becomes a transformers checkpoint with the same logits.

Tiny canvases of each family (the bodies of ``hf_convert``) are built with random weights, saved to the store,
exported, and loaded back with ``AutoModelForCausalLM.from_pretrained`` offline; canvases that do not map are
refused with an error naming the node.
"""

from __future__ import annotations

import copy
import io
import json
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from hf_convert import gpt2_body, llama_body

from slmb.core import store
from slmb.core.compiler import build_model
from slmb.core.export import ExportError, export_hf
from slmb.core.spec import TrainRequest

transformers = pytest.importorskip("transformers")

E, LAYERS, HEADS, KV, CTX = 32, 2, 4, 2, 24


def _save(name: str, body: dict, tokenizer: str, seed: int = 0) -> torch.nn.Module:
    """Build ``body`` with weights far from the init (norm gains and biases matter), save it as ``name``."""
    torch.manual_seed(seed)
    model = build_model(TrainRequest.model_validate(body)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1 and pname.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    store.save_completed(name, body, model.state_dict(), {"tokenizer": tokenizer})
    return model


def _gpt2_cfg(vocab: int, tied: bool = True):
    return transformers.GPT2Config(vocab_size=vocab, n_positions=CTX, n_embd=E, n_layer=LAYERS, n_head=HEADS,
                                   tie_word_embeddings=tied)


def _llama_cfg(vocab: int, **kw):
    args = dict(vocab_size=vocab, hidden_size=E, intermediate_size=48, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=CTX, rms_norm_eps=1e-5)
    return transformers.LlamaConfig(**{**args, **kw})


def _qwen3_cfg(vocab: int):
    return transformers.Qwen3Config(vocab_size=vocab, hidden_size=E, intermediate_size=48, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=16,
                                    max_position_embeddings=CTX, rms_norm_eps=1e-6, tie_word_embeddings=True)


def _max_diff(slm: torch.nn.Module, out: Path, vocab: int) -> float:
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, vocab, (2, CTX), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = slm(ids)
    assert ref.shape == got.shape == (2, CTX, vocab)
    return (ref - got).abs().max().item()


BYTE_V = 257


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_export_logits_and_files(tmp_path: Path, tied: bool) -> None:
    slm = _save("g", gpt2_body(_gpt2_cfg(BYTE_V, tied), "gelu_tanh", tied), "byte")
    result = export_hf("g", tmp_path / "out")
    assert result.architecture == "GPT2LMHeadModel" and not result.warnings
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(result.files)
    assert _max_diff(slm, tmp_path / "out", BYTE_V) < 1e-4
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.activation_function) == (
        LAYERS, HEADS, E, CTX, "gelu_new")
    assert cfg.tie_word_embeddings is tied and cfg.eos_token_id == 256 and cfg.resid_pdrop == 0.1


def test_byte_tokenizer_exports_like_slmb(tmp_path: Path) -> None:
    from slmb.core.tokenizers import load_tokenizer

    _save("b", gpt2_body(_gpt2_cfg(BYTE_V), "gelu_tanh", True), "byte")
    export_hf("b", tmp_path / "out")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ours = load_tokenizer("byte")
    for text in ["Hello, world!", "  naïve 日本語 🙂\n\ttabs"]:
        assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text)
        assert hf_tok.decode(ours.encode(text)) == text
    assert hf_tok.convert_tokens_to_ids("<|endoftext|>") == 256 and hf_tok.eos_token_id == 256


def test_gpt2_tokenizer_exports_like_slmb(tmp_path: Path) -> None:
    from slmb.core.tokenizers import load_tokenizer

    _save("g2", gpt2_body(_gpt2_cfg(50257), "gelu_tanh", True), "gpt2")
    result = export_hf("g2", tmp_path / "out")
    assert {"vocab.json", "merges.txt"} <= set(result.files)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ours = load_tokenizer("gpt2")
    text = "The quick brown fox's 12345 jumps  over\nthe lazy dog. Ünïcödé!"
    assert hf_tok.encode(text) == ours.encode(text)
    assert hf_tok.eos_token_id == 50256


def test_llama3_export_with_rope_scaling(tmp_path: Path) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    cfg = _llama_cfg(BYTE_V, rope_parameters=rope, tie_word_embeddings=False)
    slm = _save("l3", llama_body(cfg), "byte")
    result = export_hf("l3", tmp_path / "out")
    assert result.architecture == "LlamaForCausalLM"
    assert _max_diff(slm, tmp_path / "out", BYTE_V) < 1e-4
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert hf_cfg.rope_parameters["rope_type"] == "llama3" and hf_cfg.rope_parameters["factor"] == 8.0
    assert hf_cfg.num_key_value_heads == KV and hf_cfg.tie_word_embeddings is False


def test_llama2_mha_export(tmp_path: Path) -> None:
    cfg = _llama_cfg(BYTE_V, num_key_value_heads=HEADS, tie_word_embeddings=False)
    slm = _save("l2", llama_body(cfg, attention="mhAttention", model_family="llama2"), "byte")
    assert _max_diff(slm, export_hf("l2", tmp_path / "out").out_dir, BYTE_V) < 1e-4


def test_qwen3_export(tmp_path: Path) -> None:
    slm = _save("q3", llama_body(_qwen3_cfg(BYTE_V), qk_norm=True, model_family="qwen3"), "byte")
    result = export_hf("q3", tmp_path / "out")
    assert result.architecture == "Qwen3ForCausalLM"
    assert _max_diff(slm, tmp_path / "out", BYTE_V) < 1e-4
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").head_dim == 16


def _gpt2_nodes() -> dict:
    return gpt2_body(_gpt2_cfg(BYTE_V), "gelu_tanh", True)


def test_sinusoidal_positions_name_the_node(tmp_path: Path) -> None:
    body = _gpt2_nodes()
    body["model"][1]["data"]["posType"] = "Sinusoidal Positional Embedding"
    _save("sin", body, "byte")
    with pytest.raises(ExportError, match=r"node /model/1 \(id 'positionalEmbedding-\d+'.*sinusoidal positions"):
        export_hf("sin", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_post_norm_names_the_node(tmp_path: Path) -> None:
    body = _gpt2_nodes()
    block = body["model"][3]["children"]
    norm1, attn, drop, res = block[0], block[1], block[2], block[3]
    res["data"]["source"] = attn["data"]["id"]
    block[:4] = [attn, drop, res, norm1]  # attention -> residual -> norm: post-norm
    _save("post", body, "byte")
    with pytest.raises(ExportError, match=r"node /model/3/children/0 \(id 'mhAttention-\d+'.*post-norm"):
        export_hf("post", tmp_path / "out")


def test_residual_skipping_two_nodes_names_it(tmp_path: Path) -> None:
    body = copy.deepcopy(_gpt2_nodes())
    block = body["model"][3]["children"]
    block[7]["data"]["source"] = block[0]["data"]["id"]  # second residual adds the block input: skips both halves
    _save("skip", body, "byte")
    with pytest.raises(ExportError, match=r"node /model/3/children/7 .*residual adds"):
        export_hf("skip", tmp_path / "out")


def test_exact_gelu_maps_to_gelu_and_gated_gpt2_is_refused(tmp_path: Path) -> None:
    slm = _save("erf", gpt2_body(_gpt2_cfg(BYTE_V), "gelu", True), "byte")
    export_hf("erf", tmp_path / "erf")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "erf").activation_function == "gelu"
    assert _max_diff(slm, tmp_path / "erf", BYTE_V) < 1e-4
    body = _gpt2_nodes()
    body["model"][3]["children"][5]["data"]["bias"] = False
    _save("nobias", body, "byte")
    with pytest.raises(ExportError, match=r"node /model/3/children/5 .*GPT-2's MLP has biases"):
        export_hf("nobias", tmp_path / "out")


def _gguf(path: Path) -> tuple[dict, dict]:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    return fields, tensors


def test_gguf_llama3(tmp_path: Path) -> None:
    from slmb.core.export import _llama3_rope_factors, hf_state

    pytest.importorskip("gguf")
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    body = llama_body(_llama_cfg(BYTE_V, rope_parameters=rope, tie_word_embeddings=False))
    _save("gl", body, "byte")
    result = export_hf("gl", tmp_path / "out", "gguf")
    assert result.files == ["model.gguf"]
    fields, tensors = _gguf(tmp_path / "out" / "model.gguf")
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == LAYERS
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (HEADS, KV)
    assert fields["llama.embedding_length"] == E and fields["llama.context_length"] == CTX
    assert fields["llama.rope.freq_base"] == 500000.0 and fields["llama.feed_forward_length"] == 48
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == BYTE_V
    assert fields["tokenizer.ggml.eos_token_id"] == 256
    request, sd, _ = store.load_completed("gl")
    config, hf = hf_state(request, sd)
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v",
                                                                "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert torch.equal(tensors["rope_freqs.weight"], _llama3_rope_factors(config))
    assert torch.equal(tensors["blk.1.ffn_down.weight"].reshape(E, 48), hf["model.layers.1.mlp.down_proj.weight"])
    # Llama's q/k rows are permuted from rotate-half to interleaved pairs, head by head.
    hd = E // HEADS
    q = tensors["blk.0.attn_q.weight"].reshape(HEADS, hd // 2, 2, E).swapaxes(1, 2).reshape(E, E)
    assert torch.equal(q, hf["model.layers.0.self_attn.q_proj.weight"])
    k = tensors["blk.0.attn_k.weight"].reshape(KV, hd // 2, 2, E).swapaxes(1, 2).reshape(KV * hd, E)
    assert torch.equal(k, hf["model.layers.0.self_attn.k_proj.weight"])


def test_gguf_qwen3_and_refusals(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    _save("gq", llama_body(_qwen3_cfg(151669), qk_norm=True, model_family="qwen3"), "qwen3")
    export_hf("gq", tmp_path / "q", "gguf")
    fields, tensors = _gguf(tmp_path / "q" / "model.gguf")
    assert fields["general.architecture"] == "qwen3" and fields["qwen3.attention.key_length"] == 16
    assert fields["tokenizer.ggml.pre"] == "qwen2" and len(fields["tokenizer.ggml.tokens"]) == 151669
    assert fields["tokenizer.ggml.tokens"][151643] == "<|endoftext|>" and fields["tokenizer.ggml.merges"]
    assert "blk.0.attn_q_norm.weight" in tensors and "output.weight" not in tensors  # tied: llama.cpp reuses
    _save("g", _gpt2_nodes(), "byte")
    with pytest.raises(ExportError, match="gguf covers Llama and Qwen3"):
        export_hf("g", tmp_path / "g", "gguf")


def test_http_export_returns_a_loadable_zip(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from slmb.api.app import Settings, create_app

    slm = _save("web", _gpt2_nodes(), "byte")
    body = _gpt2_nodes()
    body["model"][1]["data"]["posType"] = "Sinusoidal Positional Embedding"
    _save("websin", body, "byte")
    client = TestClient(create_app(Settings(redis_url="redis://127.0.0.1:1/0", api_token="t")))
    auth = {"Authorization": "Bearer t"}
    before = set(Path(tempfile.gettempdir()).glob("slmb-export-*"))
    assert client.get("/api/v1/models/web/export?format=hf").status_code == 401
    r = client.get("/api/v1/models/web/export?format=hf", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert 'filename="web-hf.zip"' in r.headers["content-disposition"]
    assert set(Path(tempfile.gettempdir()).glob("slmb-export-*")) <= before  # removed once sent
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path)
    assert _max_diff(slm, tmp_path / "web", BYTE_V) < 1e-4
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "web").encode("hi") == [104, 105]
    r = client.get("/api/v1/models/websin/export", headers=auth)
    assert r.status_code == 422 and "sinusoidal" in r.json()["detail"]
    assert client.get("/api/v1/models/nope/export", headers=auth).status_code == 404
    assert client.get("/api/v1/models/..bad/export", headers=auth).status_code == 422


def test_cli_export(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from slmb.cli import app

    slm = _save("cli", _gpt2_nodes(), "byte")
    r = CliRunner().invoke(app, ["export", "cli", str(tmp_path / "out"), "--format", "hf"])
    assert r.exit_code == 0, r.output
    assert "GPT2LMHeadModel checkpoint written" in r.output
    assert _max_diff(slm, tmp_path / "out", BYTE_V) < 1e-4
    body = _gpt2_nodes()
    body["model"][1]["data"]["posType"] = "Relative Positional Embedding"
    _save("clirel", body, "byte")
    r = CliRunner().invoke(app, ["export", "clirel", str(tmp_path / "rel")])
    assert r.exit_code == 1 and "node /model/1" in r.output and "relative positions" in r.output
    r = CliRunner().invoke(app, ["export", "missing", str(tmp_path / "m")])
    assert r.exit_code == 1 and "no completed model named 'missing'" in r.output


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen3"])
def test_import_of_export_is_bit_identical(tmp_path: Path, family: str) -> None:
    from slmb.core.interop import import_checkpoint

    if family == "gpt2":
        body = gpt2_body(_gpt2_cfg(BYTE_V, tied=False), "gelu_tanh", False)
    elif family == "llama3":
        body = llama_body(_llama_cfg(BYTE_V, tie_word_embeddings=False))
    else:
        body = llama_body(_qwen3_cfg(BYTE_V), qk_norm=True, model_family="qwen3")
    slm = _save("orig", body, "byte")
    export_hf("orig", tmp_path / "out")
    import_checkpoint(str(tmp_path / "out"), "back")
    _, before, _ = store.load_completed("orig")
    request, after, _ = store.load_completed("back")
    back = build_model(TrainRequest.model_validate(request), init=False)
    back.load_state_dict(after, strict=True)
    # The imported canvas has no dropout nodes: compare tensors in module order, not by name.
    a = [t for _, t in slm.named_parameters()]
    b = [t for _, t in back.eval().named_parameters()]
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert len(before) >= len(a)
    ids = torch.randint(0, BYTE_V, (1, CTX), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(slm(ids), back(ids))


def test_export_of_an_imported_model_carries_its_tokenizer(tmp_path: Path) -> None:
    from slmb.core.interop import import_checkpoint

    _save("orig", _gpt2_nodes(), "byte")
    export_hf("orig", tmp_path / "first")
    import_checkpoint(str(tmp_path / "first"), "back")
    result = export_hf("back", tmp_path / "second")
    assert not result.warnings and {"tokenizer.json", "tokenizer_config.json"} <= set(result.files)
    assert (tmp_path / "second" / "tokenizer.json").read_bytes() == (tmp_path / "first" / "tokenizer.json").read_bytes()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "second").encode("ok") == [111, 107]
    assert json.loads((tmp_path / "second" / "config.json").read_text())["eos_token_id"] == 256


@pytest.mark.parametrize(("tok_name", "vocab"), [("llama3", 128256), ("qwen3", 151669)])
def test_tiktoken_tokenizers_export_as_tokenizer_json(tmp_path: Path, tok_name: str, vocab: int) -> None:
    from slmb.core.tokenizers import load_tokenizer

    if tok_name == "qwen3":
        body = llama_body(_qwen3_cfg(vocab), qk_norm=True, model_family="qwen3")
    else:
        body = llama_body(_llama_cfg(vocab, tie_word_embeddings=True))
    _save("tk", body, tok_name)
    result = export_hf("tk", tmp_path / "out")
    assert "tokenizer.json" in result.files and not result.warnings
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ours = load_tokenizer(tok_name)
    text = "The quick brown fox's 12345 jumps  over\nthe lazy dog.\r\n\n  Ünïcödé 日本語 🙂 don't   I'LL 3.14159"
    assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text)
    assert len(hf_tok) == ours.vocab_size and hf_tok.eos_token_id == ours.eos_id
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["eos_token_id"] == ours.eos_id and cfg.get("bos_token_id") == ours.bos_id


def test_mixed_blocks_and_wrong_norm_name_the_node(tmp_path: Path) -> None:
    body = llama_body(_llama_cfg(BYTE_V))
    second = copy.deepcopy(body["model"][1])
    for child in second["children"]:
        child["data"]["id"] += "-b"
        if child["type"] == "residual":
            child["data"]["source"] = child["data"]["source"].replace(":in", "-b:in")
        if child["type"] == "feedForward":
            child["data"]["hiddenDim"] = 64
    body["model"].insert(2, second)
    _save("mixed", body, "byte")
    with pytest.raises(ExportError, match=r"node /model/2/children/4 .*feed-forward width is 64 here but 48"):
        export_hf("mixed", tmp_path / "out")
    body = llama_body(_llama_cfg(BYTE_V))
    body["model"][1]["children"][3]["data"]["normType"] = "Layer Normalization"
    _save("ln", body, "byte")
    with pytest.raises(ExportError, match=r"node /model/1/children/3 .*layernorm in a Llama/Qwen3"):
        export_hf("ln", tmp_path / "out")
