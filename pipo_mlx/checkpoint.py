"""Reading Hugging Face folders: paths or hub repos, configs, safetensors shards.

Every failure here is a `PipoError` that names the file and says what to do, since
these are the places where a user's input is wrong.
"""

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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
    parts = path_or_repo.strip("/").split("/")
    if path_or_repo.startswith((".", "/", "~")) or len(parts) < 2:
        raise PipoError(f"folder {local} does not exist; check the path")
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


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON under a temporary name and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


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


def text_config(config: dict, config_path: Path) -> dict:
    """The backbone's text config from either config shape, with the layer pattern
    checked the way mlx-lm will build it."""
    outer_type = config.get("model_type")
    text = dict(config.get("text_config") or config)
    text.pop("text_config", None)
    text.pop("vision_config", None)
    # Outer fields (tie flag, eos, PIPO options) apply to the text model too.
    for key, value in config.items():
        if key not in ("text_config", "vision_config", "model_type", "architectures"):
            text.setdefault(key, value)
    kind = text.get("model_type", outer_type)
    if not str(kind).startswith("qwen3_5") or "moe" in str(kind):
        raise PipoError(
            f"{config_path}: model_type {kind!r} is not a dense Qwen3.5 model; "
            "PIPO checkpoints are built on Qwen3.5 (qwen3_5 / qwen3_5_text)"
        )
    text["model_type"] = "qwen3_5_text"
    for field in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if not isinstance(text.get(field), int):
            raise PipoError(f"{config_path} lacks the integer field {field!r}; restore the file")
    if "rope_parameters" not in text and "rope_theta" in text:
        text["rope_parameters"] = {
            "type": "default",
            "rope_theta": text["rope_theta"],
            "partial_rotary_factor": text.get("partial_rotary_factor", 0.25),
        }

    layer_types = text.get("layer_types")
    if layer_types:
        n = text["num_hidden_layers"]
        full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
        interval = full[0] + 1 if full else 0
        expected = [
            "full_attention" if interval and (i + 1) % interval == 0 else "linear_attention"
            for i in range(n)
        ]
        if len(layer_types) != n or layer_types != expected:
            raise PipoError(
                f"{config_path}: layer_types is not one full-attention layer every k "
                "layers, which is the only pattern mlx-lm's Qwen3.5 builds"
            )
        given = text.get("full_attention_interval")
        if given is not None and given != interval:
            print(
                f"[WARN] {config_path}: full_attention_interval={given} disagrees with "
                f"layer_types; using {interval} from layer_types"
            )
        text["full_attention_interval"] = interval
    return text


def read_pad_token_id(text: dict, tokenizer_dir: Path) -> Optional[int]:
    """The config's pad token, else the tokenizer's (Qwen3.5: 248044)."""
    pad = text.get("pad_token_id")
    if isinstance(pad, int):
        return pad
    from mlx_lm.utils import load_tokenizer

    pad = load_tokenizer(tokenizer_dir).pad_token_id
    return pad if isinstance(pad, int) else None
