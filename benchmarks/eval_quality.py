"""Quality and speed of the PIPO model against its base model, on held-out files.

    python benchmarks/eval_quality.py                   # test split, about 10 minutes on 2 CPU cores
    python benchmarks/eval_quality.py --split valid     # choose τ on valid ...
    python benchmarks/eval_quality.py --choice-from build/bench/eval_quality.json  # ... report it on test

Held-out text is one split of the stdlib corpus (`pipo_mlx.corpus`, --split,
default test), never seen by the tokenizer, pretraining or head training.

1. Teacher-forced, on windows of --seq-len tokens: the base's next-token
   accuracy and perplexity; PIPO's token1 / token2 accuracy; agreement of the
   distributions, mean 1 - TV(p_pipo, p_base) at temperature 1 for token1 slots
   (t[2i+2]) and token2 slots (t[2i+3]), the base predicting slot p from its
   output at p - 1; per τ the keep rate and the accuracy of kept token2s; the
   confidence ECE against "greedy token2 is right" and against p_mtp(true token).
2. Generation from --prompts function starts (signature and docstring) for
   --gen-tokens new tokens, base (mlx-lm) and PIPO at each --thresholds τ, in two
   modes: "sampled" (the paper's temperature 1.0, top-p 0.95, top-k 20,
   presence penalty 1.5) and "greedy". Each τ drafts at every step; a "default"
   side passes no threshold or drafting option (the model's stored threshold,
   adaptive drafting), as a user runs it. Per τ: keep rate, tokens per step, the
   mean acceptance α = min(1, p_base(y) / p_pipo(y)) of kept token2s y (both
   raw, temperature 1, teacher-forced over the exact generated pair layout).
3. Calibration: the confidence c = sigmoid(head) of each drafted token2 against
   its realized α, 10 bins (keep-all generations; without τ < 0, the kept drafts
   of every τ). ECE = sum over bins of (share of drafts) * |mean c - mean α|.
4. Quality: the share of generated functions that compile (`compiles`) and the
   base's per-token NLL of each side's generated text (nll_ratio: PIPO's text
   over the base's own).
5. Speed: each prompt runs base then every τ, one after the other (order rotated
   per prompt), through mlx-lm's and PIPO's `stream_generate` with the same
   sampler, processors and budget; tokens/s = tokens / wall time of the call
   (prefill and detokenizing included); speedup = median over prompts of the
   paired ratio PIPO / base.
6. Recommended τ: the fastest (sampled speedup) among the τ whose sampled quality
   stays within the noise of the base: compile rate at most COMPILE_MARGIN below
   the base's and NLL ratio at most 1 + NLL_MARGIN. Choose on --split valid; a
   test run picks too, but only for information (use --choice-from).

Writes eval_quality.json, reliability.png and speed_quality.png (plots need
matplotlib). JSON: models, split, settings (sampling, criteria), machine,
test_tokens (held-out tokens scored teacher-forced), base, pipo (step 1),
sampled and greedy ({prompts, tokens, base, by_threshold: {τ: ...}, default}),
calibration, recommended.

Defaults (256 windows of 256 tokens, 32 prompts x 64 new tokens, 5 thresholds,
two modes) take 5-10 minutes on 2 busy CPU cores. Only a full run (every
setting in FULL_RUN_SETTINGS at its default) writes to benchmarks/results/, the
files the docs quote; any other run writes to build/bench/ unless --out says.
"""

