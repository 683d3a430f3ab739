"""Validation (DESIGN.md §2.3): the schema pass, then a registry of small named semantic checks.

Every problem is reported at once, each with a JSON pointer into the request, what was expected, what was
found and a hint. A request that passes is built on the meta device to report parameter counts, per-node
output shapes and a memory estimate without allocating any weights.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError

from slmb.core.compiler import Plan, PlanNode, plan
from slmb.core.spec import NODE_TYPES, TrainRequest

MAX_DEPTH = 64  # JSON nesting; the deepest real canvas is about 6
MAX_EXPANDED_NODES = 20_000  # nodes after repeating blocks: far above any model one trains with slmb
BIG_WEIGHTS_BYTES = 64 << 30


@dataclass
class Issue:
    path: str  # JSON pointer, "" for the whole body
    message: str
    expected: str | None = None
    found: Any = None
    hint: str | None = None
    check: str = "schema"
    severity: str = "error"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NodeRow:
    path: str
    type: str
    name: str
    output_shape: str
    parameters: int
    depth: int
    repeat: int = 1
    note: str = ""


@dataclass
class Summary:
    total_parameters: int
    trainable_parameters: int
    rows: list[NodeRow]
    memory: dict[str, Any]  # bytes, and the device and dtype they were estimated for
    vocab_size: int
    context_length: int
    estimate: Any = field(default=None, repr=False)  # memory.MemoryEstimate


@dataclass
class Report:
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    request: TrainRequest | None = None
    plan: Plan | None = None
    summary: Summary | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"valid": self.ok, "errors": [e.to_dict() for e in self.errors],
                               "warnings": [w.to_dict() for w in self.warnings]}
        if self.summary:
            out["summary"] = {k: v for k, v in asdict(self.summary).items() if k != "estimate"}
        return out


class RequestInvalidError(ValueError):
    """Raised by callers that need a valid request (train, the API); carries every issue."""

    def __init__(self, report: Report):
        self.report = report
        lines = [f"{e.path or '/'}: {e.message}" for e in report.errors]
        super().__init__("invalid request:\n  " + "\n  ".join(lines))


def pointer(*parts: Any) -> str:
    """A JSON pointer (RFC 6901) from path parts."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def validate(body: Any, *, build: bool = True, admit: bool = False, memory_limit: int | None = None,
             world_size: int = 1) -> Report:
    """Validate a request body (the parsed JSON). Never raises for bad input: problems go into the report.

    ``admit``: also refuse a run whose estimated peak memory (``summary.memory``) is more than ``memory_limit``
    bytes, or without one, than a worker here may use (``memory.worker_memory``: $SLMB_WORKER_MEMORY or the
    machine's RAM / GPU memory). ``world_size``: the run will train on that many processes (devices); the
    estimate is then one device's, for ``config.distributed`` (for "auto", DDP when a replica fits the limit,
    else FSDP) and ``batch_size`` must split evenly over them."""
    report = Report()
    depth_issue = _too_deep(body)
    if depth_issue:
        report.errors.append(depth_issue)
        return report
    report.errors.extend(_not_json(body))
    if report.errors:
        return report
    try:
        report.request = TrainRequest.model_validate(body)
    except ValidationError as exc:
        report.errors.extend(schema_issue(err) for err in exc.errors())
        return report
    report.plan = plan(report.request)
    for name, fn in CHECKS.items():
        for issue in fn(report.plan):
            issue.check = name
            (report.errors if issue.severity == "error" else report.warnings).append(issue)
    if world_size > 1:
        report.errors.extend(_split_batch(report.request.config.batch_size, world_size))
    if report.ok and build:
        report.summary = (summarize(report.plan) if world_size <= 1
                          else _resolved_summary(report.plan, None, world_size, memory_limit))
        if admit:
            report.errors.extend(admission(report.summary, memory_limit))
        weights = report.summary.memory["weights_fp32"]
        if weights > BIG_WEIGHTS_BYTES and report.ok:
            report.warnings.append(Issue("", f"the weights alone need {weights / 2**30:,.0f} GiB in fp32",
                                         hint="check the dimensions for a typo", check="size",
                                         severity="warning"))
    return report


