"""The chunked Gated DeltaNet recurrence against mlx-lm's per-step reference.

The reference is always mlx-lm's own code: its per-step loop `gated_delta_ops`
with the gate from `compute_g` (or `gated_delta_update`, which composes them),
and mlx-lm's `TextModel` outside `fast_training`.
"""

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.gated_delta import (
    compute_g,
    gated_delta_ops,
    gated_delta_update,
    normalize_qk,
)
from mlx_lm.models.qwen3_5 import TextModel, TextModelArgs

from pipo_mlx.backbones.qwen3_5 import _training_update, fast_training
from pipo_mlx.gated_delta import chunked_gated_delta


def _inputs(B=2, T=45, Hk=2, Hv=4, Dk=32, Dv=16):
    mx.random.seed(1)
    q, k = normalize_qk(
        mx.random.normal((B, T, Hk, Dk)), mx.random.normal((B, T, Hk, Dk)), inv_scale=Dk**-0.5, eps=1e-6
    )
    v = mx.random.normal((B, T, Hv, Dv))
    a, b = mx.random.normal((B, T, Hv)), mx.random.normal((B, T, Hv))
    A_log, dt_bias = mx.log(mx.random.uniform(0, 16, (Hv,))), mx.ones(Hv)
    state = 0.1 * mx.random.normal((B, Hv, Dv, Dk))
    return q, k, v, a, b, A_log, dt_bias, state


def test_outputs_state_and_gradients_match_the_loop():
    q, k, v, a, b, A_log, dt_bias, s0 = _inputs()

    def ref(q, k, v, a, b, s0):
        return gated_delta_ops(q, k, v, compute_g(A_log, a, dt_bias), mx.sigmoid(b), s0)

    def new(q, k, v, a, b, s0):
        log_g = -mx.exp(A_log) * nn.softplus(a + dt_bias)
        return chunked_gated_delta(q, k, v, log_g, mx.sigmoid(b), s0, chunk=16)  # 45 = 2 chunks + 13

    for want, got in zip(ref(q, k, v, a, b, s0), new(q, k, v, a, b, s0)):
        np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-6)
    w = mx.random.normal(v.shape)

    def objective(fn):
        return lambda *x: (fn(*x)[0] * w).sum() + fn(*x)[1].sum()

    argnums = tuple(range(6))
    for want, got in zip(
        mx.grad(objective(ref), argnums)(q, k, v, a, b, s0),
        mx.grad(objective(new), argnums)(q, k, v, a, b, s0),
    ):
        np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5 * float(mx.abs(want).max()))


# -- every length against every chunk size, gate parameters included

# Small heads keep the per-step reference cheap: two value heads share one key
# head (the GQA repeat), Dk=8, Dv=4.
SMALL = dict(B=2, Hk=1, Hv=2, Dk=8, Dv=4)
NAMES = ("q", "k", "v", "a", "b", "A_log", "dt_bias", "state")


@lru_cache(maxsize=None)
def _small(T):
    x = _inputs(T=T, **SMALL)
    mx.random.seed(2)
    w_y = mx.random.normal((SMALL["B"], T, SMALL["Hv"], SMALL["Dv"]))
    w_s = mx.random.normal((SMALL["B"], SMALL["Hv"], SMALL["Dv"], SMALL["Dk"]))
    return x, w_y, w_s


def _reference(q, k, v, a, b, A_log, dt_bias, s0):
    return gated_delta_ops(q, k, v, compute_g(A_log, a, dt_bias), mx.sigmoid(b), s0)


def _chunked(chunk):
    def fn(q, k, v, a, b, A_log, dt_bias, s0):
        # The gate as _training_update builds it: the log of compute_g's value.
        log_g = -mx.exp(A_log) * nn.softplus(a + dt_bias)
        return chunked_gated_delta(q, k, v, log_g, mx.sigmoid(b), s0, chunk=chunk)

    return fn


def _value_and_grads(fn, x, w_y, w_s):
    """y, final state, and the gradient of sum(w_y * y) + sum(w_s * state) w.r.t. every input."""

    def objective(*x):
        y, s = fn(*x)
        return (y * w_y).sum() + (s * w_s).sum(), (y, s)

    (_, (y, s)), grads = mx.value_and_grad(objective, argnums=tuple(range(len(x))))(*x)
    mx.eval(y, s, grads)
    return np.array(y), np.array(s), [np.array(g) for g in grads]


