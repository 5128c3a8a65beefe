"""Loading a converted PIPO folder with mlx-lm's loader and tokenizer wrapper."""

from pathlib import Path
from typing import Tuple

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer

from .checkpoint import read_json
from .errors import PipoError
from .model import Model, ModelArgs


def load(path: str, lazy: bool = False) -> Tuple[Model, TokenizerWrapper]:
    """Load a folder written by `convert.py` (or `train_heads.py --fuse`)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise PipoError(f"model folder {folder} does not exist; convert one with convert.py")
    config = read_json(folder / "config.json", "a model folder")
    if "pipo" not in config:
        raise PipoError(
            f"{folder} is not a PIPO conversion (its config.json has no 'pipo' "
            f"section); run: python convert.py --hf-path {folder} --mlx-path <new folder>"
        )
    try:
        model, config = load_model(
            folder, lazy=lazy, get_model_classes=lambda config: (Model, ModelArgs)
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise PipoError(f"{folder}: cannot load the weights ({e}); convert it again") from None
    tokenizer = load_tokenizer(folder, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer
