"""Property-based: whatever the body, ``validate`` returns a Report, promptly, in bounded memory.

Mutations of the reference canvases (wrong types, missing or null fields, absurd dimensions, unknown types,
misdirected residuals, deep nesting, odd unicode) and bodies grown from a grammar of nodes. Every issue must
carry a JSON pointer that leads into the body it describes, and the report must serialise to JSON.
Deterministic: derandomized, no example database.
"""

import copy
import json
import re
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slmb.core.spec import NODE_TYPES
from slmb.core.validate import CHECKS, Report, validate


def _reference(name: str) -> dict:
    from conftest import shared_dir

    return json.loads((shared_dir() / "requests" / f"{name}-reference.json").read_text())


REFS = {name: _reference(name) for name in ("gpt2", "llama3")}

FUZZ = settings(derandomize=True, database=None, deadline=timedelta(seconds=15), print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])

MEMORY_LIMIT_MB = 500


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


@pytest.fixture
def memory():
    """Resets the peak-RSS mark so the test measures only its own allocations."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmHWM"), _status_mb("VmRSS")


def check(body, memory) -> Report:
    report = validate(body)
    assert isinstance(report, Report)
    assert report.ok is (not report.errors)
    for issue in report.errors + report.warnings:
        assert issue.severity in ("error", "warning")
        assert issue.check in CHECKS or issue.check in ("schema", "size"), issue.check
        assert issue.message
        assert _points_into(body, issue.path), (issue.path, issue.message)
    json.dumps(report.to_dict(), default=str)
    event("valid" if report.ok else "schema error" if report.request is None else "semantic error")
    if report.ok:
        assert report.summary is not None and report.summary.total_parameters > 0
    peak, rss = memory
    assert _status_mb("VmHWM") - peak < MEMORY_LIMIT_MB
    assert _status_mb("VmRSS") - rss < MEMORY_LIMIT_MB
    return report


_FIELD = re.compile(r"[A-Za-z_]+")


def _points_into(body, path: str) -> bool:
    """The pointer resolves in ``body``, except for at most two trailing field names that are absent (a
    required field, or the data object of a node that sent none)."""
    if path == "":
        return True
    if not path.startswith("/"):
        return False
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]
    value = body
    for i, part in enumerate(parts):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            rest = parts[i:]
            return len(rest) <= 2 and not isinstance(value, list) and all(_FIELD.fullmatch(p) for p in rest)
    return True


# -- value strategies ----------------------------------------------------------------------------------------

ODD_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "\ud800", "a/b~c", "~1", "\u202eevil", "\x00", "ﬁ", "𝔘𝔫𝔦", "../", "名前", "é", "e\u0301",
                     "🦙" * 3, "type", "data", "children", "null"]),
)
DIMS = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 7, 64, 257, 4096, 4097, 50257, 1 << 20, (1 << 20) + 1, 1 << 24, 10**12,
                     -(10**12), 2**63, 2**64, 10**30, -(10**30)]),
    st.integers(min_value=-(10**13), max_value=10**13),
)
SCALARS = st.one_of(st.none(), st.booleans(), DIMS, st.floats(), ODD_TEXT)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(ODD_TEXT, SCALARS, max_size=3))


def _locations(value):
    """Every (container, key) pair in a JSON value; iterative, since a mutation may nest 10,000 deep."""
    out, stack = [], [value]
    while stack:
        item = stack.pop()
        keys = item.keys() if isinstance(item, dict) else range(len(item)) if isinstance(item, list) else ()
        for key in keys:
            out.append((item, key))
            stack.append(item[key])
    return out


def _nodes(body):
    return [c[k] for c, k in _locations(body) if isinstance(c[k], dict) and "type" in c[k]]


def _scopes(body):
    """The node lists of a body: model and every transformerBlock's children."""
    out = [body["model"]] if isinstance(body.get("model"), list) else []
    out += [node["children"] for node in _nodes(body) if isinstance(node.get("children"), list)]
    return out


def _nest(value, depth, kind):
    for _ in range(depth):
        value = [value] if kind == "list" else {"x": value}
    return value


OPS = ["replace", "delete", "null", "add_key", "retype", "dimension", "residual", "nest", "wrap_in_block"]
DIM_KEYS = ["vocabSize", "embDim", "ctxLength", "numHeads", "numKvGroups", "headDim", "hiddenDim", "inDim", "outDim",
            "numOfBlocks", "dropoutRate", "eps", "ropeBase"]


