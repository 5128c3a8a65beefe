"""On-policy distillation (pipo_mlx/opd.py, docs/design.md §7) against references
written here from the definitions, in NumPy (float64) or plain MLX autodiff,
never by calling the code under test.

- reverse KL per slot, temperature 1: `full` exact, `topk` over S = student's
  top-K ∪ teacher's top-K ∪ {y}, both renormalised on S; `sampled` the detached
  log-ratio at y times log p_s(y) (its expectation under p_s has the full KL's
  gradient);
- α detached: min(1, p_t(y)/p_s(y)) from the full distributions in `topk` and
  `sampled`, Σ_v min(p_s, p_t) = 1 − TV in `full`;
- teacher mapping: the teacher reads the row without PADs; position p takes its
  output at (non-PAD tokens in positions 0..p−1) − 1;
- a PAD in a slot is labelled with the student's argmax; a token2 slot after an
  EOS token1 is not a slot;
- off policy (--soft-targets), `topk`'s α is Σ_S min(q_s, q_t) over S with both
  renormalised, and a supervised batch's slots run from its first label to its
  last.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from pipo_mlx import load
from pipo_mlx.data import IGNORE, Example, pair_layout
from pipo_mlx.opd import (
    Rollouts, Slots, last_real, opd_pass, opd_terms, reverse_kl, slots, teacher_forced,
    teacher_logprobs,
)

PAD, EOS = 0, 1
MODES = ("full", "topk", "sampled")


# -- NumPy references -------------------------------------------------------


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_logsumexp(x):
    m = x.max()
    return m + np.log(np.exp(x - m).sum())


def ref_label(logits, tokens, fill):
    return np.where(fill, np.argmax(logits, -1), tokens)


def ref_topk_set(ls, lt, y, k):
    """S for one row: the student's top-k, the teacher's top-k and y."""
    S = set(np.argsort(-ls)[:k]) | set(np.argsort(-lt)[:k]) | {int(y)}
    return np.array(sorted(S))


def ref_reverse_kl(logits, teacher, tokens, fill, mode, k=32):
    """Per row (kl, α, d kl/d logits) in float64, from the definitions.

    For `sampled` the gradient is that of the per-slot term, ratio · ∇ log p_s(y).
    """
    ls, lt = np_log_softmax(logits), np.asarray(teacher, np.float64)
    y = ref_label(logits, tokens, fill)
    N, V = ls.shape
    kl, alpha, grad = np.zeros(N), np.zeros(N), np.zeros((N, V))
    for r in range(N):
        ratio = ls[r, y[r]] - lt[r, y[r]]
        accept = min(1.0, np.exp(lt[r, y[r]]) / np.exp(ls[r, y[r]]))
        p = np.exp(ls[r])
        if mode == "full":
            kl[r] = (p * (ls[r] - lt[r])).sum()
            alpha[r] = np.minimum(p, np.exp(lt[r])).sum()
            grad[r] = p * (ls[r] - lt[r] - kl[r])
        elif mode == "topk":
            S = ref_topk_set(ls[r], lt[r], y[r], k)
            qs = ls[r, S] - np_logsumexp(ls[r, S])
            qt = lt[r, S] - np_logsumexp(lt[r, S])
            kl[r] = (np.exp(qs) * (qs - qt)).sum()
            alpha[r] = accept
            grad[r, S] = np.exp(qs) * (qs - qt - kl[r])
        else:
            kl[r] = ratio
            alpha[r] = accept
            grad[r] = ratio * (np.eye(V)[y[r]] - p)
    return kl, alpha, grad


def ref_kl_value(logits, teacher, tokens, fill, mode, k, rows_mask=None):
    """The KL value alone, for finite differences (S and y held at `rows_mask`)."""
    ls, lt = np_log_softmax(logits), np.asarray(teacher, np.float64)
    out = np.zeros(len(ls))
    for r in range(len(ls)):
        if mode == "full":
            out[r] = (np.exp(ls[r]) * (ls[r] - lt[r])).sum()
        else:
            S = rows_mask[r]
            qs = ls[r, S] - np_logsumexp(ls[r, S])
            qt = lt[r, S] - np_logsumexp(lt[r, S])
            out[r] = (np.exp(qs) * (qs - qt)).sum()
    return out


def random_slots(seed, N=7, V=50):
    """float32 student logits, teacher log-probs, tokens and fill flags: rows 0 and 3
    held a PAD, rows 1 and 4 roll out a token in neither top set."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(N, V)) * 2.0).astype(np.float32)
    teacher = np_log_softmax(rng.normal(size=(N, V)) * 2.0).astype(np.float32)
    tokens = rng.integers(2, V, size=N).astype(np.int32)
    fill = np.zeros(N, bool)
    fill[[0, 3]] = True
    tokens[fill] = PAD
    for r in (1, 4):
        tokens[r] = np.argmin(np_log_softmax(logits[r]) + teacher[r])
    return logits, teacher, tokens, fill


