"""The three small modules PIPO adds to a backbone.

Key names follow the published checkpoints (docs/design.md §2), so a converted
state dict loads into these modules without renaming.
"""

from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

COMPRESSOR_TYPES = ("linear", "mlp")


def _pair_sum(hidden_size: int) -> mx.array:
    """[I | I]: maps [e_a ; e_b] to e_a + e_b."""
    eye = mx.eye(hidden_size)
    return mx.concatenate([eye, eye], axis=1)


class Compressor(nn.Module):
    """Folds the embeddings of a token pair, [e_first ; e_second], into one vector.

    A fresh compressor starts as the sum of the two embeddings, so an untrained
    model reads a pair as a blend of its tokens rather than as noise.
    """

    def __init__(self, hidden_size: int, kind: str = "mlp"):
        super().__init__()
        if kind not in COMPRESSOR_TYPES:
            raise ValueError(
                f"unknown compressor type {kind!r}; expected one of {COMPRESSOR_TYPES}"
            )
        self.kind = kind
        h = hidden_size
        if kind == "linear":
            self.linear = nn.Linear(2 * h, h)
            self.linear.weight = _pair_sum(h)
            self.linear.bias = mx.zeros((h,))
        else:
            # Index 1 is the parameter-free SiLU, which keeps the checkpoint's
            # `mlp.0` / `mlp.2` numbering.
            self.mlp = [nn.Linear(2 * h, 2 * h), nn.SiLU(), nn.Linear(2 * h, h)]
            self.mlp[0].weight = mx.eye(2 * h)
            self.mlp[0].bias = mx.zeros((2 * h,))
            self.mlp[2].weight = _pair_sum(h)
            self.mlp[2].bias = mx.zeros((h,))

    def __call__(self, pairs: mx.array) -> mx.array:
        if self.kind == "linear":
            return self.linear(pairs)
        for layer in self.mlp:
            pairs = layer(pairs)
        return pairs


class MTPHead(nn.Module):
    """Drafts token2 from the backbone state h_i and the embedding of token1."""

    def __init__(self, args: Any, layers: List[nn.Module]):
        super().__init__()
        h, eps = args.hidden_size, args.rms_norm_eps
        self.pre_fc_norm_embedding = nn.RMSNorm(h, eps=eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(h, eps=eps)
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layers = layers  # full-attention decoder layers of the backbone's kind
        self.norm = nn.RMSNorm(h, eps=eps)

    def inputs(self, token_embeddings: mx.array, hidden: mx.array) -> mx.array:
        """What the first MTP layer reads: the two normed halves, folded by `fc`."""
        x = mx.concatenate(
            [self.pre_fc_norm_embedding(token_embeddings), self.pre_fc_norm_hidden(hidden)],
            axis=-1,
        )
        return self.fc(x)

    def __call__(
        self,
        token_embeddings: mx.array,
        hidden: mx.array,
        cache: Optional[List[Any]] = None,
    ) -> mx.array:
        x = self.inputs(token_embeddings, hidden)
        if x.shape[1] == 0:  # a single pair has no draft; attention can't take L = 0
            return self.norm(x)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(x, cache[0])
        for layer, c in zip(self.layers, cache):
            x = layer(x, mask=mask, cache=c)
        return self.norm(x)


class ConfidenceHead(nn.Module):
    """One logit per position: should the drafted token2 be kept?"""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(2 * hidden_size, eps=eps)
        self.fc1 = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.fc2 = nn.Linear(hidden_size, 1, bias=False)
        # A small last layer keeps a fresh head near c = 0.5 instead of
        # confidently wrong before any training.
        self.fc2.weight = self.fc2.weight * 0.01

    def __call__(self, hidden: mx.array, mtp_hidden: mx.array) -> mx.array:
        x = self.norm(mx.concatenate([hidden, mtp_hidden], axis=-1))
        return self.fc2(nn.silu(self.fc1(x))).squeeze(-1)