def mutate(body, data) -> None:
    op = data.draw(st.sampled_from(OPS), label="op")
    locations = _locations(body)
    if op in ("replace", "delete", "null", "nest") and locations:
        container, key = data.draw(st.sampled_from(locations), label="where")
        if op == "replace":
            container[key] = data.draw(VALUES, label="value")
        elif op == "delete":
            del container[key]
        elif op == "null":
            container[key] = None
        else:
            depth = data.draw(st.sampled_from([1, 5, 30, 63, 64, 65, 200, 10_000]), label="depth")
            container[key] = _nest(container[key], depth, data.draw(st.sampled_from(["list", "dict"])))
    elif op == "add_key":
        dicts = [body] + [c[k] for c, k in locations if isinstance(c[k], dict)]
        target = data.draw(st.sampled_from(dicts), label="into")
        target[data.draw(ODD_TEXT, label="key")] = data.draw(VALUES, label="value")
    elif op == "retype" and _nodes(body):
        node = data.draw(st.sampled_from(_nodes(body)), label="node")
        node["type"] = data.draw(st.one_of(st.sampled_from(NODE_TYPES), ODD_TEXT, st.integers()), label="type")
    elif op == "dimension" and _nodes(body):
        node = data.draw(st.sampled_from(_nodes(body)), label="node")
        if isinstance(node.get("data"), dict):
            node["data"][data.draw(st.sampled_from(DIM_KEYS))] = data.draw(st.one_of(DIMS, st.floats()), label="dim")
    elif op == "residual" and _scopes(body):
        scope = data.draw(st.sampled_from(_scopes(body)), label="scope")
        pos = data.draw(st.integers(0, len(scope)), label="pos")
        datas = [n.get("data") for n in _nodes(body)]
        ids = [d["id"] for d in datas if isinstance(d, dict) and isinstance(d.get("id"), str)]
        source = data.draw(st.one_of(st.sampled_from([*ids, "self"]), ODD_TEXT), label="source")
        source += data.draw(st.sampled_from(["", ":in", ":out", ":", ":up"]), label="suffix")
        scope.insert(pos, {"type": "residual", "data": {"id": "self", "source": source}})
    elif op == "wrap_in_block" and _scopes(body):
        scope = data.draw(st.sampled_from(_scopes(body)), label="scope")
        start = data.draw(st.integers(0, len(scope)), label="start")
        stop = data.draw(st.integers(start, len(scope)), label="stop")
        repeat = data.draw(st.one_of(st.sampled_from([1, 2, 3]), DIMS), label="numOfBlocks")
        block = {"type": "transformerBlock", "data": {"numOfBlocks": repeat}, "children": scope[start:stop]}
        scope[start:stop] = [block]


@pytest.mark.timeout(120)
@settings(FUZZ, max_examples=800)
@given(data=st.data(), name=st.sampled_from(sorted(REFS)))
def test_mutated_references_always_give_a_report(memory, data, name):
    body = copy.deepcopy(REFS[name])
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        mutate(body, data)
    check(body, memory)


# -- bodies grown from a grammar of nodes --------------------------------------------------------------------

