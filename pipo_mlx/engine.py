"""The request loop behind the server: many requests, one model, one thread on MLX.

Requests wait in a first-come, first-served queue. Up to `max_active` decode
at once as rows of one `BatchGenerator`: each step is one graph for all of
them, and rows join and leave between steps. A request with a seed runs alone,
because the samplers draw from MLX's global random state.

Each request starts from the longest reusable prompt cache (docs/design.md
§11), prefills the rest, and its caches go back to the store twice: after the
prompt, and after the reply (released by the batch when the row ends).
"""

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .batch import BatchGenerator
from .decode import DEFAULT_PREFILL_STEP_SIZE
from .kv_cache import DEFAULT_KV_GROUP_SIZE, DEFAULT_QUANTIZED_KV_START, kv_quantization
from .model import PipoModel
from .prompt_cache import PromptCacheStore, pair_up, prefill
from .solo import SoloGenerator
from .token2_head import Token2Head


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None


@dataclass
class Job:
    """One request. The engine answers on `events`: `TokenEvent`s, then `Finished` or `Failed`."""

    prompt: List[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    conf_threshold: Optional[float] = None
    draft: Optional[str] = None  # "auto" (None), "always" or "never"
    stop: Sequence[str] = ()
    logprobs: bool = False  # each token's log-probability (a host read per token)
    top_logprobs: int = 0  # > 0: the top-n alternatives of every token too
    events: "queue.Queue[Union[TokenEvent, Finished, Failed]]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop this request at the next step (a client that went away)."""
        self.cancelled.set()


@dataclass
class TokenEvent:
    text: str  # the text this token releases, stop strings held back and cut
    token: int
    from_draft: bool  # a token2, drafted by the MTP head and kept
    logprob: Optional[float]  # when the job asked for log-probabilities
    top_logprobs: List[Tuple[int, float]]


@dataclass
class Finished:
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens taken from the prompt cache, not prefilled
    completion_tokens: int
    steps: int  # decode steps: one backbone position each
    token2_kept: int
    time_to_first_token: float  # from the start of the request's prefill
    stop_string: Optional[str] = None  # the stop string that ended the reply, if one did


@dataclass
class Failed:
    error: BaseException


class ShuttingDown(RuntimeError):
    """A request cut short because the server is stopping."""


class StopStrings:
    """Cuts generated text at the first stop string, however the tokens split it.

    Text that could still begin a stop string is held back until the next
    piece shows whether it does.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit: Optional[str] = None  # the stop string found, once one is

    def feed(self, piece: str) -> Tuple[str, bool]:
        """(text safe to release, whether a stop string was reached)."""
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            self.hit = min((text.find(s), s) for s in self.stops if s in text)[1]
            return text[: min(hits)], True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        self.pending = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class _Running:
    """A started job: its row in the batch and what has come out of it."""

    def __init__(self, job: Job, uid: int, detokenizer, cached: int, started: float):
        self.job, self.uid, self.detokenizer = job, uid, detokenizer
        self.cached, self.started = cached, started
        self.stops = StopStrings(job.stop)
        self.n = self.steps = self.kept = 0
        self.ttft = 0.0


class Engine:
    """Runs `Job`s on one model in a background thread; `submit` and read `job.events`."""

    def __init__(
        self,
        model: PipoModel,
        tokenizer: TokenizerWrapper,
        prompt_cache_bytes: int,
        max_active: int = 8,
        prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
        token2_head: Union[str, Token2Head] = "full",
        max_kv_size: Optional[int] = None,
        kv_bits: Optional[int] = None,
        kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
        quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    ):
        """The KV-cache options (docs/memory.md): `max_kv_size`, rotating caches as
        `BatchGenerator`'s; `kv_bits` and its two companions, a quantized cache, with
        which requests decode one at a time instead of as a batch, as mlx-lm's server
        does then."""
        self.model, self.tokenizer = model, tokenizer
        self.quantize = kv_quantization(model, kv_bits, kv_group_size, quantized_kv_start, max_kv_size)
        self.store = PromptCacheStore(model, prompt_cache_bytes, max_kv_size=max_kv_size)
        self.max_active = max_active if self.quantize is None else 1
        if self.quantize is None:
            self._new_batch = lambda: BatchGenerator(
                model, tokenizer.eos_token_ids, prefill_step_size, token2_head, release_caches=True,
                max_kv_size=max_kv_size,
            )
        else:
            self._new_batch = lambda: SoloGenerator(
                model, self.quantize, tokenizer.eos_token_ids, prefill_step_size, token2_head
            )
        self.batch = self._new_batch()
        self._queue: Deque[Job] = deque()
        self._running: Dict[int, _Running] = {}  # by batch row uid
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="pipo-engine", daemon=True)
        self.error: Optional[BaseException] = None

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def stats(self) -> dict:
        """Requests decoding and waiting, and what the prompt cache holds (read from any thread)."""
        entries, nbytes = self.store.stats()
        return {"running": len(self._running), "queued": len(self._queue),
                "prompt_cache": {"entries": entries, "bytes": nbytes}}

    def submit(self, job: Job) -> Job:
        with self._wake:
            if self._stopping:  # the loop is gone or going: nobody would answer
                job.events.put(Failed(ShuttingDown("the server is shutting down")))
                return job
            self._queue.append(job)
            self._wake.notify()
        return job

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._stopping or self._queue or self._running):
                        self._wake.wait()
                    if self._stopping:
                        break
                    admitted = self._admit()
                for job in admitted:
                    self._start(job)
                self._round()
        except BaseException as e:  # a bug, not a request's fault: say so on /health
            self.error = e
            raise
        finally:
            with self._wake:
                waiting = list(self._queue)
            for job in [r.job for r in self._running.values()] + waiting:
                job.events.put(Failed(ShuttingDown("the server is shutting down")))

    def _admit(self) -> List[Job]:
        """Jobs to start now, in arrival order; a seeded job waits to run alone."""
        admitted: List[Job] = []
        running = [r.job for r in self._running.values()]
        while self._queue and len(running) + len(admitted) < self.max_active:
            job = self._queue[0]
            if job.cancelled.is_set():
                self._queue.popleft()
                continue
            ahead = running + admitted
            if ahead and (job.sampling.seed is not None or any(j.sampling.seed is not None for j in ahead)):
                break
            admitted.append(self._queue.popleft())
        return admitted

    def _start(self, job: Job) -> None:
        started = time.perf_counter()
        try:
            ids = pair_up(job.prompt, self.model.pad_token_id)
            # Batch rows always run the MTP head, so the cached prompts all have it.
            cache = self.store.fetch(ids, True)
            cached = len(cache.tokens)
            with mx.stream(generation_stream):
                if len(ids) - 2 > cached:
                    prefill(self.model, cache, ids[cached:-2], self.batch.chunk, True, self.quantize)
                    self.store.insert(cache, copy_it=True)
            s = job.sampling
            if s.seed is not None:
                mx.random.seed(s.seed)
            uid = self.batch.insert(
                ids,
                job.max_tokens,
                # mlx-lm's top-k fails at sampling time, for the whole batch, unless k < vocabulary
                sampler=make_sampler(s.temperature, s.top_p, s.min_p,
                                     top_k=s.top_k if s.top_k < self.model.args.vocab_size else 0),
                logits_processors=make_logits_processors(
                    repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty
                ),
                conf_threshold=job.conf_threshold,
                prompt_cache=cache,
                draft=job.draft,
            )
        except Exception as e:
            job.events.put(Failed(e))
            return
        self._running[uid] = _Running(job, uid, self.tokenizer.detokenizer, min(cached, len(job.prompt)), started)

    def _round(self) -> None:
        """One batched step of every running job."""
        for r in list(self._running.values()):
            if r.job.cancelled.is_set():
                self._finish(r, "cancelled")
        if not self._running:
            return
        try:
            responses = self.batch.next()
        except Exception as e:  # the whole batch is lost: tell every request, start afresh
            for r in self._running.values():
                r.job.events.put(Failed(e))
            self._running.clear()
            self.batch = self._new_batch()
            return
        for response in responses:
            r = self._running.get(response.uid)
            if r is not None:
                self._advance(r, response)

    def _advance(self, r: _Running, response: BatchGenerator.Response) -> None:
        token, logprobs = response.token, response.logprobs
        if r.n == 0:
            r.ttft = time.perf_counter() - r.started
        r.n += 1
        r.kept += response.from_draft
        r.steps += not response.from_draft
        finish = response.finish_reason
        if finish != "stop":
            r.detokenizer.add_token(token)
        if finish:
            r.detokenizer.finalize()
        text, stopped = r.stops.feed(r.detokenizer.last_segment)
        if stopped:
            finish = "stop"
        elif finish:
            text += r.stops.flush()
        top: List[Tuple[int, float]] = []
        if r.job.top_logprobs > 0:
            k = min(r.job.top_logprobs, logprobs.size)
            ids = mx.argpartition(-logprobs, kth=k - 1)[:k]
            top = sorted(zip(ids.tolist(), logprobs[ids].tolist()), key=lambda p: -p[1])
        logprob = logprobs[token].item() if r.job.logprobs or top else None
        r.job.events.put(TokenEvent(text, token, response.from_draft, logprob, top))
        if finish:
            self._finish(r, finish)

    def _finish(self, r: _Running, reason: str) -> None:
        del self._running[r.uid]
        self.batch.remove(r.uid)
        cache = self.batch.released.pop(r.uid, None)
        if cache is not None:
            self.store.insert(cache)
        r.job.events.put(
            Finished(reason, len(r.job.prompt), r.cached, r.n, r.steps, r.kept, r.ttft, r.stops.hit)
        )
