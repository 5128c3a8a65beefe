"""Qwen3.5 (dense, hybrid Gated-DeltaNet / full attention) as a PIPO backbone.

All that is Qwen3.5-specific lives here: the model classes on top of mlx-lm's
`qwen3_5.TextModel`, the MTP layer kind, which source configs convert and how
they are normalised, the checkpoint quirks, the PAD token, the LoRA targets,
and the chunked training route for the Gated-DeltaNet layers.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.models.qwen3_5 as qwen3_5

from ..errors import PipoError
from ..gated_delta import ShiftConv1d, chunked_gated_delta
from ..model import HEAD_PREFIXES, PipoArgs, PipoModel
from . import Backbone

# The published adapters put LoRA on these PEFT target names. In Qwen3.5 only
# the full-attention layers have q/k/v/o; the Gated-DeltaNet projections
# (in_proj_qkv, in_proj_z, in_proj_a, in_proj_b, out_proj) have other names and
# stay frozen, exactly as in the authors' adapters. Every layer's MLP gets LoRA.
LORA_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class ModelArgs(PipoArgs, qwen3_5.TextModelArgs):
    pass


def _is_norm_weight(key: str) -> bool:
    parts = key.split(".")
    return parts[-1] == "weight" and "norm" in parts[-2]


class Model(PipoModel, qwen3_5.TextModel):
    @staticmethod
    def mtp_layer(args: ModelArgs) -> nn.Module:
        # mlx-lm picks the layer kind from its index; the last index of an
        # interval is the full-attention kind, which is what the MTP layer is.
        return qwen3_5.DecoderLayer(args, args.full_attention_interval - 1)

    @staticmethod
    def cache_keys_values(layer: qwen3_5.DecoderLayer, x: mx.array, cache) -> None:
        # mlx-lm's full-attention layer, up to its cache update: the keys are
        # normed per head and rotated at the cache's offset, the values are not.
        attn = layer.self_attn
        x = layer.input_layernorm(x)
        B, L, _ = x.shape
        keys = attn.k_proj(x).reshape(B, L, attn.num_key_value_heads, -1)
        keys = attn.rope(attn.k_norm(keys).transpose(0, 2, 1, 3), offset=cache.offset)
        values = attn.v_proj(x).reshape(B, L, attn.num_key_value_heads, -1).transpose(0, 2, 1, 3)
        cache.update_and_fetch(keys, values)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """An HF-layout state dict (either key layout) to this module's names.

        Already converted weights pass through unchanged: like mlx-lm, we tell an
        HF checkpoint by its unconverted conv1d layout.
        """
        from_hf = any("conv1d.weight" in k and v.shape[-1] != 1 for k, v in weights.items())
        weights = {
            k.replace("model.language_model.", "model.", 1): v
            for k, v in weights.items()
            if not k.startswith(("model.visual", "vision_tower"))
        }
        weights = super().sanitize(weights)
        if from_hf:
            # HF Qwen3.5 norms scale by (1 + w), MLX's RMSNorm by w; mlx-lm's
            # sanitize shifts the backbone's, the heads' are ours to shift.
            for k, v in weights.items():
                if k.startswith(HEAD_PREFIXES) and _is_norm_weight(k):
                    weights[k] = v + 1.0
        return weights


def text_config(text: dict, config_path: Path) -> dict:
    """A flat Qwen3.5 text config as mlx-lm's model reads it, with the layer
    pattern checked the way mlx-lm will build it."""
    text = dict(text, model_type="qwen3_5_text")
    for field in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if not isinstance(text.get(field), int):
            raise PipoError(f"{config_path} lacks the integer field {field!r}; restore the file")
    if "rope_parameters" not in text and "rope_theta" in text:
        text["rope_parameters"] = {
            "type": "default",
            "rope_theta": text["rope_theta"],
            "partial_rotary_factor": text.get("partial_rotary_factor", 0.25),
        }

    layer_types = text.get("layer_types")
    if layer_types:
        n = text["num_hidden_layers"]
        full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
        interval = full[0] + 1 if full else 0
        expected = [
            "full_attention" if interval and (i + 1) % interval == 0 else "linear_attention"
            for i in range(n)
        ]
        if len(layer_types) != n or layer_types != expected:
            raise PipoError(
                f"{config_path}: layer_types is not one full-attention layer every k "
                "layers, which is the only pattern mlx-lm's Qwen3.5 builds"
            )
        given = text.get("full_attention_interval")
        if given is not None and given != interval:
            print(
                f"[WARN] {config_path}: full_attention_interval={given} disagrees with "
                f"layer_types; using {interval} from layer_types"
            )
        text["full_attention_interval"] = interval
    return text


# -- the fast training route (docs/design.md §8)

_original_update = qwen3_5.gated_delta_update


def _training_update(q, k, v, a, b, A_log, dt_bias, state=None, mask=None, *, use_kernel=True, **kw):
    if use_kernel or mask is not None or kw:
        return _original_update(
            q, k, v, a, b, A_log, dt_bias, state, mask, use_kernel=use_kernel, **kw
        )
    # The log of mlx-lm's gate exp(-exp(A_log) * softplus(a + dt_bias)),
    # computed directly so a strong decay cannot underflow to log(0).
    log_g = -mx.exp(A_log.astype(mx.float32)) * nn.softplus(a + dt_bias)
    return chunked_gated_delta(q, k, v, log_g, mx.sigmoid(b), state)


@contextmanager
def fast_training(model: nn.Module) -> Iterator[None]:
    """Inside this block, `model`'s Gated-DeltaNet layers train in chunked form.

    Only training-mode (mlx-lm then skips its kernel), unmasked, cache-free
    calls change route; outputs and gradients agree with mlx-lm's loop to
    float32 rounding (tests/test_gated_delta.py). mlx-lm looks the update up
    as a module global, so that global is swapped for the block.
    """
    convs = [
        m for _, m in model.named_modules()
        if isinstance(m, qwen3_5.GatedDeltaNet) and type(m.conv1d) is nn.Conv1d
    ]
    qwen3_5.gated_delta_update = _training_update
    for m in convs:
        m.conv1d.__class__ = ShiftConv1d
    try:
        yield
    finally:
        qwen3_5.gated_delta_update = _original_update
        for m in convs:
            m.conv1d.__class__ = nn.Conv1d


BACKBONE = Backbone(
    name="qwen3_5",
    model_type="qwen3_5_text",
    hf_model_types=("qwen3_5", "qwen3_5_text"),
    model_class=Model,
    args_class=ModelArgs,
    pad_token="<|endoftext|>",  # id 248044 in the Qwen3.5 tokenizer
    lora_keys=LORA_KEYS,
    text_config=text_config,
    fast_training=fast_training,
)