IDS = ["a", "b", "c"]
GOOD = {  # plausible values per field, so a fair share of bodies reaches the semantic checks and the build
    "id": st.sampled_from(IDS), "vocabSize": st.sampled_from([257, 300]), "embDim": st.sampled_from([4, 6, 8]),
    "ctxLength": st.sampled_from([4, 8, 16]),
    "posType": st.sampled_from(["Learned Positional Embedding", "rotary", "relative", "sinusoidal"]),
    "normType": st.sampled_from(["RMS Normalization", "layernorm"]), "eps": st.floats(1e-6, 0.1),
    "numHeads": st.sampled_from([1, 2, 3, 4]), "numKvGroups": st.sampled_from([1, 2]),
    "headDim": st.sampled_from([2, 3]), "qkNorm": st.booleans(), "isRoPE": st.one_of(st.booleans(), st.none()),
    "ropeBase": st.sampled_from([10_000, 5e5]),
    "ropeConfig": st.fixed_dictionaries({"factor": st.sampled_from([8, 0.5]), "low_freq_factor": st.just(1),
                                         "high_freq_factor": st.sampled_from([1, 4]),
                                         "original_context_length": st.just(4)}),
    "dropoutRate": st.sampled_from([0, 0.1]), "qkvBias": st.booleans(), "hiddenDim": st.sampled_from([4, 8]),
    "feedForwardType": st.sampled_from(["Standard", "Gated"]),
    "actFunc": st.sampled_from(["GELU", "SwiGLU", "relu", "silu", "mish", "gelu_tanh"]), "bias": st.booleans(),
    "source": st.tuples(st.sampled_from(IDS), st.sampled_from(["", ":in", ":out", ":up"])).map("".join),
    "numOfBlocks": st.sampled_from([1, 2, 3]), "inDim": st.sampled_from([4, 8]),
    "outDim": st.sampled_from([257, 300, 8]), "weightTying": st.booleans(),
}
def weighted(*choices):
    """One of several strategies, each drawn in proportion to its weight."""
    table = [s for s, w in choices for _ in range(w)]

    def pick(i):  # a named function, not sampled_from(strategies): hypothesis would repr them all, recursively
        return table[i]

    return st.integers(0, len(table) - 1).flatmap(pick)


GOOD_DATA = st.fixed_dictionaries({}, optional=GOOD)
BAD_DATA = st.dictionaries(st.one_of(st.sampled_from(sorted(GOOD)), ODD_TEXT), VALUES, max_size=4)
DATA = weighted((GOOD_DATA, 12), (BAD_DATA, 1))
LEAF = weighted(
    (st.fixed_dictionaries({"type": st.sampled_from([t for t in NODE_TYPES if t not in ("transformerBlock", "residual",
                                                                                        "tokenEmbedding")]),
                            "data": DATA}), 20),
    (st.fixed_dictionaries({"type": st.just("residual"), "data": st.fixed_dictionaries(
        {"source": GOOD["source"]}, optional={k: v for k, v in GOOD.items() if k != "source"})}), 6),
    (st.fixed_dictionaries({"type": st.sampled_from(["residual", "tokenEmbedding"]), "data": DATA}), 1),
)
NODE = st.deferred(lambda: weighted(
    (LEAF, 30),
    (st.fixed_dictionaries({"type": st.just("transformerBlock"), "data": DATA, "children": st.lists(NODE, max_size=4)}),
     3),
    (st.fixed_dictionaries({"type": st.one_of(ODD_TEXT, st.integers())}, optional={"data": DATA}), 1),
    (SCALARS, 1),
))
EMBEDDING = st.fixed_dictionaries({"type": st.just("tokenEmbedding"), "data": st.fixed_dictionaries(
    {"vocabSize": GOOD["vocabSize"], "embDim": GOOD["embDim"]}, optional={"id": GOOD["id"]})})
HEAD = st.fixed_dictionaries({"type": st.just("linear"), "data": st.fixed_dictionaries(
    {"outDim": st.sampled_from([257, 300])}, optional={"weightTying": st.booleans(), "bias": st.booleans()})})
MODEL = st.tuples(weighted((EMBEDDING, 8), (NODE, 1)), st.lists(NODE, max_size=6), weighted((HEAD, 8), (NODE, 1)))
CONFIG_KEYS = ["vocab_size", "context_length", "emb_dim", "n_heads", "tokenizer", "model", "n_blocks", "rope_base",
               "dtype"]
CONFIG = st.fixed_dictionaries({"tokenizer": st.just("byte"), "context_length": st.sampled_from([4, 8])},
                               optional={"n_heads": st.sampled_from([1, 2])})
BODY = st.fixed_dictionaries(
    {"model": weighted((MODEL.map(lambda t: [t[0], *t[1], t[2]]), 8), (st.lists(NODE, max_size=4), 1)),
     "config": weighted((CONFIG, 8), (st.dictionaries(st.sampled_from(CONFIG_KEYS), VALUES, max_size=4), 1))},
    optional={"modelName": weighted((st.just("fuzz"), 8), (ODD_TEXT, 1)), "extra": VALUES},
)


@pytest.mark.timeout(120)
@settings(FUZZ, max_examples=1000)
@given(body=st.one_of(BODY, VALUES))
def test_grammar_bodies_always_give_a_report(memory, body):
    check(body, memory)


