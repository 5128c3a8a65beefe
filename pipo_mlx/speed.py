"""Decoding speed, measured side by side: PIPO against mlx-lm decoding its base.

What `pipo_mlx.benchmark` and the scripts in benchmarks/ share: the bounds that
reading weights puts on PIPO's speed (docs/design.md §5), token streams of
exactly N tokens on both sides, the timing of one run, and runs interleaved
across repeats so that a change in machine load hits every side alike.
"""

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate as mlx_stream_generate
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .decode import stream_generate
from .model import PipoModel

Tokens = Iterator[Tuple[int, bool]]  # (token id, whether it is a kept token2)
Side = Callable[[int], Tokens]  # generates exactly n tokens


def keep_all_bound(w: Dict[str, int], token2_fraction: float = 1.0) -> float:
    """Keep-all speedup over plain decoding where reading weights bounds the speed.

    `w` holds the bytes a step reads (`drafting.weight_bytes`): plain decoding
    reads B + E per token, a keep-all step B + 2E + M + C per two tokens, and a
    token2 head that reads a fraction of the LM head (top:K) replaces its second E.
    """
    B, E, M, C = w["B"], w["E"], w["M"], w["C"]
    return (B + E) / ((B + E + token2_fraction * E + M + C) / 2)


def compressor_bound(w: Dict[str, int]) -> float:
    """Keep-none (τ ≥ 1) speed over plain decoding where reading weights bounds it:
    one token per step as the base, but the step also reads the compressor."""
    B, E, C = w["B"], w["E"], w["C"]
    return (B + E) / (B + E + C)


def plain_read_bytes(model: nn.Module) -> int:
    """Bytes of weights a plain decoding step of an mlx-lm model reads: all of
    them, except an untied embedding table, of which a lookup reads one row."""
    modules = dict(model.named_modules())
    embeddings = [m for name, m in modules.items() if name.endswith("embed_tokens")]
    untied = any(name.endswith("lm_head") for name in modules)
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if embeddings and untied:
        total -= sum(v.nbytes for _, v in tree_flatten(embeddings[0].parameters()))
    return total


# -- the sides compared


def pipo_side(
    model: PipoModel, tokenizer: TokenizerWrapper, prompt: List[int], **options: Any
) -> Side:
    """PIPO's `stream_generate` (so detokenizing, as a user gets it) with `options`."""

    def tokens(n: int) -> Tokens:
        for r in stream_generate(model, tokenizer, prompt, max_tokens=n, **options):
            yield r.token, r.from_draft

    return tokens


def mlx_lm_side(model: nn.Module, tokenizer: TokenizerWrapper, prompt: List[int]) -> Side:
    """mlx-lm's own `stream_generate` on an mlx-lm model."""

    def tokens(n: int) -> Tokens:
        for r in mlx_stream_generate(model, tokenizer, prompt, max_tokens=n):
            yield r.token, False

    return tokens


# -- measuring


@dataclass
class Run:
    ttft_s: float  # from the call to the first token
    # From the first token to the last, per token after the first step (which
    # may yield two); None when the first step yielded them all.
    s_per_token: Optional[float]
    tokens: int
    steps: int  # backbone positions run for generated tokens
    kept: int  # token2s kept
    peak_bytes: int  # mx.get_peak_memory over the run, weights included


def settle() -> None:
    """Free what earlier runs left and restart the peak, so a run's peak is its own."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


def measure(side: Side, n: int) -> Run:
    settle()
    stamps, flags = [], []
    tic = time.perf_counter()
    for _, is_token2 in side(n):
        stamps.append(time.perf_counter())
        flags.append(is_token2)
    first_step = 2 if len(flags) > 1 and flags[1] else 1
    after = len(stamps) - first_step
    return Run(
        ttft_s=stamps[0] - tic,
        s_per_token=(stamps[-1] - stamps[first_step - 1]) / after if after > 0 else None,
        tokens=len(stamps),
        steps=len(stamps) - sum(flags),
        kept=sum(flags),
        peak_bytes=mx.get_peak_memory(),
    )


def interleave(
    sides: Dict[str, Side],
    n: int,
    repeats: int,
    warmup_tokens: int = 0,
    progress: Optional[Callable[[int, Dict[str, Run]], None]] = None,
) -> Dict[str, List[Run]]:
    """Every side once per repeat, the order rotating from repeat to repeat, after
    one short warm-up run of each (first-call allocations stay out of the figures)."""
    if warmup_tokens:
        for side in sides.values():
            for _ in side(warmup_tokens):
                pass
    names = list(sides)
    runs: Dict[str, List[Run]] = {k: [] for k in names}
    for r in range(repeats):
        shift = r % len(names)
        for k in names[shift:] + names[:shift]:
            runs[k].append(measure(sides[k], n))
        if progress is not None:
            progress(r, {k: rs[-1] for k, rs in runs.items()})
    return runs


def tokens_per_s(runs: Sequence[Run]) -> float:
    """Median decoding speed, tokens per second after the first step."""
    return 1.0 / statistics.median(r.s_per_token for r in runs)


def summary(runs: Sequence[Run]) -> Dict[str, Any]:
    """The medians of a side's runs, and the PIPO figures over all of them."""
    steps = sum(r.steps for r in runs)
    decoded = [r for r in runs if r.s_per_token is not None]
    return {
        "tokens_per_s": tokens_per_s(decoded) if decoded else None,
        "tokens_per_s_runs": [1.0 / r.s_per_token for r in decoded],
        "ttft_s": statistics.median(r.ttft_s for r in runs),
        "ttft_s_runs": [r.ttft_s for r in runs],
        "tokens": runs[0].tokens,
        "tokens_per_step": sum(r.tokens for r in runs) / steps,
        "keep_rate": sum(r.kept for r in runs) / steps,
        "peak_memory_gb": max(r.peak_bytes for r in runs) / 1e9,
    }
