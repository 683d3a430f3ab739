"""Validation (DESIGN.md §2.3): parameter counts, one bad fixture per named check, pointers, and the summary."""

import copy
import json
import time

import pytest

from slmb.core.spec import NODE_TYPES
from slmb.core.validate import CHECKS, RequestInvalidError, require_valid, validate

V, E, T = 257, 32, 16


def n(type_, id_=None, children=None, **data):
    out = {"type": type_, "data": {"id": id_ or type_, **data} if id_ is not False else data}
    if children is not None:
        out["children"] = children
    return out


def tiny():
    """A small valid GPT-2 shaped request on the byte tokenizer: every check passes, nothing is warned about."""
    return {
        "config": {"context_length": T, "tokenizer": "byte"},
        "model": [
            n("tokenEmbedding", "tok", vocabSize=V, embDim=E),
            n("positionalEmbedding", "pos", ctxLength=T, embDim=E, posType="Learned Positional Embedding"),
            n("transformerBlock", "blk", numOfBlocks=2, children=[
                n("normalization", "ln1", normType="Layer Normalization"),
                n("mhAttention", "attn", numHeads=4, ctxLength=T),
                n("residual", "r1", source="ln1"),
                n("normalization", "ln2", normType="Layer Normalization"),
                n("feedForward", "ff", hiddenDim=4 * E, actFunc="GELU"),
                n("residual", "r2", source="ln2"),
            ]),
            n("normalization", "lnf", normType="Layer Normalization"),
            n("linear", "head", inDim=E, outDim=V),
        ],
        "modelName": "tiny",
    }


def child(body, i):
    return body["model"][2]["children"][i]["data"]


def load(shared, name):
    return json.loads((shared / "requests" / f"{name}-reference.json").read_text())


def test_tiny_fixture_is_valid_and_quiet():
    report = validate(tiny())
    assert report.ok, report.errors
    assert report.warnings == []


# -- parameter counts ---------------------------------------------------------------------------------------

def test_gpt2_reference_parameters(shared):
    report = validate(load(shared, "gpt2"))
    assert report.ok
    # GPT-2 small (124,439,808) with a 128-row position table instead of 1024 and an untied head.
    assert report.summary.total_parameters == 162_349_056
    assert report.summary.trainable_parameters == 162_349_056
    assert report.summary.vocab_size == 50257 and report.summary.context_length == 128


def test_llama3_reference_parameters(shared):
    report = validate(load(shared, "llama3"))
    assert report.ok
    assert report.summary.total_parameters == 1_235_818_496  # Llama 3.2 1B: the tied head counts once
    head = report.summary.rows[-1]
    assert head.parameters == 0 and "tied" in head.note
    assert report.summary.memory["weights_fp32"] == 4 * 1_235_818_496


def llama2_7b(attention):
    if attention == "gqa":
        attn = n("gqAttention", "attn", numHeads=32, numKvGroups=32, ctxLength=4096)
        pos = []
    else:
        attn = n("mhAttention", "attn", numHeads=32, ctxLength=4096)
        pos = [n("positionalEmbedding", "pos", posType="Rotary Positional Embedding")]
    return {
        "config": {"model": "llama2", "vocab_size": 32000, "context_length": 4096},
        "model": [
            n("tokenEmbedding", "tok", vocabSize=32000, embDim=4096), *pos,
            n("transformerBlock", "blk", numOfBlocks=32, children=[
                n("normalization", "n1", normType="RMS Normalization"), attn, n("residual", "r1", source="n1"),
                n("normalization", "n2", normType="RMS Normalization"),
                n("feedForward", "ff", hiddenDim=11008, feedForwardType="Gated", actFunc="SwiGLU"),
                n("residual", "r2", source="n2"),
            ]),
            n("normalization", "norm", normType="RMS Normalization"),
            n("linear", "head", inDim=4096, outDim=32000, bias=False, weightTying=False),
        ],
        "modelName": "llama2-7b",
    }


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.parametrize("attention", ["gqa", "mha_rotary"])
def test_llama2_7b_counts_without_allocating(attention):
    validate(tiny())  # warm up imports and caches so only the 7B request is measured
    before = rss_mb()
    start = time.perf_counter()
    report = validate(llama2_7b(attention))
    elapsed = time.perf_counter() - start
    grown = rss_mb() - before
    assert report.ok, report.errors
    assert report.summary.total_parameters == 6_738_415_616
    assert elapsed < 10, f"validating the 7B shape took {elapsed:.1f} s"
    assert grown < 500, f"validating the 7B shape grew RSS by {grown:.0f} MB: weights were allocated"
    attn_row = next(r for r in report.summary.rows if r.type in ("gqAttention", "mhAttention"))
    assert attn_row.parameters == 4 * 4096 * 4096 and "RoPE" in attn_row.note


