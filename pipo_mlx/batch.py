"""Batched PIPO decoding: many sequences per step, rows joining and leaving between steps.

Speculative decoding cannot batch because every row accepts a different number
of drafts. PIPO can: every row reads one pair and writes one pair per step,
whatever its gate decides, so the batch never goes ragged (docs/design.md §12).

Each prompt is prefilled alone, exactly as the single-sequence decoder does,
and its caches are then merged into the batch (mlx-lm's `BatchKVCache` pads
the attention caches on the left; the Gated-DeltaNet states stack as they
are). A step is one lazy graph for the whole batch, with per-row samplers,
logits processors, thresholds, budgets and end-of-sequence, queued with
`mx.async_eval` before the host reads the step before it. The rows share one
MTP cache layout, so the batch drafts or skips the MTP head as a whole: the
rows' keep rates vote (docs/design.md §12).
"""

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import ArraysCache, KVCache
from mlx_lm.sample_utils import LogitsProcessor, Sampler, greedy_sampler

from .decode import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PREFILL_STEP_SIZE,
    check_request,
    check_threshold,
    recommended_threshold,
)
from .drafting import DraftSchedule, KeepRate, check_draft, draft_cost
from .errors import PipoError
from .kv_cache import check_max_kv_size, window_of, window_pairs
from .model import PipoModel
from .prompt_cache import PromptCache, make_prompt_cache, owed_firsts, pair_up, prefill
from .token2_head import DEFAULT_TOKEN2_HEAD, Token2Head, make_token2_head


@dataclass
class _Row:
    uid: int
    max_tokens: int  # -1: no limit
    threshold: float
    sampler: Sampler
    processors: List[LogitsProcessor]
    draft: str  # "auto", "always" or "never"
    keep_rate: KeepRate
    history: Optional[mx.array]  # what the processors see: every token read, PADs included
    tokens: List[int] = field(default_factory=list)  # what the row's caches have read, in pairs
    max_steps: int = 0  # decode steps the model's context has room for
    steps: int = 0
    produced: int = 0
    done: bool = False
    started: bool = False  # the first step reads the prompt's last pair, already in `history`


@dataclass
class _Step:
    uids: List[int]  # the rows this step computed, in batch order
    out: mx.array  # [B, 3]: token1, token2, keep
    pairs: mx.array  # [B, 2]: what each row reads next, token2 gated into PAD
    remaining: mx.array  # [B]: token budget left after this step
    hidden: mx.array  # [B, 1, H]: backbone state at the position this step read
    drafted: bool  # whether this step ran the MTP head
    logprobs: List[mx.array] = field(default_factory=list)  # [B, V] for token1, then token2 if drafted


