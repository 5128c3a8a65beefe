"""Quality of the shipped PIPO model against its base model, on held-out files.

    python benchmarks/eval_quality.py            # a few minutes on 2 CPU cores

The test split of the stdlib corpus (`pipo_mlx.corpus`) was never seen by the
tokenizer, pretraining, head training or any tuning. Its files are tokenized,
joined with EOS and cut into windows of --seq-len tokens. On each window:

* base: next-token accuracy (greedy) and perplexity over every position;
* PIPO, teacher-forced: token1 (the backbone's prediction of t[2i+2] from the
  pairs up to i) and token2 (the MTP head's prediction of t[2i+3] given the true
  token1). Both predict the same targets the base model predicts at positions
  2i+1 and 2i+2, from the same context, so the base accuracy is their yardstick;
* at each threshold: keep rate (c >= threshold), accuracy of the kept token2s,
  tokens per backbone step (1 + keep rate), and the confidence head's expected
  calibration error (ECE, 10 equal-width bins) against whether the greedy
  token2 is right;
* greedy completions of prompts cut from the test files (up to and including a
  `def` line), 64 tokens by base and by PIPO at each threshold in --gen-thresholds:
  positional agreement, common prefix length, and the measured tokens per
  decode step.

Prints a table, writes JSON and a reliability plot (needs matplotlib).

Only a full run (every setting that changes the figures at its default) writes
to benchmarks/results/, the files the README quotes; any other run writes to
build/bench/ unless --out says where.
"""

import argparse
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from pipo_mlx.backbones.qwen3_5 import fast_training
from pipo_mlx.corpus import read_split
from pipo_mlx.model_io import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"  # committed: the README quotes these files
SCRATCH = REPO / "build" / "bench"  # git-ignored: smoke and partial runs
THRESHOLDS = (0.5, 0.8, 0.95)
ECE_BINS = 10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def test_windows(tokenizer, seq_len: int, max_windows: int) -> np.ndarray:
    ids: List[int] = []
    for _, text in read_split("test"):
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    windows = np.array(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    if 0 < max_windows < n:
        # Evenly spaced, so a capped run still covers every test file's region.
        windows = windows[np.linspace(0, n - 1, max_windows).astype(int)]
    return windows


def base_pass(model: nn.Module, windows: np.ndarray, batch: int) -> Dict[str, np.ndarray]:
    correct, nll = [], []
    for i in range(0, len(windows), batch):
        ids = mx.array(windows[i : i + batch])
        logits = model(ids[:, :-1]).astype(mx.float32)
        targets = ids[:, 1:]
        nll.append(np.array(nn.losses.cross_entropy(logits, targets)))
        correct.append(np.array(logits.argmax(-1) == targets))
    return {"correct": np.concatenate(correct), "nll": np.concatenate(nll)}


def pipo_pass(model: nn.Module, windows: np.ndarray, batch: int) -> Dict[str, np.ndarray]:
    out = {k: [] for k in ("tok1", "tok2", "conf", "p_true")}
    for i in range(0, len(windows), batch):
        ids = mx.array(windows[i : i + batch])
        o = model(ids)
        logits, mtp_logits = o.logits[:, :-1].astype(mx.float32), o.mtp_logits.astype(mx.float32)
        t1, t2 = ids[:, 2::2], ids[:, 3::2]
        out["tok1"].append(np.array(logits.argmax(-1) == t1))
        out["tok2"].append(np.array(mtp_logits.argmax(-1) == t2))
        out["conf"].append(np.array(mx.sigmoid(o.confidence.astype(mx.float32))))
        logp = mtp_logits - mx.logsumexp(mtp_logits, axis=-1, keepdims=True)
        out["p_true"].append(np.array(mx.exp(mx.take_along_axis(logp, t2[..., None], -1).squeeze(-1))))
    return {k: np.concatenate(v) for k, v in out.items()}


def calibration(conf: np.ndarray, outcome: np.ndarray) -> Tuple[float, List[dict]]:
    """ECE and the per-bin table behind the reliability plot."""
    edges = np.linspace(0, 1, ECE_BINS + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, ECE_BINS - 1)
    ece, bins = 0.0, []
    for b in range(ECE_BINS):
        sel = which == b
        if not sel.any():
            continue
        c, o = float(conf[sel].mean()), float(outcome[sel].mean())
        ece += sel.mean() * abs(c - o)
        bins.append({"lo": edges[b], "hi": edges[b + 1], "n": int(sel.sum()), "confidence": c, "accuracy": o})
    return float(ece), bins


def find_prompts(tokenizer, count: int, max_prompt: int) -> List[Tuple[str, List[int]]]:
    """Up to the first `def ...:` of each test file (a few lines of context before it)."""
    prompts = []
    for rel, text in read_split("test"):
        lines = text.splitlines(keepends=True)
        for j, line in enumerate(lines):
            if line.lstrip().startswith("def ") and line.rstrip().endswith(":"):
                # Ending on the colon, not the newline: the tokenizer merges a
                # newline with the next line's indentation, so a bare newline
                # token would tell the model the next line is not indented.
                text = "".join(lines[max(0, j - 8) : j + 1]).rstrip()
                ids = tokenizer.encode(text, add_special_tokens=False)
                prompts.append((rel, ids[-max_prompt:]))
                break
        if len(prompts) == count:
            break
    return prompts


def base_greedy(model: nn.Module, prompt: List[int], n: int, eos: set) -> List[int]:
    from mlx_lm.generate import generate_step

    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=n):
        token = int(token)
        out.append(token)
        if token in eos:
            break
    return out


