"""The request format (DESIGN.md §2): pydantic v2 models of what the front end sends.

The models accept the canvas's bodies unchanged. UI-only keys are ignored, other unknown keys are kept
(``model_extra``) so ``slmb validate`` can warn about them, and an absent or ``null`` field takes its
default. Fields that depend on the rest of the model (an embedding width, a head count) may be left out;
the compiler infers them from the chain or the config, and validation reports any it cannot.
"""

from __future__ import annotations

import functools
import re
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

# \Z, not $: "$" also matches before a trailing newline, and "ex1\n" must not name a file.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

# Keys the canvas adds for its own UI; accepted on every node and ignored without a warning.
UI_KEYS = frozenset({"id", "label", "isCollapsed", "isLocked", "hideHandles", "inDim", "outDim", "vocabSize",
                     "embDim", "ctxLength", "numHeads", "selected", "dragging", "position", "width", "height"})

# Upper bounds that keep a typo (an extra zero or six) from building a model nobody meant.
MAX_DIM = 1 << 20
MAX_VOCAB = 1 << 24
MAX_BLOCKS = 4096
MAX_CTX = 1 << 20
MAX_COUNT = 1 << 40  # steps, rows, intervals: far above any run, and within int64 (torch, numpy, MLflow's step)


def _drop_nulls(value: Any) -> Any:
    """A ``null`` from the canvas means "not set": drop it so the field's default applies."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    return value


@functools.cache
def _is_number_field(cls: type[BaseModel], name: str) -> bool:
    """The field takes an int or a float and not a bool (through ``Optional`` and ``Annotated``)."""
    found: set[type] = set()

    def walk(tp: Any) -> None:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            walk(typing.get_args(tp)[0])
        elif origin in (Union, types.UnionType):
            for arg in typing.get_args(tp):
                walk(arg)
        elif isinstance(tp, type):
            found.add(tp)

    field = cls.model_fields.get(name)
    if field is not None:
        walk(field.annotation)
    return bool(found & {int, float}) and bool not in found


def _no_bool_numbers(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """pydantic's lax mode reads ``true`` as 1 in a number field; a boolean there is a mistake, not a count."""
    if isinstance(value, bool) and info.field_name and _is_number_field(cls, info.field_name):
        raise PydanticCustomError("number_from_bool", "expected a number, found the boolean {value}",
                                  {"value": str(value).lower()})
    return value


class _Data(BaseModel):
    # JSON has no NaN or Infinity; Python's json module reads them anyway, and no layer wants one.
    model_config = ConfigDict(extra="allow", populate_by_name=True, str_strip_whitespace=True, allow_inf_nan=False)

    id: str | None = None

    _clean = model_validator(mode="before")(classmethod(lambda cls, v: _drop_nulls(v)))
    _numbers = field_validator("*", mode="before")(classmethod(_no_bool_numbers))

    def unknown_keys(self) -> list[str]:
        """Keys the data carried that slmb neither uses nor knows as UI-only."""
        return sorted(k for k in (self.model_extra or {}) if k not in UI_KEYS)


Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]
Rate = Annotated[float, Field(ge=0.0, lt=1.0)]


