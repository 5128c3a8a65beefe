"""Distillation toward a teacher: on-policy, the second training stage, and
teacher-forced, soft targets for the first (docs/design.md §7).

On-policy, the student (the PIPO model being trained) writes its own completions
with the real decoder, gate on; a frozen teacher scores them; the student's
token1 and token2 distributions are pulled onto the teacher's by reverse KL, and
the confidence head learns the probability that a teacher-run verifier would
accept each drafted token2. Teacher-forced, the same losses run over the
supervised stage's batches (the teacher's own answers) instead.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .data import IGNORE
from .decode import generate_step
from .losses import Sums, chunked_rows, confidence_bce, predicting_states, states, with_grad
from .model import PipoModel
from .prompt_cache import make_prompt_cache


@dataclass
class Rollouts:
    """A batch of student completions in the pair layout, PADs where drafts were dropped."""

    ids: np.ndarray  # [B, T] right-padded with PAD to one even length
    lengths: np.ndarray  # [B] real length of each row (prompt + completion)
    starts: np.ndarray  # [B] where each completion starts (the paired prompt's length)
    steps: int  # decode steps the rollouts took
    kept: int  # token2s the gate kept


def rollout(
    model: PipoModel,
    prompts: Sequence[List[int]],
    eos_token_ids: Sequence[int],
    max_tokens: int,
    sampler: Any,
    logits_processors: Optional[list],
    conf_threshold: float,
) -> Rollouts:
    """Each prompt completed by the student's own fused decoder (docs/design.md §5)."""
    pad = model.pad_token_id
    rows, starts, steps, kept = [], [], 0, 0
    was_training = model.training
    model.eval()  # the decoder's route: mlx-lm's inference kernels
    for prompt in prompts:
        cache = make_prompt_cache(model)
        for _, _, from_draft in generate_step(
            prompt,
            model,
            eos_token_ids=eos_token_ids,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=logits_processors,
            conf_threshold=conf_threshold,
            prompt_cache=cache,
        ):
            kept += from_draft
            steps += not from_draft
        rows.append(cache.tokens)
        starts.append(len(prompt) + len(prompt) % 2)
    model.train(was_training)
    lengths = np.array([len(r) for r in rows])
    ids = np.full((len(rows), int(lengths.max())), pad, np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    return Rollouts(ids, lengths, np.array(starts), steps, kept)


def teacher_forced(ids: np.ndarray, labels: np.ndarray) -> Rollouts:
    """A supervised batch (pair layout, PAD augmentation included) seen as rollouts:
    each row's completion starts at its first label and ends after its last."""
    has = labels != IGNORE
    starts = np.maximum(has.argmax(axis=1), 2)  # the first pair predicts nothing
    lengths = ids.shape[1] - has[:, ::-1].argmax(axis=1)
    return Rollouts(ids, lengths, starts, steps=0, kept=0)


def last_real(ids: np.ndarray, pad: int) -> np.ndarray:
    """For each position p, the index in the PAD-free sequence of the last real
    token at or before p (-1 before the first)."""
    return np.cumsum(ids != pad) - 1


# Rows the teacher scores in one call share a [rows, tokens, V] float32 logits
# array; this bounds it (about 1 GB). A row too long for it alone goes alone.
TEACHER_LOGITS_BUDGET = 1 << 28


def teacher_logprobs(
    teacher: nn.Module,
    ids: np.ndarray,
    lengths: Sequence[int],
    positions: Sequence[np.ndarray],
    pad: int,
) -> List[np.ndarray]:
    """The teacher's log-probabilities for the token at each of `positions[b]` of row b.

    The teacher reads each row without its PADs (it never saw a mid-sequence PAD);
    the prediction for position p comes from the last real token before p, so a
    PAD slot gets the teacher's prediction after the real token preceding it.
    Rows go through the teacher several at a time, the shorter ones filled after
    their end by repeating their last token: a causal model's outputs before the
    end never see the filling.
    """
    reals = [row[:n][row[:n] != pad] for row, n in zip(ids, lengths)]
    longest = max(len(r) for r in reals)
    out: List[np.ndarray] = []
    b, rows_per_call = 0, 1  # one row until the vocabulary size is known
    while b < len(reals):
        group = reals[b : b + rows_per_call]
        width = max(len(r) for r in group)
        filled = [np.concatenate([r, np.full(width - len(r), r[-1], r.dtype)]) for r in group]
        logits = teacher(mx.array(np.stack(filled))).astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for g in range(len(group)):
            row = ids[b + g][: lengths[b + g]]
            out.append(np.array(logprobs[g][mx.array(last_real(row, pad)[positions[b + g] - 1])]))
        b += len(group)
        rows_per_call = max(1, TEACHER_LOGITS_BUDGET // (logits.shape[-1] * longest))
    return out


@dataclass
class Slots:
    """The predicted slots of a rollout batch, token1 or token2 kind."""

    rows: np.ndarray  # batch row of each slot
    pairs: np.ndarray  # pair index i: token1 slot 2i+2 reads h_i, token2 slot 2i+3 reads m_i
    tokens: np.ndarray  # the rolled-out token; PAD for a dropped draft
    teacher: np.ndarray  # [N, V] teacher log-probabilities for the slot


def slots(
    teacher: nn.Module, batch: Rollouts, pad: int, eos_token_ids: Sequence[int]
) -> Tuple[Slots, Slots]:
    """The completion's token1 and token2 slots with the teacher's view of each.

    A token2 slot after an EOS token1 is left out: its PAD marks the end, not a
    dropped draft, and nothing follows it to predict.
    """
    kinds: Tuple[Dict[str, list], Dict[str, list]] = ({}, {})
    predicted = []
    for b in range(len(batch.ids)):
        row, positions = batch.ids[b], np.arange(batch.starts[b], batch.lengths[b])
        after_eos = np.isin(row[positions - 1], list(eos_token_ids)) & (positions % 2 == 1)
        predicted.append(positions[~after_eos])
    views = teacher_logprobs(teacher, batch.ids, batch.lengths, predicted, pad)
    for b, (positions, lp) in enumerate(zip(predicted, views)):
        row = batch.ids[b]
        for kind, pick in zip(kinds, (positions % 2 == 0, positions % 2 == 1)):
            p = positions[pick]
            for key, value in (
                ("rows", np.full(len(p), b)),
                ("pairs", (p - 2) // 2),
                ("tokens", row[p]),
                ("teacher", lp[pick]),
            ):
                kind.setdefault(key, []).append(value)
    return tuple(Slots(**{k: np.concatenate(v) for k, v in kind.items()}) for kind in kinds)


def _masked_logsumexp(x: mx.array, keep: mx.array) -> mx.array:
    return mx.logsumexp(mx.where(keep, x, -mx.inf), axis=-1, keepdims=True)


def reverse_kl(
    logits: mx.array,
    teacher: mx.array,
    tokens: mx.array,
    fill: mx.array,
    mode: str,
    k: int = 32,
    on_policy: bool = True,
) -> Tuple[mx.array, mx.array, mx.array]:
    """Per slot: (the term to differentiate, KL(p_s || p_t) or its estimate, α).

    `logits` are the student's [N, V] at temperature 1, `teacher` the teacher's
    log-probabilities, `tokens` the rolled-out tokens; where `fill`, the slot held
    a PAD and takes the student's argmax as its token. α, the acceptance
    probability of speculative sampling, is detached. Off policy (the tokens are
    not the student's samples), topk's α is the expected acceptance over its set,
    1 - TV of the renormalised distributions, as full's is over the vocabulary.
    """
    student = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    y = mx.stop_gradient(mx.where(fill, mx.argmax(logits, axis=-1), tokens))[:, None]
    ratio = mx.stop_gradient(
        mx.take_along_axis(student, y, axis=-1) - mx.take_along_axis(teacher, y, axis=-1)
    )[:, 0]
    accept = mx.exp(-mx.maximum(ratio, 0.0))  # min(1, p_t(y) / p_s(y))
    if mode == "sampled":
        # Unbiased on-policy form: the gradient of KL is E_y[ratio · ∇ log p_s(y)].
        term = ratio * mx.take_along_axis(student, y, axis=-1)[:, 0]
        return term, ratio, accept
    if mode == "full":
        p = mx.exp(student)
        kl = (p * (student - teacher)).sum(axis=-1)
        overlap = mx.stop_gradient(mx.minimum(p, mx.exp(teacher)).sum(axis=-1))  # 1 - TV
        return kl, kl, overlap
    # topk: both distributions renormalised over the union of the student's and
    # the teacher's top-k and the rolled-out token.
    k = min(k, logits.shape[-1])
    top_s = mx.argpartition(-student, k - 1, axis=-1)[:, :k]
    top_t = mx.argpartition(-teacher, k - 1, axis=-1)[:, :k]
    keep = mx.zeros(student.shape, dtype=mx.bool_)
    for idx in (top_s, top_t, y):
        keep = mx.put_along_axis(keep, mx.stop_gradient(idx), mx.array(True), axis=-1)
    # Entries outside the set are zeroed after normalising, not left at -inf,
    # so no NaN reaches the gradient through the masked branch.
    s = mx.where(keep, student - _masked_logsumexp(student, keep), 0.0)
    t = mx.where(keep, teacher - _masked_logsumexp(teacher, keep), 0.0)
    kl = mx.where(keep, mx.exp(s) * (s - t), 0.0).sum(axis=-1)
    if not on_policy:
        accept = mx.stop_gradient(mx.where(keep, mx.minimum(mx.exp(s), mx.exp(t)), 0.0).sum(axis=-1))
    return kl, kl, accept


def opd_pass(
    model: PipoModel,
    batch: Rollouts,
    token1: Slots,
    token2: Slots,
    mode: str,
    k: int,
    chunk_size: int,
    on_policy: bool = True,
) -> Tuple[Dict[str, Any], Dict[str, float]]:
    """The evaluation pass of the three OPD losses for one batch of rollouts: what
    `opd_terms` needs, and sums for the reports (docs/design.md §6: why two passes).
    `on_policy` False: the batch is `teacher_forced`, not the student's rollouts.

    kl1:  reverse KL of the backbone's token1 distribution, token1 slots
    kl2:  reverse KL of the MTP's token2 distribution, token2 slots
    conf: BCE of conf(sg(h), sg(m)) against α on the token2 slots
    Each is a mean over its slots; the KLs reach the model through the frozen
    LM head's input, chunk by chunk, as the supervised losses do.
    """
    pad = model.pad_token_id
    h, m = predicting_states(model, mx.array(batch.ids))
    n1, n2 = len(token1.tokens), len(token2.tokens)

    def slot_loss(count: int):
        def loss(logits, teacher, tokens, fill):
            term, kl, alpha = reverse_kl(logits, teacher, tokens, fill, mode, k, on_policy)
            return term.sum() / max(count, 1), (kl, alpha)

        return loss

    prepared: Dict[str, Any] = {}
    outputs = {}
    for name, x, slot, count in (("kl1", h, token1, n1), ("kl2", m, token2, n2)):
        if count == 0:  # e.g. every rollout ended on an EOS token1: no token2 slot
            outputs[name] = (np.zeros(0, np.float32), np.zeros(0, np.float32))
            continue
        x_slots = x[mx.array(slot.rows), mx.array(slot.pairs)]
        extras = (slot.teacher, slot.tokens, slot.tokens == pad)
        grad, (kl, alpha) = chunked_rows(
            model.lm_logits, x_slots, slot_loss(count), extras, chunk_size
        )
        prepared[name] = (float(kl.sum() / max(count, 1)), mx.array(grad))
        outputs[name] = (kl, alpha)

    alpha = mx.array(outputs["kl2"][1])
    prepared["alpha"] = alpha
    conf, pred = 0.0, 0.0
    # Nothing with no token2 slot is evaluated in MLX: its CPU backend was seen to
    # stall now and then reducing an empty array.
    if n2:
        z = model.confidence(h, m)[mx.array(token2.rows), mx.array(token2.pairs)]
        conf, pred = confidence_bce(z, alpha, 1.0, n2).item() * n2, float(mx.sigmoid(z).sum())
    stats = {
        "n1": n1,
        "kl1": float(outputs["kl1"][0].sum()),
        "n2": n2,
        "kl2": float(outputs["kl2"][0].sum()),
        "conf": conf,
        "alpha": float(outputs["kl2"][1].sum()),
        "pred": pred,
        "steps": batch.steps,
        "kept": batch.kept,
    }
    return prepared, stats


def opd_terms(
    model: PipoModel, batch: Rollouts, token1: Slots, token2: Slots, prepared: Dict[str, Any]
) -> Dict[str, mx.array]:
    """The differentiated pass: the three losses of `opd_pass` as lazy terms."""
    h, m = states(model, mx.array(batch.ids))
    terms = {}
    for name, x, slot in (("kl1", h, token1), ("kl2", m, token2)):
        if name not in prepared:
            terms[name] = mx.array(0.0)
            continue
        value, grad = prepared[name]
        terms[name] = with_grad(value, x[mx.array(slot.rows), mx.array(slot.pairs)], grad)
    if not len(token2.tokens):
        terms["conf"] = mx.array(0.0)
        return terms
    z = model.confidence(mx.stop_gradient(h), mx.stop_gradient(m))
    z = z[mx.array(token2.rows), mx.array(token2.pairs)]
    terms["conf"] = confidence_bce(z, prepared["alpha"], 1.0, len(token2.tokens))
    return terms


class OPDMeter(Sums):
    """opd_pass stats over batches, reported as means."""

    def means(self) -> Dict[str, float]:
        s = self.sums
        n1, n2, steps = (max(s.get(key, 0), 1) for key in ("n1", "n2", "steps"))
        return {
            "kl1": s["kl1"] / n1,
            "kl2": s["kl2"] / n2,
            "conf": s["conf"] / n2,
            "alpha": s["alpha"] / n2,
            "pred": s["pred"] / n2,
            "keep": s["kept"] / steps,
            "tokens_per_step": (s["steps"] + s["kept"]) / steps,
        }

    def line(self, weights: Tuple[float, float]) -> str:
        m = self.means()
        total = m["kl1"] + weights[0] * m["kl2"] + weights[1] * m["conf"]
        line = (
            f"loss {total:.3f} (kl tok1 {m['kl1']:.3f}, kl tok2 {m['kl2']:.3f}, "
            f"conf {m['conf']:.3f}) | α {m['alpha']:.3f} vs conf pred {m['pred']:.3f}"
        )
        if not self.sums.get("steps"):  # teacher-forced batches: no rollouts to describe
            return line
        return f"{line} | rollouts keep {m['keep']:.2f}, {m['tokens_per_step']:.2f} tok/step"
