"""Reading Hugging Face folders: paths or hub repos, configs, safetensors shards.

Every failure here is a `PipoError` that names the file and says what to do, since
these are the places where a user's input is wrong.
"""

import json
from pathlib import Path
from typing import Dict, List, Tuple

import mlx.core as mx

from .errors import PipoError

WEIGHT_PATTERNS = ["*.json", "*.safetensors"]
TOKENIZER_PATTERNS = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
]


def is_hub_id(spec: str) -> bool:
    """`owner/name[/subfolder]` naming no local path: a Hugging Face repo id."""
    if Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")):
        return False
    return len(spec.strip("/").split("/")) >= 2


def resolve(path_or_repo: str, patterns: List[str]) -> Path:
    """A local folder as is, or `owner/name[/subfolder]` fetched from the hub.

    Only files matching `patterns` are downloaded, and only under the subfolder:
    the published adapters share one repository.
    """
    local = Path(path_or_repo).expanduser()
    if local.exists():
        if not local.is_dir():
            raise PipoError(f"{local} is a file; pass the folder that holds config.json")
        return local
    if not is_hub_id(path_or_repo):
        raise PipoError(f"folder {local} does not exist; check the path")
    parts = path_or_repo.strip("/").split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    prefix = f"{sub}/" if sub else ""
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(repo, allow_patterns=[prefix + p for p in patterns])
    except Exception as e:  # the hub client raises many types; all mean "not here"
        raise PipoError(
            f"{path_or_repo} is neither a local folder nor a downloadable Hugging Face "
            f"repo ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "check the name, your network, or pass a local folder"
        ) from None
    path = Path(root) / sub
    if not path.is_dir():
        raise PipoError(f"hub repo {repo} has no folder {sub!r}; check the subfolder path")
    return path


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise PipoError(f"{path} not found: {path.parent} is not {what}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipoError(f"{path} is unreadable ({e}); restore or re-download it") from None
    if not isinstance(data, dict):
        raise PipoError(f"{path} should hold a JSON object; restore or re-download it")
    return data


def load_safetensors(path: Path) -> Dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:
        raise PipoError(
            f"{path} is not a readable safetensors file ({e}); "
            "it may be truncated: download or write it again"
        ) from None


def load_weights(
    folder: Path, exclude: Tuple[str, ...] = ("adapter_model.safetensors",)
) -> Tuple[Dict[str, mx.array], Dict[str, Path]]:
    """All tensors of a folder's shards, and which file each key came from."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(read_json(index, "a sharded model").get("weight_map", {}).values()))
        files = [folder / n for n in names]
        for f in files:
            if not f.is_file():
                raise PipoError(f"{f} is listed in {index.name} but missing; download it again")
    else:
        files = sorted(f for f in folder.glob("*.safetensors") if f.name not in exclude)
    if not files:
        raise PipoError(f"{folder} holds no *.safetensors weights; pass a model folder")
    weights, origin = {}, {}
    for f in files:
        for k, v in load_safetensors(f).items():
            weights[k] = v
            origin[k] = f
    return weights, origin


def flat_text_config(config: dict) -> dict:
    """The text model's config from a nested (multimodal) or flat config.

    Outer fields (tie flag, eos, PIPO options) apply to the text model too.
    """
    text = dict(config.get("text_config") or config)
    text.pop("text_config", None)
    text.pop("vision_config", None)
    for key, value in config.items():
        if key not in ("text_config", "vision_config", "model_type", "architectures"):
            text.setdefault(key, value)
    text.setdefault("model_type", config.get("model_type"))
    return text
