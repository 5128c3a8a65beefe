"""PIPO (Pair-In, Pair-Out) decoding for Qwen3.5 models in MLX."""

from .convert import convert
from .errors import PipoError
from .generate import generate, stream_generate
from .model import Model, ModelArgs, PipoOutput
from .train import TrainConfig  # the loop itself: pipo_mlx.train.train
from .utils import load

__all__ = [
    "Model",
    "ModelArgs",
    "PipoError",
    "PipoOutput",
    "TrainConfig",
    "convert",
    "generate",
    "load",
    "stream_generate",
]
