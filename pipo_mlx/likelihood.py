"""Teacher-forced log-likelihoods of token sequences under PIPO's pairs (docs/design.md §1, §4).

A PIPO model reads a row of tokens as pairs, pair i = (t_2i, t_2i+1). The
backbone's state after pair i predicts t_2i+2 through the LM head (a token1
slot); the MTP head, reading that state and the true t_2i+2, predicts t_2i+3
(a token2 slot). So slot p ≥ 2 of a row is scored by the backbone when p is
even and by the MTP head when p is odd; slots 0 and 1 have no prediction.

The distributions are raw (temperature 1, no processors, PAD not masked), the
ones the training losses use: exp(mean NLL) over the token1 or token2 slots of
a validation text is exp of its `lm` or `mtp` loss.

How a (context, continuation) request becomes a row is `request_row`: the
context is paired as the decoder pairs a prompt (a PAD after an odd one,
docs/design.md §4), so the continuation starts on a pair boundary exactly where
generated text would. Its layout is then either "pairs", the continuation read
two tokens a pair (every draft kept: first token from the backbone, second
from the MTP head, and so on), or "token1", one token a pair followed by PAD
(what decoding with τ ≥ 1 reads: every token from the backbone).
"""

from typing import List, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import PipoError
from .model import PipoModel
from .prompt_cache import pair_up

LAYOUTS = ("pairs", "token1")
DEFAULT_LAYOUT = "pairs"
# Logits are formed for at most this many slots at once: [slots, V] float32 is
# 1 GB at Qwen3.5's 248k vocabulary.
CHUNK_SLOTS = 1024


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise PipoError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    return layout


def request_row(
    context: Sequence[int], continuation: Sequence[int], pad: int, layout: str = DEFAULT_LAYOUT
) -> Tuple[List[int], List[int]]:
    """The even-length row the backbone reads for `continuation` after `context`, and the
    slots of the row that hold the continuation's tokens, in order."""
    if not context:
        raise PipoError("a request needs at least one token of context (the first token of a "
                        "row has no prediction); prefix an empty context with a BOS or EOS token")
    row = pair_up(list(context), pad)
    start = len(row)
    if check_layout(layout) == "pairs":
        row += list(continuation)
        slots = list(range(start, start + len(continuation)))
    else:
        for token in continuation:
            row += [token, pad]
        slots = list(range(start, start + 2 * len(continuation), 2))
    return pair_up(row, pad), slots


def _pick(logits: mx.array, targets: mx.array) -> Tuple[mx.array, mx.array]:
    """Log-probability of each target and whether it is the argmax, per row and position."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - mx.logsumexp(logits, axis=-1), mx.argmax(logits, axis=-1) == targets


def _padded(rows: Sequence[Sequence[int]], pad: int, even: bool) -> mx.array:
    """Rows right-padded to one length; causal models never see the padding from real slots."""
    width = max(len(r) for r in rows)
    width += even and width % 2
    ids = np.full((len(rows), width), pad, dtype=np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return mx.array(ids)


def _scores(rows: Sequence[Sequence[int]], parts: Sequence[Tuple[mx.array, mx.array, int, int]],
            head) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Fill per-row (log-prob, greedy) arrays from `parts`: (states [B, n, H], targets [B, n],
    first slot, slot stride), projecting through `head` a chunk of positions at a time."""
    B, width = len(rows), max(len(r) for r in rows)
    logprob = np.full((B, width), np.nan, dtype=np.float32)
    greedy = np.zeros((B, width), dtype=bool)
    for states, targets, first, stride in parts:
        step = max(1, CHUNK_SLOTS // B)
        for s in range(0, states.shape[1], step):
            lp, hit = _pick(head(states[:, s : s + step]), targets[:, s : s + step])
            cols = first + stride * np.arange(s, s + lp.shape[1])
            keep = cols < width
            logprob[:, cols[keep]] = np.array(lp)[:, keep]
            greedy[:, cols[keep]] = np.array(hit)[:, keep]
    return [(logprob[i, : len(r)], greedy[i, : len(r)]) for i, r in enumerate(rows)]


def pipo_slot_scores(model: PipoModel, rows: Sequence[Sequence[int]]) -> List[Tuple[np.ndarray, np.ndarray]]:
    """For each row (even length, PADs where the layout puts them): per slot p, the log-probability
    of row[p] under its slot's head and whether it is that head's argmax; NaN and False at slots 0
    and 1, which nothing predicts. The rows are scored together, right-padded."""
    if any(len(r) % 2 for r in rows):
        raise PipoError("PIPO reads rows in pairs; pair them first (request_row)")
    ids = _padded(rows, model.pad_token_id, even=True)
    h = model.hidden(ids)[:, :-1]  # h_i predicts t_{2i+2}
    m = model.draft(ids[:, 2::2], h)  # m_i, fed the true t_{2i+2}, predicts t_{2i+3}
    mx.eval(h, m)
    return _scores(rows, [(h, ids[:, 2::2], 2, 2), (m, ids[:, 3::2], 3, 2)], model.lm_logits)


def base_slot_scores(base: nn.Module, rows: Sequence[Sequence[int]], pad: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """The same for an ordinary causal LM (mlx-lm's): slot p ≥ 1 scored from its output at p - 1."""
    ids = _padded(rows, pad, even=False)
    logits = base(ids[:, :-1])
    return _scores(rows, [(logits, ids[:, 1:], 1, 1)], lambda x: x)
