"""The supervised PIPO losses, computed without ever holding [tokens, V] logits.

The LM head is frozen, so the gradient of a cross-entropy with respect to the
head's *input* is all the backward pass needs: `chunked_cross_entropy` computes
losses and those input gradients a chunk of tokens at a time, eagerly, and
`with_grad` hands the gradient to autodiff through a zero-valued surrogate term
(docs/design.md §6).

A step is two passes. The evaluation pass (`sft_pass`) runs outside autodiff:
it evaluates the states, the losses and their gradients at the head's input.
The differentiated pass (`sft_terms`) rebuilds the same states lazily and
returns terms whose gradients are those, with nothing evaluated inside it: MLX
keeps the whole graph of any array evaluated inside a function being
differentiated, every layer's activations and upcast weights included, which
would defeat --grad-checkpoint (docs/design.md §6).
"""

from typing import Any, Callable, Dict, List, Tuple

import mlx.core as mx
import numpy as np

from .data import IGNORE
from .model import PipoModel

KEEP_THRESHOLDS = (0.5, 0.8, 0.95)  # reported keep rates, as the paper's τ = 0.95 and two looser


def _graph_free(x: mx.array) -> mx.array:
    """A copy of `x` with no graph behind it.

    Inside a function being differentiated MLX keeps every evaluated array's
    graph alive; arrays computed from a graph-free copy are freed as soon as
    they go out of scope, which is what lets chunked_cross_entropy drop each
    chunk's logits.
    """
    return mx.array(np.array(x.astype(mx.float32))).astype(x.dtype)


