"""``POST /api/v1/generate-text`` and its streamed variant ``POST /api/v1/generate-text/stream`` (SSE)."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from slmb.api.routes.events import SSE_HEADERS, sse_message
from slmb.api.trust import check_name, check_text
from slmb.core.generate import BatchedGenerator, Generation, Generator, SamplingParams
from slmb.core.spec import MAX_VOCAB
from slmb.core.store import BrokenModelError, StoreError
from slmb.core.tokenizers import TokenizerNotFoundError

log = logging.getLogger("slmb.api")
router = APIRouter(tags=["generation"])
MODEL_ERRORS = {404: {"description": "no completed model of that name"},
                409: {"description": "the model is broken: the detail names it and says why"}}


class GenerateBody(BaseModel):
    """The canvas sends ``model_name``, ``input_text``, ``max_length``, ``temperature``, ``top_k``; the rest are
    slmb's sampling controls (:class:`slmb.core.generate.SamplingParams`)."""

    # JSON has no NaN or Infinity, but Python's json module reads them: refuse them here, as SamplingParams would.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model_name: str
    input_text: str = ""
    max_length: int = Field(default=50, ge=0, description="new tokens at most")
    temperature: float = Field(default=0.7, ge=0.0, le=100.0, description="0 = greedy")
    top_k: int | None = Field(default=40, ge=0, le=MAX_VOCAB, description="0 or null = off")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="null or 1 = off")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0)
    seed: int | None = Field(default=None, ge=0, lt=1 << 64)  # what torch.manual_seed takes
    stop: list[str] = Field(default_factory=list, max_length=16)

    @field_validator("model_name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("input_text")
    @classmethod
    def _text(cls, v: str) -> str:
        return check_text(v)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str]) -> list[str]:
        return [check_text(s) for s in v]


def _params(body: GenerateBody, request: Request) -> SamplingParams:
    settings = request.app.state.settings
    # 422 details lead with the JSON pointer, as validation's do: the canvas shows only `detail`.
    if body.max_length > settings.max_new_tokens:
        raise HTTPException(422, f"/max_length: max_length is {body.max_length}; the service allows at most "
                                 f"{settings.max_new_tokens}")
    if len(body.input_text) > settings.max_input_chars:
        raise HTTPException(413, f"input_text has {len(body.input_text)} characters; the service allows at most "
                                 f"{settings.max_input_chars}")
    for i, stop in enumerate(body.stop):
        if len(stop) > 200:
            raise HTTPException(422, f"/stop/{i}: stop strings are 200 characters at most, this one has {len(stop)}")
    try:
        return SamplingParams(max_new_tokens=body.max_length, temperature=body.temperature, top_k=body.top_k,
                              top_p=body.top_p if body.top_p is not None and body.top_p < 1 else None,
                              repetition_penalty=body.repetition_penalty, seed=body.seed, stop=body.stop)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