def admission(summary: Summary, limit: int | None = None) -> list[Issue]:
    """The memory error of a model whose estimated peak is over ``limit`` (see ``validate``), or none. The
    estimate is the summary's: one process, or one device of its distributed strategy."""
    from slmb.core import memory

    est = summary.estimate
    limit, source = memory.worker_memory(est.device, limit)
    message = memory.check(est, limit, source)
    if message is None:
        return []
    return [Issue("/model" if est.per_parameter >= est.training_pass else "/config/batch_size", message,
                  expected=f"<= {memory.human_bytes(limit)}", found=memory.human_bytes(est.demand),
                  hint=memory.hint(est), check="memory")]


def memory_refusal(request: TrainRequest, device: str | None = None, *, world_size: int = 1,
                   strategy: str | None = None) -> str | None:
    """The trainer's own admission check on the device it resolved (a worker may have less memory than the API
    that queued the run assumed): why the run cannot fit, and what to change; None when it fits. With
    ``world_size`` > 1 and no ``strategy``, the strategy ``choose_strategy`` would pick is judged."""
    p = plan(request)
    if strategy is None and world_size > 1:
        summary = _resolved_summary(p, device, world_size, None)
    else:
        summary = summarize(p, device, world_size=world_size, strategy=strategy)
    issues = admission(summary)
    return f"{issues[0].message}. To fit: {issues[0].hint}" if issues else None


def choose_strategy(request: TrainRequest, device: str | None, world_size: int) -> str:
    """How a run on ``world_size`` processes trains: "ddp" or "fsdp". ``config.distributed`` when it names one;
    for "auto", DDP when a full replica fits the worker's memory (``memory.worker_memory(device)``): it
    communicates least; else FSDP, which shards weights, gradients and AdamW states over the devices.

    Raises:
        memory.MemoryLimitError: "auto", and not even FSDP over ``world_size`` devices fits.
    """
    from slmb.core import memory

    if request.config.distributed != "auto":
        return request.config.distributed
    est = _resolved_summary(plan(request), device, world_size, None).estimate
    limit, source = memory.worker_memory(device or request.config.device)
    message = memory.check(est, limit, source)
    if message is not None:
        devices = f"{world_size} device{'s' if world_size > 1 else ''}"
        raise memory.MemoryLimitError(f"distributed 'auto': not even FSDP (full sharding over {devices}) fits: "
                                      f"{message}. To fit: {memory.hint(est)}")
    return est.strategy


def _resolved_summary(p: Plan, device: str | None, world_size: int, limit: int | None) -> Summary:
    """The summary for ``world_size`` processes under ``config.distributed``; "auto" is DDP when its estimate
    fits ``limit`` (default: what a worker may use), else FSDP (even when that does not fit either: admission,
    or choose_strategy, says so)."""
    from slmb.core import memory

    wanted = p.request.config.distributed
    built = meta_build(p)
    if wanted != "auto":
        return summarize(p, device, world_size=world_size, strategy=wanted, built=built)
    ddp = summarize(p, device, world_size=world_size, strategy="ddp", built=built)
    limit, source = memory.worker_memory(device or p.request.config.device, limit)
    if memory.check(ddp.estimate, limit, source) is None:
        return ddp
    return summarize(p, device, world_size=world_size, strategy="fsdp", built=built)


def _split_batch(batch_size: int, world_size: int) -> list[Issue]:
    if batch_size % world_size == 0:
        return []
    lower, upper = batch_size // world_size * world_size, -(-batch_size // world_size) * world_size
    options = " or ".join(str(b) for b in (lower, upper) if b)
    return [Issue("/config/batch_size", f"batch_size {batch_size} does not split evenly over {world_size} "
                  f"processes: batch_size is the global batch, {world_size} processes take batch_size / "
                  f"{world_size} rows each", expected=f"a multiple of {world_size}", found=batch_size,
                  hint=f"use batch_size {options} (grad_accum_steps keeps a larger effective batch)",
                  check="distributed")]


def require_valid(body: Any) -> Report:
    report = validate(body)
    if not report.ok:
        raise RequestInvalidError(report)
    return report