import argparse
import ast
import codeop
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from pipo_mlx.backbones.qwen3_5 import fast_training
from pipo_mlx.corpus import read_split
from pipo_mlx.model_io import write_json_atomic
from pipo_mlx.quality import Progress, calibration, fastest_passing, score_generation
from pipo_mlx.quality import acceptance, overlap  # noqa: F401 (this script's figures, tested through it)
from pipo_mlx.quality import teacher_forced as teacher_forced_batch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"  # committed: docs/ quote these files
SCRATCH = REPO / "build" / "bench"  # git-ignored: smoke and partial runs
THRESHOLDS = [-1.0, 0.5, 0.8, 0.9, 0.95]
MAX_PROMPT_TOKENS = 256
PAPER_SAMPLING = {"temp": 1.0, "top_p": 0.95, "top_k": 20, "presence_penalty": 1.5}
PRESENCE_CONTEXT = 20  # tokens the presence penalty looks back over (mlx-lm's default)
# Recommendation criteria, on the sampled (paper-settings) generations; one-sided, so
# a τ better than the base passes. With 32 prompts one function is 3.1 points, so the
# compile criterion there means "no fewer compiling functions than the base".
COMPILE_MARGIN = 0.03  # compile rate may trail the base's by at most 3 points
NLL_MARGIN = 0.05  # base NLL of PIPO's text at most 5% above that of the base's own text
SELECTION_MODE = "sampled"
MODES = ("sampled", "greedy")
# PIPO as a user runs it, with no threshold or drafting option: the model's stored
# threshold and adaptive drafting (docs/design.md §5); reported beside the thresholds.
DEFAULT_SIDE = "default"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the figures, as pure functions (tests/test_eval_quality.py checks them; overlap,
# acceptance, calibration and the scoring passes are pipo_mlx.quality's)


def indent_width(line: str) -> int:
    line = line.expandtabs(8)
    return len(line) - len(line.lstrip())


def function_source(prompt: str, generation: str, truncated: bool) -> Tuple[str, bool]:
    """The generated function as standalone source, and whether it is complete.

    The rule: `prompt` starts at the `def` line. The function is prompt +
    generation up to, not including, the first generated line (a line after
    the prompt's last) that is neither blank nor a comment and is indented no
    deeper than the `def`: the model has moved on to the next statement, which
    is dropped with everything after it. The function is then complete. If no
    line dedents and the token budget ran out (`truncated`, no EOS), the last
    line was cut short and is dropped (back to the prompt if the generation
    holds no newline), and the function is incomplete. Finally the `def`'s
    indentation is removed from every line that starts with it. The rule reads
    lines only: a string or bracket continued below the `def`'s column ends it.
    """
    indent = prompt[: len(prompt) - len(prompt.lstrip(" \t"))]
    width = indent_width(prompt)
    lines = (prompt + generation).split("\n")
    head = prompt.count("\n") + 1  # lines that begin in the prompt
    kept, ended = lines[:head], False
    for line in lines[head:]:
        text = line.strip()
        if text and not text.startswith("#") and indent_width(line) <= width:
            ended = True
            break
        kept.append(line)
    if truncated and not ended:
        kept = kept[:-1] if len(kept) > head else prompt.split("\n")
    body = [line[len(indent):] if line.startswith(indent) else line for line in kept]
    return "\n".join(body) + "\n", ended or not truncated


def compiles(prompt: str, generation: str, truncated: bool) -> bool:
    """Whether the function `function_source` cuts from the text is valid Python.

    A complete function must `compile()`; an incomplete one (cut by the budget)
    must be a valid beginning of a program: `codeop` reports it as complete or
    as incomplete input, not as a syntax error.
    """
    source, complete = function_source(prompt, generation, truncated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if complete:
                compile(source, "<generated>", "exec")
            else:
                codeop.compile_command(source, "<generated>", "exec")
            return True
        except (SyntaxError, ValueError, OverflowError):
            return False


def choose_threshold(rows: Dict[str, dict], base: dict) -> dict:
    """The fastest τ (highest speedup; a tie goes to the higher τ) whose compile rate is at
    least the base's minus COMPILE_MARGIN and whose NLL is at most (1 + NLL_MARGIN) x the base's."""
    candidates = []
    for tau, r in rows.items():
        gap = base["compile_rate"] - r["compile_rate"]  # points below the base, as a fraction
        ratio = r["nll"] / base["nll"]
        fails = []
        if gap > COMPILE_MARGIN + 1e-9:  # the slack absorbs rounding of k/n rates
            fails.append(f"compile rate {100 * gap:.1f} points below the base's")
        if ratio > 1 + NLL_MARGIN + 1e-9:
            fails.append(f"base NLL of its text {100 * (ratio - 1):.1f}% above that of the base's")
        candidates.append({"threshold": float(tau), "speedup": r["speedup"], "compile_gap": gap,
                           "nll_ratio": ratio, "passes": not fails, "fails": fails})
    best = fastest_passing(candidates)
    if best is None:
        return {"threshold": None, "faster_than_base": False, "candidates": candidates,
                "reason": "no threshold keeps the quality within the margins of the base"}
    passing = sum(c["passes"] for c in candidates)
    reason = (f"fastest of {passing} passing threshold(s): {best['speedup']:.2f}x the base's tokens/s, "
              f"compile rate {-100 * best['compile_gap']:+.1f} points, NLL ratio {best['nll_ratio']:.3f}")
    if best["speedup"] < 1:
        reason += "; slower than the base itself, which is then the better choice"
    return {"threshold": best["threshold"], "faster_than_base": best["speedup"] >= 1,
            "candidates": candidates, "reason": reason}


# -- held-out data


def held_out_windows(tokenizer, split: str, seq_len: int, max_windows: int) -> np.ndarray:
    ids: List[int] = []
    for _, text in read_split(split):
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    windows = np.array(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    if 0 < max_windows < n:  # evenly spaced: a capped run still covers every file's region
        windows = windows[np.linspace(0, n - 1, max_windows).astype(int)]
    return windows


@dataclass
class Prompt:
    file: str
    text: str  # from the `def` line through the docstring (else the first body line), no final newline
    ids: List[int]


def function_prompts(tokenizer, split: str, count: int) -> List[Prompt]:
    """Function starts, round-robin over the split's files (each file's in source order).

    The text ends on its last character, not on a newline: the tokenizer merges a
    newline with the next line's indentation, so a bare newline would tell the
    model that the next line is not indented. One-line functions are skipped.
    """
    per_file = []
    for rel, source in read_split(split):
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines, found = source.splitlines(keepends=True), []
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in sorted(nodes, key=lambda n: n.lineno):
            first = node.body[0]
            if first.lineno == node.lineno:
                continue
            doc = isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str)
            text = "".join(lines[node.lineno - 1 : first.end_lineno if doc else first.lineno]).rstrip()
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) <= MAX_PROMPT_TOKENS:
                found.append(Prompt(rel, text, ids))
        per_file.append(found)
    prompts: List[Prompt] = []
    for r in range(max(map(len, per_file), default=0)):
        prompts += [found[r] for found in per_file if r < len(found)]
    return prompts[:count]


# -- 1. teacher-forced on held-out text


def teacher_forced(base: nn.Module, pipo: nn.Module, windows: np.ndarray, batch: int) -> Dict[str, Any]:
    """Per window and slot: the base's hits and NLL, PIPO's hits, confidence, p_mtp(true token2)
    and the agreement 1 - TV of its token1 / token2 distributions with the base's."""
    out: Dict[str, list] = {}
    progress = Progress("teacher-forced windows", len(windows), "windows", log=log)
    for i in range(0, len(windows), batch):
        for k, v in teacher_forced_batch(base, pipo, mx.array(windows[i : i + batch])).items():
            out.setdefault(k, []).append(v)
        progress.step(len(windows[i : i + batch]))
    return {k: np.concatenate(v) for k, v in out.items()}


def teacher_forced_summary(q: Dict[str, np.ndarray], thresholds: Sequence[float]) -> Tuple[dict, dict]:
    base = {
        "next_token_accuracy": float(q["correct"].mean()),
        "perplexity": float(math.exp(q["nll"].mean())),
        "accuracy_at_token1_targets": float(q["correct"][:, 1::2].mean()),
        "accuracy_at_token2_targets": float(q["correct"][:, 2::2].mean()),
    }
    conf, right = q["conf"].ravel(), q["tok2"].ravel().astype(np.float64)
    ece, bins = calibration(conf, right)
    ece_target, target_bins = calibration(conf, q["p_true"].ravel())
    pipo = {
        "token1_accuracy": float(q["tok1"].mean()),
        "token2_accuracy": float(q["tok2"].mean()),
        "token1_agreement": float(q["agree1"].mean()),  # mean 1 - TV against the base
        "token2_agreement": float(q["agree2"].mean()),
        "mean_confidence": float(conf.mean()),
        "ece": ece,
        "ece_vs_mtp_probability": ece_target,
        "reliability_bins": bins,
        "mtp_probability_bins": target_bins,
        "thresholds": {},
    }
    for t in thresholds:
        keep = conf >= t if t < 1 else np.zeros_like(conf, dtype=bool)
        pipo["thresholds"][str(t)] = {
            "keep_rate": float(keep.mean()),
            "kept_token2_accuracy": float(right[keep].mean()) if keep.any() else None,
            "tokens_per_step": float(1 + keep.mean()),
            "ece_of_kept": calibration(conf[keep], right[keep])[0] if keep.any() else None,
        }
    return base, pipo


# -- 2. generation, timed side by side


@dataclass
class Sample:
    tokens: List[int]  # generated ids, a final EOS included
    seconds: float  # wall time of the whole call
    eos: bool
    steps: int = 0
    kept: int = 0
    row: Optional[np.ndarray] = None  # PIPO: prompt_cache.tokens, the pair layout with PADs
    scores: dict = field(default_factory=dict)


def decoding_kwargs(mode: str, settings: dict) -> dict:
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    if mode == "greedy":
        return {}
    return {"sampler": make_sampler(settings["temp"], settings["top_p"], top_k=settings["top_k"]),
            "logits_processors": make_logits_processors(presence_penalty=settings["presence_penalty"],
                                                        presence_context_size=PRESENCE_CONTEXT)}


def generate_one(models: dict, tokenizer, side: str, prompt: List[int], n: int, kwargs: dict) -> Sample:
    from mlx_lm.generate import stream_generate as base_stream

    from pipo_mlx import make_prompt_cache, stream_generate

    eos = set(tokenizer.eos_token_ids)
    tic, tokens, r = time.perf_counter(), [], None
    if side == "base":
        for r in base_stream(models["base"], tokenizer, prompt, max_tokens=n, **kwargs):
            tokens.append(r.token)
        return Sample(tokens, time.perf_counter() - tic, tokens[-1] in eos)
    cache = make_prompt_cache(models["pipo"])
    # A threshold drafts at every step, so that it alone decides; the default side
    # passes nothing, as a user does: the stored threshold and adaptive drafting.
    pipo_options = {} if side == DEFAULT_SIDE else {"conf_threshold": float(side), "draft": "always"}
    for r in stream_generate(models["pipo"], tokenizer, prompt, max_tokens=n, prompt_cache=cache,
                             **pipo_options, **kwargs):
        tokens.append(r.token)
    seconds = time.perf_counter() - tic
    return Sample(tokens, seconds, tokens[-1] in eos, r.steps, r.token2_kept, np.array(cache.tokens))


def generate_all(models: dict, tokenizer, prompts: List[Prompt], sides: List[str], mode: str,
                 args: argparse.Namespace) -> Dict[str, List[Sample]]:
    """Every prompt through every side, one after the other (order rotated per prompt)."""
    for side in sides:  # warm-up: first-call allocations stay out of the timings
        generate_one(models, tokenizer, side, prompts[0].ids, 4, decoding_kwargs(mode, args.sampling))
    samples: Dict[str, List[Sample]] = {s: [] for s in sides}
    progress = Progress(f"{mode} generation", len(prompts) * len(sides), "generations", log=log)
    for k, prompt in enumerate(prompts):
        for side in sides[k % len(sides):] + sides[: k % len(sides)]:
            mx.random.seed(args.seed + k)
            samples[side].append(generate_one(models, tokenizer, side, prompt.ids, args.gen_tokens,
                                              decoding_kwargs(mode, args.sampling)))
            progress.step()
    return samples


def score(models: dict, prompt: Prompt, s: Sample, pad: int) -> None:
    """Teacher-forced at temperature 1: the base's NLL of the generated tokens and, for PIPO,
    (c, α) of each kept token2, its distribution from the MTP pass over the exact pair layout."""
    s.scores.update(score_generation(models["base"], models["pipo"], prompt.ids, s.tokens, s.row, pad))


def agreement(a: List[int], b: List[int]) -> Tuple[float, int]:
    same = sum(x == y for x, y in zip(a, b))
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), len(b), 1), prefix


