"""What trains: the PIPO heads in full, LoRA on the backbone and MTP layer (over
quantized weights too: QLoRA), and folding LoRA back in (docs/design.md §6)."""

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import dequantize_model

from . import backbones
from .hf_io import read_json
from .model import PipoModel
from .model_io import UNTRAINED_KEY, recorded_base, save_folder
from .train_config import TrainConfig

HEADS = ("compressor", "mtp", "confidence_head")


@dataclass
class Tuning:
    """How `attach` changed a model, so that fusing can undo what it must.

    dtypes: the checkpoint dtype of each fully trained weight; quantized: the
    quantization (group_size, bits, mode) of each head layer it dequantized.
    """

    dtypes: Dict[str, mx.Dtype] = field(default_factory=dict)
    quantized: Dict[str, Dict[str, Any]] = field(default_factory=dict)


def attach(model: PipoModel, lora: bool, rank: int, alpha: float) -> Tuning:
    """Freeze the model, open the heads and add LoRA (docs/design.md §6).

    The heads train in full, so any quantized layer in them becomes a float one
    first; the backbone's quantized layers stay quantized under their LoRA, as
    mlx-lm's LoRA layers allow. With LoRA, the MTP layer's projections get
    adapters instead of full updates.
    """
    tuning = Tuning()
    for head in HEADS:
        for name, m in getattr(model, head).named_modules():
            if isinstance(m, nn.QuantizedLinear):
                tuning.quantized[f"{head}.{name}"] = {
                    "group_size": m.group_size, "bits": m.bits, "mode": m.mode,
                }
        dequantize_model(getattr(model, head))
    model.freeze()
    for head in HEADS:
        getattr(model, head).unfreeze()
    if lora:
        config = {
            "rank": rank,
            "scale": alpha / rank,
            "dropout": 0.0,
            "keys": set(backbones.of(model).lora_keys),
        }
        linear_to_lora_layers(model, len(model.layers), config)
        linear_to_lora_layers(model.mtp, len(model.mtp.layers), config)
        for _, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.linear.freeze()  # the MTP layer's base weights were unfrozen above
    tuning.dtypes = {k: v.dtype for k, v in tree_flatten(model.trainable_parameters())}
    return tuning


def setup_trainable(model: PipoModel, cfg: TrainConfig) -> Tuning:
    """`attach` as `cfg` asks, with every trainable weight as a float32 master copy
    (a bfloat16 weight would swallow small Adam steps; fusing casts them back)
    and the compute dtype set."""
    tuning = attach(model, cfg.lora, cfg.lora_rank, cfg.lora_alpha)
    model.update(tree_map(lambda p: p.astype(mx.float32), model.trainable_parameters()))
    model.compute_dtype = compute_dtype(cfg.compute_dtype, weights_dtype(model))
    return tuning


def weights_dtype(model: PipoModel) -> mx.Dtype:
    """The float dtype the backbone's weights are stored in (a quantized model's
    scales carry it)."""
    embed = model.model.embed_tokens
    return embed.scales.dtype if isinstance(embed, nn.QuantizedEmbedding) else embed.weight.dtype


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


def fuse_model(model: PipoModel, tuning: Tuning, dequantize: bool = False) -> PipoModel:
    """Fold LoRA into the base weights and give the heads back their checkpoint
    dtypes and quantization; with `dequantize`, every layer ends up float."""
    fused = [
        (name, m.fuse(dequantize=dequantize))
        for name, m in model.named_modules()
        if isinstance(m, LoRALinear)
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    params = dict(tree_flatten(model.parameters()))
    model.update(
        tree_unflatten([(k, params[k].astype(d)) for k, d in tuning.dtypes.items() if k in params])
    )
    if dequantize:
        return dequantize_model(model)
    if tuning.quantized:
        nn.quantize(model, class_predicate=lambda path, _: tuning.quantized.get(path, False))
    return model


def save_fused(
    model: PipoModel,
    tuning: Tuning,
    source: str,
    dst: Path,
    tokenizer: TokenizerWrapper,
    dequantize: bool = False,
) -> Path:
    """Fuse `model` (loaded from the folder `source`) and write it to `dst`
    atomically, with the source's config: its quantization section unless
    `dequantize`, and its base model named so that it holds from `dst`."""
    src = Path(source).expanduser()
    config = read_json(src / "config.json", "a model folder")
    if dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    pipo = dict(config.get("pipo", {}))
    pipo.pop(UNTRAINED_KEY, None)  # the heads are trained now
    base = recorded_base(src, pipo.get("base_model"))
    if base is not None:
        pipo["base_model"] = base
    config["pipo"] = pipo
    fused = fuse_model(model, tuning, dequantize)
    save_folder(dst, fused, config, tokenizer, src / "generation_config.json")
    return dst


# Below this many rows (a decoding step of the rollouts) the quantized kernel is the
# faster one even on the CPU: its cost grows with the rows, dequantizing's does not.
DEQUANTIZE_FROM_ROWS = 16


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1]


class _DequantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if _rows(x) < DEQUANTIZE_FROM_ROWS:
            return super().__call__(x)
        y = x @ _dequantized(self, x.dtype).T
        return y + self["bias"] if "bias" in self else y


class _DequantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        if _rows(x) < DEQUANTIZE_FROM_ROWS:
            return super().as_linear(x)
        return x @ _dequantized(self, x.dtype).T


def _dequantized(m: nn.Module, dtype: mx.Dtype) -> mx.array:
    w = mx.dequantize(m["weight"], m["scales"], m.get("biases"), m.group_size, m.bits, m.mode)
    return w.astype(dtype)


@contextmanager
def dequantized_reads(*models: Optional[nn.Module]) -> Iterator[None]:
    """On the CPU, inside this block, quantized layers multiply many rows at once by
    their weights dequantized rather than through MLX's quantized matmul, which has
    no fast CPU kernel (about 100x slower than a float32 matmul at 4B sizes). The
    float copy lives only while its layer runs, as a bfloat16 weight's upcast
    copy does (compute_dtype); the results agree to float rounding. Elsewhere
    (Metal) the quantized kernels are the fast route and nothing changes."""
    swaps = {nn.QuantizedLinear: _DequantizedLinear, nn.QuantizedEmbedding: _DequantizedEmbedding}
    changed = []
    if mx.default_device().type == mx.cpu:
        for model in models:
            if model is None:
                continue
            for _, m in model.named_modules():
                if type(m) in swaps:
                    changed.append((m, type(m)))
                    m.__class__ = swaps[type(m)]
    try:
        yield
    finally:
        for m, cls in changed:
            m.__class__ = cls


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
