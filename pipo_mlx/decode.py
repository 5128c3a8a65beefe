"""PIPO decoding: chunked prefill and a fused, pipelined decode loop (docs/design.md §5).

The shape follows mlx-lm: `generate_step` yields token ids, `stream_generate`
yields `GenerationResponse`s, `generate` returns the text. Every decode step is
one lazy graph: compress the last pair, one backbone position, sample token1,
and, when the step drafts (`drafting.py` decides), one MTP position on
embed(token1), sample token2, gate token2 into PAD. It is evaluated once, and
the next step is queued with `mx.async_eval` before the host reads this
step's tokens, so the device never waits for Python.

Two rules the paper leaves open are decided here (docs/design.md §4): logits
processors see every token the backbone has read or is about to read, PADs
included, because whether a token2 is kept is only known on the device; and
PAD is never sampled (unless the tokenizer counts it as end-of-sequence), so
a PAD in the stream always means "token2 dropped" and never reaches the text.
"""

import itertools
import math
import numbers
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Generator, Iterable, List, NamedTuple, Optional, Tuple, Union

import mlx.core as mx
from mlx_lm.generate import GenerationResponse, generation_stream, wired_limit
from mlx_lm.sample_utils import LogitsProcessor, Sampler, greedy_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .drafting import DraftSchedule, KeepRate, check_draft, draft_cost
from .errors import PipoError
from .kv_cache import DEFAULT_KV_GROUP_SIZE, DEFAULT_QUANTIZED_KV_START, check_cache_fits, kv_quantization
from .model import PipoModel
from .prompt_cache import PromptCache, make_prompt_cache, owed_firsts, pair_up, prefill
from .token2_head import DEFAULT_TOKEN2_HEAD, Token2Head, make_token2_head

DEFAULT_MAX_TOKENS = 256
DEFAULT_CONF_THRESHOLD = 0.95  # the paper's evaluation setting
DEFAULT_PREFILL_STEP_SIZE = 2048


@dataclass
class PipoResponse(GenerationResponse):
    """mlx-lm's `GenerationResponse` plus the PIPO figures of the call so far.

    `from_draft` is True for a token2 (drafted by the MTP head and kept).
    """

    steps: int = 0  # decode steps: backbone positions run for generated tokens
    token2_kept: int = 0
    time_to_first_token: float = 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.generation_tokens / max(self.steps, 1)

    @property
    def keep_rate(self) -> float:
        return self.token2_kept / max(self.steps, 1)


def recommended_threshold(model: PipoModel, given: Optional[float] = None) -> float:
    """`given`, else the threshold stored with the model, else the paper's 0.95."""
    if given is not None:
        return given
    stored = model.args.conf_threshold
    return DEFAULT_CONF_THRESHOLD if stored is None else stored