def _too_deep(body: Any) -> Issue | None:
    stack: list[tuple[Any, tuple, int]] = [(body, (), 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            return Issue(pointer(*path), f"nesting deeper than {MAX_DEPTH} levels", expected=f"<= {MAX_DEPTH}",
                         found=depth, hint="transformerBlock children nest only a few levels in a real model")
        if isinstance(value, dict):
            stack.extend((v, (*path, k), depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, (*path, i), depth + 1) for i, v in enumerate(value))
    return None


def _not_json(body: Any, limit: int = 20) -> list[Issue]:
    """Values that JSON cannot carry but Python's json module reads anyway: NaN, Infinity and lone UTF-16
    surrogates ("\\ud800"). Nothing downstream can use them, and a report that held one could not be sent."""
    issues: list[Issue] = []
    stack: list[tuple[Any, tuple]] = [(body, ())]
    while stack and len(issues) < limit:
        value, path = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            found = "NaN" if math.isnan(value) else ("-" if value < 0 else "") + "Infinity"
            issues.append(Issue(pointer(*path), "not a finite number", expected="a finite number", found=found,
                                hint=_TYPE_HINTS["finite_number"]))
        elif isinstance(value, str) and unencodable(value):
            issues.append(Issue(pointer(*path), "the text holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                                "escape)", found=value.encode("utf-8", "backslashreplace").decode()[:80],
                                hint=_TYPE_HINTS["string_unicode"]))
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str) and unencodable(k):
                    issues.append(Issue(pointer(*path), "a key holds a lone UTF-16 surrogate",
                                        found=k.encode("utf-8", "backslashreplace").decode()[:80],
                                        hint=_TYPE_HINTS["string_unicode"]))
                else:
                    stack.append((v, (*path, k)))
        elif isinstance(value, list):
            stack.extend((v, (*path, i)) for i, v in enumerate(value))
    return sorted(issues, key=lambda i: i.path)