def summarise(prompts: List[Prompt], samples: Dict[str, List[Sample]], tokenizer, mode: str, n: int) -> dict:
    eos = set(tokenizer.eos_token_ids)

    def quality(side: str) -> dict:
        ss = samples[side]
        texts = [tokenizer.decode([t for t in s.tokens if t not in eos]) for s in ss]
        ok = [compiles(p.text, t, not s.eos) for p, t, s in zip(prompts, texts, ss)]
        tps = [len(s.tokens) / s.seconds for s in ss]
        nll = np.concatenate([s.scores["nll"] for s in ss])
        return {"compile_rate": float(np.mean(ok)), "nll": float(nll.mean()),
                "tokens": int(sum(len(s.tokens) for s in ss)), "tokens_per_s": statistics.median(tps),
                "samples": [{"file": p.file, "prompt": p.text, "generation": t, "compiles": c}
                            for p, t, c in list(zip(prompts, texts, ok))[:2]]}

    base = quality("base")
    by_threshold, default = {}, None
    for side in samples:
        if side == "base":
            continue
        r, ss, bs = quality(side), samples[side], samples["base"]
        steps, kept = sum(s.steps for s in ss), sum(s.kept for s in ss)
        alpha = np.concatenate([s.scores.get("alpha", np.zeros(0)) for s in ss])
        r.update({
            "keep_rate": kept / max(steps, 1), "tokens_per_step": r["tokens"] / max(steps, 1), "kept": kept,
            "alpha": float(alpha.mean()) if alpha.size else None,
            "nll_ratio": r["nll"] / base["nll"],
            "speedup": statistics.median(len(s.tokens) / s.seconds * b.seconds / len(b.tokens)
                                         for s, b in zip(ss, bs)),
        })
        if mode == "greedy":
            pairs = [agreement(b.tokens, s.tokens) for s, b in zip(ss, bs)]
            r["agreement"] = float(np.mean([a for a, _ in pairs]))
            r["common_prefix_tokens"] = float(np.mean([p for _, p in pairs]))
        if side == DEFAULT_SIDE:
            default = r
        else:
            by_threshold[side] = r
    return {"prompts": len(prompts), "tokens": n, "base": base, "by_threshold": by_threshold,
            "default": default}


