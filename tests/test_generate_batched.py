"""Batched generation (issue 15.2): concurrent requests to one model decode in one forward pass per step, and each
gets exactly what it would get alone (greedy ids, seeded samples, stop strings, EOS, streamed text)."""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from service_fixtures import serve_in_thread, wait_until
from test_generate import ARCHITECTURES, T, make
from toy import toy_request

import slmb.core.nodes as N
from slmb.api.app import Settings, create_app
from slmb.api.serve import free_port
from slmb.core.generate import BatchedGenerator, Generator, SamplingParams, load_generator
from slmb.core.model import KVCache
from slmb.core.tokenizers import load_tokenizer
from slmb.core.trainer import train

# Prompts of different lengths, one longer than the models' context (24): its window is re-encoded from the start.
PROMPTS = ["a", "To be, or not", "ROMEO:\nWhat light", "", "x" * 30, "The quick brown fox jumps"]
MAX_NEW = [40, 7, 25, 1, 12, 33]  # past the context for some: their windows fill and slide while others decode


def model_for(arch: str):
    model = make(ARCHITECTURES[arch]())
    if arch == "relative":  # a zero-initialised bias would hide position mistakes
        for m in model.modules():
            if hasattr(m, "buckets"):
                torch.nn.init.normal_(m.weight)
    return model


def submit_together(batcher: BatchedGenerator, jobs: list[tuple[str, SamplingParams]]) -> list:
    """Submit all jobs before the decoding thread looks at any, so the first step already batches them."""
    with batcher._cond:
        return [batcher.submit(prompt, params) for prompt, params in jobs]


def finish(handles: list) -> list[str]:
    return ["".join(handle) for handle in handles]


def assert_same(batched, alone) -> None:
    assert batched.token_ids == alone.token_ids
    assert (batched.text, batched.finish_reason, batched.prompt_tokens) == \
        (alone.text, alone.finish_reason, alone.prompt_tokens)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_ids_equal_unbatched_with_joins_and_leaves(arch):
    model, tok = model_for(arch), load_tokenizer("byte")
    gen = Generator(model, tok)
    batcher = BatchedGenerator(gen, max_batch=4)  # six requests, four places: two join as others leave
    jobs = [(p, SamplingParams(max_new_tokens=n, temperature=0, stop_at_eos=False))
            for p, n in zip(PROMPTS, MAX_NEW, strict=True)]
    first = submit_together(batcher, jobs[:4])
    wait_until(lambda: batcher.steps >= 3, 60, "three batched steps")
    late = [batcher.submit(p, params) for p, params in jobs[4:]]  # joining sequences already mid-way
    texts = finish(first + late)
    for (prompt, params), handle, text in zip(jobs, first + late, texts, strict=True):
        alone = gen.generate(prompt, params)
        assert_same(handle.result, alone)
        assert text == alone.text  # the deltas add up to the text
        assert len(alone.token_ids) == params.max_new_tokens
    assert batcher.batched_rows >= 2 * batcher.steps >= 6  # steps really were batched
    batcher.close()


def test_prompts_and_windows_of_one_length_share_a_pass():
    """Same-length prompts, and windows re-encoded at the same step, go through one multi-token pass
    (``decode_rows`` with T > 1); each result is still its lone one."""
    model, tok = model_for("llama3"), load_tokenizer("byte")
    gen = Generator(model, tok)
    shapes: list[tuple[int, int]] = []
    decode_rows = model.decode_rows

    def recorded(ids, caches, exact=True):
        shapes.append(tuple(ids.shape))
        return decode_rows(ids, caches, exact)

    model.decode_rows = recorded
    batcher = BatchedGenerator(gen)
    jobs = [(prompt, SamplingParams(max_new_tokens=30, temperature=t, seed=i, stop_at_eos=False))
            for i, (prompt, t) in enumerate([("abcdefgh", 0), ("ROMEO: a", 0.8), ("12345678", 0), ("xyzxyzxy", 1.2)])]
    handles = submit_together(batcher, jobs)
    finish(handles)
    del model.decode_rows
    for handle, (prompt, params) in zip(handles, jobs, strict=True):
        assert_same(handle.result, gen.generate(prompt, params))
    assert (4, 8) in shapes  # the prompts: one pass
    assert (4, T) in shapes  # 8 + 30 tokens overflow the window of T: the windows re-encoded together
    batcher.close()


