"""Cheaper stand-ins for the LM head when computing the drafted token2's logits.

A decode step reads the LM head twice (token1, then token2, which depends on
token1), so where decoding is bound by reading weights the keep-all speedup
stays below 2x (docs/design.md §5). Since token2 is only a draft the confidence
head may drop, it can come from a cheaper head.
"""

from typing import Callable, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .errors import PipoError

DEFAULT_TOKEN2_HEAD = "full"

Token2Head = Callable[[mx.array], mx.array]  # MTP state m [B, H] -> logits [B, V]


def parse_token2_head(spec: str) -> Tuple[Optional[int], Optional[int]]:
    """(bits, shortlist size) from "full", "q4", "q8", "top:K", "q4+top:K" or "q8+top:K"."""
    bits = top = None
    parts = spec.split("+") if spec != DEFAULT_TOKEN2_HEAD else []
    for part in parts:
        if part in ("q4", "q8") and bits is None:
            bits = int(part[1:])
        elif part.startswith("top:") and part[4:].isdigit() and int(part[4:]) > 0 and top is None:
            top = int(part[4:])
        else:
            raise PipoError(
                f"unknown token2 head {spec!r}; use full, q4, q8, top:K (K > 0), "
                "or q4+top:K / q8+top:K"
            )
    return bits, top


def _lm_head_rows(
    layer: nn.Module, rows: int
) -> Tuple[Tuple[mx.array, ...], Optional[dict]]:
    """The first `rows` rows of the LM head: (arrays, quantization args or None)."""
    if "scales" not in layer:
        return (layer.weight[:rows],), None
    biases = layer["biases"][:rows] if "biases" in layer else None
    packed = (layer.weight[:rows], layer.scales[:rows], biases)
    return packed, {"group_size": layer.group_size, "bits": layer.bits, "mode": layer.mode}


def make_token2_head(model: nn.Module, spec: str = DEFAULT_TOKEN2_HEAD) -> Token2Head:
    """token2's logits from the MTP state: the LM head itself, or a cheaper stand-in.

    Build it once and pass it as `token2_head` (a string there builds it per call).

    * "full": the LM head; exact, and the default.
    * "q4", "q8": a 4- or 8-bit copy of the LM head, made here (extra memory),
      used only for token2. It pays where a matmul is bound by reading weights
      (Apple GPUs); MLX's CPU quantized matmul is bound by arithmetic instead,
      so on CPU it is no faster than the full head.
    * "top:K": only the first K token ids. BPE tokenizers number tokens in merge
      order, so low ids are the frequent ones; the rows are a slice of the head,
      with no copy, and cost K/V of its reads. token2 is drawn from these K ids
      only: where the full head would pick another token the draft differs, and
      the confidence head (which never sees logits) may still keep it, so the
      price is paid in token2 accuracy. Special tokens usually close the
      vocabulary, so an EOS then ends generation only as token1.
    * "q4+top:K", "q8+top:K": both.
    """
    bits, top = parse_token2_head(spec)
    if bits is None and top is None:
        return model.lm_logits
    vocab = model.args.vocab_size
    if top is not None and top > vocab:
        raise PipoError(f"token2 head {spec!r}: the vocabulary has only {vocab} tokens")
    rows = top or vocab
    layer = model.model.embed_tokens if model.args.tie_word_embeddings else model.lm_head
    packed, qargs = _lm_head_rows(layer, rows)
    if bits is not None:
        weight = packed[0] if qargs is None else mx.dequantize(*packed, **qargs)
        group = next((g for g in (64, 32) if weight.shape[-1] % g == 0), None)
        if group is None:
            raise PipoError(
                f"token2 head {spec!r}: hidden size {weight.shape[-1]} is not a multiple of 32"
            )
        packed = tuple(mx.quantize(weight, group, bits))
        qargs = {"group_size": group, "bits": bits, "mode": "affine"}
    packed = tuple(p for p in packed if p is not None)  # unquantized, or no biases
    mx.eval(packed)

    def logits(m: mx.array) -> mx.array:
        if qargs is None:
            out = m @ packed[0].T
        else:
            out = mx.quantized_matmul(m, *packed, transpose=True, **qargs)
        if rows < vocab:  # ids past the shortlist can never be drawn
            out = mx.pad(
                out, [(0, 0)] * (out.ndim - 1) + [(0, vocab - rows)], constant_values=-mx.inf
            )
        return out

    return logits


