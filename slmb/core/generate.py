"""Text generation (DESIGN.md §6): KV-cache decoding, sampling controls and UTF-8-safe streaming.

Every new token is conditioned on at most the model's last ``context_length`` tokens, exactly as an
uncached sliding window would do. Inside the window the KV cache makes a step cost one token's work;
once the window is full, positions shift at every step, so each step re-encodes the window (learned and
rotary positions are absolute, so cached keys cannot be reused after a shift).
"""

from __future__ import annotations

import atexit
import codecs
import collections
import copy
import ctypes
import glob
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from slmb.core.compiler import build_model
from slmb.core.model import SLM, KVCache
from slmb.core.runtime import keep_freed_memory
from slmb.core.spec import TrainRequest
from slmb.core.tokenizers import Tokenizer, load_tokenizer


class SamplingParams(BaseModel):
    """Sampling controls; the HTTP body and the CLI flags use the same names."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(default=50, ge=0, le=100_000)
    temperature: float = Field(default=0.7, ge=0.0, le=100.0)  # 0 = greedy
    top_k: int | None = Field(default=40, ge=0)  # 0 or None = off
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)  # None or 1 = off
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0)
    seed: int | None = Field(default=None, ge=0, lt=2**64)  # torch.manual_seed's range
    stop: list[str] = Field(default_factory=list)
    stop_at_eos: bool = True


@dataclass
class Generation:
    prompt: str
    text: str  # the generated continuation only
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str = "length"  # length | eos | stop
    seconds: float = 0.0

    @property
    def output_text(self) -> str:
        return self.prompt + self.text

    @property
    def tokens_per_sec(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


def load_model(request: dict[str, Any], state_dict: dict[str, torch.Tensor], device: str | torch.device = "cpu"
               ) -> SLM:
    """Build the model a request describes and load its weights (no random init: every weight is loaded)."""
    model = build_model(TrainRequest.model_validate(request), device=device, init=False)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def weights_mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str | None:
    """How a state dict differs from the one a model expects (names and shapes), or None: what a strict
    ``load_state_dict`` would refuse, said briefly."""
    def names(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    problems = []
    if missing := sorted(set(expected) - set(got)):
        problems.append(f"{len(missing)} tensor(s) missing ({names(missing)})")
    if unexpected := sorted(set(got) - set(expected)):
        problems.append(f"{len(unexpected)} unexpected tensor(s) ({names(unexpected)})")
    shapes = [f"{k} has shape {list(got[k].shape)}, the structure needs {list(t.shape)}"
              for k, t in expected.items() if k in got and got[k].shape != t.shape]
    problems += shapes[:3] + ([f"{len(shapes) - 3} more shapes differ"] if len(shapes) > 3 else [])
    return "; ".join(problems) or None


class Generator:
    """Samples from a model. ``stream`` yields text deltas; ``generate`` returns the whole result.

    ``dtype`` decodes with a copy of the weights in that dtype: bf16 halves the bytes a decode step reads, but
    is not bit-identical to fp32 (greedy paths can part after a near-tie), so it is opt-in. It has been slower than
    fp32 on every machine measured since the fp32 decode loop got leaner (AMX Xeon 188 vs 244 tokens/s, AVX2 EPYC
    23 vs 121, H200 728 vs 983; docs/benchmarks.md): its use is the memory it saves. None keeps the model's weights.
    """

    def __init__(self, model: SLM, tokenizer: Tokenizer, use_cache: bool = True, dtype: torch.dtype | None = None):
        if dtype is not None and dtype != next(model.parameters()).dtype:
            model = copy.deepcopy(model).to(dtype)  # deepcopy keeps tied weights tied
        self.model, self.tok, self.use_cache = model.eval(), tokenizer, use_cache
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            keep_freed_memory()
        # Logits past the tokenizer's vocabulary (a padded head) name no token: never sample them.
        self.valid_vocab = min(tokenizer.vocab_size, model.vocab_size)

    def generate(self, prompt: str, params: SamplingParams | None = None) -> Generation:
        result = Generation(prompt, "")
        for _ in self._run(prompt, params or SamplingParams(), result):
            pass
        return result

    def stream(self, prompt: str, params: SamplingParams | None = None, result: Generation | None = None
               ) -> Iterator[str]:
        """Text deltas as they are decided; never splits a UTF-8 character or emits part of a stop string."""
        yield from self._run(prompt, params or SamplingParams(), result or Generation(prompt, ""))

    def prompt_ids(self, prompt: str) -> list[int]:
        ids = self.tok.encode(prompt)
        if not ids:  # an empty prompt starts from the document boundary the model saw in training
            start = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id
            ids = [start if start is not None else 0]
        return ids

    @torch.inference_mode()
    def _run(self, prompt: str, p: SamplingParams, result: Generation) -> Iterator[str]:
        seq = _Sequence(self, self.prompt_ids(prompt), p, result)
        while not seq.done:
            yield from seq.step(seq.stepper.logits())

    def _sample(self, logits: torch.Tensor, seen: torch.Tensor | None, p: SamplingParams, gen: torch.Generator
                ) -> int:
        """The next token from one sequence's logits (V,): ``_sample_rows`` for a single row."""
        return self._sample_rows(logits.unsqueeze(0), [(seen, p, gen)])[0]

    def _sample_rows(self, logits: torch.Tensor, rows: Sequence[tuple[torch.Tensor | None, SamplingParams,
                                                                       torch.Generator]]) -> list[int]:
        """The next token of every row of ``logits`` (B, V), row i with its own ``(seen, params, generator)``:
        ``seen`` the tokens so far (bool, V) when the repetition penalty is on, else None.

        The masks and the softmax run once for all rows, each row with its own penalty, temperature, top_k and
        top_p; only the random draw is per row (each request's own seeded generator). Every step is row-wise
        (elementwise ops, reductions and sorts along a row), so a row's token does not depend on the other rows:
        a seeded request samples the same tokens alone or in any batch. The draw is ``torch.multinomial``'s own
        for one sample (argmax of p / q, q ~ Exp(1) from the generator), so seeded outputs are those of the
        one-row ``torch.multinomial`` this replaced. Greedy rows (temperature 0) take the first maximum."""
        logits = logits[:, : self.valid_vocab].float()  # (B, V')
        device = logits.device
        penal, greedy, drawn = [], [], []
        for i, (seen, p, _) in enumerate(rows):
            if seen is not None:
                penal.append(i)
            (greedy if p.temperature == 0 else drawn).append(i)
        if penal:  # CTRL-style repetition penalty, as Hugging Face applies it
            idx = torch.tensor(penal, device=device)
            sub = logits.index_select(0, idx)
            rp = _column([rows[i][1].repetition_penalty for i in penal], device)
            seen = torch.stack([rows[i][0][: self.valid_vocab] for i in penal])  # type: ignore[index]
            penalized = torch.where(sub > 0, sub / rp, sub * rp)
            logits = logits.index_copy(0, idx, torch.where(seen, penalized, sub))
        tokens = [0] * len(rows)
        if greedy:
            top = logits if len(greedy) == len(rows) else logits[greedy]
            if device.type == "cpu":  # numpy's argmax: 3 µs over GPT-2's vocabulary, torch's CPU one 70
                ids = top.numpy().argmax(1).tolist()  # the first maximum, as torch.argmax
            else:
                ids = top.argmax(1).tolist()
            for i, t in zip(greedy, ids, strict=True):
                tokens[i] = t
        if not drawn:
            return tokens
        params = [rows[i][1] for i in drawn]
        x = logits if len(drawn) == len(rows) else logits[drawn]
        x = x / _column([p.temperature for p in params], device)  # (S, V')
        ks = [min(p.top_k, self.valid_vocab) if p.top_k else 0 for p in params]
        if any(ks):
            top = torch.topk(x, max(ks)).values  # (S, kmax), descending
            if len(set(ks)) == 1:  # one k for all (a lone request, the common case): no index tensor
                kth = top[:, -1:]
            else:
                kth = top.gather(1, torch.tensor([[max(k, 1) - 1] for k in ks], device=device))
                if not all(ks):  # rows without top_k keep every logit
                    kth = kth.masked_fill(torch.tensor([[k == 0] for k in ks], device=device), float("-inf"))
            x = x.masked_fill(x < kth, float("-inf"))
        nucleus = [j for j, p in enumerate(params) if p.top_p is not None and p.top_p < 1.0]
        if nucleus:  # keep the smallest prefix (by probability) reaching top_p
            sub = x if len(nucleus) == len(params) else x[nucleus]
            sorted_x, order = torch.sort(sub, dim=1, descending=True, stable=True)
            probs = sorted_x.softmax(-1)
            drop = probs.cumsum(-1) - probs >= _column([params[j].top_p for j in nucleus], device)
            sub = sub.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
            x = sub if len(nucleus) == len(params) else x.index_copy(0, torch.tensor(nucleus, device=device), sub)
        probs = x.softmax(-1)
        # A nan or +inf logit (or none finite) makes its whole row nan; torch.multinomial refused such rows too.
        # Checked before any generator draws, so a retry (row by row) draws what the first attempt would have.
        if any(v != v for v in probs[:, 0].tolist()):
            raise ValueError("the probabilities are not finite (the model's logits hold inf or nan)")
        noise = torch.empty_like(probs)
        if len(drawn) == 1:
            noise.exponential_(generator=rows[drawn[0]][2])
        else:
            for j, i in enumerate(drawn):
                noise[j].exponential_(generator=rows[i][2])
        for i, t in zip(drawn, torch.div(probs, noise, out=noise).argmax(1).tolist(), strict=True):
            tokens[i] = t
        return tokens


