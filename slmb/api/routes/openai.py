"""OpenAI-compatible routes under ``/v1``: ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions``, so the official ``openai`` client (and the tools built on it) can use slmb's completed
models with only a ``base_url`` changed.

They are a second face of the generation routes (:mod:`slmb.api.routes.generate`): the same model cache, the same
409 for broken models, the same bounds (``SLMB_MAX_NEW_TOKENS``, ``SLMB_MAX_INPUT_CHARS``), the same bearer token
and the same body guard. What differs is the wire format: OpenAI's request fields, response objects, SSE chunks
ending in ``data: [DONE]``, and errors as ``{"error": {"message", "type", "param", "code"}}``, so that the client
raises the right exception class (``BadRequestError``, ``AuthenticationError``, ``NotFoundError``, ...).

Chat: the messages go through the checkpoint's chat template (``chat_template`` in a ``tokenizer_config.json``, or a
``chat_template.jinja``, in the model's directory or its ``tokenizer/`` folder) rendered in a sandboxed Jinja
environment, as transformers renders it. A model without one gets a plain transcript (:func:`render_chat`), and
generation stops where the model starts writing the user's next turn. A rendered template's special-token text
(``<|im_start|>``) is encoded as the special tokens' ids, which are handed to the generator as the prompt's ids
(:func:`slmb.api.routes.generate.deltas`). Concurrent requests to one model decode in one batch, as on the
generation routes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from slmb.api import model_cache
from slmb.api.routes.events import SSE_HEADERS
from slmb.api.routes.generate import complete, deltas
from slmb.api.trust import check_name, check_text, printable
from slmb.core.generate import BatchedGenerator, Generation, Generator, SamplingParams
from slmb.core.store import BrokenModelError, StoreError
from slmb.core.tokenizers import Tokenizer, TokenizerNotFoundError

log = logging.getLogger("slmb.api")
OPENAI_PREFIX = "/v1"
MAX_STOPS = 16
MAX_STOP_CHARS = 200
# The plain chat transcript for models without a chat template: one "Role: content" line per message, then the
# assistant's turn; generation stops where the model begins the user's next turn.
PLAIN_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = "\nUser:"
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


# ---------------------------------------------------------------------------------------------------- errors


class OpenAIError(Exception):
    """An error answered in OpenAI's shape. ``type`` is OpenAI's class of error (``invalid_request_error``, ...),
    ``param`` the request field at fault (``messages[0].role``), ``code`` a short machine-readable reason."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(printable(exc.body()), status_code=exc.status, headers=headers)


# What a field that takes one of several types expects, for a message clearer than one per union branch.
UNION_FIELDS = {"stop": "a string or a list of strings", "prompt": "a string or a list of one string",
                "content": "a string or a list of text parts"}


def _param(loc: tuple | list) -> str | None:
    """A pydantic location (``("body", "messages", 0, "role")``) as OpenAI names fields (``messages[0].role``)."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("str", "int", "float", "bool") and "[" not in str(part):  # not a union branch's name
            out += f".{part}" if out else str(part)
    return out or None


def _within(param: str | None, outer: str | None) -> bool:
    """Whether ``param`` is ``outer`` or a part of it (``stop[0]`` of ``stop``)."""
    return bool(param and outer) and param.startswith(outer) and param[len(outer):][:1] in ("", "[", ".")


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A /v1 body that does not validate: a 400 naming the first field at fault, as OpenAI answers (the client
    raises ``BadRequestError``), instead of FastAPI's 422 list."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        problem = (first.get("ctx") or {}).get("error", "")
        message = f"the body is not valid JSON: {problem} (at character {first['loc'][-1]})"
        return await openai_error(request, OpenAIError(400, message, code="invalid_json"))
    param = _param(first.get("loc", ()))
    field = re.sub(r"\[\d+\]$", "", (param or "").rsplit(".", 1)[-1])
    if field in UNION_FIELDS:  # one problem however many branches of the union failed: the field is neither
        errors = [errors[0]] + [e for e in errors[1:] if not _within(_param(e.get("loc", ())), param)]
        message = f"{param}: must be {UNION_FIELDS[field]}"
    else:
        message = f"{param or 'the body'}: {first['msg']}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return await openai_error(request, OpenAIError(400, message, param=param, code="invalid_value"))


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def require_token_openai(request: Request) -> None:
    """The service's bearer token (``SLMB_API_TOKEN``), refused in OpenAI's shape (the client raises
    ``AuthenticationError``)."""
    from slmb.api.app import require_token

    try:
        require_token(request)
    except HTTPException:
        raise OpenAIError(401, "missing or wrong bearer token (the service's SLMB_API_TOKEN)",
                          type="authentication_error", code="invalid_api_key") from None


router = APIRouter(tags=["openai"], dependencies=[Depends(require_token_openai)])


# ---------------------------------------------------------------------------------------------------- bodies


class _Sampling(BaseModel):
    """What both generation routes take. Fields OpenAI defines and slmb cannot honour are refused by name
    (``n`` other than 1, ``echo``, ``logprobs``); unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(default=1.0, ge=0.0, le=1.0, description="1 = off; 0 = greedy")
    top_k: int | None = Field(default=None, ge=0, description="not OpenAI's: 0 or null = off (as vLLM)")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0, description="not OpenAI's (as vLLM)")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=1 << 64)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    logprobs: Any = None
    user: str | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str] = ""
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    top_logprobs: int | None = None


