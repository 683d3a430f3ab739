"""The OpenAI-compatible routes (/v1) through the official ``openai`` client, against the app served by uvicorn on
a port of its own (a redis-server and an MLflow store of this module's own). Generation needs no worker: the API
process loads the model from its store. The model is a tiny random GPT-2 canvas on the byte tokenizer, saved to
each test's store; greedy decoding makes its output reproducible."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from service_fixtures import serve_in_thread, start_redis, stop_process
from toy import toy_request

from slmb.core import store
from slmb.core.compiler import build_model
from slmb.core.spec import TrainRequest
from slmb.core.tokenizers import load_tokenizer

MODEL = "oa-tiny"
TOKEN = "s3cret-token"
PROMPT = "ROMEO: "


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """Redis and MLflow for the module; the app twice, without and with a bearer token."""
    from mlflow.tracking import MlflowClient

    from slmb.api.app import Settings, create_app

    tmp = tmp_path_factory.mktemp("openai")
    redis_proc, url = start_redis(tmp)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("slmb", (tmp / "mlartifacts").as_uri())
    try:
        with serve_in_thread(create_app(Settings(redis_url=url, max_new_tokens=64))) as open_url, \
                serve_in_thread(create_app(Settings(redis_url=url, api_token=TOKEN))) as token_url:
            yield {"url": open_url, "token_url": token_url, "mlflow": uri}
    finally:
        stop_process(redis_proc)


@pytest.fixture
def api(backend, monkeypatch):
    """The open app's URL, with the model saved in this test's store (SLMB_HOME is per test, see conftest)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", backend["mlflow"])
    torch.manual_seed(0)
    model = build_model(TrainRequest.model_validate(toy_request(d=32)))
    store.save_completed(MODEL, toy_request(name=MODEL, d=32), model.state_dict(), {"tokenizer": "byte"})
    return backend["url"]


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def native_generate(url: str, prompt: str, n: int, seed: int = 3) -> dict:
    with httpx.Client(base_url=url, timeout=60) as c:
        resp = c.post("/api/v1/generate-text", json={"model_name": MODEL, "input_text": prompt, "max_length": n,
                                                      "temperature": 0, "seed": seed})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_models_list_holds_the_completed_models_and_leaves_out_broken_ones(api):
    broken = store.save_completed("oa-broken", toy_request(name="oa-broken"), {}, {"tokenizer": "byte"})
    (broken / store.STRUCTURE).write_text("{not json")
    models = client(api).models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [(MODEL, "model", "slmb")]
    assert models.data[0].created > 1_700_000_000


def test_greedy_completion_equals_the_native_route_and_counts_tokens(api):
    native = native_generate(api, PROMPT, 12)
    out = client(api).completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, seed=3)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == MODEL
    choice = out.choices[0]
    assert choice.text == native["generated_text"] and choice.index == 0 and choice.logprobs is None
    assert choice.finish_reason == {"length": "length", "eos": "stop", "stop": "stop"}[native["finish_reason"]]
    tokens = load_tokenizer("byte").encode(PROMPT)
    assert out.usage.prompt_tokens == len(tokens) == 7
    assert out.usage.completion_tokens == native["new_tokens"]
    assert out.usage.total_tokens == 7 + native["new_tokens"]
    # A list of one prompt is the same request.
    again = client(api).completions.create(model=MODEL, prompt=[PROMPT], max_tokens=12, temperature=0)
    assert again.choices[0].text == choice.text


def test_streamed_completion_assembles_to_the_whole_one_with_usage_last(api):
    whole = client(api).completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(client(api).completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    texts = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in texts][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in texts[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_the_stream_ends_with_done_on_the_wire(api):
    with httpx.Client(base_url=api, timeout=60) as c, c.stream(
            "POST", "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True,
                                             "temperature": 0}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")


def test_stop_strings_cut_the_text_before_them(api):
    # Seeded sampling: varied text, the same on every call.
    sample = {"model": MODEL, "prompt": PROMPT, "max_tokens": 30, "temperature": 1.0, "seed": 7}
    free = client(api).completions.create(**sample).choices[0]
    cut = next(i for i in range(3, len(free.text)) if free.text[i] not in free.text[:i])  # a first occurrence
    stop = free.text[cut]
    for given in (stop, [stop, "never-seen-zzz"]):
        out = client(api).completions.create(**sample, stop=given)
        assert (out.choices[0].text, out.choices[0].finish_reason) == (free.text[:cut], "stop")
    streamed = client(api).completions.create(**sample, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == free.text[:cut]


def test_chat_uses_the_plain_template_and_streams_deltas(api):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    transcript = "System: Be brief.\nUser: Hello\nAssistant: "
    out = client(api).chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    # The same prompt as a completion, stopping where the user's next turn would begin.
    same = client(api).completions.create(model=MODEL, prompt=transcript, max_tokens=10, temperature=0,
                                          stop="\nUser:")
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    message = out.choices[0].message
    assert (message.role, message.content) == ("assistant", same.choices[0].text)
    assert out.choices[0].finish_reason == same.choices[0].finish_reason
    assert out.usage.prompt_tokens == len(load_tokenizer("byte").encode(transcript))
    assert out.usage.completion_tokens == same.usage.completion_tokens

    chunks = list(client(api).chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == message.content
    assert body[-1].choices[0].finish_reason == out.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == out.usage.model_dump()


def test_chat_uses_the_checkpoints_template_when_it_has_one(api):
    path = store.get_model(MODEL).path
    template = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "[B]",
                                                            "eos_token": {"content": "</s>"}}))
    rendered = "[B]<user>Hi</s><assistant>"
    out = client(api).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=8, temperature=0)
    same = client(api).completions.create(model=MODEL, prompt=rendered, max_tokens=8, temperature=0, stop="</s>")
    assert out.choices[0].message.content == same.choices[0].text
    assert out.usage.prompt_tokens == len(rendered.encode())

    # Special-token text in the rendered prompt is the special token (one id), as transformers encodes it.
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<|endoftext|>",
                                                            "eos_token": "</s>"}))
    out = client(api).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=8, temperature=0)
    assert out.usage.prompt_tokens == 1 + len("<user>Hi</s><assistant>")


