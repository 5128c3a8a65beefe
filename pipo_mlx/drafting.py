"""Adaptive drafting: run the MTP head only while its drafts pay (docs/design.md §5).

A drafting step reads more weights than a plain one (the MTP layer, the
confidence head and the LM head a second time) and pays only through the
token2s it keeps. With `cost` the extra time of a drafting step as a fraction
of a plain step, drafting is faster exactly when the keep rate exceeds `cost`:
(1 + keep rate) tokens for (1 + cost) time against 1 for 1. Skipping the MTP
head is the same as dropping token2, so drafting less can only change speed,
never make the text worse than keep-none.

The decision uses only keeps the host has already read (no extra
synchronisation) and a cost fixed before decoding starts (from the weights or a
stored measurement, never a live timer), so the same prompt, seed and settings
give the same tokens run after run.
"""

from collections import deque
from typing import Deque, Optional, Sequence

import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import PipoError

DRAFT_MODES = ("auto", "always", "never")
DEFAULT_DRAFT = "auto"
# How fast the keep-rate estimate follows new keeps: the weight of one step.
EMA_WEIGHT = 1 / 16
# Hysteresis: drafting stops when the estimate falls below this share of the
# break-even rate and starts again only above break-even, so that the noise of
# a few kept or dropped drafts near break-even does not flip it back and forth.
STOP_BELOW = 0.5
# While drafting is off the estimate goes stale: each plain step moves it this
# far back toward break-even, so that after a while one kept probe is enough
# to start drafting again, and one dropped probe keeps it off.
RELAX_WEIGHT = 1 / 32
# While drafting is off, a drafting step (a probe) every PROBE_MIN plain steps
# at first, twice as far apart after each probe that keeps nothing, at most
# PROBE_MAX; a kept probe brings the gap back to PROBE_MIN.
PROBE_MIN, PROBE_MAX = 8, 64


def check_draft(mode: Optional[str]) -> str:
    """The drafting mode, checked; None means the default, "auto"."""
    if mode is None:
        return DEFAULT_DRAFT
    if mode not in DRAFT_MODES:
        raise PipoError(f"draft must be one of {', '.join(DRAFT_MODES)}; got {mode!r}")
    return mode


def _nbytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of weights a decode step reads: B (backbone, the embedding lookup aside),
    E (LM head), M (MTP head and confidence head), C (compressor)."""
    embed = _nbytes(model.model.embed_tokens)
    return {
        "B": _nbytes(model.model) - embed,
        "E": embed if model.args.tie_word_embeddings else _nbytes(model.lm_head),
        "M": _nbytes(model.mtp) + _nbytes(model.confidence_head),
        "C": _nbytes(model.compressor),
    }


def draft_cost(model: nn.Module) -> float:
    """Extra time of a drafting step over a plain step, as a fraction of the plain step.

    The value calibration measured and stored with the model, else the weights
    read: a drafting step adds the MTP and confidence heads and a second pass
    over the LM head to the plain step's backbone, LM head and compressor.
    """
    if model.args.draft_cost is not None:
        return float(model.args.draft_cost)
    w = weight_bytes(model)
    return (w["E"] + w["M"]) / (w["B"] + w["E"] + w["C"])


class KeepRate:
    """One sequence's recent keep rate, an exponential average over its drafting steps.

    It starts at the break-even rate: the first steps draft, and a model whose
    drafts are rarely kept stops after a dozen of them.
    """

    def __init__(self, cost: float):
        self.value = min(1.0, cost)

    def observe(self, kept: bool) -> None:
        self.value += (float(kept) - self.value) * EMA_WEIGHT

    def relax(self, cost: float) -> None:
        """A step that did not draft: no news, so trust the estimate a little less."""
        self.value += (cost - self.value) * RELAX_WEIGHT


class DraftSchedule:
    """Which steps draft, for one sequence or for a whole batch (rows share one graph).

    `decide` is asked once per step, before the step is built, with the
    estimates of the rows that may draft; `observe` is told, for each drafting
    step the host has read, whether any of those rows kept its token2.
    """

    def __init__(self, cost: float):
        self.cost = cost
        self.on = True  # drafting every step, until the estimate says it does not pay
        self.gap = PROBE_MIN  # plain steps between probes while off
        self.waited = 0
        self.unread: Deque[bool] = deque()  # per drafting step not yet observed: a probe?

    def decide(self, rates: Sequence[float], forced: bool = False) -> bool:
        probe = False
        if forced or not rates:
            drafting = forced
        else:
            self.on = sum(rates) / len(rates) > self.cost * (STOP_BELOW if self.on else 1.0)
            if self.on:
                self.waited, self.gap = 0, PROBE_MIN
            else:
                self.waited += 1
                probe = self.waited >= self.gap  # drafts may have become good again
                self.waited = 0 if probe else self.waited
            drafting = self.on or probe
        if drafting:
            self.unread.append(probe)
        return drafting

    def observe(self, any_kept: bool) -> None:
        if self.unread.popleft():
            self.gap = PROBE_MIN if any_kept else min(2 * self.gap, PROBE_MAX)