async def deltas(generator: Generator | BatchedGenerator, prompt: str, params: SamplingParams, result: Generation,
                 prompt_ids: Sequence[int] | None = None) -> AsyncIterator[str]:
    """The text deltas of one generation, without blocking the event loop. A ``BatchedGenerator`` decodes in its
    own thread, which hands each delta to this loop; leaving early (a client that disconnected, a cancelled
    task) cancels the request, which frees its place in the batch. A plain ``Generator`` (batching off) decodes
    in the thread pool, one token per hop."""
    if not isinstance(generator, BatchedGenerator):
        generator = _with_prompt_ids(generator, prompt_ids)
        async for delta in iterate_in_threadpool(generator.stream(prompt, params, result)):
            yield delta
        return
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    handle = generator.submit(prompt, params, result, sink=lambda item: loop.call_soon_threadsafe(items.put_nowait,
                                                                                                  item),
                              prompt_ids=prompt_ids)
    try:
        while (item := await items.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        handle.cancel()


async def complete(generator: Generator | BatchedGenerator, prompt: str, params: SamplingParams,
                   prompt_ids: Sequence[int] | None = None) -> Generation:
    """One whole generation, without blocking the event loop (see ``deltas``); the loop wakes once, at its end."""
    if not isinstance(generator, BatchedGenerator):
        return await run_in_threadpool(_with_prompt_ids(generator, prompt_ids).generate, prompt, params)
    loop = asyncio.get_running_loop()
    ended: asyncio.Future = loop.create_future()

    def sink(item: object) -> None:
        if not isinstance(item, str):  # None at the end, or the exception that failed it
            loop.call_soon_threadsafe(lambda: ended.done() or ended.set_result(item))

    handle = generator.submit(prompt, params, Generation(prompt, ""), sink=sink, prompt_ids=prompt_ids)
    try:
        if isinstance(error := await ended, BaseException):
            raise error
    finally:
        handle.cancel()
    return handle.result


def _with_prompt_ids(generator: Generator, ids: Sequence[int] | None) -> Generator:
    """The generator, decoding from ``ids`` instead of its own encoding of the prompt text (a shallow copy: the
    model and tokenizer are shared); ``Generator`` takes prompt text only. Itself when ``ids`` is None."""
    if ids is None:
        return generator
    bound = copy.copy(generator)
    bound.prompt_ids = lambda prompt: list(ids)  # type: ignore[method-assign]
    return bound


async def _generator(request: Request, name: str) -> Generator | BatchedGenerator:
    """The model's generator; 404 when there is no such model, 409 when its files are broken (the detail says
    why, naming files relative to the model)."""
    try:
        return await run_in_threadpool(request.app.state.models.get, name)
    except BrokenModelError as exc:
        raise HTTPException(409, str(exc)) from None
    except StoreError:
        raise HTTPException(404, f"no completed model named {name!r}") from None
    except TokenizerNotFoundError as exc:  # the message lists server paths: the log has it, the client not
        log.error("model %s: %s", name, exc)
        raise HTTPException(409, f"model {name!r} cannot be used here: its tokenizer's files are not on this "
                                 "server") from None


@router.post("/generate-text", summary="Generate text with a completed model (output includes the prompt)",
             responses=MODEL_ERRORS)
async def generate_text(body: GenerateBody, request: Request) -> dict:
    params = _params(body, request)
    generator = await _generator(request, body.model_name)
    result = await complete(generator, body.input_text, params)
    return {"status": "success", "model_name": body.model_name, "input_text": body.input_text,
            "output_text": result.output_text, "generated_text": result.text, "new_tokens": len(result.token_ids),
            "finish_reason": result.finish_reason, "tokens_per_sec": round(result.tokens_per_sec, 2)}


@router.post("/generate-text/stream", summary="Generate text as Server-Sent Events of text deltas",
             response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}, **MODEL_ERRORS})
async def generate_text_stream(body: GenerateBody, request: Request) -> StreamingResponse:
    """Messages: ``start`` {model_name, input_text}, ``delta`` {text} per piece of text, then ``done``
    {output_text, finish_reason, new_tokens, tokens_per_sec} (or ``error``). Each is
    ``data: {"event": ..., "data": {...}}``, as on the training event stream."""
    params = _params(body, request)
    generator = await _generator(request, body.model_name)

    def message(event: str, **data: object) -> str:
        return sse_message(json.dumps({"event": event, "data": data}, ensure_ascii=False))

    async def stream():
        result = Generation(body.input_text, "")
        yield message("start", model_name=body.model_name, input_text=body.input_text)
        try:
            # A client that leaves cancels its request between tokens.
            async for delta in deltas(generator, body.input_text, params, result):
                yield message("delta", text=delta)
        except Exception:
            request_id = uuid.uuid4().hex[:16]
            log.exception("request %s: streamed generation failed", request_id)
            yield message("error", detail="internal error", request_id=request_id)
            return
        yield message("done", output_text=result.output_text, finish_reason=result.finish_reason,
                      new_tokens=len(result.token_ids), tokens_per_sec=round(result.tokens_per_sec, 2))

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