def unencodable(text: str) -> bool:
    """A lone surrogate (``"\\ud800"`` in JSON) is no character: it cannot be encoded, tokenized or sent back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _short(value: Any, limit: int = 80) -> Any:
    if isinstance(value, int) and value.bit_length() > 64:
        # Python will not print an int of more than 4300 digits, and no field takes one: give its magnitude.
        return f"{'-' if value < 0 else ''}~10^{int(value.bit_length() * math.log10(2))}"
    if isinstance(value, bool | int | float) or value is None:
        return value
    try:
        text = value if isinstance(value, str) else repr(value)
    except ValueError:  # such an int inside a list or object
        text = f"<{type(value).__name__} holding a number too long to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def schema_issue(err: dict) -> Issue:
    """A pydantic error (``loc`` relative to the request body) as an issue with a JSON pointer and a hint."""
    loc = list(err["loc"])
    # A discriminated union puts the tag in the location (model/3/mhAttention/data): drop it.
    parts = [p for i, p in enumerate(loc) if not (p in NODE_TYPES and i > 0 and isinstance(loc[i - 1], int))]
    path = pointer(*parts)
    kind, found = err["type"], _short(err.get("input"))
    if kind == "union_tag_invalid":
        tag = err["ctx"]["tag"]
        return Issue(pointer(*parts, "type"), f"unknown node type {tag!r}", expected=f"one of {', '.join(NODE_TYPES)}",
                     found=_short(tag), hint="node types are case-sensitive, as the canvas sends them")
    if kind == "union_tag_not_found":
        return Issue(pointer(*parts, "type"), "node has no 'type'", expected=f"one of {', '.join(NODE_TYPES)}",
                     found=None, hint='every node needs "type" and "data"')
    if kind == "missing":
        return Issue(path, f"required field '{parts[-1]}' is missing", expected="a value", found=None,
                     hint=_MISSING_HINTS.get(str(parts[-1])))
    msg = err["msg"].removeprefix("Value error, ")
    expected = None
    ctx = err.get("ctx") or {}
    for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx:
            expected = f"{op} {ctx[key]}" if expected is None else f"{expected} and {op} {ctx[key]}"
    if "expected" in ctx:
        expected = f"one of {ctx['expected']}"
    hint = _TYPE_HINTS.get(kind) or _FIELD_HINTS.get(str(parts[-1]) if parts else "")
    return Issue(path, msg, expected=expected, found=found, hint=hint)


_MISSING_HINTS = {
    "model": 'the request needs "model": a list of nodes, starting with a tokenEmbedding',
    "source": 'a residual names an earlier node: "<id>", "<id>:in" or "<id>:out"',
}
_TYPE_HINTS = {
    "int_parsing": "send a whole number", "int_type": "send a whole number",
    "int_from_float": "send a whole number", "float_parsing": "send a number", "bool_parsing": "send true or false",
    "number_from_bool": "send a number: true and false are not counts or rates",
    "list_type": "send a JSON array", "model_type": "send a JSON object", "dict_type": "send a JSON object",
    "model_attributes_type": "send a JSON object", "too_short": "the list may not be empty",
    "float_type": "send a number", "bool_type": "send true or false", "string_type": "send a string",
    "string_too_short": "the text may not be empty", "string_unicode": "send valid UTF-8 text",
    "finite_number": "JSON has no NaN or Infinity: send a finite number",
    "literal_error": "use one of the listed values",
    "less_than_equal": "the limit keeps a typo (an extra zero) from building a model nobody meant",
}
# value_error messages come from the spec's own validators; say how to fix them.
_FIELD_HINTS = {"modelName": 'use letters, digits, ".", "_" and "-" (it names files), e.g. "my-model.v2"'}


# -- semantic checks ----------------------------------------------------------------------------------------

Check = Callable[[Plan], Iterator[Issue]]
CHECKS: dict[str, Check] = {}


def check(name: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        CHECKS[name] = fn
        return fn

    return register


def _data(node: PlanNode, key: str) -> str:
    return f"{node.ptr}/data/{key}"


@check("structure")
def check_structure(p: Plan) -> Iterator[Issue]:
    if p.nodes[0].type != "tokenEmbedding":
        yield Issue("/model/0/type", "the first node must be a tokenEmbedding", expected="tokenEmbedding",
                    found=p.nodes[0].type, hint="the model turns token ids into vectors first")
    for node in p.walk():
        if node.type == "tokenEmbedding" and node is not p.nodes[0]:
            yield Issue(f"{node.ptr}/type", "a tokenEmbedding can only be the first node", expected="one, first",
                        found="another one here", hint="remove it, or move it to the top of the chain")
        if node.type == "transformerBlock" and not node.children:
            yield Issue(f"{node.ptr}/children", "transformerBlock has no children", expected="at least one node",
                        found=[], hint="put the block's nodes (norm, attention, residual, ...) in children")
    expanded = _expanded(p.nodes)
    if expanded > MAX_EXPANDED_NODES:
        yield Issue("/model", f"the model expands to {expanded:,} nodes", expected=f"<= {MAX_EXPANDED_NODES:,}",
                    found=expanded, hint="check numOfBlocks for a typo")


def _expanded(nodes: list[PlanNode]) -> int:
    return sum(1 + n.repeat * _expanded(n.children) for n in nodes)


# (node type, resolved arg) -> (data key to point at, config key that can supply it)
_REQUIRED = {
    ("tokenEmbedding", "vocab_size"): ("vocabSize", "vocab_size"),
    ("tokenEmbedding", "emb_dim"): ("embDim", "emb_dim"),
    ("mhAttention", "num_heads"): ("numHeads", "n_heads"),
    ("gqAttention", "num_heads"): ("numHeads", "n_heads"),
    ("linear", "out_dim"): ("outDim", "vocab_size"),
}


@check("required")
def check_required(p: Plan) -> Iterator[Issue]:
    for node in p.walk():
        for (type_name, arg), (key, config_key) in _REQUIRED.items():
            if node.type == type_name and node.args.get(arg) is None:
                yield Issue(_data(node, key), f"{type_name} needs {key}", expected="a positive whole number",
                            found=None, hint=f"set data.{key}, or config.{config_key} for every node")


@check("widths")
def check_widths(p: Plan) -> Iterator[Issue]:
    for node in p.walk():
        a, w = node.args, node.in_width
        if w is None:
            continue
        if node.type == "positionalEmbedding" and a["declared_emb_dim"] not in (None, w) and a["windowed"]:
            yield Issue(_data(node, "embDim"), "positional embedding width differs from the hidden width",
                        expected=str(w), found=a["declared_emb_dim"], hint="use the token embedding's embDim")
        if node.type == "linear" and a["declared_in_dim"] not in (None, w):
            yield Issue(_data(node, "inDim"), "linear inDim differs from the width of its input",
                        expected=str(w), found=a["declared_in_dim"],
                        hint="inDim must equal the outDim/embDim of the node before it")


@check("attention_heads")
def check_heads(p: Plan) -> Iterator[Issue]:
    for node in p.walk():
        if node.type not in ("mhAttention", "gqAttention") or node.in_width is None or not node.args["num_heads"]:
            continue
        a, E = node.args, node.in_width
        explicit_head_dim = node.type == "gqAttention" and node.spec.data.head_dim
        if not explicit_head_dim and E % a["num_heads"]:
            yield Issue(_data(node, "numHeads"), f"embedding width {E} is not divisible by numHeads",
                        expected=f"a divisor of {E}", found=a["num_heads"],
                        hint="each head takes embDim / numHeads channels"
                        + (", or set headDim explicitly" if node.type == "gqAttention" else ""))
        if node.type == "gqAttention" and a["num_heads"] % a["num_kv_heads"]:
            yield Issue(_data(node, "numKvGroups"), "numHeads must be a multiple of numKvGroups (the KV heads)",
                        expected=f"a divisor of {a['num_heads']}", found=a["num_kv_heads"],
                        hint="each KV head serves numHeads / numKvGroups query heads")
        if a["rope"] and a["head_dim"] and a["head_dim"] % 2:
            yield Issue(_data(node, "numHeads"), f"RoPE needs an even head dimension, got {a['head_dim']}",
                        expected="even head_dim", found=a["head_dim"],
                        hint="change numHeads/headDim, or set isRoPE: false")


@check("context_length")
def check_context(p: Plan) -> Iterator[Issue]:
    T = p.request.config.context_length
    for node in p.walk():
        n = node.args.get("ctx_length")
        if node.args.get("windowed") and n is not None and n < T:
            yield Issue(_data(node, "ctxLength"), f"ctxLength {n} is shorter than config.context_length {T}",
                        expected=f">= {T}", found=n, hint="training windows hold context_length tokens")


@check("residual_sources")
def check_residuals(p: Plan) -> Iterator[Issue]:
    yield from _residuals_in(p.nodes, {n.spec.data.id for n in p.walk()})


def _residuals_in(scope: list[PlanNode], all_ids: set) -> Iterator[Issue]:
    # The id lists are built once per scope: a canvas with thousands of residuals must not validate in O(n²).
    ids = [n.spec.data.id for n in scope]
    counts = Counter(ids)
    for pos, node in enumerate(scope):
        yield from _residuals_in(node.children, all_ids)
        if node.type != "residual":
            continue
        a, path = node.args, _data(node, "source")
        earlier = [i for i in ids[:pos] if i]
        hint = f"earlier nodes in this scope: {', '.join(earlier[:8])}" if earlier else "no earlier node here"
        if a["index"] is None:
            where = "is not a node in this scope"
            if a["target"] == node.spec.data.id:
                where = "points at the residual itself"
            elif a["target"] in counts:
                where = "comes later in this scope"
            elif a["target"] in all_ids:
                where = "is in another scope (a residual joins nodes of the same chain or block copy)"
            yield Issue(path, f"residual source '{a['target']}' {where}", expected="an earlier node's id",
                        found=_short(node.spec.data.source), hint=hint)
            continue
        if counts[a["target"]] > 1:
            yield Issue(path, f"residual source '{a['target']}' names more than one node", expected="a unique id",
                        found=_short(node.spec.data.source), hint="give every node its own id")
        src = scope[a["index"]]
        width = src.in_width if a["which"] == "in" else src.out_width
        if width is None and node.in_width is not None:
            # The input of the token embedding is the ids [B, T], not a hidden state.
            yield Issue(path, f"residual source '{a['target']}' is the token ids, not a hidden state",
                        expected="a node after the token embedding, or its output", found=_short(node.spec.data.source),
                        hint=f"use '{a['target']}:out' for the embedding's output")
        elif None not in (width, node.in_width) and width != node.in_width:
            yield Issue(path, f"residual adds a width-{width} skip to a width-{node.in_width} hidden state",
                        expected=str(node.in_width), found=width, hint="residuals join tensors of the same width")


@check("blocks")
def check_blocks(p: Plan) -> Iterator[Issue]:
    for node in p.walk():
        widths = (node.in_width, node.out_width)
        if node.type == "transformerBlock" and node.repeat > 1 and None not in widths and widths[0] != widths[1]:
            yield Issue(_data(node, "numOfBlocks"), "a repeated block must keep the hidden width",
                        expected=f"children ending at width {node.in_width}", found=node.out_width,
                        hint="the block's output feeds its next copy")


@check("activations")
def check_activations(p: Plan) -> Iterator[Issue]:
    for node in p.walk():
        if node.type == "feedForward" and node.args["act"] == "swiglu" and not node.args["gated"]:
            yield Issue(_data(node, "actFunc"), "SwiGLU is a gated activation", expected='feedForwardType "Gated"',
                        found="Standard", hint='use "Gated" with SwiGLU, or SiLU with "Standard"')


@check("weight_tying")
def check_tying(p: Plan) -> Iterator[Issue]:
    emb = p.nodes[0] if p.nodes[0].type == "tokenEmbedding" else None
    for node in p.walk():
        if node.type != "linear" or not node.args["weight_tying"]:
            continue
        if emb is None:
            yield Issue(_data(node, "weightTying"), "weight tying needs a tokenEmbedding to share with",
                        expected="a tokenEmbedding first", found=None, hint="or set weightTying: false")
            continue
        want = (emb.args["vocab_size"], emb.args["emb_dim"])
        got = (node.args["out_dim"], node.args["in_dim"])
        if None not in want + got and want != got:
            yield Issue(_data(node, "outDim"), "a tied head must have the embedding's shape",
                        expected=f"outDim {want[0]}, inDim {want[1]}", found=f"outDim {got[0]}, inDim {got[1]}",
                        hint="match the token embedding, or set weightTying: false")
        if node.args["bias"]:
            yield Issue(_data(node, "bias"), "tied head with a bias: the bias is its own parameter",
                        severity="warning", hint="GPT-2 and Llama heads have no bias")


@check("output")
def check_output(p: Plan) -> Iterator[Issue]:
    body = [n for n in p.nodes if n.type != "dropout"] or p.nodes
    need = tokenizer_vocab(p.request)
    if body[-1].type != "linear":
        yield Issue(f"{body[-1].ptr}/type", "the model must end with a linear head producing logits",
                    expected="linear (outDim = vocabulary size)", found=body[-1].type,
                    hint="add a linear node with outDim = the tokenizer's vocabulary size")
    elif need and p.vocab_size and p.vocab_size < need:
        yield Issue(_data(body[-1], "outDim"), f"logits width {p.vocab_size} is smaller than the "
                    f"{p.request.config.tokenizer_name} tokenizer's vocabulary {need}", expected=f">= {need}",
                    found=p.vocab_size, hint="a larger, padded vocabulary is fine; a smaller one cannot represent "
                    "every token")
    emb = p.nodes[0]
    if emb.type == "tokenEmbedding" and need and emb.args["vocab_size"] and emb.args["vocab_size"] < need:
        yield Issue(_data(emb, "vocabSize"), f"embedding has {emb.args['vocab_size']} rows but the tokenizer "
                    f"produces ids up to {need - 1}", expected=f">= {need}", found=emb.args["vocab_size"],
                    hint="set vocabSize to the tokenizer's vocabulary size (or larger)")


def tokenizer_vocab(req: TrainRequest) -> int | None:
    """The vocabulary of the request's tokenizer when known without loading files (None for file paths)."""
    from slmb.core.tokenizers import KNOWN_VOCAB_SIZES, canonical_tokenizer_name

    if req.config.tokenizer is None and req.config.init_from:
        return None  # the base model's own tokenizer file, known once it is loaded (the trainer checks it then)
    name = canonical_tokenizer_name(req.config.tokenizer_name)
    return KNOWN_VOCAB_SIZES.get(name) if name else None