class BatchGenerator:
    """Decode many prompts at once; `insert` rows at any time, call `next` for each step."""

    @dataclass
    class Response:
        """One generated token of one row (mlx-lm's `GenerationBatch.Response`, PIPO's fields)."""

        uid: int
        token: int
        logprobs: mx.array  # [V], after the row's logits processors
        from_draft: bool  # a token2, drafted by the MTP head and kept
        finish_reason: Optional[str]  # "stop" (end of sequence), "length", or None

    def __init__(
        self,
        model: PipoModel,
        eos_token_ids: Iterable[int] = (),
        prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
        token2_head: Union[str, Token2Head] = DEFAULT_TOKEN2_HEAD,
        release_caches: bool = False,
        max_kv_size: Optional[int] = None,
        kv_bits: Optional[int] = None,
    ):
        """`release_caches`: keep each ending row's caches in `released` (for a
        `PromptCacheStore`); it costs a copy and a wait for the step in flight.
        `max_kv_size`: the attention caches rotate over that many tokens' pairs, with
        no kept first pairs, as in mlx-lm's batches; `kv_bits` is refused, as
        mlx-lm's batch caches have no quantized form (docs/memory.md)."""
        if kv_bits is not None:
            raise PipoError(
                "a batch cannot quantize its KV cache (mlx-lm's batch caches have no quantized "
                "form); leave kv_bits out, or decode one sequence at a time with stream_generate"
            )
        check_max_kv_size(max_kv_size)
        self.max_kv_size = max_kv_size
        self.model = model
        self.pad = model.pad_token_id
        self.eos = sorted(set(eos_token_ids))
        self.eos_ids = mx.array(self.eos) if self.eos else None
        self.chunk = max(2, prefill_step_size - prefill_step_size % 2)
        self.token2_head = make_token2_head(model, token2_head) if isinstance(token2_head, str) else token2_head
        self.rows: Dict[int, _Row] = {}
        self.caches: Optional[List[Any]] = None  # the batch's caches, rows in `self.order`
        self.order: List[int] = []
        self.joining: List[tuple] = []  # (uid, prefilled cache layers, last prompt pair)
        self.in_flight: Optional[_Step] = None
        self.release_caches = release_caches
        self.released: Dict[int, PromptCache] = {}  # ended rows' caches, by uid
        self.schedule = DraftSchedule(draft_cost(model))
        # MTP entries owed by steps that skipped the head, as in decode.py: [B, 1, H]
        # backbone states and [B, 1] token1s, rows in `self.order`.
        self.owed_hidden: List[mx.array] = []
        self.owed_first: List[mx.array] = []
        self._uids = itertools.count()

    def __len__(self) -> int:
        return sum(not r.done for r in self.rows.values())

    def insert(
        self,
        prompt: Sequence[int],
        max_tokens: int = DEFAULT_MAX_TOKENS,
        sampler: Optional[Sampler] = None,
        logits_processors: Optional[List[LogitsProcessor]] = None,
        conf_threshold: Optional[float] = None,
        prompt_cache: Optional[PromptCache] = None,
        draft: Optional[str] = None,
    ) -> int:
        """Prefill a prompt (alone) and queue its row for the next step; returns its uid.

        `prompt_cache`, when given, already holds a prefix of the prompt's pairs
        (from `pipo_mlx.PromptCacheStore`); it becomes this row's and is not reusable.
        `draft` is the row's say in whether steps run the MTP head ("auto",
        "always", "never"; see `generate_step`).
        """
        ids = pair_up([int(t) for t in prompt], self.pad)
        max_steps = check_request(self.model, ids, max_tokens)
        threshold = check_threshold(recommended_threshold(self.model, conf_threshold))
        mode = check_draft(draft)
        cache = make_prompt_cache(self.model, self.max_kv_size, keep=0) if prompt_cache is None else prompt_cache
        if cache.tokens != ids[: len(cache.tokens)] or len(cache.tokens) > len(ids) - 2:
            raise PipoError("the prompt cache does not hold a prefix of this prompt")
        if window_of(cache.layers) != (self.max_kv_size and window_pairs(self.max_kv_size)):
            raise PipoError("the prompt cache was not made with this batch's max_kv_size")
        with mx.stream(generation_stream):
            # Every row's prompt fills the MTP cache, whatever its threshold: the batch
            # drafts or not as a whole.
            prefill(self.model, cache, ids[len(cache.tokens) : -2], self.chunk, True)
            _, mtp_cache = self.model.split_cache(cache.layers)
            if cache.last_hidden is not None:  # the prompt's last MTP positions, owed until now
                owed = cache.last_hidden.shape[1]
                firsts = mx.array([owed_firsts(cache.tokens, owed) + ids[-2:-1]])
                self.model.fill_mtp_cache(firsts, cache.last_hidden, mtp_cache)
                mx.eval([c.state for c in mtp_cache])
        uid = next(self._uids)
        history = mx.array(ids) if logits_processors else None
        self.rows[uid] = _Row(uid, max_tokens, threshold, sampler or greedy_sampler,
                              list(logits_processors or []), mode, KeepRate(self.schedule.cost),
                              history, list(ids), max_steps)
        self.joining.append((uid, cache.layers, ids[-2:]))
        return uid

    def remove(self, uid: int) -> None:
        """Stop a row; its slot is freed at the next step."""
        row = self.rows.get(uid)
        if row is not None and not row.done:
            self._end(row)

    def _end(self, row: _Row) -> None:
        row.done = True
        if self.release_caches and row.uid in self.order and self.in_flight is not None:
            self._release(self.order.index(row.uid))

    # -- the batch's caches ----------------------------------------------------------

    def _drop_finished(self) -> Optional[tuple]:
        """Filter finished rows out of the caches; the kept rows' (next pairs, budgets), or None."""
        keep = [i for i, uid in enumerate(self.order) if not self.rows[uid].done]
        state = (self.in_flight.pairs, self.in_flight.remaining) if self.in_flight is not None else None
        if len(keep) < len(self.order):
            if keep:
                index = mx.array(keep)
                for c in self.caches:
                    c.filter(index)
                state = tuple(x[index] for x in state) if state is not None else None
                self.owed_hidden = [x[index] for x in self.owed_hidden]
                self.owed_first = [x[index] for x in self.owed_first]
            else:
                self.caches, state = None, None
                self.owed_hidden, self.owed_first = [], []
            self.order = [self.order[i] for i in keep]
        for uid in [u for u, r in self.rows.items() if r.done and u not in self.order]:
            if not any(uid == j[0] for j in self.joining):
                del self.rows[uid]
        return state

    def _release(self, i: int) -> None:
        """Row i's caches as a settled `PromptCache` over `row.tokens` (docs/design.md §11).

        The rows are still those of the step in flight, which has read the
        row's last committed pair; its MTP entry
        used a token1 that was never committed, so it is trimmed, and the
        backbone state it came from is kept as `last_hidden`.
        """
        row = self.rows[self.order[i]]
        # An MTP cache that no row has written yet (one-pair prompts, no drafting since) has nothing to extract.
        layers = [KVCache() if getattr(c, "keys", 0) is None else c.extract(i) for c in self.caches]
        if self.in_flight.drafted:
            for c in self.model.split_cache(layers)[1]:
                c.trim(1)
            hidden = self.in_flight.hidden[i : i + 1]
        else:  # every entry since the last drafting step is owed, the in-flight one included
            hidden = mx.concatenate(self.owed_hidden, axis=1)[i : i + 1]
        # Own copies: a slice would keep the whole batch's arrays alive in the store.
        for c in layers:
            if isinstance(c, ArraysCache):
                c.cache = [None if x is None else x * 1 for x in c.cache]
            elif c.keys is not None:
                c.keys, c.values = c.keys * 1, c.values * 1
        hidden = hidden * 1
        mx.eval([c.state for c in layers], hidden)
        self.released[row.uid] = PromptCache(layers, row.tokens, hidden, True)

    def _join(self, state: Optional[tuple]) -> Optional[tuple]:
        joining = [j for j in self.joining if not self.rows[j[0]].done]
        for uid, _, _ in self.joining:
            if self.rows[uid].done:
                del self.rows[uid]
        self.joining = []
        if not joining:
            return state
        if self.owed_hidden:  # the joining rows owe nothing: settle the batch's debt first
            self.model.fill_mtp_cache(
                mx.concatenate(self.owed_first, axis=1),
                mx.concatenate(self.owed_hidden, axis=1),
                self.model.split_cache(self.caches)[1],
            )
            self.owed_hidden, self.owed_first = [], []
        per_layer = zip(*(layers for _, layers, _ in joining))
        merged = [type(layer[0]).merge(list(layer)) for layer in per_layer]
        new_pairs = mx.array([p for _, _, p in joining])
        budgets = [self.rows[uid].max_tokens for uid, _, _ in joining]
        new_remaining = mx.array([b if b > 0 else 1 << 30 for b in budgets])
        if self.caches is None:
            self.caches = merged
        else:
            for c, m in zip(self.caches, merged):
                c.extend(m)
        self.order += [uid for uid, _, _ in joining]
        if state is None:
            return new_pairs, new_remaining
        return mx.concatenate([state[0], new_pairs]), mx.concatenate([state[1], new_remaining])

    # -- one step for the whole batch ---------------------------------------------------

    def _sample(self, logits: mx.array, token1: Optional[mx.array] = None) -> tuple:
        """Each row's token by its own processors and sampler; the rest is batched."""
        rows = [self.rows[uid] for uid in self.order]
        if any(r.processors for r in rows):
            parts = []
            for i, row in enumerate(rows):
                x = logits[i : i + 1]
                if row.processors:
                    history = row.history if token1 is None else mx.concatenate([row.history, token1[i]])
                    for processor in row.processors:
                        x = processor(history, x)
                parts.append(x)
            logits = mx.concatenate(parts)
        if self.pad not in self.eos:  # PAD is never sampled: it means "token2 dropped"
            logits[:, self.pad] = -mx.inf
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if all(r.sampler is rows[0].sampler for r in rows):
            tokens = rows[0].sampler(logprobs)
        else:
            tokens = mx.concatenate([r.sampler(logprobs[i : i + 1]) for i, r in enumerate(rows)])
        return tokens.astype(mx.int32), logprobs

    def _step(self, pairs: mx.array, remaining: mx.array) -> _Step:
        model = self.model
        backbone_cache, mtp_cache = model.split_cache(self.caches)
        for i, uid in enumerate(self.order):
            row = self.rows[uid]
            if row.history is not None and row.started:
                row.history = mx.concatenate([row.history, pairs[i]])
            row.started = True
        h = model.hidden(pairs, backbone_cache)  # [B, 1, H]
        token1, logprobs1 = self._sample(model.lm_logits(h[:, -1]))
        if self._drafts():
            if self.owed_hidden:
                model.fill_mtp_cache(mx.concatenate(self.owed_first, axis=1),
                                     mx.concatenate(self.owed_hidden, axis=1), mtp_cache)
                self.owed_hidden, self.owed_first = [], []
            m = model.draft(token1[:, None], h, mtp_cache)
            token2, logprobs2 = self._sample(self.token2_head(m[:, -1]), token1[:, None])
            rows = [self.rows[uid] for uid in self.order]
            tau = mx.array([1.0 if r.draft == "never" else r.threshold for r in rows])
            c = mx.sigmoid(model.confidence(h, m)[:, -1])
            keep = (tau < 0) | ((tau < 1) & (c >= tau))
            drafted = True
        else:
            self.owed_hidden.append(h)
            self.owed_first.append(token1[:, None])
            token2, logprobs2 = mx.full(token1.shape, self.pad, token1.dtype), None
            keep = mx.zeros(token1.shape, dtype=mx.bool_)
            drafted = False
        if self.eos_ids is not None:
            keep = keep & ~mx.any(token1[:, None] == self.eos_ids, axis=-1)
        # A row whose budget ends on token1 does not keep token2, so it is not read either.
        remaining = remaining - 1
        keep = keep & (remaining > 0)
        remaining = remaining - keep
        out = mx.stack([token1, token2, keep.astype(token1.dtype)], axis=1)
        next_pairs = mx.stack([token1, mx.where(keep, token2, self.pad)], axis=1)
        logprobs = [logprobs1] if logprobs2 is None else [logprobs1, logprobs2]
        return _Step(list(self.order), out, next_pairs, remaining, h, drafted, logprobs)

    def _drafts(self) -> bool:
        """Whether the step about to be built runs the MTP head: if any row asks
        "always", else by the mean keep rate of the "auto" rows (docs/design.md §12)."""
        rows = [self.rows[uid] for uid in self.order]
        forced = any(r.draft == "always" and r.threshold < 1 for r in rows)
        voters = [r.keep_rate for r in rows if r.draft == "auto" and r.threshold < 1]
        drafting = self.schedule.decide([v.value for v in voters], forced)
        if not drafting:
            for v in voters:
                v.relax(self.schedule.cost)
        return drafting

    def next(self) -> List["BatchGenerator.Response"]:
        """One decode step of every row: each yields one or two tokens (none on the first call
        after an idle batch, whose step is only queued)."""
        with mx.stream(generation_stream):
            state = self._join(self._drop_finished())
            previous, self.in_flight = self.in_flight, None
            if state is not None:
                self.in_flight = self._step(*state)
                mx.async_eval(self.in_flight.out, self.in_flight.remaining, *self.in_flight.logprobs)
        if previous is None:  # nothing was in flight: read the step just queued
            return self.next() if self.in_flight is not None else []
        return self._read(previous)

    def _read(self, step: _Step) -> List["BatchGenerator.Response"]:
        responses = []
        out = step.out.tolist()
        if step.drafted:
            voters = [(self.rows.get(uid), keep) for uid, (_, _, keep) in zip(step.uids, out)]
            voters = [(r, k) for r, k in voters if r is not None and r.draft == "auto"]
            for row, keep in voters:
                row.keep_rate.observe(bool(keep))
            if voters:
                self.schedule.observe(any(keep for _, keep in voters))
        for i, (t1, t2, keep) in enumerate(out):
            row = self.rows.get(step.uids[i])
            if row is None or row.done:
                continue
            row.tokens += [t1, t2 if keep else self.pad]
            row.steps += 1
            # A step that did not draft never keeps token2.
            tokens = [(t1, step.logprobs[0], False)] + ([(t2, step.logprobs[-1], True)] if keep else [])
            for j, (token, lp, draft) in enumerate(tokens):
                row.produced += 1
                full = row.produced == row.max_tokens or (j == len(tokens) - 1 and row.steps == row.max_steps)
                finish = "stop" if token in self.eos else "length" if full else None
                responses.append(self.Response(row.uid, token, lp[i], draft, finish))
                if finish:
                    self._end(row)
                    break
        return responses
