"""The request format (DESIGN.md §2): the canvas's bodies, old and new, its aliases, defaults and names."""

import copy
import json

import pytest

from slmb.core.compiler import plan
from slmb.core.spec import (
    Config,
    DropoutData,
    FeedForwardData,
    GQAttentionData,
    LinearData,
    MHAttentionData,
    NormalizationData,
    PositionalEmbeddingData,
    TrainRequest,
    TransformerBlockData,
)
from slmb.core.validate import validate


def load(shared, name):
    return json.loads((shared / "requests" / f"{name}-reference.json").read_text())


@pytest.mark.parametrize("name", ["gpt2", "llama3"])
def test_reference_canvases_validate_unchanged_and_without_warnings(shared, name):
    body = load(shared, name)
    before = copy.deepcopy(body)
    report = validate(body)
    assert report.ok, report.errors
    assert report.warnings == []
    assert body == before  # validation does not touch the body it was given


def test_reference_canvases_resolve_to_the_architecture_they_draw(shared):
    gpt2 = TrainRequest.model_validate(load(shared, "gpt2"))
    pos, block = gpt2.model[1], gpt2.model[3]
    assert pos.data.mode == "learned" and pos.data.ctx_length == 128
    assert block.data.num_blocks == 12 and len(block.children) == 8
    norm, attn, _, res = block.children[:4]
    assert norm.data.norm_type == "layernorm" and norm.data.resolved_eps == 1e-5
    assert attn.data.qkv_bias and attn.data.resolved_proj_bias and attn.data.dropout == 0.1
    assert res.data.target() == ("normalization-1758635395718", "in")
    assert block.children[5].data.act == "gelu" and block.children[5].data.bias

    llama = TrainRequest.model_validate(load(shared, "llama3"))
    gqa = llama.model[1].children[1].data
    assert (gqa.num_heads, gqa.num_kv_groups, gqa.rope_base, gqa.qk_norm_eps) == (32, 8, 500000, 1e-6)
    assert gqa.rope_config.is_llama3 and gqa.rope_config.factor == 32
    assert llama.config.rope_config.is_llama3  # sent as "rope_freq"
    ff = llama.model[1].children[4].data
    assert (ff.ff_type, ff.act, ff.hidden_dim) == ("gated", "swiglu", 8192)
    assert llama.model[-1].data.weight_tying and llama.model_name == "ref-llama3-full"


def short_form(pos_mode="learned"):
    """The older canvas body: short names, ``mode`` instead of ``posType``, a linear without bias/weightTying."""
    return {
        "config": {"vocab_size": 50257, "context_length": 64, "emb_dim": 64, "n_heads": 4, "n_blocks": 2},
        "model": [
            {"type": "tokenEmbedding", "data": {"vocabSize": 50257, "embDim": 64}},
            {"type": "positionalEmbedding", "data": {"ctxLength": 64, "embDim": 64, "mode": pos_mode}},
            {"type": "transformerBlock", "data": {"numOfBlocks": 2}, "children": [
                {"type": "normalization", "data": {"id": "ln1", "normType": "layernorm"}},
                {"type": "mhAttention", "data": {"numHeads": 4, "ctxLength": 64}},
                {"type": "residual", "data": {"source": "ln1"}},
                {"type": "normalization", "data": {"id": "ln2", "normType": "rmsnorm"}},
                {"type": "feedForward", "data": {"hiddenDim": 256, "actFunc": "gelu"}},
                {"type": "residual", "data": {"source": "ln2"}},
            ]},
            {"type": "normalization", "data": {"normType": "layernorm"}},
            {"type": "linear", "data": {"inDim": 64, "outDim": 50257}},
        ],
        "modelName": "short",
    }


@pytest.mark.parametrize("mode", ["learned", "rotary", "sinusoidal"])
def test_older_short_form_validates(mode):
    report = validate(short_form(mode))
    assert report.ok, report.errors
    assert report.warnings == []
    req = report.request
    assert req.model[1].data.mode == mode
    assert [c.data.norm_type for c in req.model[2].children if c.type == "normalization"] == ["layernorm", "rmsnorm"]
    head = req.model[-1].data
    assert head.bias is False and head.weight_tying is False
    attn = next(n for n in report.plan.walk() if n.type == "mhAttention")
    assert attn.args["rope"] is (mode == "rotary")  # a rotary marker turns RoPE on in later MHA


def test_ui_only_keys_are_ignored_without_warnings(shared):
    body = load(shared, "gpt2")
    ui = {"label": "x", "isCollapsed": True, "isLocked": False, "hideHandles": True, "inDim": 1, "outDim": 2}

    def decorate(nodes):
        for node in nodes:
            node["data"].update(ui)
            node.update(id="n", position={"x": 1, "y": 2}, selected=False, dragging=False, width=10, height=20)
            decorate(node.get("children", []))

    decorate(body["model"][:-1])  # the head's inDim/outDim are real
    body["model"][1]["data"]["vocabSize"] = 123  # the canvas sends vocabSize on positional embeddings
    report = validate(body)
    assert report.ok, report.errors
    assert report.warnings == []
    assert report.summary.total_parameters == 162_349_056  # and nothing of it reached a layer