@check("tokenizer")
def check_tokenizer(p: Plan) -> Iterator[Issue]:
    from slmb.core.tokenizers import canonical_tokenizer_name

    c = p.request.config
    if c.tokenizer is None and canonical_tokenizer_name(c.model) is None and not c.init_from:
        yield Issue("/config/model", f"unknown model family {c.model!r}", expected="gpt-2, llama2, llama3 or qwen3",
                    found=_short(c.model), hint='or set config.tokenizer ("gpt2", "byte", or a file path)')
    elif c.tokenizer and canonical_tokenizer_name(c.tokenizer) is None and not _looks_like_path(c.tokenizer):
        yield Issue("/config/tokenizer", f"unknown tokenizer {c.tokenizer!r}",
                    expected="gpt2, llama2, llama3, qwen3, byte or a path to a tokenizer file",
                    found=_short(c.tokenizer), hint='a tokenizer file path needs a "/" or a .model, .tiktoken or .json '
                    "ending")


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.endswith((".model", ".tiktoken", ".json"))


@check("effects")
def check_effects(p: Plan) -> Iterator[Issue]:
    flat = list(p.walk())
    last_attention = max((i for i, n in enumerate(flat) if n.type in ("mhAttention", "gqAttention")), default=-1)
    for i, node in enumerate(flat):
        if node.type == "positionalEmbedding" and node.args["mode"] in ("rotary", "relative") and i > last_attention:
            yield Issue(_data(node, "posType"), f"{node.args['mode']} position mode with no attention after it",
                        severity="warning", hint="it only changes later attention nodes")
    if not any(n.type in ("positionalEmbedding",) for n in flat) and not any(
            n.args.get("rope") or n.args.get("relative") for n in flat):
        yield Issue("/model", "no positional information: attention cannot tell token order apart",
                    severity="warning", hint="add a positionalEmbedding or use RoPE in attention")