# -- one bad fixture per check --------------------------------------------------------------------------------

def mutate(fn):
    body = tiny()
    fn(body)
    return body


# check -> (mutation of the tiny request, JSON pointer, severity, the fields besides message/hint it fills)
BAD = {
    "structure": (lambda b: b["model"][2].update(children=[]), "/model/2/children", "error", "expected found"),
    "required": (lambda b: b["model"][0]["data"].pop("vocabSize"), "/model/0/data/vocabSize", "error", "expected"),
    "widths": (lambda b: b["model"][-1]["data"].update(inDim=E + 1), "/model/4/data/inDim", "error",
               "expected found"),
    "attention_heads": (lambda b: child(b, 1).update(numHeads=5), "/model/2/children/1/data/numHeads", "error",
                        "expected found"),
    "context_length": (lambda b: child(b, 1).update(ctxLength=T // 2), "/model/2/children/1/data/ctxLength",
                       "error", "expected found"),
    "residual_sources": (lambda b: child(b, 2).update(source="ff"), "/model/2/children/2/data/source", "error",
                         "expected found"),
    "blocks": (lambda b: (b["model"][2]["children"].append(n("linear", "widen", outDim=2 * E)),
                          b["model"][-1]["data"].pop("inDim")), "/model/2/data/numOfBlocks", "error",
               "expected found"),
    "activations": (lambda b: child(b, 4).update(actFunc="SwiGLU"), "/model/2/children/4/data/actFunc", "error",
                    "expected found"),
    "weight_tying": (lambda b: b["model"][-1]["data"].update(weightTying=True, outDim=V + 3),
                     "/model/4/data/outDim", "error", "expected found"),
    "output": (lambda b: b["model"].pop(), "/model/3/type", "error", "expected found"),
    "tokenizer": (lambda b: b["config"].update(tokenizer="klingon"), "/config/tokenizer", "error", "expected found"),
    "effects": (lambda b: b["model"].__setitem__(1, n("dropout", "d")), "/model", "warning", ""),
    "config_agreement": (lambda b: b["config"].update(emb_dim=2 * E), "/config/emb_dim", "warning",
                         "expected found"),
    "unknown_keys": (lambda b: child(b, 1).update(numHead=4), "/model/2/children/1/data/numHead", "warning", ""),
    "model_name": (lambda b: b.pop("modelName"), "/modelName", "warning", ""),
}


def test_every_named_check_has_a_bad_fixture():
    assert set(BAD) == set(CHECKS)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_fixture_trips_exactly_its_check(name):
    fn, path, severity, filled = BAD[name]
    report = validate(mutate(fn))
    issues = report.errors + report.warnings
    assert [(i.check, i.path, i.severity) for i in issues] == [(name, path, severity)], issues
    issue = issues[0]
    assert issue.message
    assert issue.hint or name == "unknown_keys"  # an unknown key's message says all there is to say
    for attr in filled.split():
        assert getattr(issue, attr) not in (None, ""), attr
    assert report.ok is (severity == "warning")
    assert (report.summary is not None) is report.ok
    json.dumps(report.to_dict())


def issues_of(body, check=None):
    report = validate(body)
    return [i for i in report.errors + report.warnings if check is None or i.check == check]


def test_structure_variants():
    first = mutate(lambda b: b["model"].insert(0, n("dropout", "d0")))
    assert [(i.path, i.expected, i.found) for i in issues_of(first, "structure")] == [
        ("/model/0/type", "tokenEmbedding", "dropout"), ("/model/1/type", "one, first", "another one here")]
    nested = mutate(lambda b: b["model"][2]["children"].insert(0, n("tokenEmbedding", "tok2", vocabSize=V, embDim=E)))
    [issue] = issues_of(nested, "structure")
    assert issue.path == "/model/2/children/0/type"
    empty = mutate(lambda b: b["model"][2].update(children=[]))
    [issue] = issues_of(empty, "structure")
    assert issue.path == "/model/2/children" and issue.found == []
    huge = mutate(lambda b: b["model"][2]["data"].update(numOfBlocks=4096))
    [issue] = issues_of(huge, "structure")
    assert issue.path == "/model" and issue.found == 4096 * 6 + 5


def test_required_falls_back_to_config():
    body = mutate(lambda b: (child(b, 1).pop("numHeads"), b["model"][0]["data"].pop("embDim")))
    assert {i.path for i in issues_of(body, "required")} == {"/model/0/data/embDim",
                                                             "/model/2/children/1/data/numHeads"}
    body["config"].update(n_heads=4, emb_dim=E)
    assert validate(body).ok


def test_attention_head_variants():
    kv = mutate(lambda b: b["model"][2]["children"].__setitem__(1, n("gqAttention", "attn", numHeads=4,
                                                                     numKvGroups=3)))
    [issue] = issues_of(kv, "attention_heads")
    assert issue.path == "/model/2/children/1/data/numKvGroups" and issue.found == 3
    odd = mutate(lambda b: child(b, 1).update(numHeads=32, isRoPE=True))  # head_dim 1
    [issue] = issues_of(odd, "attention_heads")
    assert "even" in issue.message and issue.found == 1
    explicit = mutate(lambda b: b["model"][2]["children"].__setitem__(1, n("gqAttention", "attn", numHeads=3,
                                                                           numKvGroups=1, headDim=16)))
    assert validate(explicit).ok  # Qwen3: numHeads·headDim may differ from the width


@pytest.mark.parametrize(("source", "where"), [
    ("ff", "comes later in this scope"),
    ("r1", "points at the residual itself"),
    ("ghost", "is not a node in this scope"),
    ("tok", "is in another scope"),
    ("lnf:out", "is in another scope"),  # a later top-level node, seen from inside the block
    ("attn:sideways", "is not a node in this scope"),  # only :in and :out are suffixes
])
def test_residual_source_must_be_earlier_in_the_same_scope(source, where):
    body = mutate(lambda b: child(b, 2).update(source=source))
    [issue] = issues_of(body)
    assert issue.path == "/model/2/children/2/data/source" and issue.check == "residual_sources"
    assert where in issue.message and issue.found == source
    assert issue.expected == "an earlier node's id" and "ln1" in issue.hint


def test_residual_into_a_block_from_outside_and_on_the_token_ids():
    into = mutate(lambda b: b["model"].insert(3, n("residual", "rx", source="ln1")))
    [issue] = issues_of(into)
    assert issue.path == "/model/3/data/source" and "another scope" in issue.message
    ids = mutate(lambda b: b["model"].insert(2, n("residual", "rx", source="tok")))
    [issue] = issues_of(ids)
    assert issue.path == "/model/2/data/source" and "token ids" in issue.message and "tok:out" in issue.hint
    assert validate(mutate(lambda b: b["model"].insert(2, n("residual", "rx", source="tok:out")))).ok


def test_residual_duplicate_ids_and_width_mismatch():
    dup = mutate(lambda b: child(b, 1).update(id="ln1"))
    [issue] = issues_of(dup, "residual_sources")
    assert issue.path == "/model/2/children/2/data/source" and "more than one" in issue.message
    wide = {"config": {"context_length": T, "tokenizer": "byte"}, "model": [
        n("tokenEmbedding", "tok", vocabSize=V, embDim=E), n("linear", "up", outDim=2 * E),
        n("residual", "r", source="up"), n("linear", "head", outDim=V)], "modelName": "w"}
    [issue] = issues_of(wide, "residual_sources")
    assert issue.path == "/model/2/data/source" and (issue.expected, issue.found) == (str(2 * E), E)


def test_weight_tying_bias_is_a_warning():
    body = mutate(lambda b: b["model"][-1]["data"].update(weightTying=True, bias=True))
    [issue] = issues_of(body)
    assert (issue.check, issue.path, issue.severity) == ("weight_tying", "/model/4/data/bias", "warning")
    assert validate(body).ok


def test_output_vocabulary_checks_against_the_tokenizer():
    body = mutate(lambda b: b["config"].pop("tokenizer"))  # gpt-2 family: 50257 ids
    by_path = {i.path: i for i in issues_of(body, "output")}
    assert set(by_path) == {"/model/4/data/outDim", "/model/0/data/vocabSize"}
    assert by_path["/model/4/data/outDim"].expected == ">= 50257" and by_path["/model/4/data/outDim"].found == V
    padded = mutate(lambda b: (b["model"][0]["data"].update(vocabSize=V + 63),
                               b["model"][-1]["data"].update(outDim=V + 63)))
    assert validate(padded).ok  # a padded vocabulary is fine
    tail_dropout = mutate(lambda b: b["model"].append(n("dropout", "dend")))
    assert validate(tail_dropout).ok


def test_tokenizer_unknown_model_family():
    body = mutate(lambda b: (b["config"].pop("tokenizer"), b["config"].update(model="gpt-5")))
    [issue] = issues_of(body, "tokenizer")
    assert issue.path == "/config/model" and issue.found == "gpt-5" and issue.hint


def test_effects_rotary_without_later_attention():
    body = mutate(lambda b: b["model"].insert(3, n("positionalEmbedding", "rot", posType="rotary")))
    [issue] = issues_of(body)
    assert (issue.check, issue.path, issue.severity) == ("effects", "/model/3/data/posType", "warning")


def test_config_agreement_variants():
    body = mutate(lambda b: b["config"].update(n_blocks=3, n_heads=8, rope_base=5e5, vocab_size=V))
    got = {i.path: i for i in issues_of(body, "config_agreement")}
    assert set(got) == {"/config/n_blocks", "/config/n_heads"}  # no node uses RoPE, so rope_base is moot
    assert (got["/config/n_blocks"].expected, got["/config/n_blocks"].found) == ("2", 3)
    assert all(i.severity == "warning" for i in got.values())


def test_unknown_keys_everywhere_with_escaped_pointers():
    body = mutate(lambda b: (b.update(extra=1), b["config"].update(lr=1), b["model"][0].update({"a/b": 1}),
                             b["model"][0]["data"].update({"x~y": 1})))
    paths = [i.path for i in issues_of(body, "unknown_keys")]
    assert paths == ["/extra", "/config/lr", "/model/0/a~1b", "/model/0/data/x~0y"]


# -- schema errors --------------------------------------------------------------------------------------------

def test_schema_pointer_has_no_discriminator_tag(shared):
    body = load(shared, "gpt2")
    body["model"][3]["children"][1]["data"]["numHeads"] = "twelve"
    report = validate(body)
    [issue] = report.errors
    assert issue.path == "/model/3/children/1/data/numHeads"
    assert (issue.check, issue.found, issue.hint) == ("schema", "twelve", "send a whole number")


def test_booleans_are_not_numbers(shared):
    body = load(shared, "gpt2")
    body["model"][3]["children"][1]["data"]["numHeads"] = True  # pydantic's lax mode would read 1
    body["model"][3]["children"][2]["data"]["dropoutRate"] = False
    body["config"]["batch_size"] = True
    body["config"]["compile"] = True  # a real boolean field stays one
    report = validate(body)
    got = {i.path: (i.message, i.found, i.hint) for i in report.errors}
    hint = "send a number: true and false are not counts or rates"
    assert got == {"/model/3/children/1/data/numHeads": ("expected a number, found the boolean true", True, hint),
                   "/model/3/children/2/data/dropoutRate": ("expected a number, found the boolean false", False, hint),
                   "/config/batch_size": ("expected a number, found the boolean true", True, hint)}


def test_schema_errors_are_all_reported_at_once(shared):
    body = load(shared, "llama3")
    body["model"][0]["data"]["vocabSize"] = -1
    body["model"][1]["data"]["numOfBlocks"] = 10**12
    body["model"][1]["children"][1]["data"]["dropoutRate"] = 1.5
    body["model"][1]["children"][4]["data"]["feedForwardType"] = 7
    body["model"][1]["children"][2]["data"].pop("source")
    body["modelName"] = "../etc"
    report = validate(body)
    got = {i.path: i for i in report.errors}
    assert set(got) == {"/model/0/data/vocabSize", "/model/1/data/numOfBlocks", "/model/1/children/1/data/dropoutRate",
                        "/model/1/children/4/data/feedForwardType", "/model/1/children/2/data/source", "/modelName"}
    assert (got["/model/0/data/vocabSize"].expected, got["/model/0/data/vocabSize"].found) == (">= 1", -1)
    assert got["/model/1/data/numOfBlocks"].expected == "<= 4096"
    assert got["/model/1/children/2/data/source"].hint.startswith("a residual names")
    assert all(i.check == "schema" and i.severity == "error" for i in report.errors)
    assert report.plan is None and report.summary is None


def test_semantic_errors_are_all_reported_at_once():
    def bad(b):
        child(b, 1).update(numHeads=5)
        child(b, 2).update(source="ghost")
        child(b, 4).update(actFunc="swiglu")
        b["model"][-1]["data"].update(inDim=E * 2)
        b["config"].update(tokenizer="nope")

    report = validate(mutate(bad))
    assert [i.check for i in report.errors] == ["widths", "attention_heads", "residual_sources", "activations",
                                                "tokenizer"]
    assert report.summary is None
    with pytest.raises(RequestInvalidError) as exc:
        require_valid(mutate(bad))
    assert len(exc.value.report.errors) == 5 and "/model/2/children/1/data/numHeads" in str(exc.value)


def test_unknown_node_type_lists_the_known_types():
    body = mutate(lambda b: b["model"][2]["children"].__setitem__(1, {"type": "mhattention", "data": {}}))
    [issue] = validate(body).errors
    assert issue.path == "/model/2/children/1/type" and issue.found == "mhattention"
    assert all(t in issue.expected for t in NODE_TYPES)
    missing = mutate(lambda b: b["model"][3].pop("type"))
    [issue] = validate(missing).errors
    assert issue.path == "/model/3/type" and "transformerBlock" in issue.expected


@pytest.mark.parametrize(("body", "path"), [
    (None, ""), ([], ""), ("x", ""), ({}, "/model"), ({"model": []}, "/model"), ({"model": {}}, "/model"),
    ({"model": [5]}, "/model/0"), ({"model": [{"type": "dropout"}], "config": 3}, "/config"),
    ({"model": [{"type": "residual"}]}, "/model/0/data"),
    ({"model": [{"type": "dropout", "data": {"dropoutRate": float("nan")}}]}, "/model/0/data/dropoutRate"),
    ({"model": [{"type": "linear", "data": {"outDim": float("inf")}}]}, "/model/0/data/outDim"),
    ({"model": [{"type": "dropout"}], "config": {"seed": -1}}, "/config/seed"),
    ({"model": [{"type": "dropout"}], "config": {"dtype": "fp8"}}, "/config/dtype"),
    ({"model": [{"type": "dropout"}], "modelName": "a/b"}, "/modelName"),
    ({"model": [{"type": "residual", "data": {"source": ""}}]}, "/model/0/data/source"),
])
def test_malformed_bodies_give_one_pointed_error(body, path):
    report = validate(body)
    assert [e.path for e in report.errors] == [path]
    assert report.errors[0].hint or report.errors[0].expected


def test_too_deep_nesting_is_one_error_not_a_crash():
    deep: list = []
    node = deep
    for _ in range(10_000):
        node.append([])
        node = node[0]
    report = validate({"model": [{"type": "dropout", "data": {"x": deep}}]})
    [issue] = report.errors
    assert issue.path.startswith("/model/0/data/x/0/0") and "nesting" in issue.message


def test_huge_integers_render():
    body = mutate(lambda b: (b["model"][0]["data"].update(vocabSize=10**5000),
                             child(b, 4).update(hiddenDim=[-(10**5000)])))
    report = validate(body)
    assert [e.path for e in report.errors] == ["/model/0/data/vocabSize", "/model/2/children/4/data/hiddenDim"]
    assert report.errors[0].found == "~10^5000"
    json.dumps(report.to_dict())


# -- summary -------------------------------------------------------------------------------------------------

def test_summary_rows_carry_per_node_shapes_and_parameters(shared):
    report = validate(load(shared, "gpt2"))
    rows = {r.path: r for r in report.summary.rows}
    assert list(rows) == ["/model/0", "/model/1", "/model/2", "/model/3",
                          *(f"/model/3/children/{i}" for i in range(8)), "/model/4", "/model/5"]
    assert all(r.output_shape == "[B, T, 768]" for p, r in rows.items() if p != "/model/5")
    assert rows["/model/5"].output_shape == "[B, T, 50257]" and rows["/model/5"].parameters == 768 * 50257
    assert rows["/model/0"].parameters == 50257 * 768 and rows["/model/1"].parameters == 128 * 768
    block = rows["/model/3"]
    assert (block.repeat, block.depth, block.parameters) == (12, 0, 12 * 7_087_872)
    attn = rows["/model/3/children/1"]
    assert (attn.depth, attn.type, attn.parameters) == (1, "mhAttention", 768 * 3 * 768 + 3 * 768 + 768 * 768 + 768)
    assert rows["/model/3/children/3"].note == "+ normalization-1758635395718:in"
    memory = report.summary.memory
    assert memory["weights_fp32"] == 4 * 162_349_056 and memory["weights_bf16"] == 2 * 162_349_056
    assert memory["training_total"] > memory["training_states"] > 0 and memory["batch_size"] == 1


def test_summary_shapes_follow_width_changes():
    body = {"config": {"context_length": T, "tokenizer": "byte"}, "model": [
        n("tokenEmbedding", "tok", vocabSize=V, embDim=E), n("linear", "up", outDim=48), n("dropout", "d"),
        n("linear", "head", outDim=V)], "modelName": "shapes"}
    report = validate(body)
    assert [r.output_shape for r in report.summary.rows] == ["[B, T, 32]", "[B, T, 48]", "[B, T, 48]",
                                                             f"[B, T, {V}]"]
    assert [r.parameters for r in report.summary.rows] == [V * E, E * 48, 0, 48 * V]
    assert report.summary.total_parameters == V * E + E * 48 + 48 * V


def test_build_false_skips_the_summary():
    report = validate(tiny(), build=False)
    assert report.ok and report.summary is None and report.plan is not None


def test_report_round_trips_through_json(shared):
    body = load(shared, "llama3")
    body["model"][1]["children"][1]["data"]["numKvGroups"] = 5
    out = json.loads(json.dumps(validate(body).to_dict()))
    assert out["valid"] is False
    [err] = out["errors"]
    assert err == {"path": "/model/1/children/1/data/numKvGroups", "check": "attention_heads", "severity": "error",
                   "message": err["message"], "expected": "a divisor of 32", "found": 5, "hint": err["hint"]}
    good = json.loads(json.dumps(validate(copy.deepcopy(load(shared, "llama3"))).to_dict()))
    assert good["valid"] is True and good["summary"]["total_parameters"] == 1_235_818_496