def _column(values: list[float], device: torch.device) -> torch.Tensor | float:
    """Per-row settings as an fp32 (B, 1) column, to divide or compare the rows of (B, V) logits by; one value
    for all rows stays a Python number (the same fp32 operation, without making a tensor)."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


class _Sequence:
    """One prompt's decoding: sampling with its own generator, the repetition penalty, EOS, stop strings and the
    text deltas. ``Generator`` runs one at a time; ``BatchedGenerator`` runs many, feeding those with as many
    tokens to feed through one forward pass and sampling them together, so both take the same decisions from the
    same logits."""

    def __init__(self, g: Generator, ids: list[int], p: SamplingParams, result: Generation):
        self.t0 = time.perf_counter()
        self.g, self.p, self.result = g, p, result
        result.prompt_tokens = len(ids)
        self.rng = torch.Generator(device=g.device)
        self.rng.manual_seed(p.seed if p.seed is not None else torch.seed())
        self.text = _TextStream(p.stop)
        self.stepper = _Stepper(g.model, ids, p.max_new_tokens, g.use_cache)
        self.seen = None  # tokens so far, for the repetition penalty only
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(g.model.vocab_size, dtype=torch.bool, device=g.device)
            self.seen[torch.tensor(ids, device=g.device)] = True
        self.done = False
        if p.max_new_tokens == 0:
            self._finish("length")

    def step(self, logits: torch.Tensor) -> list[str]:
        """Take the next token from ``logits`` (V,); the text it releases (see ``advance``)."""
        return self.advance(self.g._sample(logits, self.seen, self.p, self.rng))

    def sampling(self) -> tuple[torch.Tensor | None, SamplingParams, torch.Generator]:
        """This sequence's row for ``Generator._sample_rows``."""
        return self.seen, self.p, self.rng

    def advance(self, token: int) -> list[str]:
        """Append the sampled ``token``; the text it releases (a delta, then the tail when this token ends the
        sequence; empty pieces left out). Sets ``done`` at EOS, a stop string or the length."""
        p, result = self.p, self.result
        if p.stop_at_eos and token == self.g.tok.eos_id:
            return self._finish("eos")
        result.token_ids.append(token)
        if self.seen is not None:
            self.seen[token] = True
        self.stepper.push(token)
        delta, stopped = self.text.feed(self.g.tok.token_bytes(token))
        result.text = self.text.emitted
        if stopped or len(result.token_ids) >= p.max_new_tokens:
            tail = self._finish("stop" if stopped else "length")
            return [d for d in (delta, *tail) if d]
        return [delta] if delta else []

    def _finish(self, reason: str) -> list[str]:
        self.done = True
        self.result.finish_reason = reason
        tail = self.text.flush() if reason != "stop" else ""
        self.result.text = self.text.emitted
        self.result.seconds = time.perf_counter() - self.t0
        return [tail] if tail else []