class RopeConfig(BaseModel):
    """Llama-3 style frequency scaling (HF ``rope_scaling`` with ``rope_type`` "llama3")."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)

    factor: float | None = Field(default=None, gt=0)
    low_freq_factor: float | None = Field(default=None, gt=0)
    high_freq_factor: float | None = Field(default=None, gt=0)
    original_context_length: int | None = Field(
        default=None, ge=1, le=MAX_CTX,
        validation_alias=AliasChoices("original_context_length", "original_max_position_embeddings"))
    rope_type: str | None = Field(default=None, validation_alias=AliasChoices("rope_type", "type"))

    _clean = model_validator(mode="before")(classmethod(lambda cls, v: _drop_nulls(v)))
    _numbers = field_validator("*", mode="before")(classmethod(_no_bool_numbers))

    @property
    def is_llama3(self) -> bool:
        keys = (self.factor, self.low_freq_factor, self.high_freq_factor, self.original_context_length)
        return all(k is not None for k in keys) and self.rope_type in (None, "llama3")


class TokenEmbeddingData(_Data):
    vocab_size: Annotated[int, Field(ge=1, le=MAX_VOCAB)] | None = Field(
        default=None, validation_alias=AliasChoices("vocabSize", "vocab_size"))
    emb_dim: Dim | None = Field(default=None, validation_alias=AliasChoices("embDim", "emb_dim"))


POS_MODES = {
    "learned": "learned", "learned positional embedding": "learned", "absolute": "learned",
    "sinusoidal": "sinusoidal", "sinusoidal positional embedding": "sinusoidal",
    "rotary": "rotary", "rotary positional embedding": "rotary", "rope": "rotary",
    "relative": "relative", "relative positional embedding": "relative",
}


class PositionalEmbeddingData(_Data):
    ctx_length: Annotated[int, Field(ge=1, le=MAX_CTX)] | None = Field(
        default=None, validation_alias=AliasChoices("ctxLength", "ctx_length", "context_length"))
    emb_dim: Dim | None = Field(default=None, validation_alias=AliasChoices("embDim", "emb_dim"))
    mode: Literal["learned", "sinusoidal", "rotary", "relative"] = Field(
        default="learned", validation_alias=AliasChoices("posType", "mode", "pos_type"))

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, v: Any) -> Any:
        # The canvas sends display names ("Rotary Positional Embedding"); older bodies send "rotary".
        if isinstance(v, str):
            return POS_MODES.get(v.strip().lower().replace("_", " "), v)
        return v


NORM_TYPES = {"layer normalization": "layernorm", "layernorm": "layernorm", "layer norm": "layernorm",
              "ln": "layernorm", "rms normalization": "rmsnorm", "rmsnorm": "rmsnorm", "rms norm": "rmsnorm",
              "rms": "rmsnorm"}


class NormalizationData(_Data):
    norm_type: Literal["layernorm", "rmsnorm"] = Field(
        default="layernorm", validation_alias=AliasChoices("normType", "norm_type"))
    eps: Annotated[float, Field(gt=0, lt=1)] | None = None
    bias: bool = True  # LayerNorm only; RMSNorm has no bias

    @field_validator("norm_type", mode="before")
    @classmethod
    def _norm(cls, v: Any) -> Any:
        return NORM_TYPES.get(v.strip().lower(), v) if isinstance(v, str) else v

    @property
    def resolved_eps(self) -> float:
        return self.eps if self.eps is not None else (1e-5 if self.norm_type == "layernorm" else 1e-6)


class _AttentionData(_Data):
    num_heads: Annotated[int, Field(ge=1, le=MAX_DIM)] | None = Field(
        default=None, validation_alias=AliasChoices("numHeads", "num_heads", "n_heads"))
    ctx_length: Annotated[int, Field(ge=1, le=MAX_CTX)] | None = Field(
        default=None, validation_alias=AliasChoices("ctxLength", "ctx_length", "context_length"))
    dropout: Rate = Field(default=0.0, validation_alias=AliasChoices("dropoutRate", "dropout_rate", "dropout"))
    qkv_bias: bool = Field(default=False, validation_alias=AliasChoices("qkvBias", "qkv_bias"))
    proj_bias: bool | None = Field(default=None, validation_alias=AliasChoices("projBias", "proj_bias"))
    rope_base: Annotated[float, Field(gt=1)] = Field(
        default=10000.0, validation_alias=AliasChoices("ropeBase", "rope_base", "rope_theta"))
    rope_config: RopeConfig | None = Field(
        default=None, validation_alias=AliasChoices("ropeConfig", "rope_config", "ropeFreq", "rope_freq"))


class MHAttentionData(_AttentionData):
    is_rope: bool | None = Field(default=None, validation_alias=AliasChoices("isRoPE", "isRope", "is_rope"))

    @property
    def resolved_proj_bias(self) -> bool:
        return self.qkv_bias if self.proj_bias is None else self.proj_bias


class GQAttentionData(_AttentionData):
    num_kv_groups: Annotated[int, Field(ge=1, le=MAX_DIM)] | None = Field(
        default=None, validation_alias=AliasChoices("numKvGroups", "num_kv_groups", "n_kv_groups", "numKvHeads"))
    head_dim: Annotated[int, Field(ge=1, le=MAX_DIM)] | None = Field(
        default=None, validation_alias=AliasChoices("headDim", "head_dim"))
    qk_norm: bool = Field(default=False, validation_alias=AliasChoices("qkNorm", "qk_norm"))
    qk_norm_eps: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=1e-6, validation_alias=AliasChoices("qkNormEps", "qk_norm_eps"))
    is_rope: bool | None = Field(default=None, validation_alias=AliasChoices("isRoPE", "isRope", "is_rope"))

    @property
    def resolved_proj_bias(self) -> bool:
        return bool(self.proj_bias)


ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelutanh": "gelu_tanh", "silu": "silu", "swish": "silu",
               "swiglu": "swiglu", "leaky": "leaky", "leaky_relu": "leaky", "leakyrelu": "leaky",
               "mish": "mish"}


class FeedForwardData(_Data):
    hidden_dim: Dim | None = Field(default=None, validation_alias=AliasChoices("hiddenDim", "hidden_dim"))
    ff_type: Literal["standard", "gated"] = Field(
        default="standard", validation_alias=AliasChoices("feedForwardType", "ffType", "ff_type"))
    act: Literal["relu", "gelu", "gelu_tanh", "silu", "swiglu", "leaky", "mish"] = Field(
        default="gelu", validation_alias=AliasChoices("actFunc", "activation", "act"))
    bias: bool = False

    @field_validator("ff_type", mode="before")
    @classmethod
    def _fft(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("act", mode="before")
    @classmethod
    def _act(cls, v: Any) -> Any:
        if isinstance(v, str):
            key = v.strip().lower().replace("-", "_").replace(" ", "_")
            return ACTIVATIONS.get(key, v)
        return v


class ResidualData(_Data):
    source: Annotated[str, Field(min_length=1)]

    def target(self) -> tuple[str, str]:
        """(node id, "in" | "out"): a bare id means the input the node received (DESIGN.md §2.2)."""
        head, sep, tail = self.source.rpartition(":")
        if sep and tail in ("in", "out") and head:
            return head, tail
        return self.source, "in"


class TransformerBlockData(_Data):
    num_blocks: Annotated[int, Field(ge=1, le=MAX_BLOCKS)] = Field(
        default=1, validation_alias=AliasChoices("numOfBlocks", "numBlocks", "num_blocks", "n_blocks"))


class LinearData(_Data):
    in_dim: Dim | None = Field(default=None, validation_alias=AliasChoices("inDim", "in_dim"))
    out_dim: Annotated[int, Field(ge=1, le=MAX_VOCAB)] | None = Field(
        default=None, validation_alias=AliasChoices("outDim", "out_dim"))
    bias: bool = False
    weight_tying: bool = Field(default=False, validation_alias=AliasChoices("weightTying", "weight_tying"))


class DropoutData(_Data):
    rate: Rate = Field(default=0.1, validation_alias=AliasChoices("dropoutRate", "dropout_rate", "rate", "p"))


class _Node(BaseModel):
    model_config = ConfigDict(extra="allow")

    _clean = model_validator(mode="before")(classmethod(lambda cls, v: _drop_nulls(v)))

    def unknown_keys(self) -> list[str]:
        return sorted(k for k in (self.model_extra or {}) if k not in UI_KEYS)


def _node(type_name: str, data_cls: type[_Data], *, optional_data: bool = True) -> type[_Node]:
    default = Field(default_factory=data_cls) if optional_data else ...
    ns = {"__annotations__": {"type": Literal[type_name], "data": data_cls}, "data": default,
          "__module__": __name__, "__doc__": f"A ``{type_name}`` node."}
    cls = type(type_name[0].upper() + type_name[1:] + "Node", (_Node,), ns)
    return cls


TokenEmbeddingNode = _node("tokenEmbedding", TokenEmbeddingData)
PositionalEmbeddingNode = _node("positionalEmbedding", PositionalEmbeddingData)
NormalizationNode = _node("normalization", NormalizationData)
MHAttentionNode = _node("mhAttention", MHAttentionData)
GQAttentionNode = _node("gqAttention", GQAttentionData)
FeedForwardNode = _node("feedForward", FeedForwardData)
ResidualNode = _node("residual", ResidualData, optional_data=False)
LinearNode = _node("linear", LinearData)
DropoutNode = _node("dropout", DropoutData)


class TransformerBlockNode(_Node):
    type: Literal["transformerBlock"]
    data: TransformerBlockData = Field(default_factory=TransformerBlockData)
    children: list[Node] = Field(default_factory=list)


Node = Annotated[
    Union[TokenEmbeddingNode, PositionalEmbeddingNode, NormalizationNode, MHAttentionNode,  # noqa: UP007
          GQAttentionNode, FeedForwardNode, ResidualNode, TransformerBlockNode, LinearNode, DropoutNode],
    Field(discriminator="type"),
]
NODE_TYPES = ("tokenEmbedding", "positionalEmbedding", "normalization", "mhAttention", "gqAttention",
              "feedForward", "residual", "transformerBlock", "linear", "dropout")
TransformerBlockNode.model_rebuild()


class Config(BaseModel):
    """``config``: the canvas's documentation keys plus slmb's optional training keys (DESIGN.md §2.1)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)
    _numbers = field_validator("*", mode="before")(classmethod(_no_bool_numbers))

    # Keys the canvas sends. The architecture comes from the nodes; these document it for the UI.
    model: str = "gpt-2"
    epochs: Annotated[int, Field(ge=1, le=100_000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=1 << 16)] = 8
    vocab_size: Annotated[int, Field(ge=1, le=MAX_VOCAB)] | None = None
    context_length: Annotated[int, Field(ge=1, le=MAX_CTX)] = 128
    stride: Annotated[int, Field(ge=1, le=MAX_CTX)] | None = None
    emb_dim: Dim | None = None
    n_heads: Dim | None = None
    n_blocks: Annotated[int, Field(ge=1, le=MAX_BLOCKS)] | None = None
    drop_rate: Rate | None = None
    qkv_bias: bool | None = None
    hidden_dim: Dim | None = None
    rope_base: Annotated[float, Field(gt=1)] | None = None
    rope_config: RopeConfig | None = Field(default=None, validation_alias=AliasChoices("rope_config", "rope_freq"))
    n_kv_groups: Dim | None = None
    qk_norm: bool | None = None
    qk_norm_eps: Annotated[float, Field(gt=0, lt=1)] | None = None
    head_dim: Dim | None = None
    # Compute precision; "auto" (the default) = bf16 where the device has it natively and it pays, else fp32.
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"

    # slmb's training keys.
    tokenizer: str | None = None
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 3e-4
    min_lr: Annotated[float, Field(ge=0, le=10)] | None = None
    weight_decay: Annotated[float, Field(ge=0, le=10)] = 0.1
    warmup_steps: Annotated[int, Field(ge=0, le=MAX_COUNT)] | None = Field(None, description=(
        "Optimizer steps of linear warmup to learning_rate. Default: a tenth of the run's optimizer steps, at most "
        "100 (a 37-step run warms up for 3), so that a short run still reaches its learning rate."))
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_accum_steps: Annotated[int, Field(ge=1, le=1 << 16)] = 1
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    max_steps: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    eval_every: Annotated[int, Field(ge=1, le=MAX_COUNT)] = 100
    # Each is a forward pass over fixed batches (held in memory), per split: 4 keep evaluation at ~3% of the loop
    # on the benchmark canvas (20 cost 13.5%: docs/benchmarks.md "Loop overhead").
    eval_batches: Annotated[int, Field(ge=1, le=10_000)] = 4
    early_stopping_patience: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    seed: Annotated[int, Field(ge=0, lt=1 << 64)] = 1337  # what torch.manual_seed and numpy both take
    device: str = "auto"
    compile: bool | Literal["auto"] = Field("auto", description=(
        "torch.compile the model's loss (trunk and LM-head cross-entropy). 'auto' (the default) compiles on CUDA "
        "when the run is estimated to last long enough to repay the compile time (the started event's "
        "compile.reason says why); on a CPU it does not compile, where it did not pay (docs/benchmarks.md)."))
    cuda_graphs: bool = Field(False, description=(
        "Replay the compiled forward and backward passes as CUDA graphs (torch.compile mode 'reduce-overhead'): "
        "fewer kernel launches, which pays most for small models and batches. Implies compile on CUDA; no effect "
        "on other devices, on several processes or with grad_accum_steps above 1 (a warning says so)."))
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    max_rows: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    text_field: str = "text"
    checkpoint_every: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    # Several processes (torchrun; docs/distributed.md): "ddp" replicates the model, "fsdp" shards it (FSDP2),
    # "auto" picks DDP when a replica fits the device and FSDP otherwise. batch_size is the global batch.
    distributed: Literal["auto", "ddp", "fsdp"] = Field("auto", description=(
        "How a run started on several processes (slmb train --nproc-per-node N, or torchrun) trains: 'ddp' "
        "replicates the model on every device, 'fsdp' shards weights, gradients and optimizer states (FSDP2), "
        "'auto' picks DDP when a replica fits the device's memory and FSDP otherwise. batch_size is the global "
        "batch, split evenly over the processes. No effect on a one-process run."))
    init_from: Annotated[str, Field(min_length=1, max_length=4096)] | None = Field(None, description=(
        "Start from pretrained weights instead of a random initialisation: the name of a completed model in the "
        "store (e.g. one made by `slmb import`), or, from the CLI only, a transformers checkpoint directory or a "
        "model id in the local Hugging Face cache. The canvas must match the weights shape for shape (else the run "
        "fails listing every mismatch); it may change dropout, and the context length: any length with RoPE, up to "
        "the table's rows with learned positions (the first rows are used). Over HTTP only store names are "
        "accepted."))
    activation_checkpointing: bool = Field(False, description=(
        "Recompute each transformer block's activations during the backward pass instead of keeping them: "
        "less memory for about a third more compute. Any run, one process or several."))

    _clean = model_validator(mode="before")(classmethod(lambda cls, v: _drop_nulls(v)))

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v: Any) -> Any:
        aliases = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "fp32": "fp32",
                   "fp16": "fp16", "bf16": "bf16", "auto": "auto"}
        return aliases.get(v.strip().lower(), v) if isinstance(v, str) else v

    @field_validator("compile", mode="before")
    @classmethod
    def _compile(cls, v: Any) -> Any:
        """true, false or "auto" (also as the strings "true"/"false"); anything else is one clear error, not one
        per member of the union."""
        if isinstance(v, str) and v.strip().lower() in ("auto", "true", "false"):
            return {"auto": "auto", "true": True, "false": False}[v.strip().lower()]
        if isinstance(v, bool):
            return v
        raise PydanticCustomError("compile_choice", 'compile must be true, false or "auto", not {value}',
                                  {"value": repr(v)})

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError("device must be auto, cpu, cuda, cuda:N or mps")
        return v

    @property
    def resolved_stride(self) -> int:
        return self.stride or self.context_length

    def resolved_warmup(self, total_steps: int) -> int:
        """The warmup of a run of ``total_steps`` optimizer steps: ``warmup_steps`` as given, else
        min(100, total_steps // 10). A resumed run has the same total, so the same warmup."""
        return self.warmup_steps if self.warmup_steps is not None else min(100, total_steps // 10)

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer to train with: the override, else the family's default."""
        return self.tokenizer or {"gpt-2": "gpt2", "gpt2": "gpt2"}.get(self.model, self.model)

    def unknown_keys(self) -> list[str]:
        return sorted(self.model_extra or {})


class TrainRequest(BaseModel):
    """The POST body of ``/api/v1/train-complete-model`` and the file given to ``slmb train``."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    config: Config = Field(default_factory=Config)
    model: Annotated[list[Node], Field(min_length=1)]
    dataset: str = "tiny_shakespeare"
    dataset_config: str | None = "default"
    model_name: str | None = Field(default=None, validation_alias=AliasChoices("modelName", "model_name"),
                                   serialization_alias="modelName")

    _clean = model_validator(mode="before")(classmethod(lambda cls, v: _drop_nulls(v)))

    @field_validator("model_name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_NAME_RE.match(v):
            raise ValueError("modelName must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ (it names files)")
        return v

    def unknown_keys(self) -> list[str]:
        return sorted(self.model_extra or {})


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the request, as ``slmb schema`` prints it."""
    return TrainRequest.model_json_schema(by_alias=True)
