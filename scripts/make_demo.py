"""Build the shipped demo models from scratch: one command, resumable.

    python scripts/make_demo.py      # everything: 113 minutes from a clean clone on 2 CPU cores

Stages, each skipped when its output exists (delete a folder under --work to
redo it; an interrupted pretraining run resumes from its last checkpoint):

  1. tokenizer   byte-level BPE trained on the train split of the stdlib corpus
  2. tokens      train/valid token streams (the test split is never read here)
  3. pretrain    a small Qwen3.5 (hybrid linear/full attention) from scratch,
                 for a wall-clock budget; the learning rate anneals with the
                 fraction of the budget spent, so any machine ends annealed
  4. hf          the pretrained model in the Hugging Face layout, with an MTP
                 head seeded from its last full-attention layer
  5. convert     `convert.py` adds fresh PIPO heads; the backbone's logits are
                 checked against the pretrained model's; the base is also
                 written as an mlx-lm folder, the teacher of the next stages
  6. prompts     train/valid prompts: the opening lines of stdlib chunks
  7. sft         `train_heads.py --teacher base --soft-targets`: the base
                 answers the prompts, and the heads and LoRA learn the base's
                 whole distribution at every slot of those answers
  8. opd         `train_heads.py --stage opd --teacher base`: on-policy
                 distillation toward the base (docs/design.md §7), then fused
  9. ship        8-bit copies of the base model (an mlx-lm folder) and the
                 PIPO model into --out
 10. calibrate   `pipo_mlx.calibrate` of the shipped pair on valid-split
                 function starts stores the fastest threshold within 5% of
                 keep-none's quality, and the measured draft cost, in the
                 model's config (the test split is never used here)

Why a script and not a package module: it is run once per release, drives the
repository's CLIs as a user would, and its only reusable piece (the corpus
split, which the evaluation also needs) lives in `pipo_mlx.corpus`.
"""

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from pipo_mlx.backbones.qwen3_5 import fast_training
from pipo_mlx.corpus import read_split
from pipo_mlx.model_io import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
# Quantization groups of 64: the largest MLX size that divides the hidden size 192
# (layers whose input it does not divide stay unquantized).
GROUP = 64
PAD, EOS = "<|pad|>", "<|endoftext|>"
HF_NORMS = (  # Qwen3.5 norms stored as w with output normalize(x) * (1 + w)
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    "model.norm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def atomic_save(path: Path, arrays: Dict[str, mx.array], metadata: Dict[str, str] = None) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
    os.replace(tmp, path)


# -- 1, 2: tokenizer and token streams -------------------------------------------


def train_tokenizer(dst: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # GPT-2-style byte-level pre-tokenization keeps runs of spaces together,
    # so Python indentation becomes a few tokens rather than one per space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((text for _, text in read_split("train")), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=4096
    )
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    wrapped.save_pretrained(tmp)
    os.replace(tmp, dst)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def encode_split(tokenizer, split: str) -> np.ndarray:
    """One stream: each file's tokens followed by EOS, files in path order."""
    ids: List[int] = []
    for _, text in read_split(split):
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        ids.append(tokenizer.eos_token_id)
    return np.array(ids, dtype=np.uint16)


# -- 3: pretraining --------------------------------------------------------------


def model_config(args: argparse.Namespace, tokenizer) -> dict:
    """The Hugging Face Qwen3.5 text config of the demo model."""
    n, every = args.layers, args.full_attention_interval
    return {
        "architectures": ["Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_text",
        "vocab_size": len(tokenizer),
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": n,
        "layer_types": [
            "full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)
        ],
        "full_attention_interval": every,
        "num_attention_heads": args.hidden_size // 64,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 64,
        "linear_value_head_dim": 64,
        "linear_conv_kernel_dim": 4,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        "tie_word_embeddings": True,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "dtype": "float32",
    }


def build_model(config: dict) -> nn.Module:
    from mlx_lm.models.qwen3_5 import TextModel, TextModelArgs

    return TextModel(TextModelArgs.from_dict(config))


def batch_at(stream: np.ndarray, step: int, seed: int, batch: int, seq: int) -> mx.array:
    """Random windows of seq + 1 tokens; a pure function of (seed, step) so a
    resumed run sees exactly the batches the interrupted one would have."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - seq - 1, size=batch)
    return mx.array(np.stack([stream[s : s + seq + 1] for s in starts]).astype(np.int32))


def lm_loss(model: nn.Module, ids: mx.array) -> mx.array:
    return nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).mean()


def evaluate(model: nn.Module, stream: np.ndarray, batch: int, seq: int, batches: int) -> float:
    # The model stays in training mode (it has no dropout), which keeps the fast
    # chunked recurrence; eval mode would take mlx-lm's per-step loop on a CPU.
    # Fixed, evenly spaced windows: the same validation set at every call.
    starts = np.linspace(0, len(stream) - seq - 1, batch * batches).astype(int)
    total = 0.0
    for i in range(batches):
        ids = mx.array(np.stack([stream[s : s + seq + 1] for s in starts[i * batch : (i + 1) * batch]]).astype(np.int32))
        total += lm_loss(model, ids).item()
    return total / batches


def learning_rate(args: argparse.Namespace, step: int, elapsed: float) -> float:
    if step < args.warmup:
        return args.learning_rate * (step + 1) / args.warmup
    progress = min(1.0, elapsed / (60 * args.pretrain_minutes))
    floor = 0.1 * args.learning_rate
    return floor + 0.5 * (args.learning_rate - floor) * (1 + math.cos(math.pi * progress))


def pretrain(args: argparse.Namespace, work: Path, config: dict) -> None:
    out = work / "pretrain"
    out.mkdir(parents=True, exist_ok=True)
    train = np.load(work / "tokens" / "train.npy")
    valid = np.load(work / "tokens" / "valid.npy")
    mx.random.seed(args.seed)
    model = build_model(config)
    optimizer = optim.AdamW(learning_rate=args.learning_rate, betas=[0.9, 0.95], weight_decay=0.1)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))

    state_file = out / "state.json"
    state = {"step": 0, "elapsed": 0.0, "history": []}
    if state_file.exists():
        state = json.loads(state_file.read_text())
        model.load_weights(str(out / "model.safetensors"))
        optimizer.init(model.trainable_parameters())
        optimizer.state = tree_unflatten(list(mx.load(str(out / "optimizer.safetensors")).items()))
        log(f"resuming pretraining at step {state['step']} ({state['elapsed'] / 60:.1f} min done)")
    log(
        f"pretraining {n_params / 1e6:.2f}M parameters on {len(train) / 1e6:.2f}M train tokens "
        f"for {args.pretrain_minutes} min (batch {args.batch_size} x {args.seq_len})"
    )

    def save() -> None:
        atomic_save(out / "model.safetensors", dict(tree_flatten(model.parameters())))
        atomic_save(out / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
        write_json_atomic(state_file, state)  # last: it points at a complete pair

    model.train()
    loss_and_grad = nn.value_and_grad(model, lm_loss)
    budget = 60 * args.pretrain_minutes
    step, elapsed = state["step"], state["elapsed"]
    last_save = last_val = time.time()
    window_tokens, window_start, smooth = 0, time.time(), None
    with fast_training(model):
        while elapsed < budget and (args.max_steps <= 0 or step < args.max_steps):
            t0 = time.time()
            optimizer.learning_rate = learning_rate(args, step, elapsed)
            ids = batch_at(train, step, args.seed, args.batch_size, args.seq_len)
            loss, grads = loss_and_grad(model, ids)
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            optimizer.update(model, grads)
            mx.eval(loss, model.parameters(), optimizer.state)
            step += 1
            elapsed += time.time() - t0
            loss = loss.item()
            smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
            window_tokens += ids.size - ids.shape[0]
            if step % args.report_every == 0:
                rate = window_tokens / (time.time() - window_start)
                log(
                    f"step {step:5d}  loss {smooth:.3f}  lr {optimizer.learning_rate.item():.2e}  "
                    f"{rate:6.0f} tok/s  {elapsed / 60:5.1f}/{args.pretrain_minutes} min  "
                    f"ETA {max(0.0, budget - elapsed) / 60:4.1f} min"
                )
                state["history"].append({"step": step, "minutes": round(elapsed / 60, 2), "train_loss": round(smooth, 4)})
                window_tokens, window_start = 0, time.time()
            if time.time() - last_val > 60 * args.val_minutes:
                val = evaluate(model, valid, args.batch_size, args.seq_len, args.val_batches)
                log(f"step {step:5d}  valid loss {val:.3f}  (ppl {math.exp(val):.1f})")
                state["history"].append({"step": step, "minutes": round(elapsed / 60, 2), "valid_loss": round(val, 4)})
                last_val = time.time()
            if time.time() - last_save > 60 * args.save_minutes:
                state.update(step=step, elapsed=elapsed)
                save()
                last_save = time.time()
    val = evaluate(model, valid, args.batch_size, args.seq_len, args.val_batches)
    log(f"pretraining done: {step} steps, {elapsed / 60:.1f} min, valid loss {val:.3f} (ppl {math.exp(val):.1f})")
    state.update(step=step, elapsed=elapsed, done=True, final_valid_loss=round(val, 4))
    state["history"].append({"step": step, "minutes": round(elapsed / 60, 2), "valid_loss": round(val, 4)})
    save()


# -- 4, 5: Hugging Face layout and conversion --------------------------------------


def to_hf(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """MLX Qwen3.5 text weights -> HF names and conventions (what mlx-lm's
    sanitize undoes): norms back to (1 + w), conv1d to [C, 1, K]."""
    out = {}
    for key, value in weights.items():
        if key.endswith(HF_NORMS):
            value = value - 1.0
        elif "conv1d.weight" in key:
            value = value.swapaxes(1, 2)
        out[key] = value
    return out


def seed_mtp(weights: Dict[str, mx.array], config: dict) -> Dict[str, mx.array]:
    """HF-layout `mtp.*` weights for a model pretrained without an MTP head.

    Real Qwen3.5 checkpoints ship a trained MTP head, the natural start for
    PIPO's (docs/design.md §2); ours has none. The closest thing we have
    is the backbone's last full-attention layer: the MTP layer starts as a copy
    of it, fed with the sum of the normalized token1 embedding and hidden
    state, and its output goes through a copy of the final norm. LoRA and the
    small modules then only have to teach it to look one token further.
    """
    h = config["hidden_size"]
    last_full = max(i for i, t in enumerate(config["layer_types"]) if t == "full_attention")
    prefix = f"model.layers.{last_full}."
    mtp = {
        "mtp." + "layers.0." + k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)
    }
    eye = mx.eye(h)
    mtp["mtp.fc.weight"] = mx.concatenate([eye, eye], axis=1)
    mtp["mtp.pre_fc_norm_embedding.weight"] = mx.zeros((h,))  # HF (1 + w): scale 1
    mtp["mtp.pre_fc_norm_hidden.weight"] = mx.zeros((h,))
    mtp["mtp.norm.weight"] = weights["model.norm.weight"]
    return mtp


def write_hf(work: Path, config: dict) -> None:
    dst = work / "hf"
    tmp = work / ".hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = to_hf(mx.load(str(work / "pretrain" / "model.safetensors")))
    weights.update(seed_mtp(weights, config))
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in (work / "tokenizer").iterdir():
        shutil.copy2(f, tmp / f.name)
    os.replace(tmp, dst)


def check_round_trip(work: Path, config: dict) -> None:
    """The converted PIPO backbone must compute the pretrained model's logits."""
    from pipo_mlx import load

    valid = np.load(work / "tokens" / "valid.npy")
    ids = mx.array(valid[None, :256].astype(np.int32))
    pretrained = build_model(config)
    pretrained.load_weights(str(work / "pretrain" / "model.safetensors"))
    pipo, _ = load(str(work / "pipo-fresh"))
    want = pretrained(ids)
    got = pipo.lm_logits(pipo.model(ids))
    diff = mx.abs(want - got).max().item()
    log(f"round trip pretrained -> HF -> convert.py: max |logit difference| {diff:.2e}")
    if diff > 1e-4:
        sys.exit(f"round trip failed: the converted backbone differs by {diff}")


def run_tool(cmd: List[str]) -> None:
    """Run one of the repository's CLIs. Killed with SIGTERM, the recipe takes the
    tool down with it (a training run left behind would hold the CPU and its run
    folder) and exits non-zero."""
    log("$ " + " ".join(cmd))
    child = subprocess.Popen([sys.executable, *cmd], cwd=REPO)

    def stop(signum: int, _frame) -> None:
        # Raised out of the wait below (waiting here would deadlock on its lock).
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if child.poll() is None:  # SIGTERM or Ctrl-C stopped the wait
            child.terminate()
            child.wait()
    if code:
        raise subprocess.CalledProcessError(code, cmd)


# -- 5b, 6: the teacher and the prompts -------------------------------------------------


def write_base(work: Path) -> None:
    """The pretrained model as an mlx-lm folder (float32): the teacher of stages 7 and 8."""
    from mlx_lm.models.qwen3_5 import Model as MlxLmQwen35, ModelArgs as MlxLmArgs
    from mlx_lm.utils import load_tokenizer

    from pipo_mlx.model_io import save_folder

    hf_config = json.loads((work / "hf" / "config.json").read_text())
    # mlx-lm builds Qwen3.5 from model_type "qwen3_5" (text_config may be flat).
    config = {**hf_config, "model_type": "qwen3_5"}
    base = MlxLmQwen35(MlxLmArgs.from_dict(config))
    base.load_weights(list(base.sanitize(mx.load(str(work / "hf" / "model.safetensors"))).items()))
    save_folder(work / "base", base, config, load_tokenizer(pinned_tokenizer(work)))


def write_prompts(work: Path, tokenizer, prompt_tokens: int, counts: Dict[str, int], seed: int) -> None:
    """train.jsonl / valid.jsonl of {"prompt": ...} records: the opening whole
    lines (about prompt_tokens tokens) of code chunks, sampled across the split."""
    dst = work / "prompts"
    dst.mkdir(parents=True, exist_ok=True)
    for split, count in counts.items():
        openings = []
        for _, text in read_split(split):
            lines = text.splitlines(keepends=True)
            for start in range(0, len(lines), 40):  # one candidate per 40 lines
                chunk, used = [], 0
                for line in lines[start:]:
                    n = len(tokenizer.encode(line, add_special_tokens=False))
                    if chunk and used + n > prompt_tokens:
                        break
                    chunk.append(line)
                    used += n
                if "".join(chunk).strip():
                    openings.append("".join(chunk))
        rng = np.random.default_rng([seed, 5, split == "valid"])
        picked = rng.choice(len(openings), size=min(count, len(openings)), replace=False)
        tmp = dst / f".{split}.jsonl.tmp"
        with open(tmp, "w") as f:
            for i in sorted(picked):
                f.write(json.dumps({"prompt": openings[i]}) + "\n")
        os.replace(tmp, dst / f"{split}.jsonl")
        log(f"prompts: {len(picked)} {split} records of {len(openings)} openings")


def calibrate_shipped(work: Path, out: Path, prompts: int) -> None:
    """The stored threshold and draft cost: pipo_mlx.calibrate of the shipped 8-bit model
    against the shipped base, on function starts of the valid split, at the paper's
    temperature, top-p and top-k (speeds are those of the models users get)."""
    valid = work / "calibration" / "valid.jsonl"
    run_tool(["scripts/demo_prompts.py", "--split", "valid", "--count", str(prompts),
              "--model", str(out / "pipo-stdlib"), "--out", str(valid)])
    run_tool(["-m", "pipo_mlx.calibrate", "--model", str(out / "pipo-stdlib"), "--prompts", str(valid),
              "--max-prompts", str(prompts), "--temp", "1.0", "--top-p", "0.95", "--top-k", "20",
              "--plot", str(work / "calibration" / "curve.png")])


# -- 7: shipping ---------------------------------------------------------------------


def pinned_tokenizer(work: Path) -> Path:
    """The tokenizer files, marked so transformers loads them as they are.

    transformers 5 replaces the tokenizer of any `qwen3_5` model folder (which
    the mlx-lm base folder must be) with its Qwen3.5 class, which rebuilds the
    pre-tokenizer with Qwen's own regex and so splits text differently from
    how our BPE was trained. An `auto_map` naming the generic class it was
    saved with makes AutoTokenizer use that class (no remote code is involved).
    """
    dst = work / "tokenizer-pinned"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(work / "tokenizer", dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, config["tokenizer_class"]]}
    write_json_atomic(dst / "tokenizer_config.json", config)
    return dst


def ship(work: Path, out: Path, q_bits: int) -> None:
    import mlx_lm
    from mlx_lm.utils import load_tokenizer, quantize_model

    from pipo_mlx import load
    from pipo_mlx.model_io import save_folder

    tokenizer = load_tokenizer(pinned_tokenizer(work))
    base, _ = mlx_lm.load(str(work / "base"))
    base_config = json.loads((work / "base" / "config.json").read_text())
    base, base_config = quantize_model(base, base_config, GROUP, q_bits)
    save_folder(out / "base-stdlib", base, base_config, tokenizer)

    fused = work / "opd" / "fused"
    pipo, _ = load(str(fused))
    pipo_config = json.loads((fused / "config.json").read_text())
    # The shipped base beside it, not the intermediate the heads were trained from.
    pipo_config["pipo"]["base_model"] = "../base-stdlib"
    pipo, pipo_config = quantize_model(pipo, pipo_config, GROUP, q_bits)
    save_folder(out / "pipo-stdlib", pipo, pipo_config, tokenizer)
    for name in ("base-stdlib", "pipo-stdlib"):
        size = sum(f.stat().st_size for f in (out / name).iterdir())
        log(f"shipped {out / name}: {size / 1e6:.2f} MB")


# -- the recipe ------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(REPO / "build" / "demo"), help="intermediate files (default build/demo)")
    p.add_argument("--out", default=str(REPO / "models"), help="where the shipped models go (default models/)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("tokenizer and model")
    g.add_argument("--vocab-size", type=int, default=4096)
    g.add_argument("--hidden-size", type=int, default=192)
    g.add_argument("--intermediate-size", type=int, default=512)
    # Deep and narrow: the LM head is a smaller share of each step, which raises
    # the keep-all bound (docs/design.md §5) to about 1.6x.
    g.add_argument("--layers", type=int, default=12)
    g.add_argument("--full-attention-interval", type=int, default=4)
    g = p.add_argument_group("pretraining")
    g.add_argument("--pretrain-minutes", type=float, default=50, help="wall-clock budget (default 50)")
    g.add_argument("--max-steps", type=int, default=0, help="stop earlier after this many steps (0: no limit)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--learning-rate", type=float, default=2e-3)
    g.add_argument("--warmup", type=int, default=30)
    g.add_argument("--report-every", type=int, default=10)
    g.add_argument("--val-minutes", type=float, default=10)
    g.add_argument("--val-batches", type=int, default=4)
    g.add_argument("--save-minutes", type=float, default=5)
    g = p.add_argument_group("PIPO heads (train_heads.py)")
    g.add_argument("--prompt-tokens", type=int, default=48, help="prompt length (default 48)")
    g.add_argument("--train-prompts", type=int, default=1500)
    g.add_argument("--valid-prompts", type=int, default=32)
    g.add_argument("--answer-tokens", type=int, default=128, help="the base's answers (default 128)")
    g.add_argument("--opd-answer-tokens", type=int, default=64, help="the student's rollouts (default 64)")
    # The supervised stage learns the base's whole distribution at each slot of its
    # answers (--soft-targets): far more signal per token than its sampled tokens.
    g.add_argument("--sft-iters", type=int, default=700)
    g.add_argument("--opd-iters", type=int, default=200)
    g.add_argument("--heads-lr", type=float, default=1e-3)
    g.add_argument("--heads-batch-size", type=int, default=8)
    g.add_argument("--opd-batch-size", type=int, default=4)
    # A quarter of the supervised rate: at 1e-3 the rollouts drifted and both KLs rose.
    g.add_argument("--opd-lr", type=float, default=2.5e-4)
    # Both stages' KL: exact over this 4096-token vocabulary, and its α is the smooth 1 - TV.
    g.add_argument("--kl", default="full", choices=["full", "topk"])
    g.add_argument("--lora-rank", type=int, default=64)
    g.add_argument("--threshold-prompts", type=int, default=32, help="valid-split prompts for calibration")
    g.add_argument("--q-bits", type=int, default=8, choices=[4, 8], help="shipped weights' bits (default 8)")
    args = p.parse_args()
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    if not (work / "tokenizer").exists():
        log("training the tokenizer")
        train_tokenizer(work / "tokenizer", args.vocab_size)
    tokenizer = load_tokenizer(work / "tokenizer")
    config = model_config(args, tokenizer)

    if not (work / "tokens").exists():
        tmp = work / ".tokens.tmp"
        tmp.mkdir(exist_ok=True)
        for split in ("train", "valid"):
            np.save(tmp / f"{split}.npy", encode_split(tokenizer, split))
        os.replace(tmp, work / "tokens")
    for split in ("train", "valid"):
        log(f"{split}: {len(np.load(work / 'tokens' / f'{split}.npy')) / 1e6:.2f}M tokens")

    state = work / "pretrain" / "state.json"
    if not (state.exists() and json.loads(state.read_text()).get("done")):
        pretrain(args, work, config)
    if not (work / "hf").exists():
        write_hf(work, config)
        log(f"wrote {work / 'hf'}")
    if not (work / "pipo-fresh").exists():
        run_tool(["convert.py", "--hf-path", str(work / "hf"), "--mlx-path", str(work / "pipo-fresh")])
    check_round_trip(work, config)

    if not (work / "base").exists():
        write_base(work)
    if not (work / "prompts" / "valid.jsonl").exists():
        counts = {"train": args.train_prompts, "valid": args.valid_prompts}
        write_prompts(work, tokenizer, args.prompt_tokens, counts, args.seed)

    common = [
        "--teacher", str(work / "base"), "--data", str(work / "prompts"), "--max-seq-length", str(args.seq_len),
        "--lora-rank", str(args.lora_rank), "--kl", args.kl,
        "--lora-alpha", str(2 * args.lora_rank), "--seed", str(args.seed), "--fuse",
    ]
    if not (work / "sft" / "fused").exists():
        resume = ["--resume"] if (work / "sft" / "train_config.json").exists() else []
        run_tool([
            "train_heads.py", "--model", str(work / "pipo-fresh"), "--adapter-path", str(work / "sft"),
            "--iters", str(args.sft_iters), "--batch-size", str(args.heads_batch_size),
            "--max-new-tokens", str(args.answer_tokens), "--learning-rate", str(args.heads_lr),
            # The base's answers sampled without the presence penalty: the student
            # should learn the base's own distribution, since the penalty is applied
            # to the student's logits again at inference.
            "--presence-penalty", "0", "--soft-targets",
            "--warmup", "30", "--val-every", "100",
            "--save-every", "50", *common, *resume,
        ])
    if not (work / "opd" / "fused").exists():
        resume = ["--resume"] if (work / "opd" / "train_config.json").exists() else []
        run_tool([
            "train_heads.py", "--model", str(work / "sft" / "fused"), "--adapter-path", str(work / "opd"),
            "--stage", "opd", "--iters", str(args.opd_iters), "--batch-size", str(args.opd_batch_size),
            "--max-new-tokens", str(args.opd_answer_tokens), "--learning-rate", str(args.opd_lr),
            "--warmup", "10", "--val-every", "50", "--val-batches", "2", "--save-every", "10",
            "--steps-per-report", "5", *common, *resume,
        ])
    if not (out / "pipo-stdlib" / "calibration.json").exists():
        ship(work, out, args.q_bits)
        calibrate_shipped(work, out, args.threshold_prompts)
    log(f"recipe done in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