@pytest.mark.timeout(120)
@settings(FUZZ, max_examples=100)
@given(data=st.data(), name=st.sampled_from(sorted(REFS)))
def test_misdirected_residual_is_reported_at_its_source(memory, data, name):
    """A residual naming a later node, itself, nothing, or a node in another scope is an error at its source."""
    body = copy.deepcopy(REFS[name])
    scopes = [("/model", body["model"])] + [(f"/model/{i}/children", n["children"])
                                             for i, n in enumerate(body["model"]) if "children" in n]
    prefix, scope = data.draw(st.sampled_from(scopes), label="scope")
    pos = data.draw(st.integers(1, len(scope)), label="pos")
    later = [n["data"]["id"] for n in scope[pos:]]
    elsewhere = [n["data"]["id"] for p, s in scopes if p != prefix for n in s]
    kind = data.draw(st.sampled_from(["forward", "self", "nothing", "other"] if later else ["self", "nothing",
                                                                                          "other"]), label="kind")
    target = {"forward": st.sampled_from(later or ["x"]), "self": st.just("me"), "other": st.sampled_from(elsewhere),
              "nothing": ODD_TEXT.filter(lambda s: s.strip() and s.strip() not in elsewhere + later + ["me"])}[kind]
    source = data.draw(target, label="target") + data.draw(st.sampled_from(["", ":in", ":out"]), label="suffix")
    scope.insert(pos, {"type": "residual", "data": {"id": "me", "source": source}})
    report = check(body, memory)
    where = f"{prefix}/{pos}/data/source"
    matching = [e for e in report.errors if e.path == where]
    assert matching, (where, [e.path for e in report.errors])
    assert matching[0].check in ("residual_sources", "schema")


@pytest.mark.timeout(120)
@settings(FUZZ, max_examples=40)
@given(depth=st.sampled_from([65, 100, 1000, 10_000]), kind=st.sampled_from(["list", "dict"]),
       where=st.sampled_from(["body", "config", "data", "children", "model"]))
def test_deep_nesting_is_one_error(memory, depth, kind, where):
    body = copy.deepcopy(REFS["gpt2"])
    deep = _nest(1, depth, kind)
    if where == "body":
        body = deep
    elif where == "config":
        body["config"]["extra"] = deep
    elif where == "data":
        body["model"][3]["children"][1]["data"]["numHeads"] = deep
    elif where == "children":
        body["model"][3]["children"].append(deep)
    else:
        body["model"] = deep
    report = check(body, memory)
    [issue] = report.errors
    assert "nesting" in issue.message


def _nested_blocks(depth: int, repeat: int) -> dict:
    inner: dict = {"type": "feedForward", "data": {"hiddenDim": 8}}
    for _ in range(depth):
        inner = {"type": "transformerBlock", "data": {"numOfBlocks": repeat}, "children": [inner]}
    return {"config": {"tokenizer": "byte", "context_length": 8}, "modelName": "deep", "model": [
        {"type": "tokenEmbedding", "data": {"vocabSize": 257, "embDim": 8}}, inner,
        {"type": "linear", "data": {"outDim": 257}}]}


@pytest.mark.timeout(120)
@settings(FUZZ, max_examples=40)
@given(depth=st.one_of(st.integers(1, 40), st.sampled_from([5_000])), repeat=st.sampled_from([1, 2, 3, 4096]))
def test_nested_transformer_blocks(memory, depth, repeat):
    body = _nested_blocks(depth, repeat)
    report = check(body, memory)
    expanded = 1
    for _ in range(depth):
        expanded = 1 + repeat * expanded
    if 2 * depth + 4 > 64:  # the feedForward's data sits two levels below its node, each block adds two
        assert [e.message for e in report.errors] == ["nesting deeper than 64 levels"]
    elif expanded + 2 > 20_000:
        assert [e.check for e in report.errors] == ["structure"]
    else:
        assert report.ok, report.errors
        assert report.summary.total_parameters == 2 * 257 * 8 + repeat**depth * (2 * 8 * 8)


# -- whatever validates, builds and runs ---------------------------------------------------------------------

def _tiny_data(**fields):
    return st.fixed_dictionaries({}, optional={"id": st.sampled_from(IDS), **fields})


