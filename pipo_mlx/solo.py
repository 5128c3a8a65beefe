"""Requests decoded one at a time, behind the batch's interface, for a quantized KV cache.

The server decodes requests as the rows of one `BatchGenerator`, but a quantized
KV cache cannot join a batch: mlx-lm's batch caches have no quantized form. As
mlx-lm's server does in that case, requests then run one at a time, each
through the single-sequence decoder (`generate_step`), whose step stays one
pipelined graph (docs/memory.md).
"""

import itertools
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx

from .decode import DEFAULT_MAX_TOKENS, DEFAULT_PREFILL_STEP_SIZE, generate_step
from .errors import PipoError
from .kv_cache import KVQuantization
from .model import PipoModel
from .prompt_cache import PromptCache, make_prompt_cache, pair_up
from .token2_head import DEFAULT_TOKEN2_HEAD, Token2Head, make_token2_head


@dataclass
class SoloResponse:
    """One token of one request: what `BatchGenerator.next` answers, field for field."""

    uid: int
    token: int
    logprobs: mx.array
    from_draft: bool
    finish_reason: Optional[str]


class _Request:
    def __init__(self, tokens: Iterator, cache: PromptCache, max_tokens: int):
        self.tokens, self.cache, self.max_tokens = tokens, cache, max_tokens
        self.produced = 0
        # The host reads one token ahead, to know whether the one it hands out is the
        # last (the decoder also stops at the model's context).
        self.ahead = next(tokens, None)


class SoloGenerator:
    """`BatchGenerator`'s `insert` / `next` / `remove` / `released`, one request at a time
    (the oldest first), each decoding with a quantized KV cache."""

    def __init__(
        self,
        model: PipoModel,
        quantize: KVQuantization,
        eos_token_ids: Iterable[int] = (),
        prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
        token2_head: Union[str, Token2Head] = DEFAULT_TOKEN2_HEAD,
    ):
        self.model, self.quantize = model, quantize
        self.eos = set(eos_token_ids)
        self.chunk = max(2, prefill_step_size - prefill_step_size % 2)
        self.token2_head = make_token2_head(model, token2_head) if isinstance(token2_head, str) else token2_head
        self.requests: Dict[int, _Request] = {}  # in arrival order
        self.released: Dict[int, PromptCache] = {}  # ended requests' caches, by uid
        self._uids = itertools.count()

    def __len__(self) -> int:
        return len(self.requests)

    def insert(
        self,
        prompt: Sequence[int],
        max_tokens: int = DEFAULT_MAX_TOKENS,
        prompt_cache: Optional[PromptCache] = None,
        **options: Any,
    ) -> int:
        """Start a request (its prefill runs now); `options` are `generate_step`'s
        (`sampler`, `logits_processors`, `conf_threshold`, `draft`)."""
        ids = pair_up([int(t) for t in prompt], self.model.pad_token_id)
        cache = make_prompt_cache(self.model) if prompt_cache is None else prompt_cache
        held = len(cache.tokens)
        if cache.tokens != ids[:held] or held > len(ids) - 2:
            raise PipoError("the prompt cache does not hold a prefix of this prompt")
        q = self.quantize
        tokens = generate_step(
            ids[held:], self.model, eos_token_ids=self.eos, max_tokens=max_tokens, prompt_cache=cache,
            prefill_step_size=self.chunk, token2_head=self.token2_head, kv_bits=q.bits,
            kv_group_size=q.group_size, quantized_kv_start=q.start, **options,
        )
        uid = next(self._uids)
        self.requests[uid] = _Request(tokens, cache, max_tokens)
        return uid

    def remove(self, uid: int) -> None:
        """Stop a request; its settled cache goes to `released`."""
        request = self.requests.pop(uid, None)
        if request is not None:
            request.tokens.close()
            self.released[uid] = request.cache

    def next(self) -> List[SoloResponse]:
        """The next token of the oldest request (none once all have ended)."""
        if not self.requests:
            return []
        uid, request = next(iter(self.requests.items()))
        token, logprobs, from_draft = request.ahead
        request.ahead = next(request.tokens, None)
        request.produced += 1
        finish = None
        if token in self.eos:
            finish = "stop"
        elif request.produced == request.max_tokens or request.ahead is None:
            finish = "length"
        if finish:
            self.remove(uid)
        return [SoloResponse(uid, token, logprobs, from_draft, finish)]