def test_unknown_model_is_not_found(api):
    with pytest.raises(openai.NotFoundError) as err:
        client(api).completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and "no-such-model" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client(api).chat.completions.create(model="../etc", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(("kwargs", "param", "message"), [
    ({"n": 2}, "n", "n: only n=1 is supported (got 2)"),
    ({"temperature": -1}, "temperature", "temperature: Input should be greater than or equal to 0"),
    ({"top_p": 1.5}, "top_p", "top_p: Input should be less than or equal to 1"),
    ({"max_tokens": 65}, "max_tokens", "max_tokens is 65; the service allows at most 64"),
    ({"echo": True}, "echo", "echo: only echo=false is supported"),
])
def test_bad_parameters_are_bad_requests_naming_the_field(api, kwargs, param, message):
    with pytest.raises(openai.BadRequestError) as err:
        client(api).completions.create(model=MODEL, prompt="hi", **{"max_tokens": 2, **kwargs})
    assert err.value.status_code == 400
    assert err.value.body == {"message": message, "type": "invalid_request_error", "param": param,
                              "code": err.value.body["code"]}


def test_bad_chat_messages_are_bad_requests_with_a_pointer(api):
    with pytest.raises(openai.BadRequestError) as err:
        client(api).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"},
                                                                   {"role": "robot", "content": "b"}])
    assert err.value.body["param"] == "messages[1].role"
    assert err.value.body["message"].startswith("messages[1].role: Input should be 'system'")
    with httpx.Client(base_url=api, timeout=30) as c:
        resp = c.post("/v1/chat/completions", json={"model": MODEL})
        wrong_stop = c.post("/v1/completions", json={"model": MODEL, "stop": [1]})
        not_json = c.post("/v1/completions", content='{"model": ', headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json() == {"error": {"message": "messages: Field required", "type": "invalid_request_error",
                                     "param": "messages", "code": "invalid_value"}}
    assert (wrong_stop.status_code, wrong_stop.json()["error"]["message"]) == (
        400, "stop: must be a string or a list of strings")
    assert not_json.status_code == 400 and not_json.json()["error"] == {
        "message": "the body is not valid JSON: Expecting value (at character 10)", "type": "invalid_request_error",
        "param": None, "code": "invalid_json"}


def test_broken_model_is_a_conflict_naming_why(api):
    broken = store.save_completed("oa-cut", toy_request(name="oa-cut"), {}, {"tokenizer": "byte"})
    (broken / store.WEIGHTS).write_bytes(b"\x00" * 3)
    with pytest.raises(openai.ConflictError) as err:
        client(api).completions.create(model="oa-cut", prompt="hi", max_tokens=2)
    assert err.value.body["message"].startswith("model 'oa-cut' is broken: model.safetensors")


def test_the_bearer_token_is_required_when_configured(backend, api):
    url = backend["token_url"]
    for key in ("unused", TOKEN + "x"):
        with pytest.raises(openai.AuthenticationError) as err:
            client(url, key).models.list()
        assert err.value.body["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        client(url).completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert [m.id for m in client(url, TOKEN).models.list().data] == [MODEL]
    out = client(url, TOKEN).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert out.usage.completion_tokens <= 4


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _imported_chat_model(path, seed: int = 5, end_scale: float = 1.0) -> tuple:
    """A tiny random Qwen3 checkpoint with a byte-level BPE tokenizer.json of exactly its vocabulary and a ChatML
    chat template, imported into the store as ``oa-qwen``. Returns (the transformers model, its tokenizer)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from slmb.core.interop import import_checkpoint

    vocab = 300
    cfg = transformers.Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=128, tie_word_embeddings=True,
                                   attn_implementation="eager", bos_token_id=None, eos_token_id=None,
                                   pad_token_id=None)
    torch.manual_seed(seed)
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # weights far from flat, so greedy paths have no near-ties
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
        hf.model.embed_tokens.weight[2] *= end_scale  # <|im_end|> (id 2): a large row ends turns soon
    path.mkdir(parents=True)
    hf.save_pretrained(path)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["user assistant system To be, or not to be, that is the question"] * 20, trainer)
    tok.add_special_tokens([f"<|extra_{i}|>" for i in range(vocab - tok.get_vocab_size())])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    import_checkpoint(str(path), "oa-qwen")
    return hf, transformers.AutoTokenizer.from_pretrained(str(path))


def test_chat_with_an_imported_checkpoint_matches_transformers(api, tmp_path):
    """The checkpoint's template, its special tokens as ids and its end of turn, as transformers' chat does."""
    hf, hf_tok = _imported_chat_model(tmp_path / "qwen", seed=9, end_scale=3.0)  # ends its turn after 4 tokens
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be, or not"}]
    prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    out = client(api).chat.completions.create(model="oa-qwen", messages=messages, max_tokens=12, temperature=0)
    assert out.usage.prompt_tokens == len(prompt)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    new = ref[0, len(prompt):].tolist()
    end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    cut = new.index(end) if end in new else len(new)
    assert cut < len(new)  # the model ends its turn: slmb stops there, at the template's end-of-turn token
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == cut
    assert out.choices[0].message.content == hf_tok.decode(new[:cut])
