"""What trains: the PIPO heads in full, LoRA on the backbone and MTP layer, and
folding LoRA back in (docs/design.md §6)."""

from contextlib import contextmanager
from typing import Dict, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.tuner.utils import linear_to_lora_layers

from . import backbones
from .errors import PipoError
from .model import PipoModel
from .train_config import TrainConfig


def setup_trainable(model: PipoModel, cfg: TrainConfig) -> Dict[str, mx.Dtype]:
    """Freeze the model, then open the heads and add LoRA (docs/design.md §6).

    Trainable: compressor, MTP head and confidence head in full; with LoRA, the
    MTP layer's projections and the backbone's LoRA keys get adapters instead of
    full updates. Returns the original dtype of each fully trained weight: they
    train as float32 master copies (a bfloat16 weight would swallow small Adam
    steps) and are cast back when fusing.
    """
    if any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()
    ):
        raise PipoError(
            f"{cfg.model} is quantized; the PIPO heads train in full precision. Convert the "
            "model without -q, train it, then quantize the fused folder"
        )
    model.freeze()
    for head in (model.compressor, model.mtp, model.confidence_head):
        head.unfreeze()
    if cfg.lora:
        lora = {
            "rank": cfg.lora_rank,
            "scale": cfg.lora_alpha / cfg.lora_rank,
            "dropout": 0.0,
            "keys": set(backbones.of(model).lora_keys),
        }
        linear_to_lora_layers(model, len(model.layers), lora)
        linear_to_lora_layers(model.mtp, len(model.mtp.layers), lora)
        for _, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.linear.freeze()  # the MTP layer's base weights were unfrozen above
    dtypes = {k: v.dtype for k, v in tree_flatten(model.trainable_parameters())}
    model.update(tree_map(lambda p: p.astype(mx.float32), model.trainable_parameters()))
    model.compute_dtype = compute_dtype(cfg.compute_dtype, model.model.embed_tokens.weight.dtype)
    return dtypes


def compute_dtype(choice: str, weights: mx.Dtype) -> mx.Dtype:
    """float32 where asked, or on the CPU over half-precision weights: MLX's CPU
    multiplies bfloat16 matrices ~30x slower than float32 (docs/design.md §6).
    The frozen weights stay in their dtype; each layer's matmuls read them
    upcast, a copy that lives only while that layer runs when layers are
    recomputed (--grad-checkpoint). Otherwise the weights' own dtype."""
    half = weights in (mx.bfloat16, mx.float16)
    on_cpu = mx.default_device().type == mx.cpu
    if choice == "float32" or (choice == "auto" and half and on_cpu):
        return mx.float32
    return weights


def fuse_model(model: PipoModel, dtypes: Dict[str, mx.Dtype]) -> PipoModel:
    """Fold LoRA into the base weights and restore the heads' checkpoint dtypes."""
    fused = [(name, m.fuse()) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    params = dict(tree_flatten(model.parameters()))
    model.update(
        tree_unflatten([(k, params[k].astype(d)) for k, d in dtypes.items() if k in params])
    )
    return model


@contextmanager
def grad_checkpointing(model: PipoModel, enabled: bool) -> Iterator[None]:
    """mlx-lm's per-layer recomputation (backbone and MTP layers share the class),
    undone afterwards because it patches the class, not the instance."""
    layer_type = type(model.layers[0])
    original = layer_type.__call__
    if enabled:
        grad_checkpoint(model.layers[0])
    try:
        yield
    finally:
        layer_type.__call__ = original