def test_not_exact_mode_batches_products_and_stays_close():
    """exact=False: one product per layer for the batch (last bits may differ), so only closeness is promised;
    on these tiny models the greedy paths agree."""
    model, tok = model_for("gpt2"), load_tokenizer("byte")
    gen = Generator(model, tok)
    batcher = BatchedGenerator(gen, max_batch=8, exact=False)
    jobs = [(p, SamplingParams(max_new_tokens=10, temperature=0)) for p in PROMPTS[:4]]
    handles = submit_together(batcher, jobs)
    finish(handles)
    assert batcher.batched_rows >= 2
    same = sum(h.result.token_ids == gen.generate(p, params).token_ids
               for h, (p, params) in zip(handles, jobs, strict=True))
    assert same >= 3


def test_seeded_sampling_is_reproducible_batched_or_alone():
    model, tok = model_for("llama3"), load_tokenizer("byte")
    gen = Generator(model, tok)
    batcher = BatchedGenerator(gen)
    settings = [dict(temperature=0.9, top_k=20, seed=1), dict(temperature=1.3, top_p=0.8, seed=2),
                dict(temperature=0.7, top_k=0, repetition_penalty=1.4, seed=3),
                dict(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=0.8, seed=2**63 + 5),
                dict(temperature=0, repetition_penalty=1.3, seed=4)]  # greedy rows share the sampling call
    jobs = [(PROMPTS[i % len(PROMPTS)], SamplingParams(max_new_tokens=30, stop_at_eos=False, **s))
            for i, s in enumerate(settings)]
    sample, sizes = gen._sample_rows, []

    def counted(logits, rows):
        sizes.append(len(rows))
        return sample(logits, rows)

    gen._sample_rows = counted
    handles = submit_together(batcher, jobs)
    finish(handles)
    gen._sample_rows = sample
    assert max(sizes) == len(jobs)  # one sampling call for every row of a step
    for handle, (prompt, params) in zip(handles, jobs, strict=True):
        assert_same(handle.result, gen.generate(prompt, params))
    # and again, batched with other company: the same samples
    again = submit_together(batcher, [jobs[2], (PROMPTS[1], SamplingParams(max_new_tokens=5)), jobs[0]])
    finish(again)
    assert again[0].result.token_ids == handles[2].result.token_ids
    assert again[2].result.token_ids == handles[0].result.token_ids
    assert len({tuple(h.result.token_ids) for h in handles}) == len(handles)  # different seeds, different samples


def reference_sample(gen: Generator, logits, seen, p: SamplingParams, rng: torch.Generator) -> int:
    """One row sampled as before batched sampling: 1-D masks and ``torch.multinomial``."""
    logits = logits[: gen.valid_vocab].float()
    if seen is not None:
        seen = seen[: gen.valid_vocab]
        logits = torch.where(seen, torch.where(logits > 0, logits / p.repetition_penalty,
                                               logits * p.repetition_penalty), logits)
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, gen.valid_vocab)).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        drop = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1) >= p.top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=rng))


SETTINGS = [dict(temperature=0), dict(temperature=0.7, top_k=40), dict(temperature=1.3, top_k=0, top_p=0.8),
            dict(temperature=0.9, top_k=0, repetition_penalty=1.4), dict(temperature=0, repetition_penalty=2.0),
            dict(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=0.8), dict(temperature=0.5, top_k=1),
            dict(temperature=2.0, top_k=0, top_p=1e-6), dict(temperature=1.0, top_k=0), dict(temperature=0.8, top_k=5)]


