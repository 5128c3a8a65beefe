"""Supervised training of the PIPO heads with MLX (PIPO_SPEC.md section 5).

Read top to bottom: the run's settings, the data (records -> token pairs -> batches),
what trains, the losses, checkpoints, and the training loop itself.

Two choices worth knowing before reading the code:

* Cross-entropies never build the full `[tokens, V]` logits. The LM head is frozen,
  so the gradient of a cross-entropy with respect to the head's *input* is all the
  backward pass needs. `chunked_cross_entropy` computes losses and those input
  gradients a chunk of tokens at a time, eagerly, and `_with_grad` hands the
  gradient to autodiff through a zero-valued surrogate term.
* The data order and the PAD augmentation are pure functions of (seed, micro-step),
  and the optimizer state is checkpointed, so `--resume` continues exactly where
  an interrupted run stopped.
"""

import json
import math
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.tuner.utils import linear_to_lora_layers

from .checkpoint import read_json, write_json_atomic
from .convert import save_folder
from .errors import PipoError
from .model import Model
from .utils import load

IGNORE = -100  # label of a position that has no loss: prompt, PAD, batch padding
KEEP_THRESHOLDS = (0.5, 0.8, 0.95)
OPTIMIZERS = ("adamw", "adam", "lion", "sgd")
TOO_LONG = ("truncate", "refuse")

# The published checkpoints put LoRA on these PEFT target names. In Qwen3.5 only
# the full-attention layers have q/k/v/o; the Gated-DeltaNet layers' projections
# (in_proj_qkv, in_proj_z, in_proj_a, in_proj_b, out_proj) carry other names and
# stay frozen, exactly as in the authors' adapters. Every layer's MLP gets LoRA.
LORA_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

RUN_FILE = "train_config.json"  # the run's settings: marks a folder as ours
POINTER_FILE = "checkpoint.json"  # names the latest complete checkpoint


# -- settings ------------------------------------------------------------------


@dataclass
class TrainConfig:
    model: str
    data: str
    adapter_path: str
    iters: int = 1000
    batch_size: int = 4
    grad_accumulation: int = 1
    max_seq_length: int = 2048
    too_long: str = "truncate"
    max_pad_ratio: float = 0.25
    optimizer: str = "adamw"
    learning_rate: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    lora: bool = True
    lora_rank: int = 64
    lora_alpha: float = 128.0
    mtp_loss_weight: float = 1.0
    conf_loss_weight: float = 1.0
    ce_chunk_size: int = 256
    grad_checkpoint: bool = False
    steps_per_report: int = 10
    val_every: int = 200
    val_batches: int = 25
    save_every: int = 100
    seed: int = 0
    resume: bool = False
    force: bool = False
    fuse: bool = False

    # What a resumed run may change: nothing here alters the data order, the
    # model being trained or the optimizer's rule. (`iters` does reshape the
    # learning-rate schedule from the resumed step on; extending a run is the
    # point of changing it.)
    RESUMABLE = frozenset(
        {
            "iters",
            "steps_per_report",
            "val_every",
            "val_batches",
            "save_every",
            "grad_checkpoint",
            "ce_chunk_size",
            "resume",
            "force",
            "fuse",
            "adapter_path",
        }
    )

    def check(self) -> None:
        positive = (
            "iters",
            "batch_size",
            "grad_accumulation",
            "lora_rank",
            "ce_chunk_size",
            "steps_per_report",
            "val_every",
            "save_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise PipoError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_seq_length < 4 or self.max_seq_length % 2:
            raise PipoError("--max-seq-length must be even and at least 4 (PIPO reads pairs)")
        if not 0.0 <= self.max_pad_ratio <= 1.0:
            raise PipoError("--max-pad-ratio must lie in [0, 1]")
        if self.too_long not in TOO_LONG:
            raise PipoError(f"--too-long must be one of {', '.join(TOO_LONG)}")
        if self.optimizer not in OPTIMIZERS:
            raise PipoError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.learning_rate <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise PipoError("--learning-rate must be positive and --min-lr-ratio in [0, 1]")
        if self.warmup < 0 or self.grad_clip < 0 or self.val_batches < -1 or self.val_batches == 0:
            raise PipoError("--warmup and --grad-clip must be >= 0; --val-batches >= 1 or -1 (all)")
        if self.resume and self.force:
            raise PipoError("--resume continues a run and --force discards it; pass only one")

    def identity(self) -> Dict[str, Any]:
        """The settings that define a run, with paths made absolute."""
        d = {k: v for k, v in asdict(self).items() if k not in self.RESUMABLE}
        d["model"] = str(Path(self.model).expanduser().resolve())
        d["data"] = str(Path(self.data).expanduser().resolve())
        return d


# -- data ----------------------------------------------------------------------


@dataclass
class Example:
    tokens: np.ndarray  # the record's tokens, prompt first
    prompt_len: int  # tokens without loss at the start


def _chat(
    tokenizer: TokenizerWrapper,
    messages: list,
    tools: Any,
    where: str,
    generation_prompt: bool = False,
) -> List[int]:
    try:
        return list(
            tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=generation_prompt, return_dict=False
            )
        )
    except Exception as e:  # jinja templates raise their own errors on odd conversations
        raise PipoError(
            f"{where}: the chat template rejects this record ({type(e).__name__}: {e})"
        ) from None


