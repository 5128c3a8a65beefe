"""PIPO (Pair-In, Pair-Out) decoding for Qwen3.5 models in MLX (docs/design.md)."""

from .batch import BatchGenerator, batch_generate
from .chat import ChatSession
from .conversion import convert
from .decode import PipoResponse, generate, stream_generate
from .errors import PipoError
from .model import PipoModel, PipoOutput
from .model_io import load
from .prompt_cache import PromptCacheStore, make_prompt_cache
from .token2_head import make_token2_head
from .train_config import TrainConfig  # the loop itself: pipo_mlx.trainer.train

__all__ = [
    "BatchGenerator",
    "ChatSession",
    "PipoError",
    "PipoModel",
    "PipoOutput",
    "PipoResponse",
    "PromptCacheStore",
    "TrainConfig",
    "batch_generate",
    "convert",
    "generate",
    "load",
    "make_prompt_cache",
    "make_token2_head",
    "stream_generate",
]