class _Stepper:
    """Feeds tokens to the model and returns next-token logits, with a KV cache inside the window."""

    def __init__(self, model: SLM, ids: list[int], max_new: int, use_cache: bool):
        self.model, self.ctx = model, model.context_length
        self.device = next(model.parameters()).device
        self.ids = list(ids)
        self.pending = self.ids[-self.ctx:]  # tokens not yet seen by the model
        self.cache = None
        if use_cache:
            param = next(model.parameters())
            self.cache = KVCache(model, 1, min(self.ctx, len(self.pending) + max_new), dtype=param.dtype)

    def push(self, token: int) -> None:
        self.ids.append(token)
        self.pending.append(token)

    def prepare(self) -> int | None:
        """Make the next step's input ready: the tokens the model has not seen, or, when they no longer fit in
        the window, the last ``ctx`` tokens from position 0 (learned and rotary positions are absolute, so the
        cached keys cannot be reused after a shift). Their number, what ``SLM.decode_rows`` batches by; None
        without a cache."""
        if self.cache is None:
            return None
        if self.cache.pos + len(self.pending) > self.cache.max_len:
            self.cache.reset()
            self.pending = self.ids[-self.ctx:]
        return len(self.pending)

    def take(self) -> list[int]:
        """The prepared tokens, for a forward pass (after ``prepare``)."""
        tokens, self.pending = self.pending, []
        return tokens

    def logits(self) -> torch.Tensor:
        if self.cache is None:
            window = self.ids[-self.ctx:]
            return self.model(torch.tensor([window], device=self.device))[0, -1]
        self.prepare()
        return self.model(torch.tensor([self.take()], device=self.device), self.cache)[0, -1]