@pytest.mark.parametrize(("width", "valid"), [(300, 257), (50304, 50257)])  # a padded head, GPT-2's vocabulary
def test_batched_sampling_equals_each_row_alone_and_the_one_row_multinomial(width, valid):
    """``_sample_rows`` over a batch gives every row the token it gets alone (same seeded stream), and the token
    the one-row ``torch.multinomial`` path gave before sampling was batched; rows with different settings mix."""
    gen = Generator(model_for("gpt2"), load_tokenizer("byte"))
    gen.valid_vocab = valid
    draw = torch.Generator().manual_seed(0)
    params = [SamplingParams(seed=i, **s) for i, s in enumerate(SETTINGS)]
    seen = [torch.rand(width, generator=draw) < 0.1 if p.repetition_penalty != 1.0 else None for p in params]
    streams = {name: [torch.Generator().manual_seed(1000 + i) for i in range(len(params))]
               for name in ("batched", "alone", "reference")}
    got: dict[str, list[list[int]]] = {name: [] for name in streams}
    for _ in range(12):  # the generators advance: later steps use later draws
        logits = torch.randn(len(params), width, generator=draw) * 4
        got["batched"].append(gen._sample_rows(logits, list(zip(seen, params, streams["batched"], strict=True))))
        got["alone"].append([gen._sample(logits[i], seen[i], p, streams["alone"][i]) for i, p in enumerate(params)])
        got["reference"].append([reference_sample(gen, logits[i], seen[i], p, streams["reference"][i])
                                 for i, p in enumerate(params)])
    assert got["batched"] == got["alone"] == got["reference"]
    assert max(max(row) for row in got["batched"]) < valid
    columns = list(zip(*got["batched"], strict=True))
    assert len(set(columns[1])) > 3  # sampled rows really vary
    # ties: a nucleus of one token is the first maximum, as greedy (the sort is stable)
    tied = torch.zeros(2, width)
    tied[:, [7, 3, 9]] = 5.0
    rows = [(None, SamplingParams(temperature=1, top_k=0, top_p=1e-6), torch.Generator().manual_seed(s))
            for s in range(2)]
    assert gen._sample_rows(tied, rows) == [3, 3]


def test_a_row_with_nonfinite_logits_fails_only_its_request():
    model = model_for("gpt2")
    gen = Generator(model, load_tokenizer("byte"))
    rows = [(None, SamplingParams(seed=s), torch.Generator().manual_seed(s)) for s in range(2)]
    for bad in (float("nan"), float("inf")):
        logits = torch.randn(2, 300)
        logits[0, 5] = bad
        with pytest.raises(ValueError, match="not finite"):
            gen._sample_rows(logits, rows)
    # refused before any draw: the generators are where they started
    assert [r[2].get_state().tolist() for r in rows] == \
        [torch.Generator().manual_seed(s).get_state().tolist() for s in range(2)]
    decode_rows = model.decode_rows

    def poisoned(ids, caches, exact=True):  # the first batched step gives row 0 non-finite logits
        out = decode_rows(ids, caches, exact)
        if not calls:
            out[0] = float("nan")
        calls.append(len(caches))
        return out

    calls: list[int] = []
    model.decode_rows = poisoned
    batcher = BatchedGenerator(gen)
    jobs = [("ab", SamplingParams(max_new_tokens=8, seed=s, stop_at_eos=False)) for s in range(3)]
    handles = submit_together(batcher, jobs)
    with pytest.raises(ValueError, match="not finite"):
        finish(handles[:1])
    finish(handles[1:])
    del model.decode_rows
    assert calls[0] == 3
    for handle, (prompt, params) in zip(handles[1:], jobs[1:], strict=True):
        assert_same(handle.result, gen.generate(prompt, params))
    batcher.close()


