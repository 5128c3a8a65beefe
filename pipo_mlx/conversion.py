"""Hugging Face PIPO / Qwen3.5 checkpoints -> an MLX model folder `pipo_mlx.load` reads.

Three sources are accepted (docs/design.md §3):
  a. a merged PIPO checkpoint (backbone + compressor + mtp + confidence_head),
  b. a base Qwen3.5 model plus a PEFT LoRA adapter folder, merged here,
  c. a plain Qwen3.5 model, which gets fresh heads for `train_heads.py`.
"""

import sys
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load_tokenizer, quantize_model

from . import backbones
from .errors import PipoError
from .heads import COMPRESSOR_TYPES
from .hf_io import (
    TOKENIZER_PATTERNS,
    WEIGHT_PATTERNS,
    flat_text_config,
    load_safetensors,
    load_weights,
    read_json,
    resolve,
)
from .model import HEAD_PREFIXES
from .model_io import UNTRAINED_KEY, base_source, cast, pad_token_id, save_folder

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
ARCHITECTURE = "Qwen3_5ForCausalPIPO"  # the name the authors' training tool stores


class MissingHeadsError(PipoError):
    """The source has no trained PIPO heads and the caller asked for them."""


def _canonical(key: str) -> str:
    """One key layout for merging: text-only `model.*`, no PEFT prefix."""
    key = key.removeprefix("base_model.model.")
    # Some PEFT versions keep the wrapper's name in saved-whole module keys.
    key = key.replace(".modules_to_save.default.", ".")
    return key.replace("model.language_model.", "model.", 1)


def merge_adapter(
    weights: Dict[str, mx.array], adapter_dir: Path, base_name: str
) -> None:
    """Fold a PEFT LoRA adapter into `weights` (canonical keys), in place."""
    cfg = read_json(adapter_dir / "adapter_config.json", "a PEFT adapter folder")
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise PipoError(
            f"{adapter_dir / 'adapter_config.json'}: only plain LoRA adapters are "
            "supported (no DoRA or other PEFT types)"
        )
    if cfg.get("alpha_pattern"):
        raise PipoError(
            f"{adapter_dir / 'adapter_config.json'}: per-module lora alphas "
            "(alpha_pattern) are not supported; merge the adapter with PEFT first"
        )
    alpha = float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        hint = " (found adapter_model.bin: re-save it with safe_serialization=True)"
        raise PipoError(
            f"{file} not found{hint if (adapter_dir / 'adapter_model.bin').exists() else ''}"
        )
    pairs: Dict[str, Dict[str, mx.array]] = {}
    whole: Dict[str, mx.array] = {}
    for key, value in load_safetensors(file).items():
        key = _canonical(key)
        if ".lora_A." in key or ".lora_B." in key:
            target, rest = key.split(".lora_", 1)
            pairs.setdefault(target + ".weight", {})[rest[0]] = value
        elif ".lora_" in key:
            raise PipoError(f"{file}: unsupported LoRA tensor {key}")
        elif ".original_module." in key:
            continue
        else:
            whole[key] = value

    def other_base(detail: str) -> PipoError:
        return PipoError(
            f"{file}: {detail}; this adapter was trained for another base model "
            f"than {base_name} (its config names {cfg.get('base_model_name_or_path')!r})"
        )

    for target, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise PipoError(f"{file}: {target} has lora_A or lora_B but not both")
        if target not in weights:
            raise other_base(f"LoRA targets {target}, which the base does not have")
        w, a, b = weights[target], ab["A"], ab["B"]
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise other_base(
                f"LoRA for {target} is {b.shape[0]}x{a.shape[1]} but the base weight "
                f"is {w.shape[0]}x{w.shape[1]}"
            )
        rank = a.shape[0]
        scale = alpha / (rank**0.5 if rslora else rank)
        delta = b.astype(mx.float32) @ a.astype(mx.float32)
        weights[target] = (w.astype(mx.float32) + scale * delta).astype(w.dtype)
    for key, value in whole.items():
        if key in weights and weights[key].shape != value.shape:
            raise other_base(
                f"saved module tensor {key} has shape {tuple(value.shape)}, "
                f"the base's is {tuple(weights[key].shape)}"
            )
        weights[key] = value