# (model, data class, documented defaults as (attribute, value))
DEFAULTS = [
    (DropoutData, {"rate": 0.1}),
    (PositionalEmbeddingData, {"mode": "learned"}),
    (MHAttentionData, {"dropout": 0.0, "qkv_bias": False, "resolved_proj_bias": False, "rope_base": 10000}),
    (GQAttentionData, {"dropout": 0.0, "qkv_bias": False, "resolved_proj_bias": False, "rope_base": 10000,
                       "qk_norm": False, "qk_norm_eps": 1e-6, "head_dim": None, "rope_config": None}),
    (FeedForwardData, {"ff_type": "standard", "bias": False}),
    (LinearData, {"bias": False, "weight_tying": False}),
    (TransformerBlockData, {"num_blocks": 1}),
]


@pytest.mark.parametrize(("cls", "defaults"), DEFAULTS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("how", ["absent", "null"])
def test_absent_and_null_fields_take_the_documented_default(cls, defaults, how):
    fields = {"dropoutRate", "posType", "mode", "qkvBias", "projBias", "ropeBase", "qkNorm", "qkNormEps", "headDim",
              "ropeConfig", "feedForwardType", "bias", "weightTying", "numOfBlocks", "isRoPE"}
    data = cls.model_validate({k: None for k in fields} if how == "null" else {})
    for attr, value in defaults.items():
        assert getattr(data, attr) == value, attr


@pytest.mark.parametrize("value", [None, "absent"])
def test_norm_eps_default_depends_on_the_norm(value):
    extra = {} if value == "absent" else {"eps": None}
    assert NormalizationData.model_validate({"normType": "Layer Normalization", **extra}).resolved_eps == 1e-5
    assert NormalizationData.model_validate({"normType": "RMS Normalization", **extra}).resolved_eps == 1e-6
    assert NormalizationData.model_validate({"normType": "rmsnorm", "eps": 1e-5}).resolved_eps == 1e-5


def test_mha_proj_bias_follows_qkv_bias_unless_set():
    assert MHAttentionData.model_validate({"qkvBias": True}).resolved_proj_bias is True
    assert MHAttentionData.model_validate({"qkvBias": True, "projBias": None}).resolved_proj_bias is True
    assert MHAttentionData.model_validate({"qkvBias": True, "projBias": False}).resolved_proj_bias is False
    assert GQAttentionData.model_validate({"qkvBias": True}).resolved_proj_bias is False  # GQA: projBias (false)


def attention_args(node_type, **data):
    body = {"config": {"context_length": 16}, "model": [
        {"type": "tokenEmbedding", "data": {"vocabSize": 50257, "embDim": 32}},
        {"type": node_type, "data": {"numHeads": 4, **data}},
        {"type": "linear", "data": {"outDim": 50257}}]}
    return plan(TrainRequest.model_validate(body)).nodes[1].args


def test_rope_defaults_on_for_gqa_and_off_for_mha():
    assert attention_args("gqAttention")["rope"] is True
    assert attention_args("gqAttention", isRoPE=None)["rope"] is True
    assert attention_args("gqAttention", isRoPE=False)["rope"] is False
    assert attention_args("mhAttention")["rope"] is False
    assert attention_args("mhAttention", isRoPE=None)["rope"] is False
    gqa = attention_args("gqAttention")
    assert (gqa["num_kv_heads"], gqa["head_dim"], gqa["rope_base"]) == (4, 8, 10000)  # KV heads = heads by default


def test_whole_request_nulls_take_defaults(shared):
    body = load(shared, "gpt2")
    body.update(config=None, dataset=None, dataset_config=None)
    body["model"][3]["children"][1]["data"] = None
    req = validate(body)
    # A null mhAttention data takes every default, so the head count must come from somewhere else: the
    # config is null too, so that is reported, nothing crashes.
    assert [e.path for e in req.errors] == ["/model/3/children/1/data/numHeads"]
    body["config"] = {"n_heads": 12, "context_length": 128}
    req = validate(body).request
    assert req.dataset == "tiny_shakespeare" and req.dataset_config == "default"
    assert req.config.context_length == 128 and req.config.resolved_stride == 128
    assert req.model[3].children[1].data.num_heads is None and req.model[3].children[1].data.dropout == 0.0


def test_config_defaults_and_every_canvas_key_is_accepted(shared):
    c = Config.model_validate({})
    assert (c.model, c.context_length, c.resolved_stride, c.dtype, c.lr_schedule, c.device) == (
        "gpt-2", 128, 128, "auto", "cosine", "auto")
    assert c.tokenizer_name == "gpt2"
    canvas = {"model": "qwen3", "epochs": 2, "batch_size": 4, "vocab_size": 151936, "context_length": 64,
              "stride": 32, "emb_dim": 64, "n_heads": 4, "n_blocks": 2, "drop_rate": 0.0, "qkv_bias": False,
              "hidden_dim": 128, "rope_base": 1e6, "rope_config": None, "n_kv_groups": 2, "qk_norm": True,
              "qk_norm_eps": 1e-6, "head_dim": 16, "dtype": "bf16"}
    c = Config.model_validate(canvas)
    assert c.unknown_keys() == [] and c.resolved_stride == 32 and c.tokenizer_name == "qwen3"
    assert Config.model_validate({"dtype": "bfloat16"}).dtype == "bf16"


def test_rope_config_aliases_in_config_and_nodes():
    scaling = {"factor": 8, "low_freq_factor": 1, "high_freq_factor": 4, "original_context_length": 8192}
    for key in ("rope_config", "rope_freq"):
        assert Config.model_validate({key: scaling}).rope_config.is_llama3
    for key in ("ropeConfig", "rope_config", "rope_freq", "ropeFreq"):
        assert GQAttentionData.model_validate({key: scaling}).rope_config.factor == 8
    hf = {"factor": 8, "low_freq_factor": 1, "high_freq_factor": 4, "original_max_position_embeddings": 8192,
          "rope_type": "llama3"}
    assert GQAttentionData.model_validate({"ropeConfig": hf}).rope_config.is_llama3
    assert not GQAttentionData.model_validate({"ropeConfig": {"factor": 8}}).rope_config.is_llama3


@pytest.mark.parametrize(("key", "value", "mode"), [
    ("posType", "Learned Positional Embedding", "learned"), ("mode", "learned", "learned"),
    ("posType", "Sinusoidal Positional Embedding", "sinusoidal"), ("mode", "sinusoidal", "sinusoidal"),
    ("posType", "Rotary Positional Embedding", "rotary"), ("mode", "rotary", "rotary"),
    ("posType", "Relative Positional Embedding", "relative"), ("mode", "relative", "relative"),
    ("pos_type", " ROTARY ", "rotary"),
])
def test_positional_aliases(key, value, mode):
    assert PositionalEmbeddingData.model_validate({key: value}).mode == mode


@pytest.mark.parametrize(("value", "norm"), [("Layer Normalization", "layernorm"), ("layernorm", "layernorm"),
                                             ("RMS Normalization", "rmsnorm"), ("rmsnorm", "rmsnorm"),
                                             ("RMSNorm", "rmsnorm")])
def test_norm_aliases(value, norm):
    assert NormalizationData.model_validate({"normType": value}).norm_type == norm


@pytest.mark.parametrize(("value", "act"), [("GELU", "gelu"), ("relu", "relu"), ("SiLU", "silu"), ("swish", "silu"),
                                            ("SwiGLU", "swiglu"), ("gelu_tanh", "gelu_tanh"), ("Leaky", "leaky"),
                                            ("MISH", "mish")])
def test_activation_names_are_case_insensitive(value, act):
    assert FeedForwardData.model_validate({"actFunc": value}).act == act


def test_unknown_enum_values_are_errors_naming_the_choices():
    report = validate({"model": [{"type": "tokenEmbedding", "data": {"vocabSize": 10, "embDim": 8}},
                                 {"type": "positionalEmbedding", "data": {"posType": "Spiral"}},
                                 {"type": "feedForward", "data": {"actFunc": "tanhh"}},
                                 {"type": "linear", "data": {"outDim": 50257}}]})
    by_path = {e.path: e for e in report.errors}
    assert set(by_path) == {"/model/1/data/posType", "/model/2/data/actFunc"}
    assert "rotary" in by_path["/model/1/data/posType"].expected and by_path["/model/1/data/posType"].found == "Spiral"
    assert "swiglu" in by_path["/model/2/data/actFunc"].expected


@pytest.mark.parametrize("name", ["ex1", "a.b-c_d", "A", "9lives", "x" * 64, "ref-gpt2-full"])
def test_model_name_accepts_file_safe_names(name):
    assert TrainRequest.model_validate({"model": [{"type": "dropout"}], "modelName": name}).model_name == name


@pytest.mark.parametrize("name", ["../x", "", ".hidden", "a/b", "x" * 65, "modèle", "名前", "-x", "_x", "a b", "a\\b",
                                  "a\nb", "ex1\n", "x\u200b", "con:1"])
def test_model_name_rejects_anything_else(name):
    report = validate({"model": [{"type": "dropout"}], "modelName": name})
    errors = [e for e in report.errors if e.path == "/modelName"]
    assert len(errors) == 1 and "A-Za-z0-9" in errors[0].message and errors[0].found == name


def test_model_name_null_or_absent_is_allowed():
    assert TrainRequest.model_validate({"model": [{"type": "dropout"}], "modelName": None}).model_name is None
    assert TrainRequest.model_validate({"model": [{"type": "dropout"}]}).model_name is None
