"""A chunked, matmul-based Gated DeltaNet recurrence for training on any device.

mlx-lm's Qwen3.5 runs the gated delta rule in training mode as a Python loop
over time steps (`gated_delta_ops`), and so does every CPU forward pass. Each
step touches the whole [B, H, Dv, Dk] state a few times, forward and backward,
which makes the linear-attention layers dominate a CPU training step (about
3x slower than full attention at our demo size).

The chunked form (Yang et al., "Gated Delta Networks", 2024) gives the same
outputs with a loop over chunks of C steps instead: inside a chunk the delta
rule's product of rank-one updates becomes a triangular solve (here a product
of log2(C) matrix factors, which MLX can differentiate) and plain matmuls.

The layers' depthwise causal conv1d (kernel 4) is the next biggest CPU cost:
MLX's grouped convolution is several times slower, forward and backward, than
the same thing written as K shifted multiply-adds.

`backbones.qwen3_5.fast_training` routes a Qwen3.5 model's training calls
through both (docs/design.md §8); the inference path is left untouched.
"""

import math
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

CHUNK = 64


def _unit_lower_inverse(n: mx.array) -> mx.array:
    """(I - N)^-1 for strictly lower triangular N [..., C, C].

    N is nilpotent, so the inverse is the finite series I + N + N^2 + ...,
    which factors as (I + N)(I + N^2)(I + N^4)...: log2(C) matmul pairs
    instead of C sequential row updates, and differentiable by construction.
    """
    c = n.shape[-1]
    eye = mx.eye(c, dtype=n.dtype)
    inv = eye + n
    power = n
    for _ in range(max(0, math.ceil(math.log2(c)) - 1)):
        power = power @ power
        inv = inv @ (eye + power)
    return inv


def chunked_gated_delta(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    log_g: mx.array,
    beta: mx.array,
    state: Optional[mx.array] = None,
    chunk: int = CHUNK,
) -> Tuple[mx.array, mx.array]:
    """The gated delta rule over a whole sequence, without masks.

    Same contract as mlx-lm's `gated_delta_ops` except that the gate is given
    as its logarithm: q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; log_g, beta
    [B, T, Hv]; state [B, Hv, Dv, Dk]. Returns y [B, T, Hv, Dv] and the final
    state.
    """
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    if Hv // Hk > 1:
        q = mx.repeat(q, Hv // Hk, -2)
        k = mx.repeat(k, Hv // Hk, -2)
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    dtype = q.dtype
    c = min(chunk, T)
    n = -(-T // c)
    pad = n * c - T

    def blocks(x: mx.array) -> mx.array:
        # [B, T, H, ...] -> [B, H, n, C, ...], zero-padded at the end: a padded
        # step has k = v = 0 and gate 1, so it changes nothing before it.
        x = x.astype(mx.float32)
        if pad:
            x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(B, n, c, *x.shape[2:])
        return x.transpose(0, 3, 1, 2, *range(4, x.ndim))

    q, k, v, log_g, beta = map(blocks, (q, k, v, log_g, beta))
    g = mx.cumsum(log_g, axis=-1)  # [B, H, n, C]: log decay from chunk start
    causal = mx.tril(mx.ones((c, c), dtype=mx.bool_))
    strict = mx.tril(mx.ones((c, c), dtype=mx.bool_), k=-1)
    # decay[i, j] = prod of gates over (j, i], only for j <= i. The log-gates are
    # summed over each interval rather than taken as g[i] - g[j]: with strong
    # decay g runs into the thousands and the difference would lose the gate
    # gradients to rounding.
    interval = mx.cumsum(mx.where(strict, log_g[..., :, None], 0.0), axis=-2)
    decay = mx.exp(mx.where(causal, interval, -mx.inf))

    k_beta = k * beta[..., None]
    a = mx.where(strict, -(k_beta @ k.swapaxes(-1, -2)) * decay, 0.0)
    solve = _unit_lower_inverse(a)
    u = solve @ (v * beta[..., None])  # [B, H, n, C, Dv]
    w = solve @ (k_beta * mx.exp(g)[..., None])  # [B, H, n, C, Dk]
    intra = mx.where(causal, q @ k.swapaxes(-1, -2), 0.0) * decay
    to_end = decay[..., -1, :, None]  # decay from each step to chunk end

    s = state.swapaxes(-1, -2)  # [B, H, Dk, Dv]
    ys = []
    for i in range(n):
        v_new = u[:, :, i] - w[:, :, i] @ s
        ys.append((q[:, :, i] * mx.exp(g[:, :, i])[..., None]) @ s + intra[:, :, i] @ v_new)
        s = s * mx.exp(g[:, :, i, -1])[..., None, None] + (
            k[:, :, i] * to_end[:, :, i]
        ).swapaxes(-1, -2) @ v_new
    y = mx.stack(ys, axis=2).reshape(B, Hv, n * c, Dv)[:, :, :T]
    return y.transpose(0, 2, 1, 3).astype(dtype), s.swapaxes(-1, -2)


class ShiftConv1d(nn.Conv1d):
    """A depthwise, unpadded Conv1d as K shifted products (same weight layout)."""

    def __call__(self, x: mx.array) -> mx.array:
        kernel = self.weight.shape[1]
        steps = x.shape[1] - kernel + 1
        y = x[:, :steps] * self.weight[:, 0, 0]
        for j in range(1, kernel):
            y = y + x[:, j : j + steps] * self.weight[:, j, 0]
        return y
