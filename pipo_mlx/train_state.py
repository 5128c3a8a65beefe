"""Training checkpoints: a run folder's step-NNNNNNN/ folders and the pointer to the latest.

Each checkpoint holds the trainable weights and the optimizer state; together
with batches that are a function of the step, that makes `--resume` exact.
"""

import os
import shutil
from pathlib import Path
from typing import List

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from .errors import PipoError
from .hf_io import read_json
from .model_io import write_json_atomic
from .train_config import TrainConfig

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
            str(tmp / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
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
        weights = mx.load(str(folder / "adapters.safetensors"))
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