class _TextStream:
    """Turns token bytes into text deltas: whole UTF-8 characters only, holding back text that may begin a
    stop string until it is clear it does not."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # decoded so far
        self.emitted = ""  # handed out so far (text minus the held-back tail)

    def feed(self, data: bytes) -> tuple[str, bool]:
        self.text += self.decoder.decode(data)
        for stop in self.stops:
            cut = self.text.find(stop)
            if cut != -1:
                self.text = self.text[:cut]
                return self._emit(len(self.text)), True
        return self._emit(len(self.text) - self._held()), False

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _emit(self, upto: int) -> str:
        delta = self.text[len(self.emitted):upto] if upto > len(self.emitted) else ""
        self.emitted += delta
        return delta

    def flush(self) -> str:
        self.text += self.decoder.decode(b"", final=True)
        return self._emit(len(self.text))


class GenerationHandle:
    """One request submitted to a ``BatchedGenerator``. Iterating it yields the text deltas as the decoding
    thread decides them (blocking), then stops; ``result`` is the ``Generation``, complete once it has stopped.
    ``cancel`` (a client that left) frees its place in the batch at the next step.

    With a ``sink``, the decoding thread calls ``sink(item)`` instead of queueing for the iterator: each delta (a
    str), then None at the end, or the exception that failed the request. It must not block (an event loop's
    ``call_soon_threadsafe`` is the intended use)."""

    def __init__(self, prompt: str, ids: list[int], params: SamplingParams, result: Generation,
                 sink: Callable[[Any], None] | None):
        self.prompt, self.ids, self.params, self.result = prompt, ids, params, result
        self._queue: queue.SimpleQueue[Any] | None = None if sink is not None else queue.SimpleQueue()
        self._sink = sink if sink is not None else self._queue.put  # type: ignore[union-attr]
        self.cancelled = False
        self.finished = threading.Event()

    def cancel(self) -> None:
        self.cancelled = True

    def __iter__(self) -> Iterator[str]:
        if self._queue is None:
            raise TypeError("this request delivers its deltas to its sink")
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _put(self, item: Any) -> None:
        try:
            self._sink(item)
        except Exception:  # the consumer is gone (its event loop closed, say): nobody to tell, stop decoding
            self.cancelled = True
        if item is None or isinstance(item, BaseException):
            self.finished.set()


IDLE_S = 10.0  # a BatchedGenerator's thread ends after this long without requests
# At most this many logits (fp32: 256 MiB) from one batched pass: sequences re-encoding long windows together
# would otherwise hold (rows, window, V) of them (GPT-2's vocabulary and a 1024 window: 206 MB a row).
ROWS_LOGITS_BUDGET = 1 << 26
# Below this many parameters, a decoding thread uses one intra-op thread: its ops are too small to share, and an
# OpenMP team per op (attention splits its heads across threads) costs more than the op. Measured with the tiny
# service benchmark (bench/serve_generate.py) on a busy 2-core machine: 2 threads spent 83 ms of CPU per request
# (the worker spinning between ops while others wanted the core) and served 11 requests/s; 1 thread spent 7 ms
# and served 95.
SMALL_MODEL_PARAMS = 10_000_000


def _thread_intra_op(n: int) -> bool:
    """Use ``n`` intra-op threads in the calling thread only (OpenMP's per-thread setting, which torch's CPU ops
    read; ``torch.set_num_threads`` would change every thread's, and MKL's). False where torch has no OpenMP."""
    if not torch.backends.openmp.is_available():
        return False
    for lib in (None, *sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "lib*omp*.so*")))):
        try:
            ctypes.CDLL(lib).omp_set_num_threads(ctypes.c_int(n))
        except (OSError, AttributeError):
            continue
        return torch.get_num_threads() == n
    return False


class BatchedGenerator:
    """Decodes concurrent requests to one model together, in one thread of its own: each step, one forward pass
    (``SLM.decode_rows``) for every group of sequences that feed the same number of tokens (one past their cache;
    same-length prompts; windows that are full, re-encoded from position 0 as ``Generator`` does) and one
    sampling call for all (``Generator._sample_rows``), each sequence with its own sampling settings, seed, stop
    strings and stream. Requests join between steps and leave when they end or are cancelled; at most
    ``max_batch`` decode at once, the rest wait in order. ``threads``: intra-op threads of
    the decoding thread (default: 1 for models under ``SMALL_MODEL_PARAMS`` on the CPU, else torch's setting).

    ``exact`` (the default): every row is computed as the sequence alone would be, so results (greedy ids,
    seeded samples) are bit-identical to ``Generator``'s whatever else is in the batch; see ``nodes.Rows``.
    Thread-safe; holds no HTTP or asyncio: ``submit`` returns a ``GenerationHandle``."""

    def __init__(self, generator: Generator, max_batch: int = 32, exact: bool = True, threads: int | None = None):
        self.generator, self.model, self.tok = generator, generator.model, generator.tok
        self.max_batch, self.exact = max(1, max_batch), exact
        if threads is None and generator.device.type == "cpu" and generator.model.num_parameters() < SMALL_MODEL_PARAMS:
            threads = 1
        self.threads = threads  # intra-op threads of the decoding thread (None: torch's setting)
        self._cond = threading.Condition()
        self._waiting: collections.deque[GenerationHandle] = collections.deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.active = 0  # sequences decoding now
        self.steps = self.batched_rows = 0  # forward passes that batched >= 2 sequences, and their rows

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.generator.prompt_ids(prompt)

    def submit(self, prompt: str, params: SamplingParams | None = None, result: Generation | None = None,
               sink: Callable[[Any], None] | None = None, prompt_ids: Sequence[int] | None = None
               ) -> GenerationHandle:
        ids = list(prompt_ids) if prompt_ids is not None else self.prompt_ids(prompt)
        handle = GenerationHandle(prompt, ids, params or SamplingParams(), result or Generation(prompt, ""), sink)
        with self._cond:
            self._waiting.append(handle)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="slmb-generate", daemon=True)
                self._thread.start()
                _running.add(self)
            self._cond.notify()
        return handle

    def generate(self, prompt: str, params: SamplingParams | None = None) -> Generation:
        handle = self.submit(prompt, params)
        for _ in handle:
            pass
        return handle.result

    def stream(self, prompt: str, params: SamplingParams | None = None, result: Generation | None = None
               ) -> Iterator[str]:
        handle = self.submit(prompt, params, result)
        try:
            yield from handle
        finally:
            handle.cancel()

    def close(self, wait: float = 0.0) -> None:
        """End the decoding thread as soon as it has nothing to do, not after ``IDLE_S`` (waiting up to ``wait``
        seconds for it). A request submitted later (one that got this generator just before the model cache let it
        go) is still served, by a thread of its own that ends with it."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and wait > 0:
            thread.join(wait)

    def _loop(self) -> None:
        active: list[tuple[GenerationHandle, _Sequence]] = []
        if self.threads:
            _thread_intra_op(self.threads)
        try:
            self._serve(active)
        except BaseException as exc:  # a bug here must not leave clients waiting forever
            with self._cond:
                self._thread = None
                stranded = [h for h, _ in active] + list(self._waiting)
                self._waiting.clear()
            for handle in stranded:
                handle._put(exc if isinstance(exc, Exception) else RuntimeError("the decoding thread ended"))
            raise

    def _serve(self, active: list[tuple[GenerationHandle, _Sequence]]) -> None:
        while True:
            with self._cond:
                while not active and not self._waiting:
                    if self._closed or (not self._cond.wait(IDLE_S) and not self._waiting):
                        self._thread = None  # closed, or idle: the next submit starts a thread again
                        return
                joining = []
                while self._waiting and len(active) + len(joining) < self.max_batch:
                    joining.append(self._waiting.popleft())
            for handle in joining:
                if handle.cancelled:
                    continue
                try:
                    seq = _Sequence(self.generator, handle.ids, handle.params, handle.result)
                except Exception as exc:
                    handle._put(exc)
                    continue
                if seq.done:  # max_new_tokens 0
                    handle._put(None)
                else:
                    active.append((handle, seq))
            active[:] = [(h, s) for h, s in active if not h.cancelled]
            self.active = len(active)
            if active:
                self._step(active)
                active[:] = [(h, s) for h, s in active if not s.done and not h.cancelled]
            self.active = len(active)

    @torch.inference_mode()
    def _step(self, active: list[tuple[GenerationHandle, _Sequence]]) -> None:
        """One token for every active sequence: one forward pass for each group of two or more sequences that
        feed the same number of tokens (one past their cache; prompts or re-encoded windows of one length), one
        each for the others, then one sampling call for all; ends (and tells) those that are done or fail."""
        groups: dict[int, list[tuple[GenerationHandle, _Sequence]]] = {}
        alone: list[tuple[GenerationHandle, _Sequence]] = []
        for h, s in active:
            if s.done:
                continue
            try:
                n = s.stepper.prepare()
            except Exception as exc:
                self._fail(h, s, exc)
                continue
            if n is None:
                alone.append((h, s))
            else:
                groups.setdefault(n, []).append((h, s))
        ready: list[tuple[GenerationHandle, _Sequence]] = []  # rows of the logits, in order
        parts: list[torch.Tensor] = []
        vocab = self.model.vocab_size
        for n, group in groups.items():
            rows = max(1, ROWS_LOGITS_BUDGET // (n * vocab))  # the (rows, n, V) logits of one pass stay bounded
            for start in range(0, len(group), rows):
                batch = group[start : start + rows]
                if len(batch) < 2:
                    alone += batch
                    continue
                ids = torch.tensor([s.stepper.take() for _, s in batch], device=self.generator.device)
                try:
                    out = self.model.decode_rows(ids, [s.stepper.cache for _, s in batch], self.exact)  # (B, n, V)
                except Exception as exc:
                    for h, s in batch:
                        self._fail(h, s, exc)
                    continue
                self.steps += 1
                self.batched_rows += len(batch)
                ready += batch
                parts.append(out[:, -1])
        for h, s in alone:
            try:
                parts.append(s.stepper.logits().unsqueeze(0))
            except Exception as exc:
                self._fail(h, s, exc)
                continue
            ready.append((h, s))
        if not ready:
            return
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        try:
            tokens: list[int | Exception] = list(self.generator._sample_rows(logits, [s.sampling() for _, s in ready]))
        except Exception:  # one row's failure (non-finite logits, say) must fail that request only: row by row
            tokens = []
            for i, (_, s) in enumerate(ready):
                try:
                    tokens.append(self.generator._sample_rows(logits[i : i + 1], [s.sampling()])[0])
                except Exception as exc:
                    tokens.append(exc)
        for (h, s), token in zip(ready, tokens, strict=True):
            if isinstance(token, Exception):
                self._fail(h, s, token)
                continue
            try:
                for piece in s.advance(token):
                    h._put(piece)
            except Exception as exc:
                self._fail(h, s, exc)
                continue
            if s.done:
                h._put(None)

    @staticmethod
    def _fail(handle: GenerationHandle, seq: _Sequence, exc: Exception) -> None:
        seq.done = True
        handle._put(exc)


_running: weakref.WeakSet[BatchedGenerator] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Let decoding threads end before the interpreter does (a daemon thread inside torch at exit can abort it)."""
    for batcher in list(_running):
        batcher.close(wait=5.0)


def load_generator(name: str, device: str | torch.device = "cpu", dtype: str | None = None
                   ) -> tuple[Generator, dict[str, Any]]:
    """A generator for a completed model in the store, and the model's metadata. ``dtype="bf16"`` decodes with
    bf16 weights (see ``Generator``)."""
    from slmb.core.store import BrokenModelError, load_completed

    request, state_dict, metadata = load_completed(name)
    spec = TrainRequest.model_validate(request)  # the store checked that it is one
    try:
        model = build_model(spec, device="meta")
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise BrokenModelError(name, f"structure.json does not build a model: {exc}") from None
    mismatch = weights_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise BrokenModelError(name, f"model.safetensors does not match structure.json: {mismatch}")
    model = load_model(request, state_dict, device)
    weights = {None: None, "fp32": None, "bf16": torch.bfloat16}[dtype]
    return Generator(model, model_tokenizer(name, metadata, spec.config.tokenizer_name), dtype=weights), metadata


def model_tokenizer(name: str, metadata: dict[str, Any], default: str) -> Tokenizer:
    """The tokenizer a completed model decodes with: its own file when metadata names one (``tokenizer_file``:
    an imported checkpoint's tokenizer.json / tokenizer.model, copied into the model's directory), else the
    ``tokenizer`` name its training recorded, else ``default``. Only a bare file name inside the model's own
    directory is accepted, so no caller can point this at an arbitrary path."""
    from slmb.core.store import BrokenModelError, get_model

    own = metadata.get("tokenizer_file")
    if own is None:
        return load_tokenizer(metadata.get("tokenizer") or default)
    if not isinstance(own, str) or Path(own).name != own or own.startswith("."):
        raise BrokenModelError(name, f"metadata.json: tokenizer_file {own!r} is not a file name in the model's "
                                     "directory")
    path = get_model(name).path.resolve() / own
    if not path.is_file():
        raise BrokenModelError(name, f"its tokenizer file {own} is missing from {path.parent}")
    return load_tokenizer(str(path))
