"""Prompt caches: one conversation's model state, and a store that reuses them.

A `PromptCache` holds what the backbone and the MTP head have read, in pairs.
`prefill` feeds it more pairs. `PromptCacheStore` keeps finished caches in
mlx-lm's `LRUPromptCache` under a byte budget and hands back a copy of the one
with the longest usable prefix of a new prompt (docs/design.md §11).

Only exact reuse is allowed: the Gated-DeltaNet state cannot be rolled back, so
a stored cache is reused only when its pairs are a prefix of the new prompt's
pairs, i.e. when a fresh prefill would have read exactly the same pairs. A
reply whose drafts were dropped holds PADs the next prompt's text does not, so
its cache matches only up to the first PAD; the snapshot taken after the
prompt's prefill is then the longest reusable point.
"""

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache

from .errors import PipoError
from .kv_cache import KEEP_PAIRS, check_max_kv_size
from .model import PipoModel


@dataclass
class PromptCache:
    """Model caches that carry a conversation across `stream_generate` calls.

    Make one with `make_prompt_cache(model)`. After a call the backbone holds
    every token in `tokens`. The MTP entry of the last pair needs the first token
    of the pair after it, which the next call brings, so it is left out and
    `last_hidden` keeps the backbone state it will be computed from. Steps that
    skipped the MTP head (adaptive drafting) leave more entries owed:
    `last_hidden` then holds the states of the last k pairs, [1, k, H].
    """

    layers: List[Any]  # model.make_cache(): the backbone's caches, then the MTP's
    tokens: List[int] = field(default_factory=list)  # ids the backbone has read, PADs included
    last_hidden: Optional[mx.array] = None
    uses_mtp: Optional[bool] = None  # False once filled with conf_threshold >= 1

    @property
    def nbytes(self) -> int:
        held = self.last_hidden.nbytes if self.last_hidden is not None else 0
        # mlx-lm's QuantizedKVCache cannot count an empty cache (an unused MTP's).
        return held + sum(c.nbytes for c in self.layers if not c.empty())

    def is_trimmable(self) -> bool:
        """Never: the recurrent layers keep no history to roll back to."""
        return False


def make_prompt_cache(
    model: PipoModel, max_kv_size: Optional[int] = None, keep: int = KEEP_PAIRS
) -> PromptCache:
    """An empty cache; `max_kv_size` (tokens) makes the attention caches rotate over
    that many tokens' pairs, the first `keep` pairs kept (docs/memory.md)."""
    check_max_kv_size(max_kv_size)
    return PromptCache(model.make_cache(max_kv_size, keep))


def pair_up(ids: List[int], pad: int) -> List[int]:
    """`ids` with a PAD appended when their count is odd, as the backbone reads pairs."""
    return ids + [pad] if len(ids) % 2 else list(ids)


def owed_firsts(tokens: List[int], owed: int) -> List[int]:
    """The first tokens of the pairs after the `owed` last pairs of `tokens`, as far
    as `tokens` has them: the MTP inputs of all owed entries but the last."""
    return tokens[len(tokens) - 2 * owed + 2 :: 2] if owed > 1 else []


def prefill(
    model: PipoModel,
    cache: PromptCache,
    ids: List[int],
    chunk: int,
    use_mtp: bool,
    quantize: Optional[Callable[[List[Any]], None]] = None,
) -> None:
    """Feed the pairs of `ids` (an even count) into the caches, `chunk` tokens at a time.

    The MTP runs teacher-forced one position behind the backbone: position i
    needs the first token of pair i + 1, known here for all but the last pair,
    whose backbone state waits in `cache.last_hidden`. `quantize` (a
    `KVQuantization`) may swap in quantized caches after each chunk.
    """
    if cache.tokens and use_mtp and not cache.uses_mtp:
        raise PipoError(
            "this prompt cache was filled with conf_threshold >= 1, so its MTP cache is "
            "empty; keep that threshold or start a new cache"
        )
    cache.uses_mtp = use_mtp if not cache.tokens else cache.uses_mtp and use_mtp
    for start in range(0, len(ids), chunk):
        backbone_cache, mtp_cache = model.split_cache(cache.layers)
        part = ids[start : start + chunk]
        x = mx.array(part)[None]
        h = model.hidden(x, backbone_cache)
        if use_mtp:
            if cache.last_hidden is None:
                hidden, firsts = h[:, :-1], x[:, 2::2]
            else:
                hidden = mx.concatenate([cache.last_hidden, h[:, :-1]], axis=1)
                known = owed_firsts(cache.tokens, cache.last_hidden.shape[1])
                firsts = mx.concatenate([mx.array([known], dtype=x.dtype), x[:, 0::2]], axis=1)
            model.fill_mtp_cache(firsts, hidden, mtp_cache)
            cache.last_hidden = h[:, -1:]
        if quantize is not None:
            quantize(cache.layers)
        mx.eval([c.state for c in cache.layers], cache.last_hidden)
        cache.tokens.extend(part)
        mx.clear_cache()


class PromptCacheStore:
    """Finished prompt caches under a byte budget, least recently used evicted first.

    Caches filled with the MTP head (conf_threshold < 1) and without it are kept
    apart: one kind cannot stand in for the other.
    """

    def __init__(
        self, model: PipoModel, max_bytes: int, max_entries: int = 64, max_kv_size: Optional[int] = None
    ):
        """`max_kv_size`: new caches rotate, with no kept pairs, as a batch's rows do."""
        self.model, self.max_bytes, self.max_kv_size = model, max_bytes, max_kv_size
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes)

    def fetch(self, ids: List[int], use_mtp: bool) -> PromptCache:
        """A fresh copy of the stored cache that reads the longest prefix of `ids`.

        `ids` are paired (even). The copy never covers the last pair, which the
        first decode step reads; with nothing usable stored, a new empty cache.
        """
        found, _ = self._lru.fetch_nearest_cache(use_mtp, ids[:-2])
        return make_prompt_cache(self.model, self.max_kv_size, keep=0) if found is None else found[0]

    def insert(self, cache: PromptCache, copy_it: bool = False) -> None:
        """Keep `cache` under the pairs it has read; `copy_it` when the caller goes on using it."""
        if not cache.tokens or self.max_bytes <= 0:
            return
        stored = copy.deepcopy(cache) if copy_it else cache
        self._lru.insert_cache(bool(cache.uses_mtp), list(cache.tokens), [stored])

    def stats(self) -> Tuple[int, int]:
        """(entries, bytes)."""
        return len(self._lru), self._lru.nbytes