def test_stop_strings_and_eos_per_sequence():
    model = model_for("gpt2")
    greedy = SamplingParams(max_new_tokens=30, temperature=0, stop_at_eos=False)
    plain = Generator(model, load_tokenizer("byte"))
    texts = [plain.generate(p, greedy) for p in PROMPTS[:3]]
    # a stop string from the middle of the first text, an EOS id from the middle of the second's tokens
    stop = texts[0].text[10:13]
    tok = copy.copy(load_tokenizer("byte"))
    tok.eos_id = texts[1].token_ids[8]
    gen = Generator(model, tok)
    batcher = BatchedGenerator(gen)
    jobs = [(PROMPTS[0], greedy.model_copy(update={"stop": [stop]})),
            (PROMPTS[1], greedy.model_copy(update={"stop_at_eos": True})),
            (PROMPTS[2], greedy)]
    handles = submit_together(batcher, jobs)
    streamed = finish(handles)
    results = [h.result for h in handles]
    for result, (prompt, params), text in zip(results, jobs, streamed, strict=True):
        assert_same(result, gen.generate(prompt, params))
        assert text == result.text
    assert results[0].finish_reason == "stop" and stop not in results[0].text
    assert results[0].text == texts[0].text[: texts[0].text.index(stop)]
    assert results[1].finish_reason == "eos" and len(results[1].token_ids) == texts[1].token_ids.index(tok.eos_id)
    assert results[2].finish_reason == "length" and len(results[2].token_ids) == 30


def test_a_cancelled_request_frees_its_place():
    gen = Generator(model_for("gpt2"), load_tokenizer("byte"))
    batcher = BatchedGenerator(gen, max_batch=1)
    endless = batcher.submit("a", SamplingParams(max_new_tokens=100_000, temperature=0, stop_at_eos=False))
    wait_until(lambda: len(endless.result.token_ids) >= 3, 60, "the first request to decode")
    short = batcher.submit("b", SamplingParams(max_new_tokens=5, temperature=0))
    assert not short.finished.wait(0.5)  # it waits: the only place is taken
    endless.cancel()
    assert short.finished.wait(60), "the cancelled request kept its place"
    assert len(short.result.token_ids) == 5 or short.result.finish_reason == "eos"
    wait_until(lambda: batcher.active == 0, 30, "no active sequence")
    assert len(endless.result.token_ids) < 100_000
    # the streaming iterator cancels when its consumer leaves
    stream = batcher.stream("c", SamplingParams(max_new_tokens=100_000, temperature=0, stop_at_eos=False))
    next(piece for piece in stream if piece)
    stream.close()
    wait_until(lambda: batcher.active == 0, 30, "the abandoned stream to leave")
    batcher.close()
    wait_until(lambda: batcher._thread is None, 30, "the decoding thread to end")
    late = batcher.generate("d", SamplingParams(max_new_tokens=3, temperature=0))  # after close: still served
    assert late.token_ids == gen.generate("d", SamplingParams(max_new_tokens=3, temperature=0)).token_ids
    wait_until(lambda: batcher._thread is None, 30, "its thread to end as well")


def test_zero_new_tokens_and_errors_end_the_request():
    gen = Generator(model_for("gpt2"), load_tokenizer("byte"))
    batcher = BatchedGenerator(gen)
    empty = batcher.generate("hi", SamplingParams(max_new_tokens=0))
    assert (empty.text, empty.token_ids, empty.finish_reason) == ("", [], "length")
    sample = gen._sample_rows

    def failing(logits, rows):  # a request whose sampling fails, in a batch with one that does not
        if any(p.seed == 13 for _, p, _ in rows):
            raise RuntimeError("sampling failed")
        return sample(logits, rows)

    gen._sample_rows = failing
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    bad, good = submit_together(batcher, [("hi", SamplingParams(seed=13)), ("hi", greedy)])
    with pytest.raises(RuntimeError, match="sampling failed"):
        finish([bad])
    finish([good])
    gen._sample_rows = sample
    assert good.result.token_ids == gen.generate("hi", greedy).token_ids  # the other request was served
    assert batcher.generate("hi", greedy).token_ids == good.result.token_ids  # and so is the next


