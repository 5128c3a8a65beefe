"""How close a PIPO model's output is to its base model's (docs/design.md §5).

The figures behind `pipo_mlx.calibrate` and benchmarks/eval_quality.py. Every
distribution here is raw (temperature 1, no logits processors, PAD not masked),
so the figures describe the models, not one sampling setting:

- agreement, per slot: sum_v min(p_pipo(v), p_base(v)) = 1 - TV(p_pipo, p_base);
- acceptance of a drafted token y: min(1, p_base(y) / p_pipo(y)), speculative
  sampling's probability of keeping it; its mean over y ~ p_pipo is the agreement;
- the base's NLL of generated text, per token;
- ECE of the confidence head against an outcome, in equal-width bins.
"""

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .opd import last_real

ECE_BINS = 10


class Progress:
    """Logs 'what: done/total unit, rate, ETA' at most every `every` seconds and at the end."""

    def __init__(self, what: str, total: int, unit: str, log: Callable[[str], Any] = print,
                 every: float = 15.0):
        self.what, self.total, self.unit, self.log, self.every = what, total, unit, log, every
        self.done, self.start = 0, time.time()
        self.last = self.start

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if now - self.last >= self.every or self.done == self.total:
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            self.log(f"{self.what}: {self.done}/{self.total} {self.unit}, {rate:.2f}/s, "
                     + (f"ETA {eta:.0f} s" if self.done < self.total else f"{now - self.start:.0f} s"))
            self.last = now


def overlap(logits_a: mx.array, logits_b: mx.array) -> np.ndarray:
    """Per row, sum_v min(p_a(v), p_b(v)) = 1 - TV(p_a, p_b), softmax at temperature 1."""
    a = mx.softmax(logits_a.astype(mx.float32), axis=-1)
    b = mx.softmax(logits_b.astype(mx.float32), axis=-1)
    return np.array(mx.minimum(a, b).sum(axis=-1))


def logprob_at(logits: mx.array, tokens: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return picked - mx.logsumexp(logits, axis=-1)


def acceptance(draft_logits: mx.array, target_logits: mx.array, tokens: mx.array) -> np.ndarray:
    """Speculative sampling's acceptance of each drafted token y: min(1, p_target(y) / p_draft(y))."""
    gap = logprob_at(target_logits, tokens) - logprob_at(draft_logits, tokens)
    return np.array(mx.exp(mx.minimum(gap, 0.0)))


def calibration(conf: np.ndarray, outcome: np.ndarray, bins: int = ECE_BINS) -> Tuple[float, List[dict]]:
    """ECE (equal-width bins on [0, 1], weighted by their share) and the per-bin table."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        sel = which == b
        if not sel.any():
            continue
        c, o = float(conf[sel].mean()), float(outcome[sel].mean())
        ece += sel.mean() * abs(c - o)
        table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(sel.sum()),
                      "confidence": c, "observed": o})
    return float(ece), table


def teacher_forced(base: nn.Module, pipo: nn.Module, ids: mx.array) -> Dict[str, np.ndarray]:
    """Both models read the same text `ids` [B, T] (T even, no PAD). Per row and slot: the
    base's hits and NLL (every position), and PIPO's token1 hits (slots t[2i+2]), token2 hits
    (t[2i+3]), confidence, p_mtp(true token2) and the agreement 1 - TV of its token1 / token2
    distributions with the base's, the base predicting slot p from its output at p - 1."""
    b = base(ids[:, :-1]).astype(mx.float32)  # b[:, j] predicts t[j + 1]
    targets = ids[:, 1:]
    o = pipo(ids)
    logits, mtp = o.logits[:, :-1].astype(mx.float32), o.mtp_logits.astype(mx.float32)
    t1, t2 = ids[:, 2::2], ids[:, 3::2]
    return {
        "nll": np.array(nn.losses.cross_entropy(b, targets)),
        "correct": np.array(b.argmax(-1) == targets),
        "tok1": np.array(logits.argmax(-1) == t1),
        "tok2": np.array(mtp.argmax(-1) == t2),
        "conf": np.array(mx.sigmoid(o.confidence.astype(mx.float32))),
        "p_true": np.array(mx.exp(logprob_at(mtp, t2))),
        "agree1": overlap(logits, b[:, 1::2]),  # slot 2i+2: base output 2i+1
        "agree2": overlap(mtp, b[:, 2::2]),  # slot 2i+3: base output 2i+2
    }


def score_generation(base: nn.Module, pipo: nn.Module, prompt: Sequence[int], tokens: Sequence[int],
                     row: Optional[np.ndarray], pad: int) -> Dict[str, np.ndarray]:
    """Teacher-forced figures of one generation: "nll", the base's NLL of each generated token;
    with PIPO's pair layout `row` (its `prompt_cache.tokens`, PADs where drafts were dropped)
    also "conf" and "alpha", the confidence and acceptance of each kept token2, its draft
    distribution recomputed by the MTP over exactly the pairs the decoder read."""
    ids = list(prompt) + list(tokens)
    b = base(mx.array(ids)[None])[0]
    n = len(prompt)
    scores = {"nll": -np.array(logprob_at(b[n - 1 : -1], mx.array(list(tokens))))}
    if row is None:
        return scores
    real = row[row != pad]
    assert real.tolist() == ids, "the prompt cache does not hold the prompt and the generated tokens"
    start = n + n % 2  # an odd prompt is paired up with a PAD
    slots = np.array([p for p in range(start + 1, len(row), 2) if row[p] != pad], dtype=np.int64)
    scores["conf"], scores["alpha"] = np.zeros(0), np.zeros(0)
    if len(slots):
        o = pipo(mx.array(row)[None])
        pairs = mx.array((slots - 3) // 2)  # the MTP position that drafted slot p
        scores["conf"] = np.array(mx.sigmoid(o.confidence[0, pairs].astype(mx.float32)))
        # The base predicts a token from its output at the last real token before it.
        scores["alpha"] = acceptance(o.mtp_logits[0, pairs], b[mx.array(last_real(row, pad)[slots] - 1)],
                                     mx.array(row[slots]))
    return scores


def fastest_passing(candidates: Sequence[dict]) -> Optional[dict]:
    """The candidate {"threshold", "speedup", "passes", ...} with the highest speedup among those
    that pass; a tie goes to the higher τ, the one that keeps fewer drafts. None: none passes."""
    passing = [c for c in candidates if c["passes"]]
    return max(passing, key=lambda c: (c["speedup"], c["threshold"]), default=None)