def _stops(body: _Sampling) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS:
        raise OpenAIError(400, f"stop: at most {MAX_STOPS} stop strings", param="stop")
    for i, s in enumerate(stops):
        _text(s, f"stop[{i}]")
        if len(s) > MAX_STOP_CHARS:
            raise OpenAIError(400, f"stop[{i}]: stop strings are {MAX_STOP_CHARS} characters at most",
                              param="stop")
    return stops


def _text(value: str, param: str) -> str:
    try:
        return check_text(value)
    except ValueError as exc:
        raise OpenAIError(400, f"{param}: {exc}", param=param) from None


def _params(body: _Sampling, request: Request, max_tokens: int | None, default_max: int, prompt: str,
            extra_stops: tuple[str, ...] = ()) -> SamplingParams:
    """OpenAI's sampling fields as slmb's :class:`SamplingParams`, within the service's bounds."""
    settings = request.app.state.settings
    _text(body.model, "model")
    if body.n != 1:
        raise OpenAIError(400, f"n: only n=1 is supported (got {body.n})", param="n", code="unsupported_value")
    if body.logprobs not in (None, False, 0):
        raise OpenAIError(400, "logprobs: not supported", param="logprobs", code="unsupported_value")
    if len(prompt) > settings.max_input_chars:
        raise OpenAIError(400, f"the prompt has {len(prompt)} characters; the service allows at most "
                               f"{settings.max_input_chars}", param="prompt", code="context_length_exceeded")
    max_new = default_max if max_tokens is None else max_tokens
    if max_new > settings.max_new_tokens:
        raise OpenAIError(400, f"max_tokens is {max_new}; the service allows at most {settings.max_new_tokens}",
                          param="max_tokens", code="invalid_value")
    greedy = body.temperature == 0 or body.top_p == 0
    try:
        return SamplingParams(max_new_tokens=max_new, temperature=0.0 if greedy else body.temperature,
                              top_k=body.top_k or None, top_p=body.top_p if body.top_p < 1 else None,
                              repetition_penalty=body.repetition_penalty, seed=body.seed,
                              stop=[*_stops(body), *extra_stops])
    except ValueError as exc:
        raise OpenAIError(400, str(exc)) from None


async def _generator(request: Request, name: str) -> Generator | BatchedGenerator:
    """As the generation routes load a model, with their answers in OpenAI's shape: 404 ``model_not_found``,
    409 for a broken model (naming why) or one whose tokenizer is not on this server."""
    try:
        check_name(name)
    except ValueError:
        raise OpenAIError(404, f"The model {name!r} does not exist", param="model", code="model_not_found") from None
    try:
        return await run_in_threadpool(request.app.state.models.get, name)
    except BrokenModelError as exc:
        raise OpenAIError(409, str(exc), param="model", code="model_broken") from None
    except StoreError:
        raise OpenAIError(404, f"The model {name!r} does not exist", param="model", code="model_not_found") from None
    except TokenizerNotFoundError as exc:  # the message lists server paths: the log has it, the client not
        log.error("model %s: %s", name, exc)
        raise OpenAIError(409, f"model {name!r} cannot be used here: its tokenizer's files are not on this server",
                          param="model", code="model_unusable") from None


def _usage(result: Generation) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
            "total_tokens": result.prompt_tokens + len(result.token_ids)}


