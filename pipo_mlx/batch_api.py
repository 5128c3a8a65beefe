"""`batch_generate`: many prompts in one call, answered as `mlx_lm.batch_generate` answers.

It drives a `BatchGenerator` (batch.py) to the end and gathers each row's
reply, figures and, on request, caches, token ids and log-probabilities, in
mlx-lm's `BatchResponse`, so code written for mlx-lm reads it unchanged.
"""

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import BatchResponse as MlxBatchResponse
from mlx_lm.generate_utils import BatchStats
from mlx_lm.sample_utils import LogitsProcessor, Sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .batch import BatchGenerator
from .decode import DEFAULT_MAX_TOKENS
from .errors import PipoError
from .model import PipoModel
from .prompt_cache import PromptCache


@dataclass
class BatchResponse(MlxBatchResponse):
    """What `batch_generate` returns: mlx-lm's `BatchResponse` (`texts`, `stats`,
    `caches`, `token_ids`, `logprobs`) plus each prompt's PIPO figures."""

    steps: List[int] = field(default_factory=list)  # decode steps, one backbone position each
    token2_kept: List[int] = field(default_factory=list)  # drafted tokens kept


def batch_generate(
    model: PipoModel,
    tokenizer: Any,
    prompts: Sequence[Union[str, Sequence[int]]],
    prompt_caches: Optional[Sequence[Optional[PromptCache]]] = None,
    max_tokens: Union[int, Sequence[int]] = DEFAULT_MAX_TOKENS,
    verbose: bool = False,
    return_prompt_caches: bool = False,
    return_token_ids: bool = False,
    return_logprobs: bool = False,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    conf_threshold: Union[None, float, Sequence[Optional[float]]] = None,
    draft: Optional[str] = None,
    **kwargs: Any,
) -> BatchResponse:
    """The replies to `prompts` (text or token ids), decoded together in one batch.

    Called as `mlx_lm.batch_generate` is, and answers as it does: `texts`,
    `stats` (mlx-lm's `BatchStats`), and on request `caches` (each prompt's
    `PromptCache`, over its prompt and reply), `token_ids` (the reply's ids,
    end of sequence left out) and `logprobs` (each of those tokens' log-probability).
    A prompt with a cache in `prompt_caches` is the continuation of what the
    cache holds; the caches given are left as they were. `max_tokens` and
    `conf_threshold` may be one value or one per prompt; `sampler`,
    `logits_processors` and `draft` apply to every row; the other options are
    `BatchGenerator`'s (`prefill_step_size`, `token2_head`, `max_kv_size`).
    """
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    n = len(prompts)
    budgets = [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)
    thresholds = list(conf_threshold) if isinstance(conf_threshold, (list, tuple)) else [conf_threshold] * n
    caches = list(prompt_caches) if prompt_caches is not None else [None] * n
    if not len(budgets) == len(thresholds) == len(caches) == n:
        raise PipoError(f"{n} prompts need as many max_tokens, conf_threshold and prompt_caches")
    eos = tokenizer.eos_token_ids
    gen = BatchGenerator(model, eos, release_caches=return_prompt_caches, **kwargs)
    stats = BatchStats()
    start = time.perf_counter()
    uids = []
    for prompt, budget, threshold, cache in zip(prompts, budgets, thresholds, caches):
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if cache is not None:  # ours to fill: the caller's stays as it was, as with mlx-lm
            cache = copy.deepcopy(cache)
            ids = cache.tokens + ids
        uids.append(gen.insert(ids, budget, sampler=sampler, logits_processors=logits_processors,
                               conf_threshold=threshold, prompt_cache=cache, draft=draft))
        stats.prompt_tokens += len(ids)
    stats.prompt_time = time.perf_counter() - start
    replies: Dict[int, List[int]] = {uid: [] for uid in uids}
    logprobs: Dict[int, List[float]] = {uid: [] for uid in uids}
    steps, kept = dict.fromkeys(uids, 0), dict.fromkeys(uids, 0)
    tic = time.perf_counter()
    while len(gen):
        responses = gen.next()
        stats.generation_steps += 1
        stats.generation_tokens += len(responses)
        for r in responses:
            steps[r.uid] += not r.from_draft
            kept[r.uid] += r.from_draft
            if r.finish_reason != "stop":
                replies[r.uid].append(r.token)
                if return_logprobs:
                    logprobs[r.uid].append(r.logprobs[r.token].item())
    stats.decode_time = time.perf_counter() - tic
    stats.wall_time = time.perf_counter() - start
    stats.peak_memory = mx.get_peak_memory() / 1e9
    texts = []
    for uid in uids:
        detokenizer = tokenizer.detokenizer
        for token in replies[uid]:
            detokenizer.add_token(token)
        detokenizer.finalize()
        texts.append(detokenizer.text)
    if verbose:
        print(f"[batch_generate] Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.3f} tokens-per-sec")
        print(f"[batch_generate] Generation: {stats.generation_tokens} tokens, "
              f"{stats.generation_tps:.3f} tokens-per-sec")
        print(f"[batch_generate] PIPO: {sum(steps.values())} row steps, "
              f"token2 kept {sum(kept.values())}")
        print(f"[batch_generate] Peak memory: {stats.peak_memory:.3f} GB")
    return BatchResponse(
        texts,
        stats,
        [gen.released[uid] for uid in uids] if return_prompt_caches else None,
        [replies[uid] for uid in uids] if return_token_ids else None,
        [logprobs[uid] for uid in uids] if return_logprobs else None,
        [steps[uid] for uid in uids],
        [kept[uid] for uid in uids],
    )