def pipo_greedy(model: nn.Module, prompt: List[int], n: int, eos: set, threshold: float) -> Tuple[List[int], int]:
    from pipo_mlx.decode import generate_step

    out, steps = [], 0
    for token, _, is_token2 in generate_step(prompt, model, eos_token_ids=eos, max_tokens=n, conf_threshold=threshold):
        out.append(int(token))
        steps += not is_token2
    return out, steps


def agreement(a: List[int], b: List[int], n: int) -> Tuple[float, int]:
    a, b = a[:n], b[:n]
    same = sum(x == y for x, y in zip(a, b))
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), len(b), 1), prefix


def shown(path: str) -> str:
    """A path relative to the repository when it is inside it (results get committed)."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def fmt(x: "float | None") -> str:
    return "n/a" if x is None else f"{x:.3f}"


def plot(bins: List[dict], target_bins: List[dict], ece: float, path: Path) -> bool:
    """Write the reliability plot to path; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install matplotlib): no reliability plot")
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label="greedy token2 correct")
    top.plot(
        [b["confidence"] for b in target_bins], [b["accuracy"] for b in target_bins], "s:",
        label="MTP probability of the true token2",
    )
    for t in THRESHOLDS:
        top.axvline(t, color="lightgray", linewidth=0.8)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("observed")
    top.set_title(f"PIPO confidence head, held-out stdlib files (ECE {ece:.3f})", fontsize=10)
    top.legend(loc="upper left", fontsize=8)
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    bottom.bar(centers, [b["n"] for b in bins], width=1 / ECE_BINS * 0.9, color="tab:blue", alpha=0.6)
    bottom.set_xlabel("confidence c = sigmoid(head)")
    bottom.set_ylabel("drafts")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)
    return True


def write_results(out: Path, results: dict, bins: List[dict], target_bins: List[dict], ece: float) -> List[Path]:
    """The JSON and, where matplotlib is installed, the plot; logs (and returns) what was written."""
    written = [out / "eval_quality.json"]
    write_json_atomic(written[0], results)
    png = out / "reliability.png"
    if plot(bins, target_bins, ece, png):
        written.append(png)
    elif png.exists():
        log(f"{png} is left from an earlier run")
    log(f"wrote {' and '.join(map(str, written))}")
    return written


# Settings that change the figures; a run with any of them off its default is not a full run.
FULL_RUN_SETTINGS = ("pipo", "base", "seq_len", "max_windows", "prompts", "gen_tokens", "gen_thresholds")


def is_full_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bool:
    def same(k: str) -> bool:
        value, default = getattr(args, k), parser.get_default(k)
        if k in ("pipo", "base"):
            return Path(value).resolve() == Path(default).resolve()
        return value == default

    return all(same(k) for k in FULL_RUN_SETTINGS)


def parse_args(argv: "List[str] | None" = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipo", default=str(REPO / "models" / "pipo-stdlib"))
    p.add_argument("--base", default=str(REPO / "models" / "base-stdlib"))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=256, help="test windows to score, 0 for all (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--gen-thresholds", type=float, nargs="+", default=[0.95, 1.0])
    p.add_argument(
        "--out",
        help="output folder (default: benchmarks/results for a full run, build/bench for a run "
        "with any of --pipo, --base, --seq-len, --max-windows, --prompts, --gen-tokens, "
        "--gen-thresholds off its default)",
    )
    args = p.parse_args(argv)
    args.full = is_full_run(args, p)
    if args.out is None:
        args.out = str(RESULTS if args.full else SCRATCH)
    return args