def _include_usage(body: _Sampling) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(generator: Generator | BatchedGenerator, prompt: str, params: SamplingParams, result: Generation,
                  chunk: Any, final: Any, usage_chunk: Any | None, prompt_ids: list[int] | None = None
                  ) -> AsyncIterator[str]:
    """The SSE body: ``chunk(delta)`` per piece of text, ``final(result)`` with the finish reason, the usage
    chunk when asked for, ``[DONE]``. An error after the headers went out is an ``error`` message (what the
    ``openai`` client raises as ``APIError``), with the cause in the log under its request id."""
    try:
        async for delta in deltas(generator, prompt, params, result, prompt_ids):
            yield _sse(chunk(delta))
    except Exception:
        request_id = uuid.uuid4().hex[:16]
        log.exception("request %s: streamed OpenAI generation failed", request_id)
        yield _sse({"error": {"message": f"internal error (request id {request_id})", "type": "server_error",
                              "param": None, "code": None}})
        return
    yield _sse(final(result))
    if usage_chunk is not None:
        yield _sse(usage_chunk(result))
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------- models


def _created(value: Any) -> int:
    """A model's creation time as Unix seconds: the store writes ISO 8601, MLflow milliseconds."""
    if isinstance(value, int | float):
        return int(value / 1000) if value > 1e11 else int(value)
    try:
        return int(datetime.fromisoformat(str(value)).timestamp())
    except ValueError:
        return 0


@router.get("/models", summary="The completed models, as OpenAI lists models (broken ones left out)")
async def list_models() -> dict:
    models = await run_in_threadpool(model_cache.list_models)
    return {"object": "list", "data": [
        {"id": m["model_name"], "object": "model", "created": _created(m.get("created")), "owned_by": "slmb"}
        for m in models if m.get("status") != "broken"]}


# ---------------------------------------------------------------------------------------------------- completions


@router.post("/completions", summary="OpenAI text completion (the text returned does not include the prompt)")
async def completions(body: CompletionBody, request: Request) -> Any:
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise OpenAIError(400, f"prompt: one prompt per request (got a list of {len(body.prompt)})",
                              param="prompt", code="unsupported_value")
        prompt = body.prompt[0]
    else:
        prompt = body.prompt
    _text(prompt, "prompt")
    if body.echo:
        raise OpenAIError(400, "echo: only echo=false is supported", param="echo", code="unsupported_value")
    if body.best_of not in (None, 1):
        raise OpenAIError(400, "best_of: only 1 is supported", param="best_of", code="unsupported_value")
    if body.suffix:
        raise OpenAIError(400, "suffix: not supported", param="suffix", code="unsupported_value")
    params = _params(body, request, body.max_tokens, 16, prompt)  # OpenAI's default max_tokens is 16
    generator = await _generator(request, body.model)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def obj(choices: list[dict], **extra: Any) -> dict:
        return {"id": ident, "object": "text_completion", "created": created, "model": body.model,
                "choices": choices, **extra}

    def choice(text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    if not body.stream:
        result = await complete(generator, prompt, params)
        return obj([choice(result.text, FINISH[result.finish_reason])], usage=_usage(result))
    stream = _stream(generator, prompt, params, Generation(prompt, ""),
                     chunk=lambda delta: obj([choice(delta, None)]),
                     final=lambda r: obj([choice("", FINISH[r.finish_reason])]),
                     usage_chunk=(lambda r: obj([], usage=_usage(r))) if _include_usage(body) else None)
    return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)


# ---------------------------------------------------------------------------------------------------- chat


def _content(message: ChatMessage, i: int) -> str:
    """A message's text: a string, or the text parts of a list of parts (images and audio are refused)."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return _text(message.content, f"messages[{i}].content")
    texts = []
    for j, part in enumerate(message.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise OpenAIError(400, f"messages[{i}].content[{j}]: only text parts are supported",
                              param=f"messages[{i}].content[{j}]", code="unsupported_value")
        texts.append(_text(part["text"], f"messages[{i}].content[{j}].text"))
    return "".join(texts)


def chat_template(model_dir: Path) -> tuple[str, dict[str, str]] | None:
    """The checkpoint's chat template and its special tokens (``bos_token``, ``eos_token``), or None. Looked for
    as transformers saves them: ``chat_template.jinja`` or ``chat_template`` in ``tokenizer_config.json``, in the
    model's directory or its ``tokenizer/`` folder. A template given as a list of named templates uses
    ``default``."""
    for folder in (model_dir, model_dir / "tokenizer"):
        config: dict[str, Any] = {}
        cfg_file = folder / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.warning("%s is unreadable: %s", cfg_file.name, exc)
        template = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(template, list):
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        if isinstance(template, str) and template:
            specials = {}
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                value = config.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    specials[key] = value
            return template, specials
    return None


def render_chat(messages: list[dict[str, str]], template: tuple[str, dict[str, str]] | None) -> tuple[str, tuple]:
    """The prompt for ``messages`` and the extra stop strings it needs. With a template: rendered as
    transformers does (sandboxed Jinja, ``add_generation_prompt=True``); the model's end-of-sequence token ends
    the turn. Without: the plain transcript, stopping at the user's next turn."""
    if template is None:
        lines = [f"{PLAIN_ROLES[m['role']]}: {m['content']}\n" for m in messages]
        return "".join(lines) + "Assistant: ", (PLAIN_STOP,)
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    source, specials = template
    try:
        prompt = env.from_string(source).render(messages=messages, add_generation_prompt=True, **specials)
    except Exception as exc:  # TemplateError, or a template that fails on these messages (a TypeError, ...)
        raise OpenAIError(400, f"messages: the model's chat template refused them: {exc}", param="messages",
                          code="chat_template_error") from None
    eos = specials.get("eos_token")
    return prompt, ((eos,) if eos else ())