SIZES = st.sampled_from([4, 8, 16])
TINY_LEAF = st.one_of(
    st.fixed_dictionaries({"type": st.just("normalization"), "data": _tiny_data(
        normType=st.sampled_from(["layernorm", "rmsnorm"]), eps=st.sampled_from([1e-5, 0.5]), bias=st.booleans())}),
    st.fixed_dictionaries({"type": st.just("mhAttention"), "data": _tiny_data(
        numHeads=st.sampled_from([1, 2, 3, 4, 6]), ctxLength=SIZES, isRoPE=st.booleans(), qkvBias=st.booleans(),
        projBias=st.booleans(), dropoutRate=st.sampled_from([0, 0.5]))}),
    st.fixed_dictionaries({"type": st.just("gqAttention"), "data": _tiny_data(
        numHeads=st.sampled_from([1, 2, 3, 4, 6]), numKvGroups=st.sampled_from([1, 2, 3]),
        headDim=st.sampled_from([1, 2, 3, 4]), ctxLength=SIZES, isRoPE=st.booleans(), qkNorm=st.booleans(),
        ropeConfig=GOOD["ropeConfig"])}),
    st.fixed_dictionaries({"type": st.just("feedForward"), "data": _tiny_data(
        hiddenDim=st.sampled_from([1, 3, 8]), feedForwardType=GOOD["feedForwardType"], actFunc=GOOD["actFunc"],
        bias=st.booleans())}),
    st.fixed_dictionaries({"type": st.just("residual"), "data": st.fixed_dictionaries(
        {"source": st.tuples(st.sampled_from([*IDS, "tok"]), st.sampled_from(["", ":in", ":out"])).map("".join)},
        optional={"id": st.sampled_from(IDS)})}),
    st.fixed_dictionaries({"type": st.just("dropout"), "data": _tiny_data(dropoutRate=st.sampled_from([0, 0.3]))}),
    st.fixed_dictionaries({"type": st.just("linear"), "data": _tiny_data(outDim=st.sampled_from([4, 6, 8]))}),
    st.fixed_dictionaries({"type": st.just("positionalEmbedding"), "data": _tiny_data(
        posType=st.sampled_from(["learned", "sinusoidal", "rotary", "relative"]), ctxLength=SIZES)}),
)
TINY_NODE = st.deferred(lambda: weighted(
    (TINY_LEAF, 4),
    (st.fixed_dictionaries({"type": st.just("transformerBlock"), "data": st.fixed_dictionaries(
        {"numOfBlocks": st.sampled_from([1, 2])}), "children": st.lists(TINY_NODE, min_size=1, max_size=6)}), 1)))
TINY_BODY = st.fixed_dictionaries({
    "config": st.fixed_dictionaries({"tokenizer": st.just("byte"), "context_length": st.sampled_from([4, 8])}),
    "modelName": st.just("tiny"),
    "model": st.tuples(
        st.fixed_dictionaries({"type": st.just("tokenEmbedding"), "data": st.fixed_dictionaries(
            {"id": st.just("tok"), "vocabSize": st.sampled_from([257, 260]),
             "embDim": st.sampled_from([4, 6, 8, 12])})}),
        st.lists(TINY_NODE, max_size=6),
        st.fixed_dictionaries({"type": st.just("linear"), "data": st.fixed_dictionaries(
            {"outDim": st.sampled_from([257, 260])}, optional={"weightTying": st.booleans(), "bias": st.booleans()})}),
    ).map(lambda t: [t[0], *t[1], t[2]]),
})


@pytest.mark.timeout(120)
@settings(FUZZ, max_examples=150)
@given(body=TINY_BODY, T=st.sampled_from([1, 3, 8]))
def test_whatever_validates_builds_and_runs(memory, body, T):
    """No check may be missing: a request that validates builds for real and gives finite [B, T, V] logits, and
    the summary's parameter count is the built model's."""
    import torch

    from slmb.core.compiler import build_model

    report = check(body, memory)
    if not report.ok:
        return
    T = min(T, report.summary.context_length)
    torch.manual_seed(0)
    model = build_model(report.plan).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 257, (2, T)))
    assert logits.shape == (2, T, report.summary.vocab_size)
    assert report.summary.rows[-1].output_shape == f"[B, T, {report.summary.vocab_size}]"
    assert torch.isfinite(logits).all()
    assert model.num_parameters() == report.summary.total_parameters