# config key -> (node type, resolved arg, how to read it for the config's meaning)
_AGREE = [("emb_dim", "tokenEmbedding", "emb_dim"), ("vocab_size", "tokenEmbedding", "vocab_size"),
          ("n_heads", "attention", "num_heads"), ("n_kv_groups", "gqAttention", "num_kv_heads"),
          ("hidden_dim", "feedForward", "hidden_dim"), ("qkv_bias", "attention", "qkv_bias"),
          ("qk_norm", "gqAttention", "qk_norm"), ("head_dim", "gqAttention", "head_dim")]


@check("config_agreement")
def check_config(p: Plan) -> Iterator[Issue]:
    c = p.request.config
    flat = list(p.walk())
    for key, type_name, arg in _AGREE:
        want = getattr(c, key)
        if want is None:
            continue
        for node in flat:
            t = "attention" if node.type in ("mhAttention", "gqAttention") else node.type
            got = node.args.get(arg)
            if t == type_name and got is not None and got != want:
                yield Issue(f"/config/{key}", f"config.{key} = {want} but {node.ptr} uses {got}",
                            expected=str(got), found=want, severity="warning",
                            hint="the nodes define the model; config keys only document it")
                break
    if c.n_blocks is not None:
        blocks = sum(n.repeat for n in flat if n.type == "transformerBlock")
        if blocks and blocks != c.n_blocks:
            yield Issue("/config/n_blocks", f"config.n_blocks = {c.n_blocks} but the canvas has {blocks} blocks",
                        expected=str(blocks), found=c.n_blocks, severity="warning",
                        hint="the nodes define the model; config keys only document it")
    if c.rope_base is not None:
        for node in flat:
            if node.args.get("rope") and node.args["rope_base"] != c.rope_base:
                yield Issue("/config/rope_base", f"config.rope_base = {c.rope_base:g} but {node.ptr} uses "
                            f"{node.args['rope_base']:g}", expected=f"{node.args['rope_base']:g}",
                            found=c.rope_base, severity="warning", hint="set ropeBase on the attention node")
                break


