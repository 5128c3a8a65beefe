"""The backbones PIPO can sit on, each described in one module of this package.

Everything that depends on the backbone's architecture lives in its module and
is reached through a `Backbone` (docs/design.md §10). Adding one (say a dense
Qwen3) is a new module that builds a `Backbone` plus one entry in `_MODULES`.
"""

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Callable, ContextManager, Dict, Optional, Tuple, Type

import mlx.nn as nn

from ..errors import PipoError

# name -> module defining BACKBONE; imported on first use.
_MODULES = {"qwen3_5": ".qwen3_5"}


@dataclass(frozen=True)
class Backbone:
    name: str
    model_type: str  # what a converted config.json names (the text model's type)
    hf_model_types: Tuple[str, ...]  # source model types conversion accepts
    model_class: Type[nn.Module]
    args_class: type
    # The tokenizer's PAD token, by text, for a tokenizer config that names none.
    # Looked up in the tokenizer's vocabulary, never used as a bare id.
    pad_token: Optional[str]
    lora_keys: Tuple[str, ...]  # module paths inside a layer that get LoRA
    # An HF config (nested or flat) -> the text config mlx-lm's model reads,
    # checked; raises PipoError naming the file.
    text_config: Callable[[dict, Path], dict]
    # A context in which the model's training forward pass takes a faster,
    # numerically equivalent route (a no-op where there is none).
    fast_training: Callable[[nn.Module], ContextManager]


def _load(name: str) -> Backbone:
    return import_module(_MODULES[name], __name__).BACKBONE


def all_backbones() -> Dict[str, Backbone]:
    return {name: _load(name) for name in _MODULES}


def for_model_type(model_type: str, where: str = "config.json") -> Backbone:
    """The backbone whose converted configs carry `model_type`."""
    for backbone in all_backbones().values():
        if model_type == backbone.model_type:
            return backbone
    raise PipoError(
        f"{where}: model_type {model_type!r} is not a backbone pipo_mlx knows "
        f"({', '.join(b.model_type for b in all_backbones().values())}); "
        "convert the checkpoint with convert.py"
    )


def for_hf_model_type(model_type: str, where: str) -> Backbone:
    """The backbone that converts a source checkpoint of `model_type`."""
    for backbone in all_backbones().values():
        if model_type in backbone.hf_model_types:
            return backbone
    accepted = ", ".join(t for b in all_backbones().values() for t in b.hf_model_types)
    raise PipoError(
        f"{where}: model_type {model_type!r} is not a backbone PIPO supports "
        f"(accepted: {accepted})"
    )


def of(model: nn.Module) -> Backbone:
    """The backbone a PIPO model is built on."""
    return for_model_type(model.args.model_type)