def _encode_record(record: Any, tokenizer: TokenizerWrapper, where: str) -> Example:
    """mlx-lm's data formats: {"text"}, {"prompt", "completion"}, {"messages"}."""
    if not isinstance(record, dict):
        raise PipoError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    tools = record.get("tools")
    if "messages" in record:
        messages = record["messages"]
        if not (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
                for m in messages
            )
        ):
            raise PipoError(
                f"{where}: 'messages' must be a non-empty list of {{role, content}} objects"
            )
        if not tokenizer.has_chat_template:
            raise PipoError(
                f"{where}: 'messages' records need a chat template, and this tokenizer "
                "has none; use 'text' or 'prompt'/'completion' records"
            )
        # The last message is the completion; everything before it is prompt.
        full = _chat(tokenizer, messages, tools, where)
        prompt = (
            _chat(tokenizer, messages[:-1], tools, where, messages[-1]["role"] == "assistant")
            if len(messages) > 1
            else []
        )
        empty = not messages[-1]["content"].strip()
    elif "prompt" in record or "completion" in record:
        p, c = record.get("prompt"), record.get("completion")
        if not (isinstance(p, str) and isinstance(c, str)):
            raise PipoError(f"{where}: 'prompt' and 'completion' must both be strings")
        if tokenizer.has_chat_template:
            messages = [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
            full = _chat(tokenizer, messages, tools, where)
            prompt = _chat(tokenizer, messages[:1], tools, where, True)
        else:
            prompt = tokenizer.encode(p)
            full = prompt + tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id]
        empty = not c.strip()
    elif "text" in record:
        if not isinstance(record["text"], str):
            raise PipoError(f"{where}: 'text' must be a string")
        full, prompt = tokenizer.encode(record["text"]), []
        if full and full[-1] != tokenizer.eos_token_id:
            full.append(tokenizer.eos_token_id)
        empty = not record["text"].strip()
    else:
        raise PipoError(
            f"{where}: the record has none of the fields 'text', 'prompt'+'completion' "
            f"or 'messages' (it has {', '.join(map(repr, record)) or 'none'})"
        )
    if empty:
        raise PipoError(
            f"{where}: the record has no text to train on (empty completion); fill or remove it"
        )
    # Chat templates may render a prompt differently once an answer follows it;
    # the loss starts where the two renderings part.
    n = 0
    while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
        n += 1
    return Example(np.asarray(full, dtype=np.int32), n)