@pytest.fixture
def served(monkeypatch):
    train(toy_request(name="bat", max_steps=2, ctx=32), track=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SLMB_GENERATE_BATCH", "8")
    app = create_app(Settings.from_env(redis_url=f"redis://127.0.0.1:{free_port()}/0"))  # no Redis needed
    with serve_in_thread(app) as url:
        yield app, url


def test_concurrent_service_requests_are_each_right(served):
    app, url = served
    alone, _ = load_generator("bat")
    bodies = [{"model_name": "bat", "input_text": PROMPTS[i % 4], "max_length": 10 + 3 * i,
               "temperature": 0 if i % 2 else 0.8, "seed": i, "stop": ["zz"] if i == 3 else []} for i in range(12)]
    answers: list = [None] * len(bodies)

    def post(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            answers[i] = client.post("/api/v1/generate-text", json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for body, resp in zip(bodies, answers, strict=True):
        assert resp is not None and resp.status_code == 200, resp and resp.text
        want = alone.generate(body["input_text"], SamplingParams(
            max_new_tokens=body["max_length"], temperature=body["temperature"], top_k=40, seed=body["seed"],
            stop=body["stop"]))
        got = resp.json()
        assert (got["generated_text"], got["new_tokens"], got["finish_reason"]) == \
            (want.text, len(want.token_ids), want.finish_reason)
        assert got["output_text"] == body["input_text"] + want.text
    assert isinstance(app.state.models.get("bat"), BatchedGenerator)

    async def streams() -> list[tuple[str, dict]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def one(body: dict) -> tuple[str, dict]:
                text, done = "", {}
                async with client.stream("POST", "/api/v1/generate-text/stream", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data:"):
                            message = json.loads(line[5:])
                            if message["event"] == "delta":
                                text += message["data"]["text"]
                            elif message["event"] == "done":
                                done = message["data"]
                return text, done
            return await asyncio.gather(*(one(b) for b in bodies[:6]))

    for body, (text, done), resp in zip(bodies[:6], asyncio.run(streams()), answers[:6], strict=True):
        assert done["output_text"] == body["input_text"] + text == resp.json()["output_text"]


def test_a_client_that_disconnects_frees_its_place(served):
    app, url = served
    body = {"model_name": "bat", "input_text": "a", "max_length": 1000, "temperature": 0}
    with httpx.Client(base_url=url, timeout=60) as client, \
            client.stream("POST", "/api/v1/generate-text/stream", json=body) as resp:
        for line in resp.iter_lines():
            if '"delta"' in line:
                break  # leave mid-stream
    batcher = app.state.models.get("bat")
    wait_until(lambda: batcher.active == 0, 60, "the disconnected request to leave the batch")
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/api/v1/generate-text", json={**body, "max_length": 4}).json()["new_tokens"] == 4


def test_the_service_benchmark_drives_a_running_service(served):
    """bench/serve_generate.py --url: its load and table against the served app (the full run starts servers of
    its own, minutes; this checks the measuring part)."""
    _, url = served
    bench = Path(__file__).resolve().parent.parent / "bench" / "serve_generate.py"
    out = subprocess.run([sys.executable, str(bench), "--url", url, "--model", "bat", "--clients", "4", "--rounds",
                          "2", "--lone", "3", "--new", "5", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    modes = json.loads(out.stdout.strip().splitlines()[-1])["modes"]["service"]
    assert (modes["lone"]["requests"], modes["concurrent"]["requests"]) == (3, 8)
    for r in modes.values():
        assert r["req_s"] > 0 and 0 < r["p50_s"] <= r["p95_s"] <= r["max_s"]
        assert r["tokens_s"] > 0


def test_the_step_benchmark_times_the_decoding_thread():
    """bench/serve_generate.py --step: the in-process decoding thread, and the share spent sampling."""
    bench = Path(__file__).resolve().parent.parent / "bench" / "serve_generate.py"
    out = subprocess.run([sys.executable, str(bench), "--step", "--clients", "3", "--new", "4", "--reps", "2",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert (r["clients"], r["new_tokens"], r["reps"], r["sampling_call"]) == (3, 4, 2, "_sample_rows")
    assert 0 < r["wall_min_s"] <= r["wall_s"] and 0 < r["sampling_share"] < 1 and r["batched_steps"] >= 2


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_exact_rows_logits_equal_lone_decoding_bit_for_bit(arch, monkeypatch):
    """Exact mode's logits, row by row, are the lone decode step's, whether its products ran as one batched call
    (where the probe allowed) or row by row (forced here by a probe that always says no)."""
    model = model_for(arch)
    draw = torch.Generator().manual_seed(5)

    def run() -> None:
        batch = [KVCache(model, 1, T) for _ in range(5)]
        alone = [KVCache(model, 1, T) for _ in range(5)]
        with torch.inference_mode():
            for i in range(5):  # prompts of different lengths: the rows sit at different positions
                prompt = torch.randint(0, 257, (1, 2 + 3 * i), generator=draw)
                model(prompt, batch[i])
                model(prompt, alone[i])
            for n in (1, 1, 3, 1):  # a step of 3 tokens each as well
                ids = torch.randint(0, 257, (5, n), generator=draw)
                out = model.decode_rows(ids, batch, exact=True)
                for i in range(5):
                    assert torch.equal(out[i], model(ids[i : i + 1], alone[i])[0])
            for cache in batch + alone:  # full windows re-encoded from position 0, together
                cache.reset()
            ids = torch.randint(0, 257, (5, T), generator=draw)
            out = model.decode_rows(ids, batch, exact=True)
            for i in range(5):
                assert torch.equal(out[i], model(ids[i : i + 1], alone[i])[0])

    monkeypatch.setattr(N, "_BATCH_INVARIANT", {})
    run()
    assert N._BATCH_INVARIANT  # the products were probed (and batched where the probe found them identical)

    class Never(dict):
        def get(self, key, default=None):
            return False

    monkeypatch.setattr(N, "_BATCH_INVARIANT", Never())
    run()


def test_a_batched_product_that_rounds_differently_is_not_used(monkeypatch):
    monkeypatch.setattr(N, "_BATCH_INVARIANT", {})
    w = torch.randn(48, 32)
    x = torch.randn(6, 1, 32)
    single = lambda r: torch.nn.functional.linear(r, w)  # noqa: E731
    off = lambda rows: torch.nn.functional.linear(rows, w) * (1 + 2**-20)  # noqa: E731  (last bits differ)
    state = torch.get_rng_state()
    y = N._rows_product(("t",), single, off, x)
    assert torch.equal(torch.get_rng_state(), state)  # the probe draws from a generator of its own
    assert torch.equal(y, torch.cat([single(x[i : i + 1].clone()) for i in range(6)]))
    assert list(N._BATCH_INVARIANT.values()) == [False]
    exact = lambda rows: torch.cat([single(rows[i : i + 1].clone()) for i in range(rows.shape[0])])  # noqa: E731
    N._rows_product(("u",), single, exact, x)
    assert N._BATCH_INVARIANT[("u", 6, 1, torch.float32, x.device, torch.get_num_threads())] is True


@pytest.mark.parametrize("width", [64, 40, 4096])  # batched; a scalar tail; more than one chunk of work
def test_activations_of_exact_rows_round_as_one_row(width):
    h = torch.randn(20, 1, width) * 3
    for act in N.ACTIVATIONS.values():
        assert torch.equal(N._rows_activation(act, h), torch.cat([act(h[i : i + 1].clone()) for i in range(20)]))