def call_reverse_kl(logits, teacher, tokens, fill, mode, k=32):
    args = (mx.array(a) for a in (logits, teacher, tokens, fill))
    return reverse_kl(*args, mode, k)


# -- 1. values --------------------------------------------------------------


VALUE_CASES = [("full", 0), ("sampled", 0)] + [("topk", k) for k in (1, 3, 8, 25, 40, 50)]
GRAD_CASES = [("full", 0), ("sampled", 0)] + [("topk", k) for k in (1, 3, 25, 40)]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode,k", VALUE_CASES)
def test_reverse_kl_values_and_alpha_match_numpy(mode, k, seed):
    logits, teacher, tokens, fill = random_slots(seed)
    term, kl, alpha = call_reverse_kl(logits, teacher, tokens, fill, mode, k or 32)
    want_kl, want_alpha, _ = ref_reverse_kl(logits, teacher, tokens, fill, mode, k)
    np.testing.assert_allclose(np.array(kl), want_kl, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(alpha), want_alpha, rtol=1e-5, atol=1e-5)
    assert np.all(np.array(alpha) <= 1 + 1e-6) and np.all(np.array(alpha) >= 0)
    if mode == "sampled":
        # The term is ratio · log p_s(y); its value is not the KL.
        ls = np_log_softmax(logits)
        y = ref_label(logits, tokens, fill)
        np.testing.assert_allclose(
            np.array(term), want_kl * ls[np.arange(len(y)), y], rtol=1e-5, atol=1e-5
        )
    else:
        np.testing.assert_allclose(np.array(term), want_kl, rtol=1e-5, atol=1e-5)
    if mode == "topk" and k >= logits.shape[1]:
        # S is the whole vocabulary: topk is the full KL.
        full = ref_reverse_kl(logits, teacher, tokens, fill, "full")[0]
        np.testing.assert_allclose(np.array(kl), full, rtol=1e-5, atol=1e-5)


def test_alpha_definitions_by_hand():
    """α on a two-row, three-token case worked by hand."""
    ps = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    pt = np.array([[0.2, 0.6, 0.2], [0.1, 0.3, 0.6]])
    logits, teacher = np.log(ps).astype(np.float32), np.log(pt).astype(np.float32)
    tokens, fill = np.array([0, PAD], np.int32), np.array([False, True])
    # y = 0 (p_t/p_s = 0.4) and, for the PAD row, the student's argmax 1 (0.3/0.6 = 0.5)
    for mode in ("sampled", "topk"):
        _, _, alpha = call_reverse_kl(logits, teacher, tokens, fill, mode, k=1)
        np.testing.assert_allclose(np.array(alpha), [0.4, 0.5], atol=1e-6)
    _, _, alpha = call_reverse_kl(logits, teacher, tokens, fill, "full")
    np.testing.assert_allclose(np.array(alpha), [0.2 + 0.3 + 0.2, 0.1 + 0.3 + 0.3], atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 25, 50])
def test_off_policy_alpha_is_the_overlap_on_the_set(k):
    logits, teacher, tokens, fill = random_slots(5)
    args = (mx.array(a) for a in (logits, teacher, tokens, fill))
    term, kl, alpha = reverse_kl(*args, "topk", k, on_policy=False)
    want_kl, _, _ = ref_reverse_kl(logits, teacher, tokens, fill, "topk", k)
    ls, lt = np_log_softmax(logits), np.asarray(teacher, np.float64)
    y = ref_label(logits, tokens, fill)
    want = []
    for r in range(len(ls)):
        S = ref_topk_set(ls[r], lt[r], y[r], k)
        qs = np.exp(ls[r, S] - np_logsumexp(ls[r, S]))
        qt = np.exp(lt[r, S] - np_logsumexp(lt[r, S]))
        want.append(np.minimum(qs, qt).sum())
    np.testing.assert_allclose(np.array(alpha), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(kl), want_kl, rtol=1e-5, atol=1e-5)
    if k >= logits.shape[1]:  # S is the vocabulary: full's 1 - TV
        full_alpha = ref_reverse_kl(logits, teacher, tokens, fill, "full")[1]
        np.testing.assert_allclose(np.array(alpha), full_alpha, rtol=1e-5, atol=1e-5)