def main(argv: "List[str] | None" = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if not args.full and out.resolve() == RESULTS.resolve():
        log(f"not a full run, but --out names {out}: the committed results will be replaced")
    else:
        log(f"results go to {out}" + ("" if args.full else " (not a full run)"))
    out.mkdir(parents=True, exist_ok=True)

    from mlx_lm import load as load_base
    from mlx_lm.utils import dequantize_model

    from pipo_mlx import load as load_pipo

    base, tokenizer = load_base(args.base)
    pipo, pipo_tokenizer = load_pipo(args.pipo)
    # MLX's CPU backend multiplies quantized (and float16) weights about 10x
    # slower than float32 ones. Dequantizing computes with exactly the shipped
    # weight values, so the figures are those of the shipped models.
    if mx.default_device() == mx.cpu:
        base, pipo = dequantize_model(base), dequantize_model(pipo)
    if tokenizer.vocab_size != pipo_tokenizer.vocab_size:
        raise SystemExit("the base and PIPO models use different tokenizers")
    windows = test_windows(tokenizer, args.seq_len, args.max_windows)
    log(f"{len(windows)} test windows of {args.seq_len} tokens")

    # Teacher-forced passes run in training mode (the models have no dropout):
    # it takes the chunked recurrence, which on a CPU is much faster than
    # mlx-lm's inference loop and agrees with it to float32 rounding.
    t0 = time.time()
    base.train(), pipo.train()
    with fast_training(base), fast_training(pipo):
        b = base_pass(base, windows, args.batch_size)
        log(f"base pass {time.time() - t0:.0f} s")
        q = pipo_pass(pipo, windows, args.batch_size)
        log(f"PIPO pass {time.time() - t0:.0f} s")
    base.eval(), pipo.eval()

    results = {
        "models": {"base": shown(args.base), "pipo": shown(args.pipo)},
        "test_tokens": int(windows.size),
        "base": {
            "next_token_accuracy": float(b["correct"].mean()),
            "perplexity": float(math.exp(b["nll"].mean())),
            # The same targets as token1 / token2 (positions 2i+1 and 2i+2).
            "accuracy_at_token1_targets": float(b["correct"][:, 1:-1:2].mean()),
            "accuracy_at_token2_targets": float(b["correct"][:, 2::2].mean()),
        },
        "pipo": {
            "token1_accuracy": float(q["tok1"].mean()),
            "token2_accuracy": float(q["tok2"].mean()),
            "mean_confidence": float(q["conf"].mean()),
            "thresholds": {},
        },
    }
    conf, right = q["conf"].ravel(), q["tok2"].ravel().astype(np.float64)
    ece, bins = calibration(conf, right)
    ece_target, target_bins = calibration(conf, q["p_true"].ravel())
    results["pipo"]["ece"] = ece
    results["pipo"]["ece_vs_mtp_probability"] = ece_target
    results["pipo"]["reliability_bins"] = bins
    for t in THRESHOLDS:
        keep = conf >= t
        results["pipo"]["thresholds"][str(t)] = {
            "keep_rate": float(keep.mean()),
            "kept_token2_accuracy": float(right[keep].mean()) if keep.any() else None,
            "tokens_per_step": float(1 + keep.mean()),
            # ECE among the drafts the gate would keep: is c honest where it matters?
            "ece_of_kept": calibration(conf[keep], right[keep])[0] if keep.any() else None,
        }

    eos = set(tokenizer.eos_token_ids)
    prompts = find_prompts(tokenizer, args.prompts, max_prompt=192)
    gen: Dict[str, dict] = {}
    t0 = time.time()
    base_outs = [base_greedy(base, ids, args.gen_tokens, eos) for _, ids in prompts]
    for t in args.gen_thresholds:
        agree, prefix, tokens, steps, samples = [], [], 0, 0, []
        for (rel, ids), ref in zip(prompts, base_outs):
            toks, n_steps = pipo_greedy(pipo, ids, args.gen_tokens, eos, t)
            a, pre = agreement(ref, toks, args.gen_tokens)
            agree.append(a)
            prefix.append(pre)
            tokens += len(toks)
            steps += n_steps
            samples.append({"file": rel, "base": tokenizer.decode(ref), "pipo": tokenizer.decode(toks)})
        gen[str(t)] = {
            "agreement": float(np.mean(agree)),
            "common_prefix_tokens": float(np.mean(prefix)),
            "tokens_per_step": tokens / max(steps, 1),
            "samples": samples[:3],
        }
    log(f"greedy completions of {len(prompts)} prompts: {time.time() - t0:.0f} s")
    results["greedy"] = {"prompts": len(prompts), "tokens": args.gen_tokens, "by_threshold": gen}

    rows = [
        ("base next-token accuracy", f"{results['base']['next_token_accuracy']:.3f}"),
        ("base perplexity", f"{results['base']['perplexity']:.2f}"),
        ("PIPO token1 accuracy", f"{results['pipo']['token1_accuracy']:.3f}"),
        ("PIPO token2 accuracy", f"{results['pipo']['token2_accuracy']:.3f}"),
        ("confidence ECE (all drafts)", f"{ece:.3f}"),
    ]
    for t, r in results["pipo"]["thresholds"].items():
        rows += [
            (f"@{t}: keep rate", f"{r['keep_rate']:.3f}"),
            (f"@{t}: kept token2 accuracy", fmt(r["kept_token2_accuracy"])),
            (f"@{t}: tokens per step (teacher-forced)", f"{r['tokens_per_step']:.2f}"),
            (f"@{t}: ECE of kept drafts", fmt(r["ece_of_kept"])),
        ]
    for t, r in gen.items():
        rows += [
            (f"greedy @{t}: agreement with base, first {args.gen_tokens}", f"{r['agreement']:.3f}"),
            (f"greedy @{t}: common prefix (tokens)", f"{r['common_prefix_tokens']:.1f}"),
            (f"greedy @{t}: tokens per step (measured)", f"{r['tokens_per_step']:.2f}"),
        ]
    width = max(len(k) for k, _ in rows)
    print(f"\n| {'metric'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v:>5} |")

    write_results(out, results, bins, target_bins, ece)


if __name__ == "__main__":
    main()