def _model_template(name: str) -> tuple[tuple[str, dict[str, str]] | None, list[int]]:
    """The model's chat template (None: the plain one) and the ids its ``generation_config.json`` ends a turn
    with (``eos_token_id``: Llama 3's instruct models end a turn with ``<|eot_id|>``, not the tokenizer's EOS)."""
    path = model_cache.local_or_fetched(name).path
    eos: Any = None
    for folder in (path, path / "tokenizer"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            eos = json.loads((folder / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
            break
    ids = eos if isinstance(eos, list) else [eos]
    return chat_template(path), [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]


def encode_with_specials(tok: Tokenizer, text: str) -> list[int]:
    """``text`` as ids, its special-token text (``<|im_start|>``, ``<|eot_id|>``) as the special tokens' ids.
    slmb's ``encode`` reads such text as ordinary text (right for training data, wrong for a rendered chat
    template, whose markers are meant as the checkpoint's special tokens, as transformers encodes them)."""
    specials = sorted(tok.special_tokens, key=len, reverse=True)
    if not specials:
        return tok.encode(text)
    ids: list[int] = []
    for i, piece in enumerate(re.split("(" + "|".join(map(re.escape, specials)) + ")", text)):
        if i % 2:
            ids.append(tok.special_tokens[piece])
        elif piece:
            ids.extend(tok.encode(piece))
    return ids


@router.post("/chat/completions", summary="OpenAI chat completion (the checkpoint's chat template, or a plain one)")
async def chat_completions(body: ChatBody, request: Request) -> Any:
    messages = [{"role": m.role, "content": _content(m, i)} for i, m in enumerate(body.messages)]
    if body.top_logprobs:
        raise OpenAIError(400, "top_logprobs: not supported", param="top_logprobs", code="unsupported_value")
    settings = request.app.state.settings
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    _params(body, request, max_tokens, settings.max_new_tokens, "")  # the cheap checks first, before any load
    generator = await _generator(request, body.model)
    template, eos_ids = await run_in_threadpool(_model_template, body.model)
    prompt, extra_stops = render_chat(messages, template)
    specials = {i: t for t, i in generator.tok.special_tokens.items()}
    extra_stops += tuple(specials[i] for i in eos_ids if i in specials and i != generator.tok.eos_id)
    params = _params(body, request, max_tokens, settings.max_new_tokens, prompt, extra_stops)
    ids = (encode_with_specials(generator.tok, prompt) or generator.prompt_ids("")) if template is not None else None
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def obj(kind: str, choices: list[dict], **extra: Any) -> dict:
        return {"id": ident, "object": kind, "created": created, "model": body.model, "choices": choices, **extra}

    if not body.stream:
        result = await complete(generator, prompt, params, ids)
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "finish_reason": FINISH[result.finish_reason], "logprobs": None}
        return obj("chat.completion", [choice], usage=_usage(result))

    def delta(d: dict, finish: str | None = None) -> dict:
        return obj("chat.completion.chunk", [{"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}])

    async def stream() -> AsyncIterator[str]:
        yield _sse(delta({"role": "assistant", "content": ""}))
        async for message in _stream(
                generator, prompt, params, Generation(prompt, ""),
                chunk=lambda piece: delta({"content": piece}),
                final=lambda r: delta({}, FINISH[r.finish_reason]),
                usage_chunk=(lambda r: obj("chat.completion.chunk", [], usage=_usage(r)))
                if _include_usage(body) else None, prompt_ids=ids):
            yield message

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