def _compressor_type(text: dict, weights: Dict[str, mx.array], requested: Optional[str], src: Path) -> str:
    in_weights = next(
        (t for t in COMPRESSOR_TYPES if any(k.startswith(f"compressor.{t}.") for k in weights)),
        None,
    )
    in_config = text.get("compressor_type")
    for origin, kind in (("config.json", in_config), ("--compressor-type", requested)):
        if kind is not None and kind not in COMPRESSOR_TYPES:
            raise PipoError(
                f"{src / 'config.json' if origin == 'config.json' else origin}: unknown "
                f"compressor type {kind!r}; use one of {', '.join(COMPRESSOR_TYPES)}"
            )
    chosen = in_weights or in_config or requested or "mlp"
    for origin, kind in (("config.json", in_config), ("--compressor-type", requested)):
        if kind is not None and kind != chosen:
            raise PipoError(
                f"{origin} says compressor type {kind!r} but the checkpoint in {src} "
                f"holds a {chosen!r} compressor; drop the option or fix the config"
            )
    return chosen


def _check_weights(
    model: nn.Module, weights: Dict[str, mx.array], origin: Dict[str, Path], src: Path
) -> list:
    """Shapes against the config; returns the head groups that need fresh weights."""
    expected = dict(tree_flatten(model.parameters()))
    for key, value in weights.items():
        if key not in expected:
            raise PipoError(
                f"{origin.get(key, src)}: unexpected tensor {key}; this checkpoint does "
                "not match a PIPO model with its config.json"
            )
        if tuple(value.shape) != tuple(expected[key].shape):
            raise PipoError(
                f"{origin.get(key, src)}: {key} has shape {tuple(value.shape)} but "
                f"config.json implies {tuple(expected[key].shape)}; the weights and "
                "config.json disagree (mixed-up folders?)"
            )
    fresh = []
    for prefix in HEAD_PREFIXES:
        group = [k for k in expected if k.startswith(prefix)]
        present = [k for k in group if k in weights]
        if not present:
            fresh.append(prefix.rstrip("."))
        elif len(present) != len(group):
            missing = sorted(set(group) - set(present))
            raise PipoError(
                f"{src}: {prefix.rstrip('.')} is incomplete, {missing[0]} and "
                f"{len(missing) - 1} more are missing; restore the checkpoint"
            )
    backbone_missing = [
        k for k in expected if not k.startswith(HEAD_PREFIXES) and k not in weights
    ]
    if backbone_missing:
        raise PipoError(
            f"{src}: the checkpoint lacks {backbone_missing[0]} (and "
            f"{len(backbone_missing) - 1} more) that config.json implies; "
            "is config.json from another model?"
        )
    return fresh


