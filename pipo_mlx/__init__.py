"""PIPO (Pair-In, Pair-Out) decoding for Qwen3.5 models in MLX (docs/design.md)."""

import sys
from types import ModuleType

from .batch import BatchGenerator
from .batch_api import BatchResponse, batch_generate
from .chat import ChatSession
from .conversion import convert
from .decode import PipoResponse, generate, stream_generate
from .errors import PipoError
from .model import PipoModel, PipoOutput
from .model_io import load
from .prompt_cache import PromptCacheStore, make_prompt_cache
from .prompt_cache_file import (
    PromptCacheFile,
    fill_prompt_cache,
    load_prompt_cache,
    save_prompt_cache,
)
from .token2_head import make_token2_head
from .train_config import TrainConfig  # the loop itself: pipo_mlx.trainer.train

__all__ = [
    "BatchGenerator",
    "BatchResponse",
    "ChatSession",
    "PipoError",
    "PipoModel",
    "PipoOutput",
    "PipoResponse",
    "PromptCacheFile",
    "PromptCacheStore",
    "TrainConfig",
    "batch_generate",
    "convert",
    "fill_prompt_cache",
    "generate",
    "load",
    "load_prompt_cache",
    "make_prompt_cache",
    "make_token2_head",
    "save_prompt_cache",
    "stream_generate",
]


class _Package(ModuleType):
    """The package keeps its functions bound when a same-named module is imported.

    `pipo_mlx.generate` and `pipo_mlx.convert` are both library functions and
    the thin modules behind `python -m pipo_mlx.generate` / `.convert`. Importing
    such a module makes Python set it as an attribute of the package, which
    would replace the function; mlx-lm avoids this by importing its modules in
    its `__init__`, but ours would then be in `sys.modules` before `python -m`
    runs them, which runpy warns about.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, ModuleType) and callable(self.__dict__.get(name)):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