def generated_calibration(samples: Dict[str, List[Sample]]) -> Optional[dict]:
    """c against realized α of drafted token2s: the keep-all runs, else every kept draft."""
    drafted = [s for s in samples if s not in ("base", DEFAULT_SIDE)]
    keep_all = [s for s in drafted if float(s) < 0]
    source = keep_all[:1] or drafted
    conf = np.concatenate([x.scores.get("conf", np.zeros(0)) for s in source for x in samples[s]])
    alpha = np.concatenate([x.scores.get("alpha", np.zeros(0)) for s in source for x in samples[s]])
    if not conf.size:
        return None
    ece, bins = calibration(conf, alpha)
    what = f"τ={source[0]} (every draft kept)" if keep_all else "kept drafts of every τ (no keep-all run)"
    return {"source": f"{SELECTION_MODE} generations, {what}", "drafts": int(conf.size), "ece": ece,
            "mean_confidence": float(conf.mean()), "mean_alpha": float(alpha.mean()), "bins": bins}


# -- output


def shown(path: str) -> str:
    """A path relative to the repository when it is inside it (results get committed)."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def fmt(x: "float | None", digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, plt, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


def plot_reliability(plt, bins: List[dict], target_bins: List[dict], ece: float, alpha: Optional[dict],
                     thresholds: Sequence[float], path: Path) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    curves = [(bins, "o-", f"greedy token2 correct, held-out text (ECE {ece:.3f})"),
              (target_bins, "s:", "MTP probability of the true token2, held-out text")]
    if alpha:
        curves.insert(0, (alpha["bins"], "D-", f"realized α, generations (ECE {alpha['ece']:.3f})"))
    for table, style, label in curves:
        top.plot([b["confidence"] for b in table], [b["observed"] for b in table], style, label=label)
    for t in thresholds:
        if 0 <= t < 1:
            top.axvline(t, color="lightgray", linewidth=0.8)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed")
    top.set_title("PIPO confidence head", fontsize=10)
    top.legend(loc="upper left", fontsize=7)
    for table, label in [(bins, "held-out text")] + ([(alpha["bins"], "generations")] if alpha else []):
        bottom.bar([(b["lo"] + b["hi"]) / 2 for b in table], [b["n"] for b in table], width=0.09, alpha=0.5,
                   label=label)
    bottom.set(xlabel="confidence c = sigmoid(head)", ylabel="drafts", yscale="log")
    bottom.legend(fontsize=7)
    save(fig, plt, path)


def plot_speed_quality(plt, results: dict, path: Path) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    taus = list(results["sampled"]["by_threshold"])
    x = range(len(taus))
    for mode, style in (("sampled", "o-"), ("greedy", "s:")):
        rows = results[mode]["by_threshold"]
        top.plot(x, [rows[t]["speedup"] for t in taus], style, label=f"{mode}")
        bottom.plot(x, [rows[t]["compile_rate"] for t in taus], style, color="tab:blue", label=mode)
        bottom.axhline(results[mode]["base"]["compile_rate"], color="gray", linestyle=style[1:], linewidth=0.8,
                       label=f"base, {mode}")
    top.axhline(1.0, color="gray", linewidth=0.8)
    top.set(ylabel="tokens/s, PIPO / mlx-lm base")
    chosen = results["recommended"]["threshold"]
    if chosen is not None and str(chosen) in taus:
        top.axvline(taus.index(str(chosen)), color="tab:green", linestyle="--", label=f"recommended {chosen}")
    top.legend(fontsize=8)
    top.set_title("PIPO against the base model (mlx-lm), held-out function starts", fontsize=10)
    ratio = bottom.twinx()
    ratio.plot(x, [results["sampled"]["by_threshold"][t]["nll_ratio"] for t in taus], "^-", color="tab:red")
    ratio.axhline(1 + NLL_MARGIN, color="tab:red", linestyle="--", linewidth=0.8)
    ratio.set_ylabel("base NLL, PIPO text / base text (sampled)", color="tab:red", fontsize=8)
    bottom.set(ylabel="compile rate (blue)", xlabel="threshold τ", ylim=(0, 1.05))
    bottom.set_xticks(list(x), [("keep all" if float(t) < 0 else t) for t in taus])
    bottom.legend(fontsize=7, loc="best")
    save(fig, plt, path)


def write_results(out: Path, results: dict, bins: List[dict], target_bins: List[dict], ece: float,
                  thresholds: Sequence[float] = ()) -> List[Path]:
    """The JSON and, where matplotlib is installed, the plots; logs (and returns) what was written."""
    written = [out / "eval_quality.json"]
    write_json_atomic(written[0], results)
    plots = [out / "reliability.png"] + ([out / "speed_quality.png"] if "recommended" in results else [])
    plt = pyplot()
    if plt is None:
        log("matplotlib is not installed (pip install matplotlib): no reliability plot, no speed plot")
        for png in plots:
            if png.exists():
                log(f"{png} is left from an earlier run")
    else:
        plot_reliability(plt, bins, target_bins, ece, results.get("calibration"), thresholds, plots[0])
        if len(plots) > 1:
            plot_speed_quality(plt, results, plots[1])
        written += plots
    log(f"wrote {' and '.join(map(str, written))}")
    return written


def print_table(r: dict) -> None:
    b, q, cal = r["base"], r["pipo"], r["calibration"]
    rows = [("base next-token accuracy / perplexity", f"{b['next_token_accuracy']:.3f} / {b['perplexity']:.2f}"),
            ("PIPO token1 / token2 accuracy", f"{q['token1_accuracy']:.3f} / {q['token2_accuracy']:.3f}"),
            ("PIPO token1 / token2 agreement (1 - TV)",
             f"{q['token1_agreement']:.3f} / {q['token2_agreement']:.3f}"),
            ("confidence ECE: greedy right / α on generations", f"{q['ece']:.3f} / {fmt(cal and cal['ece'])}")]
    for mode in MODES:
        m = r[mode]["base"]
        rows.append((f"{mode} base: compile / NLL / tok/s",
                     f"{m['compile_rate']:.3f} / {m['nll']:.3f} / {m['tokens_per_s']:.1f}"))
        for t, x in [*r[mode]["by_threshold"].items(), (DEFAULT_SIDE, r[mode]["default"])]:
            rows.append((f"{mode} τ={t}: compile / NLL ratio / speedup / keep / tok/step / α",
                         f"{x['compile_rate']:.3f} / {x['nll_ratio']:.3f} / {x['speedup']:.2f}x / "
                         f"{x['keep_rate']:.3f} / {x['tokens_per_step']:.2f} / {fmt(x['alpha'])}"))
    rec = r["recommended"]
    rows.append((f"recommended τ (chosen on {rec['chosen_on']})", f"{rec['threshold']}: {rec['reason']}"))
    width = max(len(k) for k, _ in rows)
    print(f"\n| {'metric'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


# -- command line

# Settings that change the figures; a run with any of them off its default is not a full run.
FULL_RUN_SETTINGS = ("pipo", "base", "split", "seq_len", "max_windows", "prompts", "gen_tokens", "thresholds",
                     "temp", "top_p", "top_k", "presence_penalty", "seed")


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
    p.add_argument("--split", choices=("valid", "test"), default="test",
                   help="held-out split (default test); choose τ on valid, report on test")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=256, help="held-out windows, 0 for all (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=32, help="function starts to complete (default 32)")
    p.add_argument("--gen-tokens", type=int, default=64, help="new tokens per completion (default 64)")
    p.add_argument("--thresholds", "--gen-thresholds", dest="thresholds", type=float, nargs="+",
                   default=THRESHOLDS, help="PIPO confidence thresholds τ (default -1 0.5 0.8 0.9 0.95)")
    for name, value in PAPER_SAMPLING.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                       help=f"sampled mode (default {value}, the paper's)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; prompt k is seeded seed + k")
    p.add_argument("--choice-from", help="eval_quality.json of a run on another split (valid): report its τ")
    settings = ", ".join(f"--{k.replace('_', '-')}" for k in FULL_RUN_SETTINGS)
    p.add_argument("--out", help="output folder (default: benchmarks/results for a full run, build/bench "
                   f"for a run with any of {settings} off its default)")
    args = p.parse_args(argv)
    args.full = is_full_run(args, p)
    if args.out is None:
        args.out = str(RESULTS if args.full else SCRATCH)
    args.sampling = {k: getattr(args, k) for k in PAPER_SAMPLING}
    return args


def recommendation(args: argparse.Namespace, results: dict) -> dict:
    rows = results[SELECTION_MODE]["by_threshold"]
    rec = {**choose_threshold(rows, results[SELECTION_MODE]["base"]), "chosen_on": args.split}
    if args.choice_from:
        other = json.loads(Path(args.choice_from).read_text())
        if other.get("split") == args.split:
            raise SystemExit(f"--choice-from {args.choice_from} was run on the {args.split} split too")
        own = rec
        tau = other["recommended"]["threshold"]
        rec = {"threshold": tau, "chosen_on": other["split"], "source": shown(args.choice_from),
               "reason": other["recommended"]["reason"], "figures_here": rows.get(str(tau)),
               f"would_choose_on_{args.split}": own}
    elif args.split == "test":
        rec["note"] = "chosen on the test split, for information only: choose τ with --split valid"
    return rec


def main(argv: "List[str] | None" = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if not args.full and out.resolve() == RESULTS.resolve():
        log(f"not a full run, but --out names {out}: the committed results will be replaced")
    else:
        log(f"results go to {out}" + ("" if args.full else " (not a full run)"))
    out.mkdir(parents=True, exist_ok=True)
    wall = time.time()
    load_start = os.getloadavg()

    from mlx_lm import load as load_base
    from mlx_lm.utils import dequantize_model

    from pipo_mlx import load as load_pipo

    base, tokenizer = load_base(args.base)
    pipo, pipo_tokenizer = load_pipo(args.pipo)
    # MLX's CPU backend multiplies quantized (and float16) weights about 10x slower
    # than float32 ones. Dequantizing computes with exactly the shipped weight
    # values, so the figures are those of the shipped models (both sides alike).
    if mx.default_device() == mx.cpu:
        base, pipo = dequantize_model(base), dequantize_model(pipo)
    if tokenizer.vocab_size != pipo_tokenizer.vocab_size:
        raise SystemExit("the base and PIPO models use different tokenizers")
    models, pad = {"base": base, "pipo": pipo}, pipo.pad_token_id
    windows = held_out_windows(tokenizer, args.split, args.seq_len, args.max_windows)
    prompts = function_prompts(tokenizer, args.split, args.prompts)
    if not prompts:
        raise SystemExit(f"no function of at most {MAX_PROMPT_TOKENS} tokens in the {args.split} split")
    log(f"{args.split} split: {len(windows)} windows of {args.seq_len} tokens, {len(prompts)} prompts")

    # Teacher-forced passes run in training mode (the models have no dropout): it
    # takes the chunked recurrence, much faster on a CPU than mlx-lm's inference
    # loop and equal to it to float32 rounding. Generation runs in eval mode.
    base.train(), pipo.train()
    with fast_training(base), fast_training(pipo):
        q = teacher_forced(base, pipo, windows, args.batch_size)
    base.eval(), pipo.eval()
    results = {"models": {"base": shown(args.base), "pipo": shown(args.pipo)}, "split": args.split,
               "settings": {"seq_len": args.seq_len, "max_windows": args.max_windows, "prompts": args.prompts,
                            "gen_tokens": args.gen_tokens, "thresholds": args.thresholds,
                            "sampling": {**args.sampling, "presence_context_size": PRESENCE_CONTEXT}, "seed": args.seed,
                            "criteria": {"mode": SELECTION_MODE, "compile_margin": COMPILE_MARGIN,
                                         "nll_margin": NLL_MARGIN}},
               "test_tokens": int(windows.size)}
    results["base"], results["pipo"] = teacher_forced_summary(q, args.thresholds)

    sides = ["base"] + list(dict.fromkeys(str(t) for t in args.thresholds)) + [DEFAULT_SIDE]
    for mode in MODES:
        samples = generate_all(models, tokenizer, prompts, sides, mode, args)
        progress = Progress(f"{mode} scoring", len(prompts) * len(sides), "samples", log=log)
        base.train(), pipo.train()
        with fast_training(base), fast_training(pipo):
            for side in sides:
                for prompt, s in zip(prompts, samples[side]):
                    score(models, prompt, s, pad)
                    progress.step()
        base.eval(), pipo.eval()
        results[mode] = summarise(prompts, samples, tokenizer, mode, args.gen_tokens)
        if mode == SELECTION_MODE:
            results["calibration"] = generated_calibration(samples)
    results["recommended"] = recommendation(args, results)
    results["machine"] = {"cores": os.cpu_count(), "device": str(mx.default_device()), "mlx": mx.__version__,
                          "load_average_start": load_start, "load_average_end": os.getloadavg(),
                          "wall_s": time.time() - wall}
    print_table(results)
    write_results(out, results, results["pipo"]["reliability_bins"], results["pipo"]["mtp_probability_bins"],
                  results["pipo"]["ece"], args.thresholds)


if __name__ == "__main__":
    main()
