"""KV-cache options: a quantized or a rotating (windowed) attention cache (docs/memory.md).

Only the backbone's full-attention layers and the MTP layer keep KV caches; the
Gated-DeltaNet layers carry a fixed-size state whatever the length. Both options
are mlx-lm's own caches: `QuantizedKVCache`, entered through
`maybe_quantize_kv_cache`, and `RotatingKVCache`. A cache position is one
*pair* of tokens (docs/design.md §1), so the options, given in tokens as
mlx-lm's are, are mapped to whole pairs here and a window never splits a pair.
"""

from dataclasses import dataclass
from typing import Any, List, Optional

from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START, maybe_quantize_kv_cache
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache

from .errors import PipoError

# mlx-lm's rotating cache keeps the first 4 tokens for good (attention sinks):
# the first 2 pairs here. A batch's rotating cache (mlx-lm's
# BatchRotatingKVCache) has no such sinks, so batch rows keep none.
KEEP_PAIRS = 2
KV_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize accepts
KV_GROUP_SIZES = (32, 64, 128)
DEFAULT_KV_GROUP_SIZE = 64
MIN_MAX_KV_SIZE = 2 * (KEEP_PAIRS + 1)  # the kept pairs plus one that rotates


def window_pairs(max_kv_size: int) -> int:
    """The pairs a rotating cache of `max_kv_size` tokens holds: an odd size rounds down."""
    return max_kv_size // 2


def check_max_kv_size(max_kv_size: Optional[int]) -> None:
    if max_kv_size is None:
        return
    if isinstance(max_kv_size, bool) or not isinstance(max_kv_size, int) or max_kv_size < MIN_MAX_KV_SIZE:
        raise PipoError(
            f"max_kv_size must be a whole number of tokens, at least {MIN_MAX_KV_SIZE} (the "
            f"{KEEP_PAIRS} pairs a rotating cache keeps plus one that rotates), got {max_kv_size!r}"
        )


def rotating_cache(max_kv_size: int, keep: int = KEEP_PAIRS) -> RotatingKVCache:
    return RotatingKVCache(max_size=window_pairs(max_kv_size), keep=keep)


@dataclass(frozen=True)
class KVQuantization:
    """Quantize the attention caches once they hold `start` tokens (mlx-lm's rule, in pairs)."""

    bits: int
    group_size: int
    start: int  # tokens

    def __call__(self, layers: List[Any]) -> None:
        """Swap in `QuantizedKVCache`s in place; lazy, so it joins the step's graph."""
        maybe_quantize_kv_cache(layers, (self.start + 1) // 2, self.group_size, self.bits)


def check_kv_options(
    kv_bits: Optional[int],
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    max_kv_size: Optional[int] = None,
) -> None:
    """The options checked on their own and against each other (the model: `kv_quantization`)."""
    check_max_kv_size(max_kv_size)
    if kv_bits is None:
        return
    if kv_bits not in KV_BITS or isinstance(kv_bits, bool):
        raise PipoError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))}, got {kv_bits!r}")
    if kv_group_size not in KV_GROUP_SIZES or isinstance(kv_group_size, bool):
        raise PipoError(
            f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, got {kv_group_size!r}"
        )
    if isinstance(quantized_kv_start, bool) or not isinstance(quantized_kv_start, int) or quantized_kv_start < 0:
        raise PipoError(f"quantized_kv_start must be 0 or more tokens, got {quantized_kv_start!r}")
    if max_kv_size is not None:
        raise PipoError(
            "a rotating cache cannot be quantized (mlx-lm's RotatingKVCache has no quantized "
            "form); use kv_bits or max_kv_size, not both"
        )


def kv_quantization(
    model: Any,
    kv_bits: Optional[int],
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    max_kv_size: Optional[int] = None,
) -> Optional[KVQuantization]:
    """The options checked, the model's head size too; None without `kv_bits`."""
    check_kv_options(kv_bits, kv_group_size, quantized_kv_start, max_kv_size)
    if kv_bits is None:
        return None
    head_dim = model.args.head_dim
    if head_dim % kv_group_size:
        fits = ", ".join(str(g) for g in KV_GROUP_SIZES if head_dim % g == 0)
        raise PipoError(
            f"kv_group_size {kv_group_size} does not divide the model's attention head size "
            f"{head_dim}; " + (f"use {fits}" if fits else "no group size does, so leave kv_bits out")
        )
    return KVQuantization(kv_bits, kv_group_size, quantized_kv_start)


def window_of(layers: List[Any]) -> Optional[int]:
    """The pairs a cache's rotating layers hold, None if it does not rotate."""
    return next((c.max_size for c in layers if isinstance(c, RotatingKVCache)), None)


def check_cache_fits(layers: List[Any], max_kv_size: Optional[int], quantize: Optional[KVQuantization]) -> None:
    """A prompt cache given with KV options must be one those options would have made."""
    if max_kv_size is not None and window_of(layers) != window_pairs(max_kv_size):
        raise PipoError(
            f"the prompt cache was not made with max_kv_size {max_kv_size}; make it with "
            "make_prompt_cache(model, max_kv_size=...) or leave max_kv_size out"
        )
    if quantize is None:
        return
    if window_of(layers) is not None:
        raise PipoError("the prompt cache is a rotating one, which cannot be quantized; leave kv_bits out")
    for c in layers:
        if isinstance(c, QuantizedKVCache) and (c.bits, c.group_size) != (quantize.bits, quantize.group_size):
            raise PipoError(
                f"the prompt cache is already quantized to {c.bits} bits in groups of "
                f"{c.group_size}; ask for the same kv_bits and kv_group_size or start a new cache"
            )
