"""MLX PIPO model folders: loading them, and writing them atomically."""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer, save_config, save_model

from . import backbones
from .backbones import Backbone
from .errors import PipoError
from .hf_io import is_hub_id, read_json

# The `pipo` config field naming the heads a conversion initialised fresh; their
# output is noise until training, whose fused model no longer has the field.
UNTRAINED_KEY = "untrained_heads"
_warned_untrained = set()  # folders already warned about in this process


def base_source(spec: str) -> str:
    """How a model folder records its base (`pipo.base_model`): a hub id as given,
    a local path made absolute, so the record holds wherever the folder moves."""
    return spec if is_hub_id(spec) else str(Path(spec).expanduser().resolve())


def recorded_base(folder: Path, record: Optional[str]) -> Optional[str]:
    """A folder's base record as a hub id or an absolute path. A relative path (a
    hand-written config's, as the shipped demo's) is relative to `folder`."""
    if record is None:
        return None
    local = folder / Path(record).expanduser()  # an absolute record stays as it is
    if not local.exists() and is_hub_id(record):
        return record
    return str(local.resolve())


def pad_token_id(tokenizer: Any, backbone: Backbone, where: Path) -> int:
    """The tokenizer's PAD id, or that of the backbone's named PAD token
    (docs/design.md §3); never a bare constant."""
    pad = tokenizer.pad_token_id
    if isinstance(pad, int):
        return pad
    pad = tokenizer.get_vocab().get(backbone.pad_token) if backbone.pad_token else None
    if isinstance(pad, int):
        return pad
    raise PipoError(
        f"{where}: neither config.json nor the tokenizer defines a pad token, which "
        "PIPO needs; add pad_token_id to config.json"
    )


def load(
    path: str, lazy: bool = False, adapter_path: Optional[str] = None
) -> Tuple[nn.Module, TokenizerWrapper]:
    """Load a folder written by `convert.py` (or `train_heads.py --fuse`); with
    `adapter_path`, a `train_heads.py` checkpoint on top, unfused (as mlx_lm.load
    puts LoRA adapters on a model)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise PipoError(f"model folder {folder} does not exist; convert one with convert.py")
    config = read_json(folder / "config.json", "a model folder")
    if "pipo" not in config:
        raise PipoError(
            f"{folder} is not a PIPO conversion (its config.json has no 'pipo' "
            f"section); run: python convert.py --hf-path {folder} --mlx-path <new folder>"
        )
    backbone = backbones.for_model_type(config.get("model_type"), str(folder / "config.json"))
    try:
        model, config = load_model(
            folder,
            lazy=lazy,
            get_model_classes=lambda config: (backbone.model_class, backbone.args_class),
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise PipoError(f"{folder}: cannot load the weights ({e}); convert it again") from None
    if adapter_path is None:  # an adapter brings trained heads
        warn_untrained(folder, config["pipo"].get(UNTRAINED_KEY))
    model.identity = model_identity(folder, adapter_path)
    tokenizer = load_tokenizer(folder, eos_token_ids=config.get("eos_token_id"))
    if model.args.pad_token_id is None:
        model.args.pad_token_id = pad_token_id(tokenizer, backbone, folder)
    if adapter_path is not None:
        from .train_state import load_adapters  # it builds on this module

        load_adapters(model, adapter_path)
    return model, tokenizer


# Fields a tool may rewrite in place without changing what the model computes.
_TUNABLE = ("conf_threshold", "draft_cost", "base_model", UNTRAINED_KEY)
_SAMPLES = 16  # chunks read from each weight file for its fingerprint
_SAMPLE_BYTES = 1 << 16


def model_identity(folder: Path, adapter_path: Optional[str] = None) -> str:
    """A fingerprint of the weights a model folder (and adapter) holds, for prompt-cache
    files: the config without its tunable fields, and for each weight file its name,
    size and evenly spread samples of its bytes. Reading a few chunks instead of the
    whole file keeps it fast; a fine-tune changes every tensor, so the samples differ."""
    digest = hashlib.sha256()
    config = read_json(folder / "config.json", "a model folder")
    config["pipo"] = {k: v for k, v in config.get("pipo", {}).items() if k not in _TUNABLE}
    digest.update(json.dumps(config, sort_keys=True).encode())
    files = sorted(folder.glob("*.safetensors"))
    if adapter_path is not None:  # its checkpoints sit in step folders
        files += sorted(Path(adapter_path).expanduser().rglob("*.safetensors"))
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            for i in range(_SAMPLES):
                f.seek(size * i // _SAMPLES)
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def warn_untrained(folder: Path, heads: Optional[list]) -> None:
    """Say once per folder, on stderr, that its heads were never trained."""
    where = folder.resolve()
    if not heads or where in _warned_untrained:
        return
    _warned_untrained.add(where)
    print(
        f"[WARN] {folder}: its PIPO heads ({', '.join(heads)}) were never trained, so the "
        "text it generates is noise; train them with train_heads.py and use its --fuse output",
        file=sys.stderr,
    )


def cast(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast floating parameters to `dtype`, except those the model keeps precise
    (mlx-lm's `cast_predicate`: Qwen3.5's A_log)."""
    keep = model.cast_predicate
    model.update(
        tree_map_with_path(
            lambda p, v: v.astype(dtype) if keep(p) and mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters(),
        )
    )


def save_folder(
    dst: Path,
    model: nn.Module,
    config: dict,
    tokenizer: TokenizerWrapper,
    generation_config: Optional[Path] = None,
) -> None:
    """Write weights, config and tokenizer to `dst` atomically.

    Everything goes to a hidden sibling first and is renamed into place at the
    end, so an interrupted write never leaves a half-written model behind.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_model(tmp, model)
        save_config(dict(config), tmp / "config.json")
        tokenizer.save_pretrained(str(tmp))
        if generation_config is not None and generation_config.is_file():
            shutil.copy2(generation_config, tmp / generation_config.name)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, data: dict, indent: int = 2) -> None:
    """Write JSON under a temporary name in the same folder and rename it over `path`:
    readers, and a failure at any point, see the old file or the new one, never a mix,
    and no temporary file stays behind."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=indent, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C included
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise PipoError(f"cannot write {path} ({e.strerror or e}); it is unchanged") from None
        raise