# -- 2. gradients -----------------------------------------------------------


def _mx_grad(logits, teacher, tokens, fill, mode, k, out=0):
    t, y, f = mx.array(teacher), mx.array(tokens), mx.array(fill)
    return np.array(
        mx.grad(lambda l: reverse_kl(l, t, y, f, mode, k)[out].sum())(mx.array(logits))
    )


@pytest.mark.parametrize("mode,k", GRAD_CASES)
def test_reverse_kl_gradients_match_analytic(mode, k):
    logits, teacher, tokens, fill = random_slots(2)
    _, _, want = ref_reverse_kl(logits, teacher, tokens, fill, mode, k)
    if mode != "sampled":
        # The analytic reference itself against float64 central differences.
        ls = np_log_softmax(logits)
        y = ref_label(logits, tokens, fill)
        sets = [ref_topk_set(ls[r], teacher[r], y[r], k) for r in range(len(ls))] if k else None
        x, eps, fd = logits.astype(np.float64), 1e-6, np.zeros(logits.shape)
        for j in range(x.shape[1]):
            d = np.zeros_like(x)
            d[:, j] = eps
            fd[:, j] = (
                ref_kl_value(x + d, teacher, tokens, fill, mode, k, sets)
                - ref_kl_value(x - d, teacher, tokens, fill, mode, k, sets)
            ) / (2 * eps)
        np.testing.assert_allclose(want, fd, atol=1e-7)
    got = _mx_grad(logits, teacher, tokens, fill, mode, k or 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # KL value (sampled: the log-ratio) and α are detached.
    assert not np.any(_mx_grad(logits, teacher, tokens, fill, mode, k or 32, out=2))
    if mode == "sampled":
        assert not np.any(_mx_grad(logits, teacher, tokens, fill, mode, k or 32, out=1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_gradient_is_unbiased_for_full(seed):
    """Σ_y p_s(y) ∇(sampled term at y) = ∇ full KL, enumerating y exactly (V = 8)."""
    rng = np.random.default_rng(seed)
    V = 8
    row = (rng.normal(size=V) * 1.5).astype(np.float32)
    teacher = np_log_softmax(rng.normal(size=V) * 1.5).astype(np.float32)
    logits = np.tile(row, (V, 1))  # one copy of the row per y
    tokens, fill = np.arange(V, dtype=np.int32), np.zeros(V, bool)
    per_y = _mx_grad(logits, np.tile(teacher, (V, 1)), tokens, fill, "sampled", 32)
    ps = np.exp(np_log_softmax(row))
    expected = (ps[:, None] * per_y).sum(0)
    full_mx = _mx_grad(row[None], teacher[None], tokens[:1], fill[:1], "full", 32)[0]
    full_np = ref_reverse_kl(row[None], teacher[None], tokens[:1], fill[:1], "full")[2][0]
    np.testing.assert_allclose(expected, full_np, atol=1e-5)
    np.testing.assert_allclose(full_mx, full_np, atol=1e-5)
    # ... and the sampled KL value averages to the full KL.
    _, kl, _ = call_reverse_kl(logits, np.tile(teacher, (V, 1)), tokens, fill, "sampled")
    full_kl = ref_reverse_kl(row[None], teacher[None], tokens[:1], fill[:1], "full")[0][0]
    assert (ps * np.array(kl)).sum() == pytest.approx(full_kl, abs=1e-5)


# -- 3. the teacher's view ---------------------------------------------------


class FakeTeacher:
    """[1, n] ids -> [1, n, V] logits that depend on the whole prefix (an embedding
    cumulative sum through a projection); records every input."""

    def __init__(self, V, D=6, seed=0):
        rng = np.random.default_rng(seed)
        self.table = rng.normal(size=(V, D)).astype(np.float32)
        self.proj = (rng.normal(size=(D, V)) * 0.3).astype(np.float32)
        self.calls = []

    def __call__(self, ids):
        self.calls.append(np.array(ids))
        return mx.cumsum(mx.array(self.table)[ids], axis=1) @ mx.array(self.proj)

    def reference(self, real):
        """Log-probs [n, V] after each prefix of `real`, in float64."""
        t, p = self.table.astype(np.float64), self.proj.astype(np.float64)
        return np_log_softmax(np.cumsum(t[np.asarray(real)], axis=0) @ p)


def ref_teacher_view(teacher, row, length, positions):
    """The teacher's log-probs for the token at each position, by the index rule."""
    row = np.asarray(row[:length])
    real = [int(t) for t in row if t != PAD]
    out = teacher.reference(real)
    rows = []
    for p in positions:
        before = sum(1 for t in row[:p] if t != PAD)  # non-PAD tokens in 0..p-1
        assert before >= 1
        rows.append(out[before - 1])
    return np.array(rows)


def pair_row(prompt, pairs):
    """A rollout row: the prompt (a pairing PAD if odd) then the completion pairs."""
    prompt = list(prompt) + [PAD] * (len(prompt) % 2)
    return prompt + [t for pair in pairs for t in pair], len(prompt)


def test_last_real_matches_a_loop():
    row = np.array([5, 6, 7, PAD, 8, PAD, 9, PAD, 10, 11, PAD, PAD])
    want, count = [], 0
    for t in row:
        count += t != PAD
        want.append(count - 1)
    np.testing.assert_array_equal(last_real(row, PAD), want)
    np.testing.assert_array_equal(last_real(np.array([PAD, 3, PAD]), PAD), [-1, 0, 0])


@pytest.mark.parametrize(
    "prompt,pairs,extra",
    [
        ([5, 6, 7], [(8, 9), (10, PAD), (11, 12)], 0),  # pairing PAD, a dropped draft
        # consecutive (token, PAD) pairs, batch padding
        ([5, 6, 7, 8], [(9, PAD), (10, PAD), (11, PAD), (12, 13)], 4),
        ([5], [(6, PAD), (7, PAD), (EOS, PAD)], 2),  # one-token prompt, EOS as token1
        ([5, 6], [(7, 8), (9, 10)], 6),  # no PAD in the row, batch padding
    ],
)
def test_teacher_logprobs_follow_the_index_rule(prompt, pairs, extra):
    V = 30
    row, _ = pair_row(prompt, pairs)
    length = len(row)
    ids = np.array(row + [PAD] * extra, np.int32)  # right-padded to the batch length
    positions = np.arange(1, length)  # every predicted position, prompt included
    teacher = FakeTeacher(V, seed=len(row))
    got = teacher_logprobs(teacher, ids[None], [length], [positions], PAD)[0]
    want = ref_teacher_view(teacher, ids, length, positions)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    # The teacher read exactly the row's real tokens, never a PAD.
    assert len(teacher.calls) == 1
    seen = teacher.calls[0]
    assert seen.shape[0] == 1 and PAD not in seen
    np.testing.assert_array_equal(seen[0], [t for t in row if t != PAD])
    # A PAD slot's prediction is the one for the real token after it: the same
    # prefix, so the same log-probs.
    for i, p in enumerate(positions[:-1]):
        if ids[p] == PAD:
            np.testing.assert_array_equal(got[i], got[i + 1])


# -- 4. slots ----------------------------------------------------------------


def ref_slots(teacher, batch, eos_ids):
    """Token1 and token2 slots as dicts of arrays, from the rule, one position at a time."""
    kinds = ({k: [] for k in ("rows", "pairs", "tokens", "positions")} for _ in range(2))
    one, two = kinds
    teacher_rows = ([], [])
    for b, row in enumerate(batch.ids):
        n, start = int(batch.lengths[b]), int(batch.starts[b])
        for p in range(start, n):
            if p % 2 == 0:  # token1 slot 2i+2 reads h_i
                kind, i, which = one, (p - 2) // 2, 0
            else:  # token2 slot 2i+3 reads m_i
                if row[p - 1] in eos_ids:
                    continue
                kind, i, which = two, (p - 3) // 2, 1
            kind["rows"].append(b)
            kind["pairs"].append(i)
            kind["tokens"].append(int(row[p]))
            kind["positions"].append(p)
            teacher_rows[which].append(ref_teacher_view(teacher, row, n, [p])[0])
    out = []
    for kind, t in zip((one, two), teacher_rows):
        d = {k: np.array(v, np.int64) for k, v in kind.items()}
        d["teacher"] = np.array(t)
        out.append(d)
    return out


def hand_batch():
    """Row 0: odd prompt (pairing PAD), a draft kept, two dropped in a row, then
    (EOS, PAD). Row 1: shorter, a dropped draft first, EOS as token2, batch-padded."""
    r0, s0 = pair_row([5, 6, 7, 8, 9], [(10, 11), (12, PAD), (13, PAD), (14, 15), (EOS, PAD)])
    r1, s1 = pair_row([20, 21, 22, 23], [(24, PAD), (25, 26), (27, EOS)])
    T = max(len(r0), len(r1))
    ids = np.full((2, T), PAD, np.int32)
    ids[0, : len(r0)], ids[1, : len(r1)] = r0, r1
    return Rollouts(ids, np.array([len(r0), len(r1)]), np.array([s0, s1]), steps=9, kept=2)


def to_slots(d):
    tokens, teacher = d["tokens"].astype(np.int32), d["teacher"].astype(np.float32)
    return Slots(d["rows"], d["pairs"], tokens, teacher)


def test_slots_match_the_rule():
    batch = hand_batch()
    teacher = FakeTeacher(30, seed=3)
    t1, t2 = slots(teacher, batch, PAD, [EOS])
    w1, w2 = ref_slots(FakeTeacher(30, seed=3), batch, {EOS})
    # The rule worked by hand for this batch.
    assert list(w1["positions"]) == [6, 8, 10, 12, 14, 4, 6, 8]
    assert list(w2["positions"]) == [7, 9, 11, 13, 5, 7, 9]  # 15 follows EOS: no slot
    assert list(w2["tokens"]) == [11, PAD, PAD, 15, PAD, 26, EOS]
    for got, want in ((t1, w1), (t2, w2)):
        np.testing.assert_array_equal(got.rows, want["rows"])
        np.testing.assert_array_equal(got.pairs, want["pairs"])
        np.testing.assert_array_equal(got.tokens, want["tokens"])
        np.testing.assert_allclose(got.teacher, want["teacher"], rtol=1e-5, atol=2e-5)
    # token2 slot p = 2i + 3 reads m_i with i = (p - 3) // 2
    np.testing.assert_array_equal(t2.pairs, (w2["positions"] - 3) // 2)
    np.testing.assert_array_equal(t1.pairs, (w1["positions"] - 2) // 2)
    assert_teacher_read_real_tokens(teacher.calls, batch)


def assert_teacher_read_real_tokens(calls, batch):
    """Each row reached the teacher once, as its real tokens, never a PAD; a shorter
    row in a call is filled after its end with its own last token."""
    seen = [r for call in calls for r in call]
    assert len(seen) == len(batch.ids)
    for b, got in enumerate(seen):
        assert PAD not in got
        row = batch.ids[b, : batch.lengths[b]]
        real = row[row != PAD]
        np.testing.assert_array_equal(got[: len(real)], real)
        assert (got[len(real) :] == real[-1]).all()


def test_teacher_batches_rows_within_its_budget(monkeypatch):
    """The first row goes alone (the vocabulary is unknown until then); the rest
    share calls as the logits budget allows, with the same views as one by one."""
    rows = [pair_row([5, 6, 7], [(8, PAD), (9, 10)] * k) for k in (1, 3, 2, 4, 1)]
    T = max(len(r) for r, _ in rows)
    ids = np.full((len(rows), T), PAD, np.int32)
    for b, (r, _) in enumerate(rows):
        ids[b, : len(r)] = r
    batch = Rollouts(ids, np.array([len(r) for r, _ in rows]), np.array([s for _, s in rows]), 0, 0)
    alone, together = FakeTeacher(30, seed=1), FakeTeacher(30, seed=1)
    monkeypatch.setattr("pipo_mlx.opd.TEACHER_LOGITS_BUDGET", 1)
    one = slots(alone, batch, PAD, [EOS])
    assert [len(c) for c in alone.calls] == [1] * len(rows)
    longest = max(int((r != PAD).sum()) for r in ids)
    monkeypatch.setattr("pipo_mlx.opd.TEACHER_LOGITS_BUDGET", 2 * 30 * longest)
    two = slots(together, batch, PAD, [EOS])
    assert [len(c) for c in together.calls] == [1, 2, 2]
    assert_teacher_read_real_tokens(together.calls, batch)
    for a, b in zip(one, two):
        np.testing.assert_allclose(a.teacher, b.teacher, rtol=1e-5, atol=2e-5)


def test_teacher_forced_slots_of_a_supervised_batch():
    """A supervised batch with PAD augmentation: its slots run from the first
    label to the last; augmentation PADs sit only in token2 slots (labelled with
    the student's argmax by the loss); the teacher reads real tokens only."""
    rng = np.random.default_rng(4)
    examples = [Example(np.array(t, np.int32), n) for t, n in (
        ([5, 6, 7, 8, 9, 10, 11, 12, 13, EOS], 3),  # odd prompt: a pairing PAD
        ([20, 21, 22, 23, 24, 25, EOS], 4),  # odd completion: EOS as token1, a final PAD
        ([30, 31, 32, 33, 34, 35], 0),  # a text record: loss from the start
    )]
    rows = [pair_layout(e, PAD, 0.6, rng) for e in examples]
    T = max(len(i) for i, _ in rows) + 3  # batch padding
    ids = np.full((len(rows), T), PAD, np.int32)
    labels = np.full((len(rows), T), IGNORE, np.int32)
    for b, (i, l) in enumerate(rows):
        ids[b, : len(i)], labels[b, : len(l)] = i, l
    assert sum(len(i) for i, _ in rows) > sum(len(pair_layout(e, PAD)[0]) for e in examples)  # splits
    batch = teacher_forced(ids, labels)
    for b in range(len(rows)):
        labelled = [p for p in range(T) if labels[b, p] != IGNORE]
        assert batch.starts[b] == max(labelled[0], 2)
        assert batch.lengths[b] == labelled[-1] + 1
    assert batch.steps == batch.kept == 0
    teacher = FakeTeacher(40, seed=2)
    t1, t2 = slots(teacher, batch, PAD, [EOS])
    w1, w2 = ref_slots(FakeTeacher(40, seed=2), batch, {EOS})
    for got, want in ((t1, w1), (t2, w2)):
        np.testing.assert_array_equal(got.tokens, want["tokens"])
        np.testing.assert_allclose(got.teacher, want["teacher"], rtol=1e-5, atol=2e-5)
    assert PAD not in t1.tokens and PAD in t2.tokens
    # Every labelled position is a slot; so is each split pair's PAD.
    pads = sum(int(((ids[b, s:n] == PAD) & (np.arange(s, n) % 2 == 1)).sum())
               for b, (s, n) in enumerate(zip(batch.starts, batch.lengths)))
    assert len(t1.tokens) + len(t2.tokens) == int((labels != IGNORE)[:, 2:].sum()) + pads
    assert_teacher_read_real_tokens(teacher.calls, batch)


# -- 5. opd_losses on a tiny PIPO model --------------------------------------


def opd_losses(model, batch, t1, t2, mode, k, chunk_size):
    """The trainer's two passes as one call: the terms and the report sums."""
    prepared, stats = opd_pass(model, batch, t1, t2, mode, k, chunk_size)
    return opd_terms(model, batch, t1, t2, prepared), stats


class TinyTeacher(nn.Module):
    """A causal LM in miniature: embedding, a running mean of the prefix, linear head."""

    def __init__(self, V, D=16):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.head = nn.Linear(D, V)

    def __call__(self, ids):
        assert PAD not in np.array(ids)
        e = self.embed(ids)
        mean = mx.cumsum(e, axis=1) / mx.arange(1, ids.shape[1] + 1)[None, :, None]
        return self.head(mx.tanh(mean)) * 3.0


def model_batch(V):
    """hand_batch's layout with random token ids from the model's vocabulary."""
    batch = hand_batch()
    rng = np.random.default_rng(7)
    remap = rng.permutation(np.arange(2, V))[: 40]
    ids = batch.ids.copy()
    real = (ids != PAD) & (ids != EOS)
    ids[real] = remap[ids[real]]
    return Rollouts(ids, batch.lengths, batch.starts, batch.steps, batch.kept)


def np_teacher_view(teacher, batch, positions_rows):
    """Teacher log-probs for (row, position) pairs by the index rule, teacher run
    on each row's real tokens by this test."""
    out = []
    for b, p in positions_rows:
        row = batch.ids[b, : batch.lengths[b]]
        real = row[row != PAD]
        lp = np_log_softmax(np.array(teacher(mx.array(real)[None])[0]))
        out.append(lp[int((row[:p] != PAD).sum()) - 1])
    return np.array(out, np.float32)


@pytest.fixture(scope="module")
def opd_setup(mlx_pipo):
    model, _ = load(str(mlx_pipo))
    mx.random.seed(0)
    V = model.args.vocab_size
    teacher = TinyTeacher(V)
    batch = model_batch(V)
    w1, w2 = ref_slots(FakeTeacher(V), batch, {EOS})  # positions, rows, pairs, tokens
    for w in (w1, w2):
        w["teacher"] = np_teacher_view(teacher, batch, zip(w["rows"], w["positions"]))
    return model, teacher, batch, w1, w2


def _trainable(model):
    """Heads in full, the upper backbone layers and final norm; embeddings (the tied
    LM head) frozen, as the chunked loss requires."""
    model.freeze()
    for m in (model.compressor, model.mtp, model.confidence_head, model.model.norm):
        m.unfreeze()
    for layer in model.model.layers[2:]:
        layer.unfreeze()
    assert not any("embed_tokens" in k for k, _ in tree_flatten(model.trainable_parameters()))


@pytest.mark.parametrize("mode", MODES)
def test_opd_losses_equal_a_numpy_recomputation(opd_setup, mode):
    model, teacher, batch, w1, w2 = opd_setup
    k = 4
    out = model(mx.array(batch.ids))
    l1 = np.array(out.logits)[w1["rows"], w1["pairs"]]
    l2 = np.array(out.mtp_logits)[w2["rows"], w2["pairs"]]
    z = np.array(out.confidence)[w2["rows"], w2["pairs"]].astype(np.float64)
    kl1, _, _ = ref_reverse_kl(l1, w1["teacher"], w1["tokens"], w1["tokens"] == PAD, mode, k)
    kl2, alpha, _ = ref_reverse_kl(l2, w2["teacher"], w2["tokens"], w2["tokens"] == PAD, mode, k)
    conf = np.logaddexp(0, z) - alpha * z

    terms, stats = opd_losses(model, batch, to_slots(w1), to_slots(w2), mode, k, chunk_size=3)
    assert stats["n1"] == len(w1["tokens"]) == 8 and stats["n2"] == len(w2["tokens"]) == 7
    assert terms["kl1"].item() == pytest.approx(kl1.mean(), rel=1e-4, abs=1e-6)
    assert terms["kl2"].item() == pytest.approx(kl2.mean(), rel=1e-4, abs=1e-6)
    assert terms["conf"].item() == pytest.approx(conf.mean(), rel=1e-4)
    assert stats["kl1"] == pytest.approx(kl1.sum(), rel=1e-4, abs=1e-5)
    assert stats["kl2"] == pytest.approx(kl2.sum(), rel=1e-4, abs=1e-5)
    assert stats["alpha"] == pytest.approx(alpha.sum(), rel=1e-4)
    assert stats["conf"] == pytest.approx(conf.sum(), rel=1e-4)
    assert stats["pred"] == pytest.approx((1 / (1 + np.exp(-z))).sum(), rel=1e-4)
    assert (stats["steps"], stats["kept"]) == (batch.steps, batch.kept)
    # The teacher view given to opd_losses is the one slots() builds.
    s1, s2 = slots(teacher, batch, PAD, [EOS])
    np.testing.assert_allclose(s1.teacher, w1["teacher"], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(s2.teacher, w2["teacher"], rtol=1e-5, atol=2e-5)


def _direct_loss(model, ids, w1, w2, mode, k, weights):
    """The same loss with whole logits and plain MLX autodiff, written here."""
    h = model.hidden(ids)[:, :-1]
    m = model.draft(ids[:, 2::2], h)

    def kl(states, w):
        logits = model.lm_logits(states[mx.array(w["rows"]), mx.array(w["pairs"])])
        logits = logits.astype(mx.float32)
        ls = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        lt = mx.array(w["teacher"])
        y = mx.array(w["y"])[:, None]
        if mode == "full":
            return (mx.exp(ls) * (ls - lt)).sum(-1).mean()
        if mode == "sampled":
            ly = mx.take_along_axis(ls, y, axis=-1)[:, 0]
            ratio = mx.stop_gradient(ly - mx.take_along_axis(lt, y, axis=-1)[:, 0])
            # opd_losses reports the log-ratio as the value, with the term's gradient
            return (ratio * ly + mx.stop_gradient(ratio - ratio * ly)).mean()
        keep = mx.array(w["set"])
        qs = logits - mx.logsumexp(mx.where(keep, logits, -1e30), axis=-1, keepdims=True)
        qt = lt - mx.logsumexp(mx.where(keep, lt, -1e30), axis=-1, keepdims=True)
        return (mx.where(keep, mx.exp(qs) * (qs - qt), 0.0)).sum(-1).mean()

    z = model.confidence(mx.stop_gradient(h), mx.stop_gradient(m))
    z = z[mx.array(w2["rows"]), mx.array(w2["pairs"])]
    conf = (mx.logaddexp(0.0, z) - mx.array(w2["alpha"]) * z).mean()
    return kl(h, w1) + weights[0] * kl(m, w2) + weights[1] * conf


@pytest.mark.parametrize("mode", MODES)
def test_chunked_opd_gradients_equal_whole_logits_gradients(opd_setup, mode):
    model, teacher, batch, w1, w2 = opd_setup
    k, weights = 4, (0.5, 2.0)
    _trainable(model)
    try:
        ids = mx.array(batch.ids)
        # Labels, sets and α at the current weights (all detached in the loss).
        out = model(ids)
        for w, logits in ((w1, out.logits), (w2, out.mtp_logits)):
            l = np.array(logits)[w["rows"], w["pairs"]]
            fill = w["tokens"] == PAD
            w["y"] = ref_label(l, w["tokens"], fill)
            ls = np_log_softmax(l)
            w["set"] = np.zeros(l.shape, bool)
            for r in range(len(l)):
                w["set"][r, ref_topk_set(ls[r], w["teacher"][r], w["y"][r], k)] = True
            alpha = ref_reverse_kl(l, w["teacher"], w["tokens"], fill, mode, k)[1]
            w["alpha"] = alpha.astype(np.float32)

        # As the trainer does: the evaluation pass outside autodiff, then the terms.
        prepared, _ = opd_pass(model, batch, to_slots(w1), to_slots(w2), mode, k, chunk_size=3)

        def chunked(ids):
            t = opd_terms(model, batch, to_slots(w1), to_slots(w2), prepared)
            return t["kl1"] + weights[0] * t["kl2"] + weights[1] * t["conf"]

        v1, g1 = nn.value_and_grad(model, chunked)(ids)
        direct = lambda i: _direct_loss(model, i, w1, w2, mode, k, weights)  # noqa: E731
        v2, g2 = nn.value_and_grad(model, direct)(ids)
        assert v1.item() == pytest.approx(v2.item(), rel=1e-5)
        g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
        assert g1.keys() == g2.keys() and len(g1) > 10
        nonzero = 0
        for name in g1:
            scale = float(mx.abs(g2[name]).max()) + 1e-6
            assert float(mx.abs(g1[name] - g2[name]).max()) <= 1e-4 * scale + 1e-7, name
            nonzero += scale > 1e-5
        assert nonzero > len(g1) // 2
    finally:
        model.unfreeze()


@pytest.mark.parametrize("mode", MODES)
def test_a_batch_without_token2_slots(opd_setup, mode):
    """Every rollout ended with EOS as its first token1: one token1 slot, no token2 slot."""
    model, teacher, _, _, _ = opd_setup
    ids = np.array([[5, 6, 7, 8, EOS, PAD]], np.int32)
    batch = Rollouts(ids, np.array([6]), np.array([4]), steps=1, kept=0)
    t1, t2 = slots(teacher, batch, PAD, [EOS])
    assert (len(t1.tokens), len(t2.tokens)) == (1, 0)
    out = model(mx.array(batch.ids))
    l1 = np.array(out.logits)[t1.rows, t1.pairs]
    want, _, _ = ref_reverse_kl(l1, t1.teacher, t1.tokens, t1.tokens == PAD, mode, 4)
    terms, stats = opd_losses(model, batch, t1, t2, mode, 4, chunk_size=3)
    assert terms["kl1"].item() == pytest.approx(want[0], rel=1e-4, abs=1e-6)
    assert terms["kl2"].item() == 0 and terms["conf"].item() == 0
    assert stats["n2"] == 0 and stats["kl2"] == 0 and stats["alpha"] == 0