def check_threshold(value: float) -> float:
    """The confidence threshold, checked: a real number, not NaN."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value):
        raise PipoError(
            f"confidence threshold {value!r} is not a number; use e.g. 0.95 (below 0 "
            "keeps every drafted token, 1 or more never drafts)"
        )
    return float(value)


def context_steps(model: PipoModel, held: int, paired: int) -> int:
    """How many decode steps fit in the model's context after `held` cached tokens and
    a prompt of `paired` tokens: each step adds one pair to what the backbone reads."""
    return (model.args.max_position_embeddings - held - paired) // 2


def check_request(model: PipoModel, ids: List[int], max_tokens: int, held: int = 0) -> int:
    """A decode request checked: its budget, and its paired prompt on top of the `held`
    tokens a prompt cache already has against the model's context. Returns the
    decode steps left in the context (at least one)."""
    if max_tokens == 0 or max_tokens < -1:
        raise PipoError(f"max_tokens must be positive (or -1 for no limit), got {max_tokens}")
    if not ids:
        raise PipoError("the prompt is empty; give at least one token of text")
    limit = model.args.max_position_embeddings
    steps = context_steps(model, held, len(ids))
    if steps < 1:
        on_top = f" on top of the {held} already in the cache" if held else ""
        what = "more than" if held + len(ids) > limit else "which leaves no room for a reply in"
        raise PipoError(
            f"the prompt has {len(ids)} tokens{on_top}, {what} the model's context of "
            f"{limit}; shorten it{' or start a new conversation' if held else ''}"
        )
    return steps


class _Step(NamedTuple):
    out: mx.array  # [token1, token2, keep] ([token1] if not drafted): what the host reads
    pair: mx.array  # [1, 2]: what the next step reads, token2 gated into PAD
    hidden: mx.array  # [1, 1, H]: backbone state at this step's position
    remaining: Optional[mx.array]  # token budget left after this step
    logprobs: Tuple[mx.array, Optional[mx.array]]
    drafted: bool  # whether this step ran the MTP head


def generate_step(
    prompt: Union[mx.array, List[int]],
    model: PipoModel,
    *,
    eos_token_ids: Iterable[int] = (),
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    conf_threshold: Optional[float] = None,
    draft: Optional[str] = None,
    prompt_cache: Optional[PromptCache] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    token2_head: Union[str, Token2Head] = DEFAULT_TOKEN2_HEAD,
    max_kv_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """Yield (token, logprobs, is_token2) for each generated token, PADs never.

    Stops by itself: an EOS as token1 ends generation and drops token2, an EOS
    as token2 ends it after token2, exactly `max_tokens` tokens are yielded
    at most (-1: no limit), and the model's context is never passed: the step
    that fills it does not draft, so its token1 is the last token. A dropped
    token2 enters the caches as PAD, so after the call `prompt_cache.tokens` is
    the prompt plus what was yielded, in pairs.
    `draft` says which steps run the MTP head: "auto" (the default) while its
    drafts pay for themselves (`drafting.py`), "always", or "never" (the same
    as a threshold of 1 or more). `token2_head` is a `make_token2_head` spec or
    the head it made. `max_kv_size` (a rotating cache, for a new cache),
    `kv_bits`, `kv_group_size` and `quantized_kv_start` (a quantized one) are
    mlx-lm's KV-cache options, in tokens, applied in whole pairs (docs/memory.md).
    """
    ids = prompt.tolist() if isinstance(prompt, mx.array) else [int(t) for t in prompt]
    threshold = check_threshold(recommended_threshold(model, conf_threshold))
    mode = check_draft(draft)
    if prefill_step_size < 2:
        raise PipoError(f"prefill_step_size must be at least 2 (one pair), got {prefill_step_size}")
    quantize = kv_quantization(model, kv_bits, kv_group_size, quantized_kv_start, max_kv_size)
    cache = make_prompt_cache(model, max_kv_size) if prompt_cache is None else prompt_cache
    if not isinstance(cache, PromptCache):
        raise TypeError("prompt_cache must come from pipo_mlx.make_prompt_cache(model)")
    check_cache_fits(cache.layers, max_kv_size if prompt_cache is not None else None, quantize)

    pad = model.pad_token_id
    ids = pair_up(ids, pad)
    max_steps = check_request(model, ids, max_tokens, held=len(cache.tokens))
    # A threshold >= 1 never keeps token2: skip the MTP outright, as "never" does.
    use_mtp = threshold < 1 and mode != "never"
    schedule = DraftSchedule(draft_cost(model))
    keep_rate = KeepRate(schedule.cost)
    if isinstance(token2_head, str):
        token2_head = make_token2_head(model, token2_head)

    sampler = sampler or greedy_sampler
    eos = sorted(set(eos_token_ids))
    eos_ids = mx.array(eos) if eos else None
    mask_pad = pad not in eos
    pad_id = mx.array([pad], dtype=mx.int32)
    # MTP entries owed by steps that skipped the head (and by the prompt's last
    # pairs): backbone states and the token1 that followed each, written in one
    # go by the next drafting step so that the MTP cache misses no position.
    owed_hidden: List[mx.array] = []
    owed_first: List[mx.array] = []

    def sample(logits: mx.array, history: Optional[mx.array]) -> Tuple[mx.array, mx.array]:
        for processor in logits_processors or ():
            logits = processor(history, logits)
        if mask_pad:
            logits[:, pad] = -mx.inf
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs).astype(mx.int32), logprobs.squeeze(0)

    def step(
        pair: mx.array,
        history: Optional[mx.array],
        remaining: Optional[mx.array],
        drafting: bool,
    ) -> _Step:
        if quantize is not None:  # swaps cache objects once, lazily, as mlx-lm's step does
            quantize(cache.layers)
        backbone_cache, mtp_cache = model.split_cache(cache.layers)
        h = model.hidden(pair, backbone_cache)
        token1, logprobs1 = sample(model.lm_logits(h[:, -1]), history)
        if drafting:
            if owed_hidden:
                model.fill_mtp_cache(
                    mx.concatenate(owed_first, axis=1), mx.concatenate(owed_hidden, axis=1), mtp_cache
                )
                owed_hidden.clear()
                owed_first.clear()
            m = model.draft(token1[:, None], h, mtp_cache)
            if history is not None:
                history = mx.concatenate([history, token1])
            token2, logprobs2 = sample(token2_head(m[:, -1]), history)
            if threshold >= 0:
                keep = mx.sigmoid(model.confidence(h, m)[:, -1]) >= threshold
            else:
                keep = mx.ones_like(token1, dtype=mx.bool_)
        else:
            # Nothing to gate: the next pair is (token1, PAD) and the host reads
            # token1 alone. The budget is still counted on the device only when a
            # later step may draft (each op costs about 1% of a small model's step).
            if use_mtp:
                owed_hidden.append(h)
                owed_first.append(token1[:, None])
            if remaining is not None:
                remaining = remaining - 1
            next_pair = mx.concatenate([token1, pad_id])[None]
            return _Step(token1, next_pair, h, remaining, (logprobs1, None), False)
        # The host drops token2 after an EOS token1 or past the budget; the pair
        # the backbone reads next must drop it too, on the device.
        if eos_ids is not None:
            keep = keep & ~mx.any(token1[:, None] == eos_ids, axis=-1)
        if remaining is not None:
            remaining = remaining - 1
            keep = keep & (remaining > 0)
            remaining = remaining - keep
        out = mx.concatenate([token1, token2, keep.astype(token1.dtype)])
        next_pair = mx.stack([token1, mx.where(keep, token2, pad)], axis=1)
        return _Step(out, next_pair, h, remaining, (logprobs1, logprobs2), True)

    def drafts(number: int) -> bool:
        """Whether step `number` (the one about to be built) runs the MTP head: never
        the step that fills the context, so that the caller knows its token1 ends."""
        if number >= max_steps:
            return False
        drafting = use_mtp and schedule.decide([keep_rate.value], forced=mode == "always")
        if not drafting:
            keep_rate.relax(schedule.cost)
        return drafting

    def queue(s: _Step) -> None:
        mx.async_eval(s.out, *(lp for lp in s.logprobs if lp is not None))

    chunk = prefill_step_size - prefill_step_size % 2
    with mx.stream(generation_stream):
        prefill(model, cache, ids[:-2], chunk, use_mtp, quantize)
        if use_mtp and cache.last_hidden is not None:
            owed_hidden.append(cache.last_hidden)
            known = owed_firsts(cache.tokens, cache.last_hidden.shape[1]) + ids[-2:-1]
            owed_first.append(mx.array([known], dtype=mx.int32))
        cache.last_hidden = None
        cache.tokens.extend(ids[-2:])
        history = mx.array(cache.tokens) if logits_processors else None
        # On the device only to drop a token2 past the budget; without drafts, the host counts.
        budget = mx.array([max_tokens]) if max_tokens > 0 and use_mtp else None
        current = last = step(mx.array([ids[-2:]]), history, budget, drafts(1))
        queue(current)
        produced = 0
        try:
            for n in itertools.count(1):
                if history is not None:
                    history = mx.concatenate([history, current.pair[0]])
                last = step(current.pair, history, current.remaining, drafts(n + 1))
                queue(last)
                if current.drafted:
                    token1, token2, keep = current.out.tolist()
                    keep_rate.observe(bool(keep))
                    schedule.observe(bool(keep))
                else:
                    (token1,), token2, keep = current.out.tolist(), pad, 0
                cache.tokens += [token1, token2 if keep else pad]
                produced += 1
                yield token1, current.logprobs[0], False
                if token1 in eos or produced == max_tokens or n == max_steps:
                    break
                if keep:
                    produced += 1
                    yield token2, current.logprobs[1], True
                    if token2 in eos or produced == max_tokens:
                        break
                if n % 256 == 0:
                    mx.clear_cache()
                current = last
        finally:
            # `last` already read the final pair. If it drafted, its MTP entry
            # used a token1 that will never be committed: trim it and owe it.
            # Otherwise every entry since the last drafting step is still owed.
            if use_mtp:
                if last.drafted:
                    cache.last_hidden = last.hidden
                    for c in model.split_cache(cache.layers)[1]:
                        c.trim(1)
                else:
                    cache.last_hidden = mx.concatenate(owed_hidden, axis=1)


def stream_generate(
    model: PipoModel,
    tokenizer: Any,
    prompt: Union[str, mx.array, List[int]],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    **kwargs: Any,
) -> Generator[PipoResponse, None, None]:
    """Yield `PipoResponse`s (text pieces and figures) as tokens are produced.

    `prompt` is text or token ids (apply a chat template first, as with mlx-lm).
    The other options are those of `generate_step`: `sampler`,
    `logits_processors`, `conf_threshold`, `draft`, `prompt_cache`,
    `prefill_step_size`, `token2_head`, and the KV-cache options `max_kv_size`,
    `kv_bits`, `kv_group_size`, `quantized_kv_start`.
    """
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        prompt = tokenizer.encode(
            prompt, add_special_tokens=bos is None or not prompt.startswith(bos)
        )
    prompt_tokens = prompt.size if isinstance(prompt, mx.array) else len(prompt)
    cache = kwargs.get("prompt_cache")
    held = len(cache.tokens) if isinstance(cache, PromptCache) else 0
    # generate_step ends on the token1 of this step, the last the context holds.
    max_steps = context_steps(model, held, prompt_tokens + prompt_tokens % 2)
    eos = tokenizer.eos_token_ids
    detokenizer = tokenizer.detokenizer
    tokens = generate_step(prompt, model, eos_token_ids=eos, max_tokens=max_tokens, **kwargs)

    # closing(): a caller that stops early still gets a settled prompt cache.
    with wired_limit(model, [generation_stream]), closing(tokens):
        tic = time.perf_counter()
        n = steps = kept = 0
        for token, logprobs, from_draft in tokens:
            if n == 0:
                ttft = time.perf_counter() - tic
                tic = time.perf_counter()
            n += 1
            kept += from_draft
            steps += not from_draft
            finish_reason = None
            if token in eos or n == max_tokens or (not from_draft and steps == max_steps):
                finish_reason = "stop" if token in eos else "length"
                tokens.close()  # settle the prompt cache before the caller can reuse it
            if token not in eos:
                detokenizer.add_token(token)
            if finish_reason:
                detokenizer.finalize()
            elapsed = time.perf_counter() - tic
            yield PipoResponse(
                text=detokenizer.last_segment,
                token=token,
                logprobs=logprobs,
                from_draft=from_draft,
                prompt_tokens=prompt_tokens,
                prompt_tps=prompt_tokens / ttft,
                generation_tokens=n,
                generation_tps=n / elapsed if elapsed > 0 else 0.0,
                peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=finish_reason,
                steps=steps,
                token2_kept=kept,
                time_to_first_token=ttft,
            )


def generate(
    model: PipoModel,
    tokenizer: Any,
    prompt: Union[str, mx.array, List[int]],
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """The whole response text; `verbose` streams it and prints the figures."""
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose:
        print()
        print_figures(response)
    return text


def print_figures(response: PipoResponse) -> None:
    r = response
    print("=" * 10)
    print(
        f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec, "
        f"time to first token {r.time_to_first_token:.3f} s"
    )
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec")
    print(
        f"PIPO: {r.steps} steps, {r.tokens_per_step:.2f} tokens per step, "
        f"token2 kept {r.token2_kept}/{r.steps} ({100 * r.keep_rate:.1f}%)"
    )
    print(f"Peak memory: {r.peak_memory:.3f} GB")