def chunked_rows(
    head: Callable[[mx.array], mx.array],
    x: mx.array,
    loss: Callable[..., Tuple[mx.array, Tuple[mx.array, ...]]],
    extras: Tuple[np.ndarray, ...],
    chunk_size: int,
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Run `loss(head(x_chunk) as float32 logits, *extras_chunk)` over rows of x [N, H],
    `chunk_size` rows at a time, so at most one chunk's logits exist.

    `loss` returns (a scalar to differentiate, per-row outputs). Returns the
    gradient with respect to x (NumPy, [N, H]) and the per-row outputs, joined.
    """
    x = _graph_free(x)
    step = mx.value_and_grad(lambda xc, *e: loss(head(xc).astype(mx.float32), *e))
    grad = np.zeros(x.shape, np.float32)
    outputs: List[List[np.ndarray]] = []
    for s in range(0, x.shape[0], chunk_size):
        (_, rows), g = step(x[s : s + chunk_size], *(mx.array(e[s : s + chunk_size]) for e in extras))
        # NumPy copies: see _graph_free.
        grad[s : s + chunk_size] = np.array(g.astype(mx.float32))
        outputs.append([np.array(r) for r in rows])
    return grad, [np.concatenate(parts) for parts in zip(*outputs)] if outputs else []


def chunked_cross_entropy(
    head: Callable[[mx.array], mx.array], x: mx.array, targets: mx.array, chunk_size: int
) -> Tuple[float, mx.array, np.ndarray, np.ndarray, int]:
    """Mean cross-entropy of head(x) over the positions whose target is not IGNORE.

    Returns (mean, d mean / d x as a graph-free array shaped like x, per-position
    CE and argmax-hit as NumPy arrays shaped like targets (0 where ignored),
    number of counted positions).
    """
    shape = x.shape
    t = np.array(targets).reshape(-1)
    rows = np.flatnonzero(t != IGNORE)
    count = max(len(rows), 1)

    def loss(logits: mx.array, tc: mx.array):
        ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        return ce.sum() / count, (ce, mx.argmax(logits, axis=-1) == tc)

    ce = np.zeros(t.shape, np.float32)
    hit = np.zeros(t.shape, bool)
    grad = np.zeros((len(t), shape[-1]), np.float32)
    if len(rows):
        x_rows = x.reshape(-1, shape[-1])[mx.array(rows)]
        grad[rows], (ce[rows], hit[rows]) = chunked_rows(head, x_rows, loss, (t[rows],), chunk_size)
    return (
        float(ce.sum() / count),
        mx.array(grad).reshape(shape),
        ce.reshape(targets.shape),
        hit.reshape(targets.shape),
        len(rows),
    )


def with_grad(value: float, x: mx.array, grad: mx.array) -> mx.array:
    """`value`, whose gradient with respect to x is `grad`: the added term is zero."""
    return value + ((x - mx.stop_gradient(x)) * grad).sum()


def states(model: PipoModel, ids: mx.array) -> Tuple[mx.array, mx.array]:
    """The teacher-forced states that predict each pair's slots, lazily: backbone
    states h[:, :-1] for the token1 slots, MTP states m for the token2 slots."""
    # The heads may be float32 master weights (setup_trainable); the backbone
    # computes in its weights' dtype unless training asked for another.
    x = model.compress(ids).astype(model.compute_dtype or model.model.embed_tokens.weight.dtype)
    h = model.model(None, input_embeddings=x)[:, :-1]
    return h, model.draft(ids[:, 2::2], h)


def predicting_states(model: PipoModel, ids: mx.array) -> Tuple[mx.array, mx.array]:
    """`states`, evaluated (for the evaluation passes, outside autodiff)."""
    h, m = states(model, ids)
    mx.eval(h, m)
    return h, m


def confidence_bce(z: mx.array, target: mx.array, valid: Any, count: int) -> mx.array:
    """softplus(z) - target * z, summed over `valid` slots (a mask, or 1.0: all) / count."""
    return ((mx.logaddexp(0.0, z) - target * z) * valid).sum() / max(count, 1)


def sft_pass(
    model: PipoModel, ids: mx.array, labels: mx.array, chunk_size: int
) -> Tuple[Dict[str, Any], Dict[str, float]]:
    """The evaluation pass of the three PIPO losses for one batch: what `sft_terms`
    needs, and sums for the reports.

    lm:   CE of LM-head(h[:, :-1]) against labels[:, 2::2] (token1)
    mtp:  CE of LM-head(m) against labels[:, 3::2] (token2), m = MTP(embed(ids[:, 2::2]), h[:, :-1])
    conf: BCE of conf(sg(h[:, :-1]), sg(m)) against sg(p_mtp(true token2))
    Each is a mean over the positions whose label is not IGNORE.
    """
    h, m = predicting_states(model, ids)
    lm, g_h, _, hit1, n1 = chunked_cross_entropy(model.lm_logits, h, labels[:, 2::2], chunk_size)
    mtp, g_m, ce2, hit2, n2 = chunked_cross_entropy(model.lm_logits, m, labels[:, 3::2], chunk_size)

    valid = np.array(labels[:, 3::2]) != IGNORE
    target = np.where(valid, np.exp(-ce2), 0.0).astype(np.float32)  # p_mtp(true token2)
    prepared = {"lm": (lm, g_h), "mtp": (mtp, g_m), "target": mx.array(target),
                "valid": mx.array(valid), "n2": n2}
    z = model.confidence(h, m)
    conf = confidence_bce(z, prepared["target"], prepared["valid"], n2)

    p = np.array(mx.sigmoid(z.astype(mx.float32)))[valid]
    stats = {
        "n1": n1,
        "lm": lm * n1,
        "hit1": float(hit1.sum()),
        "n2": n2,
        "mtp": mtp * n2,
        "hit2": float(hit2.sum()),
        "conf": conf.item() * n2,
        "pred": float(p.sum()),
        "target": float(target.sum()),
    }
    for tau in KEEP_THRESHOLDS:
        kept = p >= tau
        stats[f"keep{tau}"] = float(kept.sum())
        stats[f"kepthit{tau}"] = float((kept & hit2[valid]).sum())
    return prepared, stats


def sft_terms(model: PipoModel, ids: mx.array, prepared: Dict[str, Any]) -> Dict[str, mx.array]:
    """The differentiated pass: the three losses of `sft_pass` as lazy terms."""
    h, m = states(model, ids)
    (lm, g_h), (mtp, g_m) = prepared["lm"], prepared["mtp"]
    z = model.confidence(mx.stop_gradient(h), mx.stop_gradient(m))
    return {
        "lm": with_grad(lm, h, g_h),
        "mtp": with_grad(mtp, m, g_m),
        "conf": confidence_bce(z, prepared["target"], prepared["valid"], prepared["n2"]),
    }


class Sums:
    """Per-batch stats summed over batches; subclasses report them as means."""

    def __init__(self) -> None:
        self.sums: Dict[str, float] = {}

    def add(self, stats: Dict[str, float]) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v


class Meter(Sums):
    """sft_pass stats over batches, reported as means."""

    def means(self) -> Dict[str, float]:
        s = self.sums
        n1, n2 = max(s.get("n1", 0), 1), max(s.get("n2", 0), 1)
        out = {
            "lm": s["lm"] / n1,
            "mtp": s["mtp"] / n2,
            "conf": s["conf"] / n2,
            "acc1": s["hit1"] / n1,
            "acc2": s["hit2"] / n2,
            "pred": s["pred"] / n2,
            "target": s["target"] / n2,
        }
        for tau in KEEP_THRESHOLDS:
            out[f"keep{tau}"] = s[f"keep{tau}"] / n2
            out[f"keptacc{tau}"] = s[f"kepthit{tau}"] / max(s[f"keep{tau}"], 1)
        return out

    def line(self, weights: Tuple[float, float]) -> str:
        m = self.means()
        keep = "/".join(f"{m[f'keep{t}']:.2f}" for t in KEEP_THRESHOLDS)
        kept = "/".join(f"{m[f'keptacc{t}']:.2f}" for t in KEEP_THRESHOLDS)
        total = m["lm"] + weights[0] * m["mtp"] + weights[1] * m["conf"]
        return (
            f"loss {total:.3f} (lm {m['lm']:.3f}, mtp {m['mtp']:.3f}, conf {m['conf']:.3f}) | "
            f"acc tok1 {m['acc1']:.3f} tok2 {m['acc2']:.3f} | "
            f"conf pred {m['pred']:.3f} vs target {m['target']:.3f} | "
            f"keep@{'/'.join(str(t) for t in KEEP_THRESHOLDS)} {keep} (tok2 acc {kept})"
        )
