"""Prompt-cache files: a `PromptCache` saved once and reused by later runs (as mlx-lm's).

The layer caches go through mlx-lm's `save_prompt_cache` / `load_prompt_cache`,
so every cache kind mlx-lm has (quantized, rotating) round-trips. PIPO's own
fields ride along as one more `ArraysCache` at the end: the token ids the
backbone has read and the backbone states whose MTP entries are still owed
(`PromptCache.last_hidden`). The metadata names the model by a fingerprint of
its weights (`model_io.model_identity`) and records the pairing, so a file
made for another model, or one whose caches do not hold whole pairs, is
refused instead of producing silent nonsense.

A prompt of odd length cannot be cached whole: its last token would need a
pairing PAD, which a longer prompt does not have there. The file keeps it as
`pending`, and `continuation` puts it in front of the rest of the prompt.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START, generation_stream
from mlx_lm.models import cache as mlx_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .decode import DEFAULT_PREFILL_STEP_SIZE, check_request
from .errors import PipoError
from .kv_cache import DEFAULT_KV_GROUP_SIZE, kv_quantization
from .model import PipoModel
from .prompt_cache import PromptCache, make_prompt_cache, prefill

FORMAT = "pipo_mlx prompt cache 1"
SUFFIX = ".safetensors"  # mlx's writer appends it to any other name


@dataclass
class PromptCacheFile:
    """A loaded prompt-cache file: the cache, and the prompt tokens it stands for."""

    cache: PromptCache
    pending: List[int]  # prompt tokens after the cached pairs (an odd prompt's last one)
    chat: bool = False  # it ends inside a chat template's user message
    metadata: Dict[str, str] = field(default_factory=dict)

    def continuation(self, ids: Sequence[int]) -> List[int]:
        """What to generate from with `prompt_cache=self.cache`, for the rest `ids`."""
        return self.pending + [int(t) for t in ids]


def prompt_to_cache(
    tokenizer: TokenizerWrapper,
    prompt: str,
    system_prompt: Optional[str] = None,
    use_chat_template: bool = True,
    chat_template_kwargs: Optional[Dict[str, Any]] = None,
) -> List[int]:
    """The ids of `prompt` as the start of a user message, left open (as
    mlx-lm's cache_prompt does) so that a later query continues the message;
    raw text without a chat template."""
    if not (use_chat_template and tokenizer.has_chat_template):
        if system_prompt is not None:
            raise PipoError("a system prompt needs a chat template; put it in the prompt text")
        return tokenizer.encode(prompt)
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    text = tokenizer.apply_chat_template(
        messages + [{"role": "user", "content": prompt}], add_generation_prompt=False,
        continue_final_message=True, tokenize=False, **(chat_template_kwargs or {}),
    )
    return tokenizer.encode(text, add_special_tokens=False)


def fill_prompt_cache(
    model: PipoModel,
    ids: Sequence[int],
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    max_kv_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
) -> Tuple[PromptCache, List[int]]:
    """A cache over the whole pairs of `ids`, with the MTP head's entries (so any
    threshold can go on from it), and the token left over when `ids` is odd."""
    ids = [int(t) for t in ids]
    whole = len(ids) - len(ids) % 2
    if whole == 0:
        raise PipoError("a prompt of one token has no whole pair to cache; give a longer one")
    check_request(model, ids[:whole], 1)  # and leave room for a reply
    if prefill_step_size < 2:
        raise PipoError(f"prefill_step_size must be at least 2 (one pair), got {prefill_step_size}")
    quantize = kv_quantization(model, kv_bits, kv_group_size, quantized_kv_start, max_kv_size)
    cache = make_prompt_cache(model, max_kv_size)
    with mx.stream(generation_stream):
        prefill(model, cache, ids[:whole], prefill_step_size - prefill_step_size % 2, True, quantize)
    return cache, ids[whole:]


def _identity(model: PipoModel) -> str:
    identity = getattr(model, "identity", None)
    if identity is None:
        raise PipoError("prompt-cache files need a model loaded with pipo_mlx.load (it names the weights)")
    return identity


def _check_name(path: Path) -> None:
    if path.suffix != SUFFIX:
        raise PipoError(f"prompt-cache file {path} must end in {SUFFIX}")


def save_prompt_cache(
    path: str,
    cache: PromptCache,
    model: PipoModel,
    pending: Sequence[int] = (),
    chat: bool = False,
    metadata: Optional[Dict[str, str]] = None,
) -> None:
    """Write `cache` (filled by `model`) to `path`, a `.safetensors` name, atomically.

    `pending`: prompt tokens not in the cache (at most one, an odd prompt's last);
    `chat`: the cache ends inside a chat template's user message (`prompt_to_cache`);
    `metadata`: more string fields to keep.
    """
    path = Path(path).expanduser()
    _check_name(path)
    if not cache.tokens or len(cache.tokens) % 2 or len(pending) > 1:
        raise PipoError("only a cache filled with whole pairs, and at most one pending token, can be saved")
    pipo = mlx_cache.ArraysCache(2)
    pipo.cache = [mx.array(cache.tokens, dtype=mx.int32), cache.last_hidden]
    meta = {
        **(metadata or {}),
        "format": FORMAT,
        "model_identity": _identity(model),
        "pairs": str(len(cache.tokens) // 2),
        "uses_mtp": json.dumps(bool(cache.uses_mtp)),
        "pending": json.dumps([int(t) for t in pending]),
        "chat": json.dumps(bool(chat)),
        "pad_token_id": str(model.pad_token_id),
    }
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mlx_cache.save_prompt_cache(str(tmp), list(cache.layers) + [pipo], meta)
        os.replace(tmp, path)
    except OSError as e:
        raise PipoError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_prompt_cache(path: str, model: PipoModel) -> PromptCacheFile:
    """Read a file `save_prompt_cache` wrote, checked against `model`: a file from
    another model, or one whose caches do not hold whole pairs, is refused."""
    path = Path(path).expanduser()
    _check_name(path)
    if not path.is_file():
        raise PipoError(f"prompt-cache file {path} does not exist; make one with pipo_mlx.cache_prompt")
    not_ours = PipoError(f"{path} is not a pipo_mlx prompt-cache file; make one with pipo_mlx.cache_prompt")
    try:
        layers, meta = mlx_cache.load_prompt_cache(str(path), return_metadata=True)
    except Exception:  # whatever mlx or mlx-lm make of a foreign or damaged file
        raise not_ours from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not layers:
        raise not_ours
    if meta.get("model_identity") != _identity(model):
        raise PipoError(
            f"{path} was made with another model (or other weights) than this one; "
            "make it again with pipo_mlx.cache_prompt and this --model"
        )
    *layers, pipo = layers
    tokens, last_hidden = pipo.cache
    cache = PromptCache(layers, tokens.tolist(), last_hidden, json.loads(meta["uses_mtp"]))
    _check_pairs(path, model, cache, int(meta["pairs"]))
    return PromptCacheFile(cache, json.loads(meta["pending"]), json.loads(meta["chat"]), meta)


def _check_pairs(path: Path, model: PipoModel, cache: PromptCache, pairs: int) -> None:
    """Every layer's cache holds the pairs the tokens say: the backbone's attention one
    entry per pair, the MTP one per pair less those owed (docs/design.md §5)."""
    owed = cache.last_hidden.shape[1] if cache.last_hidden is not None else 0
    backbone, mtp = model.split_cache(cache.layers)
    expected = [pairs] * len(backbone) + [pairs - owed if cache.uses_mtp else 0] * len(mtp)
    held = [getattr(c, "offset", n) for c, n in zip(cache.layers, expected)]
    if (
        len(cache.layers) != len(model.make_cache())
        or len(cache.tokens) != 2 * pairs
        or held != expected
        or (cache.uses_mtp and owed < 1)
    ):
        raise PipoError(
            f"{path} does not hold whole pairs of tokens in every layer (it was written "
            "by something else or damaged); make it again with pipo_mlx.cache_prompt"
        )