def pair_layout(
    example: Example, pad: int, pad_ratio: float = 0.0, rng: Optional[np.random.Generator] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Token ids and labels in PIPO's pair layout (PIPO_SPEC.md section 5).

    An odd prompt gets a PAD so the completion starts a pair; an odd total gets a
    final PAD. With `pad_ratio` > 0, each full completion pair (a, b) is split
    into (a, PAD), (b, PAD) with that probability, teaching the (token, PAD)
    pairs that the confidence gate produces at inference. Labels are IGNORE on
    the prompt and on every PAD.
    """
    prompt, completion = example.tokens[: example.prompt_len], example.tokens[example.prompt_len :]
    if len(prompt) % 2:
        prompt = np.append(prompt, pad)
    if len(completion) % 2:
        completion = np.append(completion, pad)
    pairs = completion.reshape(-1, 2)
    if pad_ratio > 0:
        split = (rng.random(len(pairs)) < pad_ratio) & (pairs[:, 1] != pad)
        # A split pair (a, b) is written twice, then rewritten as (a, PAD), (b, PAD).
        copies = 1 + split
        pairs = np.repeat(pairs, copies, axis=0)
        first = (np.cumsum(copies) - copies)[split]
        pairs[first + 1, 0] = pairs[first, 1]
        pairs[first, 1] = pairs[first + 1, 1] = pad
    ids = np.concatenate([prompt, pairs.reshape(-1)]).astype(np.int32)
    labels = ids.copy()
    labels[: len(prompt)] = IGNORE
    labels[ids == pad] = IGNORE
    return ids, labels


def _has_target(labels: np.ndarray) -> bool:
    # Position 0 and 1 form the first pair, which nothing predicts.
    return bool((labels[2:] != IGNORE).any())


def load_dataset(
    path: Path, tokenizer: TokenizerWrapper, pad: int, max_len: int, too_long: str
) -> List[Example]:
    """Read and tokenize a JSONL file; every problem names the file and line."""
    if not path.is_file():
        raise PipoError(f"{path} not found; put training records there, one JSON object per line")
    try:
        # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends.
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise PipoError(f"{path} is unreadable ({e}); it must be UTF-8 JSON Lines") from None
    examples, truncated, dropped = [], 0, 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipoError(
                f"{where}: not valid JSON ({e.msg}, column {e.colno}); fix or remove the line"
            ) from None
        ex = _encode_record(record, tokenizer, where)
        ids, labels = pair_layout(ex, pad)
        if not _has_target(labels):
            raise PipoError(
                f"{where}: the record is too short to train on (PIPO needs a completion "
                "token after the first pair); lengthen or remove it"
            )
        if len(ids) > max_len:
            if too_long == "refuse":
                raise PipoError(
                    f"{where}: {len(ids)} tokens after pairing, more than --max-seq-length "
                    f"{max_len}; raise --max-seq-length, shorten the record, or pass "
                    "--too-long truncate"
                )
            truncated += 1
            if not _has_target(labels[:max_len]):
                dropped += 1  # its prompt alone fills the window
                continue
        examples.append(ex)
    if not examples:
        raise PipoError(f"{path} holds no usable records")
    if truncated:
        print(
            f"[INFO] {path}: {truncated} record(s) longer than --max-seq-length {max_len} "
            f"truncated ({dropped} dropped: no completion left)",
            flush=True,
        )
    return examples


def load_data(
    data: str, tokenizer: TokenizerWrapper, pad: int, cfg: TrainConfig
) -> Tuple[List[Example], List[Example]]:
    folder = Path(data).expanduser()
    if not folder.is_dir():
        raise PipoError(
            f"data folder {folder} not found; it should hold train.jsonl and, "
            "optionally, valid.jsonl"
        )
    train = load_dataset(folder / "train.jsonl", tokenizer, pad, cfg.max_seq_length, cfg.too_long)
    valid = []
    if (folder / "valid.jsonl").exists():
        valid = load_dataset(
            folder / "valid.jsonl", tokenizer, pad, cfg.max_seq_length, cfg.too_long
        )
    else:
        print(f"[INFO] no {folder / 'valid.jsonl'}: training without validation", flush=True)
    return train, valid


def _collate(
    rows: List[Tuple[np.ndarray, np.ndarray]], pad: int, max_len: int
) -> Tuple[mx.array, mx.array, int]:
    """Right-pad to a common even length; causal attention keeps padding out of real positions."""
    rows = [(i[:max_len], l[:max_len]) for i, l in rows]
    T = max(len(i) for i, _ in rows)
    ids = np.full((len(rows), T), pad, np.int32)
    labels = np.full((len(rows), T), IGNORE, np.int32)
    for r, (i, l) in enumerate(rows):
        ids[r, : len(i)], labels[r, : len(l)] = i, l
    return mx.array(ids), mx.array(labels), sum(len(i) for i, _ in rows)


def train_batch(
    examples: List[Example], micro_step: int, cfg: TrainConfig, pad: int
) -> Tuple[mx.array, mx.array, int]:
    """Micro-batch number `micro_step` (0-based): a pure function of the seed and the step.

    Epoch e visits the examples in permutation(seed, e); sequence position
    p = micro_step * batch_size + j falls in epoch p // N.
    """
    n = len(examples)
    rng = np.random.default_rng([cfg.seed, 0, micro_step])
    ratio = rng.uniform(0.0, cfg.max_pad_ratio)
    rows = []
    for p in range(micro_step * cfg.batch_size, (micro_step + 1) * cfg.batch_size):
        order = _epoch_order(cfg.seed, p // n, n)
        rows.append(pair_layout(examples[order[p % n]], pad, ratio, rng))
    return _collate(rows, pad, cfg.max_seq_length)


@lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 1, epoch]).permutation(n)


def valid_batches(
    examples: List[Example], cfg: TrainConfig, pad: int
) -> Iterator[Tuple[mx.array, mx.array, int]]:
    """The validation set in file order, without PAD augmentation."""
    count = math.ceil(len(examples) / cfg.batch_size)
    if cfg.val_batches != -1:
        count = min(count, cfg.val_batches)
    for b in range(count):
        chunk = examples[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        yield _collate([pair_layout(e, pad) for e in chunk], pad, cfg.max_seq_length)


# -- what trains ---------------------------------------------------------------


def setup_trainable(model: Model, cfg: TrainConfig) -> Dict[str, mx.Dtype]:
    """Freeze the model, then open the heads and add LoRA (PIPO_SPEC.md section 5).

    Trainable: compressor, MTP head and confidence head in full; with LoRA, the
    MTP layer's projections and the backbone's LORA_KEYS get adapters instead of
    full updates. Returns the original dtype of each fully trained weight: they
    train as float32 master copies (a bfloat16 weight would swallow small Adam
    steps) and are cast back when fusing.
    """
    if any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()
    ):
        raise PipoError(
            f"{cfg.model} is quantized; the PIPO heads train in full precision. Convert the "
            "model without -q, train it, then quantize the fused folder"
        )
    model.freeze()
    for head in (model.compressor, model.mtp, model.confidence_head):
        head.unfreeze()
    if cfg.lora:
        lora = {
            "rank": cfg.lora_rank,
            "scale": cfg.lora_alpha / cfg.lora_rank,
            "dropout": 0.0,
            "keys": set(LORA_KEYS),
        }
        linear_to_lora_layers(model, len(model.layers), lora)
        linear_to_lora_layers(model.mtp, len(model.mtp.layers), lora)
        for _, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.linear.freeze()  # the MTP layer's base weights were unfrozen above
    dtypes = {k: v.dtype for k, v in tree_flatten(model.trainable_parameters())}
    model.update(tree_map(lambda p: p.astype(mx.float32), model.trainable_parameters()))
    return dtypes


def fuse_model(model: Model, dtypes: Dict[str, mx.Dtype]) -> Model:
    """Fold LoRA into the base weights and restore the heads' checkpoint dtypes."""
    fused = [(name, m.fuse()) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    params = dict(tree_flatten(model.parameters()))
    model.update(
        tree_unflatten([(k, params[k].astype(d)) for k, d in dtypes.items() if k in params])
    )
    return model


@contextmanager
def _grad_checkpointing(model: Model, enabled: bool) -> Iterator[None]:
    """mlx-lm's per-layer recomputation (backbone and MTP layers share the class),
    undone afterwards because it patches the class, not the instance."""
    layer_type = type(model.layers[0])
    original = layer_type.__call__
    if enabled:
        grad_checkpoint(model.layers[0])
    try:
        yield
    finally:
        layer_type.__call__ = original


# -- losses --------------------------------------------------------------------


def _graph_free(x: mx.array) -> mx.array:
    """A copy of `x` with no graph behind it.

    Inside a function being differentiated MLX keeps every evaluated array's
    graph alive; arrays computed from a graph-free copy are freed as soon as
    they go out of scope, which is what lets chunked_cross_entropy drop each
    chunk's logits.
    """
    return mx.array(np.array(x.astype(mx.float32))).astype(x.dtype)


def chunked_cross_entropy(
    head: Callable[[mx.array], mx.array], x: mx.array, targets: mx.array, chunk_size: int
) -> Tuple[float, mx.array, np.ndarray, np.ndarray, int]:
    """Mean cross-entropy of head(x) over the positions whose target is not IGNORE.

    Computed `chunk_size` positions at a time, so at most one chunk's logits
    exist. Returns (mean, d mean / d x as a graph-free array shaped like x,
    per-position CE and argmax-hit as NumPy arrays shaped like targets (0 where
    ignored), number of counted positions).
    """
    shape = x.shape
    flat = _graph_free(x.reshape(-1, shape[-1]))
    t = np.array(targets).reshape(-1)
    rows = np.flatnonzero(t != IGNORE)
    count = max(len(rows), 1)

    def chunk_loss(xc: mx.array, tc: mx.array):
        logits = head(xc).astype(mx.float32)
        ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        return ce.sum() / count, (ce, mx.argmax(logits, axis=-1) == tc)

    loss_and_grad = mx.value_and_grad(chunk_loss)
    ce = np.zeros(t.shape, np.float32)
    hit = np.zeros(t.shape, bool)
    grad = np.zeros(flat.shape, np.float32)
    for s in range(0, len(rows), chunk_size):
        r = rows[s : s + chunk_size]
        (_, (c, h)), g = loss_and_grad(flat[mx.array(r)], mx.array(t[r]))
        # NumPy copies: see _graph_free.
        ce[r], hit[r], grad[r] = np.array(c), np.array(h), np.array(g.astype(mx.float32))
    return (
        float(ce.sum() / count),
        mx.array(grad).reshape(shape),
        ce.reshape(targets.shape),
        hit.reshape(targets.shape),
        len(rows),
    )


def _with_grad(value: float, x: mx.array, grad: mx.array) -> mx.array:
    """`value`, whose gradient with respect to x is `grad`: the added term is zero."""
    return value + ((x - mx.stop_gradient(x)) * grad).sum()


def pipo_losses(
    model: Model, ids: mx.array, labels: mx.array, chunk_size: int
) -> Tuple[Dict[str, mx.array], Dict[str, float]]:
    """The three PIPO losses for one batch, and sums for the reports.

    lm:   CE of LM-head(h[:, :-1]) against labels[:, 2::2] (token1)
    mtp:  CE of LM-head(m) against labels[:, 3::2] (token2), m = MTP(embed(ids[:, 2::2]), h[:, :-1])
    conf: BCE of conf(sg(h[:, :-1]), sg(m)) against sg(p_mtp(true token2))
    Each is a mean over the positions whose label is not IGNORE.
    """
    # The heads may be float32 master weights (setup_trainable); the backbone
    # keeps its own dtype.
    x = model.compress(ids).astype(model.model.embed_tokens.weight.dtype)
    h = model.model(None, input_embeddings=x)[:, :-1]
    m = model.draft(ids[:, 2::2], h)
    mx.eval(h, m)
    lm, g_h, _, hit1, n1 = chunked_cross_entropy(model.lm_logits, h, labels[:, 2::2], chunk_size)
    mtp, g_m, ce2, hit2, n2 = chunked_cross_entropy(model.lm_logits, m, labels[:, 3::2], chunk_size)

    z = model.confidence(mx.stop_gradient(h), mx.stop_gradient(m))
    valid = np.array(labels[:, 3::2]) != IGNORE
    target = np.where(valid, np.exp(-ce2), 0.0).astype(np.float32)  # p_mtp(true token2)
    bce = (mx.logaddexp(0.0, z) - mx.array(target) * z) * mx.array(valid)
    conf = bce.sum() / max(n2, 1)

    p = np.array(mx.sigmoid(z.astype(mx.float32)))[valid]
    stats = {
        "n1": n1,
        "lm": lm * n1,
        "hit1": float(hit1.sum()),
        "n2": n2,
        "mtp": mtp * n2,
        "hit2": float(hit2.sum()),
        "conf": conf.item() * n2,
        "pred": float(p.sum()),
        "target": float(target.sum()),
    }
    for tau in KEEP_THRESHOLDS:
        kept = p >= tau
        stats[f"keep{tau}"] = float(kept.sum())
        stats[f"kepthit{tau}"] = float((kept & hit2[valid]).sum())
    return {"lm": _with_grad(lm, h, g_h), "mtp": _with_grad(mtp, m, g_m), "conf": conf}, stats


class Meter:
    """Sums of pipo_losses stats over batches, reported as means."""

    def __init__(self) -> None:
        self.sums: Dict[str, float] = {}

    def add(self, stats: Dict[str, float]) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self) -> Dict[str, float]:
        s = self.sums
        n1, n2 = max(s.get("n1", 0), 1), max(s.get("n2", 0), 1)
        out = {
            "lm": s["lm"] / n1,
            "mtp": s["mtp"] / n2,
            "conf": s["conf"] / n2,
            "acc1": s["hit1"] / n1,
            "acc2": s["hit2"] / n2,
            "pred": s["pred"] / n2,
            "target": s["target"] / n2,
        }
        for tau in KEEP_THRESHOLDS:
            out[f"keep{tau}"] = s[f"keep{tau}"] / n2
            out[f"keptacc{tau}"] = s[f"kepthit{tau}"] / max(s[f"keep{tau}"], 1)
        return out

    def line(self, weights: Tuple[float, float]) -> str:
        m = self.means()
        keep = "/".join(f"{m[f'keep{t}']:.2f}" for t in KEEP_THRESHOLDS)
        kept = "/".join(f"{m[f'keptacc{t}']:.2f}" for t in KEEP_THRESHOLDS)
        total = m["lm"] + weights[0] * m["mtp"] + weights[1] * m["conf"]
        return (
            f"loss {total:.3f} (lm {m['lm']:.3f}, mtp {m['mtp']:.3f}, conf {m['conf']:.3f}) | "
            f"acc tok1 {m['acc1']:.3f} tok2 {m['acc2']:.3f} | "
            f"conf pred {m['pred']:.3f} vs target {m['target']:.3f} | "
            f"keep@{'/'.join(str(t) for t in KEEP_THRESHOLDS)} {keep} (tok2 acc {kept})"
        )


def evaluate(
    model: Model, batches: Iterator[Tuple[mx.array, mx.array, int]], chunk_size: int
) -> Meter:
    model.eval()
    meter = Meter()
    for ids, labels, _ in batches:
        meter.add(pipo_losses(model, ids, labels, chunk_size)[1])
    model.train()
    return meter


# -- optimizer and schedule ----------------------------------------------------


def learning_rate(cfg: TrainConfig) -> Callable[[mx.array], mx.array]:
    """Linear warmup, then cosine decay to min_lr_ratio * learning_rate at `iters`."""
    lr, low = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup = min(cfg.warmup, cfg.iters)

    def schedule(step: mx.array) -> mx.array:
        step = step.astype(mx.float32)
        warm = lr * (step + 1) / max(warmup, 1)
        progress = mx.clip((step - warmup) / max(cfg.iters - warmup, 1), 0.0, 1.0)
        cosine = low + 0.5 * (lr - low) * (1.0 + mx.cos(math.pi * progress))
        return mx.where(step < warmup, warm, cosine)

    return schedule


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    lr = learning_rate(cfg)
    if cfg.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    if cfg.optimizer == "lion":
        return optim.Lion(learning_rate=lr, weight_decay=cfg.weight_decay)
    return optim.SGD(learning_rate=lr, momentum=0.9, weight_decay=cfg.weight_decay)


# -- run folder and checkpoints ------------------------------------------------


def _our_entries(out: Path) -> List[Path]:
    return [
        p
        for p in out.iterdir()
        if p.name in (RUN_FILE, POINTER_FILE, "fused")
        or p.name.startswith(("step-", ".step-", f".{POINTER_FILE}", f".{RUN_FILE}", ".fused"))
    ]


def check_output(cfg: TrainConfig) -> None:
    """Refuse to overwrite another run; on --resume, refuse changed settings. Writes nothing."""
    out = Path(cfg.adapter_path).expanduser()
    if out.exists() and not out.is_dir():
        raise PipoError(f"--adapter-path {out} is a file; pass a folder")
    run = out / RUN_FILE
    if cfg.resume:
        if not run.is_file():
            raise PipoError(
                f"--resume: {out} holds no training run ({RUN_FILE} missing); "
                "drop --resume to start one"
            )
        saved = read_json(run, "a train_heads.py output folder")
        for key, value in cfg.identity().items():
            if saved.get(key) != value:
                raise PipoError(
                    f"--resume: the run in {out} used {key}={saved.get(key)!r}, not {value!r}; "
                    "pass the same value, or --force to start over"
                )
    elif out.is_dir() and any(out.iterdir()) and not cfg.force:
        what = "a training run" if run.exists() else "other files"
        raise PipoError(
            f"{out} already holds {what}; pass --resume to continue it, --force to start "
            "over (its checkpoints are deleted), or choose another --adapter-path"
        )


def start_output(cfg: TrainConfig) -> Path:
    out = Path(cfg.adapter_path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for p in _our_entries(out):
        # --force discards the old run; any run drops what a killed one left half-written.
        if cfg.force or p.name.startswith("."):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    write_json_atomic(out / RUN_FILE, {**cfg.identity(), "iters": cfg.iters})
    return out


def save_checkpoint(out: Path, step: int, model: Model, optimizer: optim.Optimizer) -> None:
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


def restore_checkpoint(out: Path, model: Model, optimizer: optim.Optimizer) -> int:
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


@contextmanager
def _stop_on_ctrl_c() -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C asks the loop to checkpoint and stop after the current step;
    a second one stops at once."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def handler(signum, frame):
        requested.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(
            "\n[INFO] Ctrl-C: saving a checkpoint after this step (press again to quit now)",
            flush=True,
        )

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


# -- the training loop ---------------------------------------------------------


def train(cfg: TrainConfig) -> Model:
    """Train the PIPO heads as `cfg` says; returns the trained model (with LoRA layers,
    or fused when cfg.fuse)."""
    cfg.check()
    check_output(cfg)
    model, tokenizer = load(cfg.model)
    pad = model.args.pad_token_id
    train_set, valid_set = load_data(cfg.data, tokenizer, pad, cfg)
    mx.random.seed(cfg.seed)  # LoRA's initial A matrices
    dtypes = setup_trainable(model, cfg)
    optimizer = make_optimizer(cfg)
    out = start_output(cfg)
    step = restore_checkpoint(out, model, optimizer) if cfg.resume else 0

    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_all = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(
        f"[INFO] {len(train_set)} train / {len(valid_set)} valid records; trainable "
        f"{n_train / 1e6:.3f}M of {n_all / 1e6:.3f}M parameters "
        f"({'LoRA r=%d + heads' % cfg.lora_rank if cfg.lora else 'heads only'})",
        flush=True,
    )
    if step:
        print(f"[INFO] resumed from step {step} in {out}", flush=True)

    weights = (cfg.mtp_loss_weight, cfg.conf_loss_weight)

    def loss_fn(ids: mx.array, labels: mx.array):
        terms, stats = pipo_losses(model, ids, labels, cfg.ce_chunk_size)
        return terms["lm"] + weights[0] * terms["mtp"] + weights[1] * terms["conf"], stats

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def validate(at: int) -> None:
        if valid_set:
            meter = evaluate(model, valid_batches(valid_set, cfg, pad), cfg.ce_chunk_size)
            print(f"[val] step {at}: {meter.line(weights)}", flush=True)

    model.train()
    meter, tokens, elapsed = Meter(), 0, 0.0
    with _grad_checkpointing(model, cfg.grad_checkpoint), _stop_on_ctrl_c() as stop_requested:
        if step == 0:
            validate(0)
        start, total_elapsed = step, 0.0
        while step < cfg.iters:
            tic = time.perf_counter()
            grads = None
            for j in range(cfg.grad_accumulation):
                ids, labels, n = train_batch(train_set, step * cfg.grad_accumulation + j, cfg, pad)
                (_, stats), g = loss_and_grad(ids, labels)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                mx.eval(grads)
                meter.add(stats)
                tokens += n
            if cfg.grad_accumulation > 1:
                grads = tree_map(lambda g: g / cfg.grad_accumulation, grads)
            if cfg.grad_clip > 0:
                grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state)
            step += 1
            dt = time.perf_counter() - tic
            elapsed += dt
            total_elapsed += dt

            if step % cfg.steps_per_report == 0 or step == cfg.iters:
                eta = total_elapsed / (step - start) * (cfg.iters - step)
                # The optimizer holds the rate of its latest update.
                lr = optimizer.learning_rate.item()
                print(
                    f"[train] step {step}/{cfg.iters} | {meter.line(weights)} | lr {lr:.2e} | "
                    f"{tokens / elapsed:.0f} tok/s | peak {mx.get_peak_memory() / 1e9:.2f} GB | "
                    f"ETA {_clock(eta)}",
                    flush=True,
                )
                meter, tokens, elapsed = Meter(), 0, 0.0
            if step % cfg.val_every == 0 or step == cfg.iters:
                validate(step)
            if step % cfg.save_every == 0 or step == cfg.iters or stop_requested():
                save_checkpoint(out, step, model, optimizer)
            if stop_requested():
                print(f"[INFO] saved step {step} in {out}; continue with --resume", flush=True)
                raise KeyboardInterrupt
    print(f"[INFO] step {step}: checkpoint in {out / f'step-{step:07d}'}", flush=True)
    if cfg.fuse:
        dst = out / "fused"
        src = Path(cfg.model).expanduser()
        save_folder(
            dst, fuse_model(model, dtypes), read_json(src / "config.json", "a model folder"), src
        )
        print(f"[INFO] fused model in {dst}", flush=True)
    return model


__all__ = [
    "IGNORE",
    "LORA_KEYS",
    "Example",
    "Meter",
    "TrainConfig",
    "chunked_cross_entropy",
    "evaluate",
    "fuse_model",
    "load_data",
    "load_dataset",
    "pair_layout",
    "pipo_losses",
    "restore_checkpoint",
    "save_checkpoint",
    "setup_trainable",
    "train",
    "train_batch",
]