@check("unknown_keys")
def check_unknown(p: Plan) -> Iterator[Issue]:
    req = p.request
    for key in req.unknown_keys():
        yield Issue(pointer(key), f"unknown key '{key}' is ignored", severity="warning")
    for key in req.config.unknown_keys():
        yield Issue(pointer("config", key), f"unknown config key '{key}' is ignored", severity="warning",
                    hint="see `slmb schema` for the keys slmb reads")
    for node in p.walk():
        for key in node.spec.unknown_keys():
            yield Issue(node.ptr + pointer(key), f"unknown node key '{key}' is ignored", severity="warning")
        for key in node.spec.data.unknown_keys():
            yield Issue(node.ptr + pointer("data", key), f"unknown {node.type} field '{key}' is ignored",
                        severity="warning", hint="see `slmb schema` for the fields of each node type")


@check("model_name")
def check_model_name(p: Plan) -> Iterator[Issue]:
    if p.request.model_name is None:
        yield Issue("/modelName", "no modelName", severity="warning",
                    hint="slmb train names the model after the file, or pass --name")


# -- summary ------------------------------------------------------------------------------------------------

@dataclass
class MetaBuild:
    """What the meta-device build tells the summary: parameters per node and per block copy."""

    rows: list[NodeRow]
    total: int
    trainable: int
    matrices: int  # nn.Linear weights: what autocast casts
    block_copies: list[int]  # each top-level transformer-block copy's parameters (FSDP's shard units)