@lru_cache(maxsize=None)
def _small_reference(T):
    return _value_and_grads(_reference, *_small(T))


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 130])
def test_lengths_and_chunk_sizes_match_the_loop(T, chunk):
    """Outputs, final state and the gradients w.r.t. q, k, v, a, b, A_log, dt_bias and
    the initial state, for T shorter than, equal to, and not a multiple of the chunk."""
    want_y, want_s, want_g = _small_reference(T)
    got_y, got_s, got_g = _value_and_grads(_chunked(chunk), *_small(T))
    np.testing.assert_allclose(got_y, want_y, atol=2e-6, err_msg="y")
    np.testing.assert_allclose(got_s, want_s, atol=2e-6, err_msg="state")
    for name, want, got in zip(NAMES, want_g, got_g):
        np.testing.assert_allclose(got, want, atol=3e-5 * np.abs(want).max(), err_msg=f"d/d{name}")
    assert np.abs(want_g[NAMES.index("A_log")]).max() > 0 and np.abs(want_g[NAMES.index("dt_bias")]).max() > 0


# -- the update as fast_training installs it


@pytest.mark.parametrize("T", [1, 64, 65, 130])
def test_training_update_matches_mlx_lm_with_gate_gradients(T):
    """_training_update (the chunked route, state=None as in cache-free training)
    against mlx-lm's gated_delta_update on its per-step loop: y, state and the
    gradients w.r.t. q, k, v, a, b, A_log and dt_bias."""
    (q, k, v, a, b, A_log, dt_bias, _), w_y, w_s = _small(T)
    x = (q, k, v, a, b, A_log, dt_bias)

    def ref(*x):
        return gated_delta_update(*x, None, None, use_kernel=False)

    def new(*x):
        return _training_update(*x, None, None, use_kernel=False)

    want_y, want_s, want_g = _value_and_grads(ref, x, w_y, w_s)
    got_y, got_s, got_g = _value_and_grads(new, x, w_y, w_s)
    np.testing.assert_allclose(got_y, want_y, atol=2e-6, err_msg="y")
    np.testing.assert_allclose(got_s, want_s, atol=2e-6, err_msg="state")
    for name, want, got in zip(NAMES, want_g, got_g):
        np.testing.assert_allclose(got, want, atol=3e-5 * np.abs(want).max(), err_msg=f"d/d{name}")


def test_training_update_leaves_masked_calls_to_mlx_lm():
    (q, k, v, a, b, A_log, dt_bias, s0), _, _ = _small(9)
    mask = mx.array([[True] * 9, [False] * 3 + [True] * 6])
    want = gated_delta_update(q, k, v, a, b, A_log, dt_bias, s0, mask, use_kernel=False)
    got = _training_update(q, k, v, a, b, A_log, dt_bias, s0, mask, use_kernel=False)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(np.array(g), np.array(w))


# -- a whole model


def _tiny_model():
    args = TextModelArgs.from_dict({
        "model_type": "qwen3_5_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 3, "full_attention_interval": 3, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "linear_num_key_heads": 1,
        "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "tie_word_embeddings": True,
    })
    mx.random.seed(0)
    return TextModel(args)


def test_fast_training_changes_no_logits_and_restores_the_model():
    model = _tiny_model()
    model.train()
    ids = mx.random.randint(0, 64, (2, 40))
    want = model(ids)
    with fast_training(model):
        got = model(ids)
        assert type(model.layers[0].linear_attn.conv1d) is not nn.Conv1d
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4)
    assert type(model.layers[0].linear_attn.conv1d) is nn.Conv1d


def test_fast_training_changes_no_parameter_gradient():
    """Gradients of a train-mode LM loss w.r.t. every parameter of a tiny Qwen3.5,
    each layer's A_log, dt_bias and conv1d included, with and without fast_training.
    70 tokens: one full chunk of 64 and a padded one."""
    model = _tiny_model()
    model.train()
    mx.random.seed(3)
    ids = mx.random.randint(0, 64, (2, 71))

    def loss(model, ids):
        return nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).mean()

    loss_and_grad = nn.value_and_grad(model, loss)
    want_loss, want = loss_and_grad(model, ids)
    mx.eval(want_loss, want)
    with fast_training(model):
        got_loss, got = loss_and_grad(model, ids)
        mx.eval(got_loss, got)
    want, got = dict(tree_flatten(want)), dict(tree_flatten(got))
    assert sorted(got) == sorted(want) == sorted(k for k, _ in tree_flatten(model.parameters()))
    for name in ("A_log", "dt_bias", "conv1d.weight"):
        assert {k for k in want if k.endswith("linear_attn." + name)} == {
            f"model.layers.{i}.linear_attn.{name}" for i in (0, 1)
        }
    np.testing.assert_allclose(got_loss.item(), want_loss.item(), rtol=1e-6)
    for key, w in want.items():
        w, g = np.array(w), np.array(got[key])
        scale = float(np.abs(w).max())
        assert scale > 0, f"{key} has no gradient"
        np.testing.assert_allclose(g, w, atol=1e-4 * scale, err_msg=key)
