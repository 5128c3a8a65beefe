"""Training checkpoints: a run folder's step-NNNNNNN/ folders and the pointer to the latest.

Each checkpoint holds the trainable weights and the optimizer state; together
with batches that are a function of the step, that makes `--resume` exact. A
checkpoint also loads on top of its model for generation (`load_adapters`) or
folds into a new model folder (`fuse`).
"""

import os
import shutil
from pathlib import Path
from typing import List, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from .adapters import Tuning, attach, save_fused
from .errors import PipoError
from .hf_io import read_json
from .model_io import load, write_json_atomic
from .train_config import TrainConfig

WEIGHTS_FILE = "adapters.safetensors"  # in each step folder

RUN_FILE = "train_config.json"  # the run's settings: marks a folder as ours
POINTER_FILE = "checkpoint.json"  # names the latest complete checkpoint


def save_checkpoint(out: Path, step: int, model: nn.Module, optimizer: optim.Optimizer) -> None:
    """Write step-NNNNNNN/ under a temporary name, then repoint checkpoint.json.

    The pointer is replaced atomically and only after the new folder is
    complete, so a run killed at any moment leaves the previous checkpoint
    intact and named.
    """
    name = f"step-{step:07d}"
    tmp = out / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        mx.save_safetensors(
            str(tmp / WEIGHTS_FILE), dict(tree_flatten(model.trainable_parameters()))
        )
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        shutil.rmtree(out / name, ignore_errors=True)
        tmp.rename(out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json_atomic(out / POINTER_FILE, {"step": step, "dir": name})
    for old in out.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(out: Path, model: nn.Module, optimizer: optim.Optimizer) -> int:
    """Load the latest checkpoint into model and optimizer; returns its step (0 if none)."""
    if not (out / POINTER_FILE).exists():
        return 0
    pointer = read_json(out / POINTER_FILE, "a train_heads.py output folder")
    folder = out / str(pointer.get("dir"))
    damaged = (
        f"the checkpoint {folder} is damaged or incomplete; restore it or start over with --force"
    )
    try:
        weights = mx.load(str(folder / WEIGHTS_FILE))
        state = mx.load(str(folder / "optimizer.safetensors"))
    except Exception:
        raise PipoError(damaged) from None
    expected = dict(tree_flatten(model.trainable_parameters()))
    if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in expected.items()}:
        raise PipoError(f"{damaged} (its tensors do not match the model being trained)")
    model.load_weights(list(weights.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    if set(state) != {k for k, _ in tree_flatten(optimizer.state)}:
        raise PipoError(f"{damaged} (its optimizer state does not match --optimizer)")
    optimizer.state = tree_map_with_path(lambda path, _: state[path], optimizer.state)
    mx.eval(model.parameters(), optimizer.state)
    return int(pointer["step"])


def _our_entries(out: Path) -> List[Path]:
    return [
        p
        for p in out.iterdir()
        if p.name in (RUN_FILE, POINTER_FILE, "fused", "rollouts")
        or p.name.startswith(
            ("step-", ".step-", f".{POINTER_FILE}", f".{RUN_FILE}", ".fused", ".rollouts")
        )
    ]


def start_run(cfg: TrainConfig) -> Path:
    """Make the run folder and record the run's settings in it (the caller has
    checked that the folder may be used: see cli/train.py)."""
    out = Path(cfg.adapter_path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for p in _our_entries(out):
        # --force discards the old run; any run drops what a killed one left half-written.
        if cfg.force or p.name.startswith("."):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    write_json_atomic(out / RUN_FILE, {**cfg.identity(), "iters": cfg.iters})
    return out


def find_checkpoint(adapter_path: str) -> Tuple[dict, Path]:
    """The run settings and the step folder that `adapter_path` names: a run
    folder (its latest checkpoint) or one of its step-NNNNNNN folders."""
    path = Path(adapter_path).expanduser()
    if (path / POINTER_FILE).is_file():
        run = path
        folder = path / str(read_json(path / POINTER_FILE, "a train_heads.py output folder").get("dir"))
    elif (path / WEIGHTS_FILE).is_file():
        run, folder = path.parent, path
    else:
        raise PipoError(
            f"{path} holds no train_heads.py checkpoint ({POINTER_FILE} or {WEIGHTS_FILE} "
            "missing); pass the folder given to train_heads.py --adapter-path, or one of "
            "its step-NNNNNNN folders"
        )
    if not (run / RUN_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise PipoError(
            f"{folder} is not a complete train_heads.py checkpoint ({run / RUN_FILE} or "
            f"{folder / WEIGHTS_FILE} missing)"
        )
    return read_json(run / RUN_FILE, "a train_heads.py output folder"), folder


def load_adapters(model: nn.Module, adapter_path: str) -> Tuning:
    """Put a training checkpoint on top of `model` without fusing: LoRA layers as
    the run had them, and its head weights in the dtypes of the model's own."""
    settings, folder = find_checkpoint(adapter_path)
    tuning = attach(
        model, bool(settings.get("lora", True)), int(settings.get("lora_rank", 64)),
        float(settings.get("lora_alpha", 128.0)),
    )
    try:
        weights = mx.load(str(folder / WEIGHTS_FILE))
    except Exception:
        raise PipoError(f"{folder / WEIGHTS_FILE} is damaged or incomplete") from None
    expected = {k: v.shape for k, v in tree_flatten(model.trainable_parameters())}
    if {k: v.shape for k, v in weights.items()} != expected:
        raise PipoError(
            f"the checkpoint in {folder} does not fit this model (its tensors differ); it "
            f"was trained on {settings.get('model', 'another model')}"
        )
    model.update(tree_unflatten([(k, v.astype(tuning.dtypes[k])) for k, v in weights.items()]))
    model.freeze()
    model.eval()
    mx.eval(model.parameters())
    return tuning


def fuse(
    model_path: str, adapter_path: str, save_path: str, dequantize: bool = False
) -> Path:
    """Fold the training checkpoint `adapter_path` into the model folder
    `model_path` and write the result to `save_path` (quantized as the model is,
    unless `dequantize`); returns the written folder."""
    dst = Path(save_path).expanduser()
    model, tokenizer = load(model_path)
    tuning = load_adapters(model, adapter_path)
    return save_fused(model, tuning, model_path, dst, tokenizer, dequantize)