def _tokenizer_source(*folders: Optional[Path]) -> Path:
    for folder in folders:
        if folder is not None and any(
            (folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")
        ):
            return folder
    raise PipoError(
        f"no tokenizer files (tokenizer.json, tokenizer.model or vocab.json) in "
        f"{' or '.join(str(f) for f in folders if f)}; copy the base model's tokenizer there"
    )


def convert(
    hf_path: str,
    mlx_path: str,
    adapter_path: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    compressor_type: Optional[str] = None,
    force: bool = False,
    require_trained_heads: bool = False,
) -> Path:
    """Convert a checkpoint; returns the output folder. See the module docstring.

    With `require_trained_heads`, a source without a compressor and confidence
    head (a plain Qwen3.5) raises `MissingHeadsError` instead of getting fresh ones.
    """
    dst = Path(mlx_path).expanduser()
    if dst.exists() and not force:
        raise PipoError(f"{dst} already exists; choose another --mlx-path or pass --force")
    if dtype is not None and dtype not in DTYPES:
        raise PipoError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")

    src = resolve(hf_path, WEIGHT_PATTERNS + TOKENIZER_PATTERNS)
    config = read_json(src / "config.json", "a Hugging Face model folder")
    text = flat_text_config(config)
    backbone = backbones.for_hf_model_type(text["model_type"], str(src / "config.json"))
    text = backbone.text_config(text, src / "config.json")
    weights, origin = load_weights(src)
    weights = {_canonical(k): v for k, v in weights.items()}
    origin = {_canonical(k): v for k, v in origin.items()}

    adapter_dir = None
    if adapter_path is not None:
        adapter_dir = resolve(
            adapter_path,
            ["adapter_config.json", "adapter_model.safetensors"] + TOKENIZER_PATTERNS,
        )
        merge_adapter(weights, adapter_dir, hf_path)
    if require_trained_heads and not any(
        k.startswith(("compressor.", "confidence_head.")) for k in weights
    ):
        raise MissingHeadsError(f"{hf_path} has no trained PIPO heads")

    text["compressor_type"] = _compressor_type(text, weights, compressor_type, src)
    tokenizer_dir = _tokenizer_source(adapter_dir, src)
    tokenizer = load_tokenizer(tokenizer_dir)
    pad = text.get("pad_token_id")
    if not isinstance(pad, int):
        pad = pad_token_id(tokenizer, backbone, src)
    pipo = {
        "compressor_type": text.pop("compressor_type"),
        "mtp_num_hidden_layers": int(text.pop("mtp_num_hidden_layers", 1)),
        "pad_token_id": pad,
    }
    if isinstance(text.get("conf_threshold"), (int, float)):  # a recommended gate, kept
        pipo["conf_threshold"] = float(text.pop("conf_threshold"))
    text.pop("pad_token_id", None)
    out_config = {**text, "architectures": [ARCHITECTURE], "pipo": pipo}
    for key in ("auto_map", "transformers_version", "torch_dtype", "dtype", "quantization_config"):
        out_config.pop(key, None)

    try:
        model = backbone.model_class(backbone.args_class.from_dict(out_config))
    except (TypeError, ValueError) as e:
        raise PipoError(f"{src / 'config.json'}: cannot build the model ({e})") from None
    weights = model.sanitize(weights)
    origin = {k: origin.get(k, src) for k in weights}
    fresh = _check_weights(model, weights, origin, src)
    model.load_weights(list(weights.items()), strict=False)
    # From here the model holds the only references to the lazily read and merged
    # tensors, so each source is freed once its output tensor is evaluated below.
    del weights, origin
    if fresh:
        print(f"[INFO] initialised fresh {', '.join(fresh)} (train them with train_heads.py)",
              file=sys.stderr)
        # Read by model_io.load, which warns; training's fused output drops the mark.
        pipo[UNTRAINED_KEY] = fresh
    if adapter_dir is not None or fresh:
        # The source is the base itself: the benchmark and calibration compare against it.
        pipo["base_model"] = base_source(hf_path)

    target = DTYPES[dtype] if dtype else DTYPES.get(
        str(config.get("dtype") or config.get("torch_dtype") or text.get("dtype")), mx.float32
    )
    cast(model, target)
    if quantize:
        model, out_config = quantize_model(model, out_config, q_group_size, q_bits)

    # One tensor at a time, largest first: each one's sources (read lazily, merged,
    # cast or quantized) are freed before the next is read, so the peak stays near
    # the size of the output whatever order MLX would evaluate a whole shard in.
    for _, value in sorted(tree_flatten(model.parameters()), key=lambda kv: -kv[1].nbytes):
        mx.eval(value)
    save_folder(dst, model, out_config, tokenizer, tokenizer_dir / "generation_config.json")
    return dst