def meta_build(p: Plan) -> MetaBuild:
    from torch import nn

    from slmb.core import nodes as N
    from slmb.core.compiler import build_model

    model = build_model(p, device="meta")
    rows: list[NodeRow] = []
    copies: list[int] = []
    emb_weight = next((m.weight for m in model.modules() if isinstance(m, N.TokenEmbedding)), None)

    def visit(pnodes: list[PlanNode], layers, depth: int) -> None:
        for pn, layer in zip(pnodes, layers, strict=True):
            name = pn.spec.data.id or pn.type
            if pn.type == "transformerBlock":
                params = sum(t.numel() for t in layer.parameters())
                rows.append(NodeRow(pn.ptr, pn.type, name, _shape(pn.out_width), params, depth, pn.repeat,
                                    f"{pn.repeat} × {params // max(pn.repeat, 1):,}"))
                if depth == 0:
                    copies.extend(sum(t.numel() for t in block.parameters()) for block in layer.blocks)
                visit(pn.children, layer.blocks[0].layers, depth + 1)
                continue
            own = sum(t.numel() for t in layer.parameters(recurse=True))
            note = ""
            if isinstance(layer, N.Linear) and layer.weight is emb_weight:
                own -= layer.weight.numel()
                note = "tied to the token embedding"
            elif pn.type == "residual":
                note = f"+ {pn.args['target']}:{pn.args['which']}"
            elif pn.args.get("rope") and pn.args.get("rope_scaling"):
                note = "RoPE, llama3 scaling"
            elif pn.args.get("rope"):
                note = "RoPE"
            rows.append(NodeRow(pn.ptr, pn.type, name, _shape(pn.out_width), own, depth, 1, note))

    visit(p.nodes, model.chain.layers, 0)
    matrices = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return MetaBuild(rows, model.num_parameters(), model.num_parameters(trainable_only=True), matrices, copies)


def summarize(p: Plan, device: str | None = None, *, world_size: int = 1, strategy: str | None = None,
              built: MetaBuild | None = None) -> Summary:
    """Build on the meta device (no memory) and report parameters, output shapes and a memory estimate: of one
    process, or with ``strategy`` ("ddp", "fsdp") of one device of ``world_size``. ``built``: a meta build of
    ``p`` already made (one build serves several strategies)."""
    from slmb.core import memory

    b = built or meta_build(p)
    est = memory.estimate(p, b.total, b.matrices, device, world_size=world_size, strategy=strategy,
                          block_parameters=b.block_copies)
    c = p.request.config
    t = est.terms
    mem = {"weights_fp32": 4 * b.total, "weights_bf16": b.total * 2,
           "training_states": t["weights"] + t["gradients"] + t["adamw_states"], **t, "training_total": est.peak,
           "device": est.device, "dtype": est.dtype, "batch_size": c.batch_size, "context_length": c.context_length,
           "world_size": est.world_size, "strategy": est.strategy, "device_batch_size": est.batch_rows,
           "activation_checkpointing": est.checkpointing}
    return Summary(b.total, b.trainable, b.rows, mem, p.vocab_size or 0, p.context_length, est)


def _shape(width: int | None) -> str:
    return f"[B, T, {width}]" if width else "[B, T]"
