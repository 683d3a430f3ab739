"""Toy-scale requests for trainer and CLI tests: a byte-level GPT with d=32, context 32, on tiny_shakespeare."""

from __future__ import annotations

from typing import Any


def run(body: dict[str, Any] | None, **kwargs: Any) -> tuple[Any, list]:
    """Train with every step reported (``step_every_s=0``, no MLflow unless ``track``); returns (result, events)."""
    from slmb.core import events as ev
    from slmb.core.trainer import train

    got: list = []
    kwargs.setdefault("track", False)
    result = train(body, sinks=[ev.CallbackSink(got.append), *kwargs.pop("sinks", [])], step_every_s=0, **kwargs)
    return result, got


def losses(events: list) -> dict[int, float]:
    """Each step event's loss, by step."""
    return {e.step: e.loss for e in events if e.name == "step"}


def toy_request(*, d: int = 32, blocks: int = 1, ctx: int = 32, vocab: int = 257, dropout: float = 0.0,
                name: str = "toy", dataset: str = "tiny_shakespeare", **config: Any) -> dict[str, Any]:
    """The JSON body of a tiny GPT-2-style canvas (tied LM head), with training keys for a few-step run."""
    cfg = {"model": "gpt-2", "tokenizer": "byte", "epochs": 1, "batch_size": 4, "context_length": ctx,
           "dtype": "fp32", "learning_rate": 3e-3, "warmup_steps": 0, "eval_every": 1000, "eval_batches": 2,
           "drop_rate": dropout, **config}
    block = [
        {"type": "normalization", "data": {"id": "ln1", "normType": "Layer Normalization"}},
        {"type": "mhAttention", "data": {"id": "attn", "numHeads": 2, "ctxLength": ctx, "dropoutRate": dropout}},
        {"type": "dropout", "data": {"id": "drop1", "dropoutRate": dropout}},
        {"type": "residual", "data": {"id": "res1", "source": "ln1"}},
        {"type": "normalization", "data": {"id": "ln2", "normType": "Layer Normalization"}},
        {"type": "feedForward", "data": {"id": "ff", "hiddenDim": 4 * d, "actFunc": "gelu"}},
        {"type": "residual", "data": {"id": "res2", "source": "ln2"}},
    ]
    return {
        "config": cfg,
        "model": [
            {"type": "tokenEmbedding", "data": {"id": "tok", "vocabSize": vocab, "embDim": d}},
            {"type": "positionalEmbedding", "data": {"id": "pos", "ctxLength": ctx, "embDim": d,
                                                     "posType": "Learned Positional Embedding"}},
            {"type": "dropout", "data": {"id": "drop0", "dropoutRate": dropout}},
            {"type": "transformerBlock", "data": {"id": "blocks", "numOfBlocks": blocks}, "children": block},
            {"type": "normalization", "data": {"id": "lnf", "normType": "Layer Normalization"}},
            {"type": "linear", "data": {"id": "head", "outDim": vocab, "weightTying": True}},
        ],
        "dataset": dataset,
        "dataset_config": "default",
        "modelName": name,
    }
