"""The chunked Gated DeltaNet recurrence against mlx-lm's per-step reference."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.gated_delta import compute_g, gated_delta_ops, normalize_qk
from mlx_lm.models.qwen3_5 import TextModel, TextModelArgs

from pipo_mlx.backbones.qwen3_5 import fast_training
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


def test_fast_training_changes_no_logits_and_restores_the_model():
    args = TextModelArgs.from_dict({
        "model_type": "qwen3_5_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 3, "full_attention_interval": 3, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "linear_num_key_heads": 1,
        "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "tie_word_embeddings": True,
    })
    mx.random.seed(0)
    model = TextModel(args)
    model.train()
    ids = mx.random.randint(0, 64, (2, 40))
    want = model(ids)
    with fast_training(model):
        got = model(ids)
        assert type(model.layers[0].linear_attn.conv1d) is not nn.Conv1d
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4)
    assert type(model.layers[0].linear_attn.conv1d) is nn.Conv1d
