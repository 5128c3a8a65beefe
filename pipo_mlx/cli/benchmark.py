"""Benchmark a PIPO model against mlx-lm decoding its base, side by side in one run."""

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..decode import recommended_threshold
from ..drafting import weight_bytes
from ..errors import PipoError
from ..hf_io import TOKENIZER_PATTERNS, WEIGHT_PATTERNS, is_hub_id, resolve
from ..model import PipoModel
from ..model_io import load, recorded_base, write_json_atomic
from ..speed import (
    compressor_bound,
    interleave,
    keep_all_bound,
    mlx_lm_side,
    pipo_side,
    plain_read_bytes,
    summary,
)
from . import run_cli
from .generate import DEMO, DEMO_PLACES

WARMUP_TOKENS = 8
SEED = 0  # random prompts: the same ids run after run


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure a PIPO model against mlx-lm decoding its base model, side by "
        "side in one run: time to first token at each prompt length, and decoding "
        "tokens/s at the default settings (adaptive drafting) and at chosen confidence "
        "thresholds (drafting every step, and adaptively), with tokens per step, token2 "
        "keep rate, peak memory and the ratio to mlx-lm. Both sides generate exactly the same number of "
        "tokens with stream_generate (no end-of-sequence), runs alternate within each "
        "trial, and every figure is the median over the trials. Where decoding is bound "
        "by reading weights, keep-none (threshold 1) is at most (B+E)/(B+E+C) of "
        "mlx-lm's speed, printed beside it (docs/design.md §5)."
    )
    parser.add_argument(
        "--model",
        help="a PIPO model folder (convert.py or train_heads.py --fuse output); default: "
        f"the demo model shipped in the repository's {DEMO}",
    )
    parser.add_argument(
        "--base",
        help="the base model, for mlx_lm.load: a folder or Hugging Face repo id (default: "
        "the one the model's config.json records as pipo.base_model)",
    )
    parser.add_argument(
        "--prompt-tokens",
        "-p",
        default="128,512",
        help="prompt lengths for time to first token, comma-separated; decoding runs after "
        "the first (default 128,512)",
    )
    parser.add_argument(
        "--generation-tokens",
        "-g",
        default="256",
        help="tokens each side generates per decoding run (default 256)",
    )
    parser.add_argument(
        "--thresholds",
        help="confidence thresholds to measure, each with drafting on every step and with "
        "adaptive drafting, comma-separated; 1 or more keeps no token2 and skips the draft (default: the model's stored "
        "threshold, else 0.95, and 1; write --thresholds=-1,0.5 when the first is negative)",
    )
    parser.add_argument(
        "--num-trials", "-n", default="3", help="trials, each running every side once (default 3)"
    )
    parser.add_argument(
        "--prompt",
        help="text whose tokens, repeated, make the prompts ('-' reads stdin; default: "
        "random token ids). A trained model keeps more drafts on real text",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write every figure to this JSON file"
    )
    return parser


# -- options


def _numbers(flag: str, text: str, kind: type, low: float) -> List[Any]:
    """A comma-separated list of numbers of `kind`, each at least `low`, or a PipoError."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(math.isnan(v) or v < low for v in values):
        kind_name = "integers" if kind is int else "numbers"
        raise PipoError(f"{flag} takes {kind_name} of at least {low:g}, comma-separated; got {text!r}")
    return values


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """The options as numbers, checked before anything is loaded."""
    args.prompt_tokens = _numbers("--prompt-tokens", args.prompt_tokens, int, 1)
    # Three tokens at least: the first step may yield two, and the speed is timed after it.
    (args.generation_tokens,) = _numbers("--generation-tokens", args.generation_tokens, int, 3)
    (args.num_trials,) = _numbers("--num-trials", args.num_trials, int, 1)
    if args.thresholds is not None:
        args.thresholds = _numbers("--thresholds", args.thresholds, float, -math.inf)
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    if args.prompt is not None and not args.prompt.strip():
        raise PipoError("--prompt is empty; pass some text, or leave it out for random tokens")
    return args


# -- models


def model_folder(spec: Optional[str]) -> Path:
    if spec is not None:
        return Path(spec).expanduser()
    demo = next((p for p in DEMO_PLACES if p.is_dir()), None)
    if demo is None:
        raise PipoError(
            f"no --model given and the demo model {DEMO} is not here (it ships with a "
            "checkout of the repository); pass --model with a PIPO model folder"
        )
    return demo


def base_spec(args: argparse.Namespace, folder: Path, model: PipoModel) -> str:
    if args.base is not None:
        return args.base
    recorded = recorded_base(folder, model.args.base_model)
    if recorded is None:
        raise PipoError(
            f"{folder} does not record its base model (pipo.base_model in config.json); "
            "pass --base with the base's folder or Hugging Face repo id"
        )
    return recorded


def load_base(spec: str, tokenizer: TokenizerWrapper) -> Tuple[nn.Module, TokenizerWrapper]:
    """mlx_lm.load of the base, refused unless it reads token ids as the model does."""
    import mlx_lm

    if not is_hub_id(spec) and not Path(spec).expanduser().is_dir():
        raise PipoError(f"base model {spec} does not exist; pass --base with the base's folder")
    # A hub id may name a subfolder, which mlx_lm.load cannot fetch; resolve() can.
    folder = resolve(spec, WEIGHT_PATTERNS + TOKENIZER_PATTERNS)
    try:
        base, base_tokenizer = mlx_lm.load(str(folder))
    except Exception as e:  # mlx-lm raises many types; all mean "not a model it loads"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PipoError(
            f"mlx_lm.load cannot load the base {spec} ({type(e).__name__}: {first}); "
            "pass --base with an ordinary (not PIPO) model folder or repo id"
        ) from None
    if base_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise PipoError(
            f"the base {spec} has another tokenizer vocabulary than the model; pass --base "
            "with the model this one was converted from"
        )
    return base, base_tokenizer


def prompt_ids(args: argparse.Namespace, tokenizer: TokenizerWrapper, pad: int) -> List[int]:
    """The longest prompt; shorter ones are its prefixes. Random ids leave out PAD and
    special tokens, which a real prompt would not hold at random places."""
    length = max(args.prompt_tokens)
    if args.prompt is not None:
        text = tokenizer.encode(args.prompt, add_special_tokens=False)
        return (text * (length // len(text) + 1))[:length]
    special = set(tokenizer.all_special_ids) | {pad}
    ordinary = np.array(sorted(set(tokenizer.get_vocab().values()) - special))
    return np.random.default_rng(SEED).choice(ordinary, size=length).tolist()


# -- measuring


def decode_rows(
    model: PipoModel, tokenizer: TokenizerWrapper, base: nn.Module, base_tokenizer: Any,
    prompt: List[int], thresholds: Sequence[float], n: int, trials: int,
) -> List[Dict[str, Any]]:
    default = recommended_threshold(model)
    settings: Dict[str, Dict[str, Any]] = {f"default (τ={default:g}, draft=auto)": {}}
    for t in thresholds:
        if t >= 1:
            settings[f"τ={t:g} (keep none)"] = {"conf_threshold": t, "draft": "always"}
            continue
        # τ alone deciding, and the adaptive policy on top of it
        for mode in ("always", "auto"):
            settings[f"τ={t:g}, draft={mode}"] = {"conf_threshold": t, "draft": mode}
    sides = {"mlx-lm": mlx_lm_side(base, base_tokenizer, prompt)}
    sides.update({k: pipo_side(model, tokenizer, prompt, **o) for k, o in settings.items()})

    def progress(r: int, last: Dict[str, Any]) -> None:
        speeds = ", ".join(f"{k} {1 / run.s_per_token:.1f}" for k, run in last.items())
        log(f"decoding, trial {r + 1}/{trials}: {speeds} tokens/s")

    runs = interleave(sides, n, trials, WARMUP_TOKENS, progress)
    base_speed = summary(runs["mlx-lm"])["tokens_per_s"]
    rows = []
    for label, rs in runs.items():
        options = settings.get(label)
        row = {
            "setting": label,
            "side": "mlx-lm" if options is None else "pipo",
            "conf_threshold": None if options is None else options.get("conf_threshold", default),
            "draft": None if options is None else options.get("draft", "auto"),
            **summary(rs),
        }
        row["ratio_to_mlx_lm"] = row["tokens_per_s"] / base_speed
        rows.append(row)
    return rows


def ttft_rows(
    model: PipoModel, tokenizer: TokenizerWrapper, base: nn.Module, base_tokenizer: Any,
    prompt: List[int], lengths: Sequence[int], trials: int,
) -> List[Dict[str, Any]]:
    """Time to first token at the default settings, each length its own prompt prefix."""
    rows = []
    for length in lengths:
        ids = prompt[:length]
        sides = {"mlx-lm": mlx_lm_side(base, base_tokenizer, ids),
                 "pipo": pipo_side(model, tokenizer, ids)}
        runs = {k: summary(rs) for k, rs in interleave(sides, 1, trials).items()}
        base_s, pipo_s = runs["mlx-lm"]["ttft_s"], runs["pipo"]["ttft_s"]
        rows.append({
            "prompt_tokens": length,
            "mlx_lm_s": base_s,
            "pipo_s": pipo_s,
            "mlx_lm_s_runs": runs["mlx-lm"]["ttft_s_runs"],
            "pipo_s_runs": runs["pipo"]["ttft_s_runs"],
            "ratio": base_s / pipo_s,
            "mlx_lm_peak_memory_gb": runs["mlx-lm"]["peak_memory_gb"],
            "pipo_peak_memory_gb": runs["pipo"]["peak_memory_gb"],
        })
        log(f"time to first token, {length} tokens: mlx-lm {base_s:.3f} s, PIPO {pipo_s:.3f} s")
    return rows


# -- output


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> Dict[str, Any]:
    import mlx_lm

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "load_average_start": list(os.getloadavg()),
    }


def print_report(r: Dict[str, Any]) -> None:
    m, s, w = r["machine"], r["settings"], r["weights"]
    print(f"PIPO {r['model']} against mlx-lm on {r['base']}")
    print(f"{m['device']}, {m['cores']} cores, mlx {m['mlx']}, mlx-lm {m['mlx_lm']}; load "
          f"average {' '.join(f'{x:.2f}' for x in m['load_average_start'])} at start, "
          f"{' '.join(f'{x:.2f}' for x in m['load_average_end'])} at end")
    trials = f"{s['num_trials']} trial{'s' if s['num_trials'] > 1 else ''}"
    print(f"median of {trials}; {s['generation_tokens']} tokens generated after "
          f"a {s['prompt_tokens'][0]}-token {s['prompt']} prompt; stream_generate on both "
          "sides (detokenized), no end-of-sequence")
    print(f"\n{'decoding':<30}{'tokens/s':>10}{'ratio':>8}{'tok/step':>10}{'keep':>7}"
          f"{'peak GB':>9}")
    for row in r["decode"]:
        pipo = row["side"] == "pipo"
        bound = ""
        if pipo and row["conf_threshold"] >= 1:
            bound = f"   compressor bound {w['compressor_bound']:.2f}x"
        keep = f"{row['keep_rate']:.2f}" if pipo else "-"
        print(f"{row['setting']:<30}{row['tokens_per_s']:>10.1f}{row['ratio_to_mlx_lm']:>7.2f}x"
              f"{row['tokens_per_step']:>10.2f}{keep:>7}{row['peak_memory_gb']:>9.3f}{bound}")
    print(f"weight-reading bounds: keep-none {w['compressor_bound']:.2f}x, keep-all "
          f"{w['keep_all_bound']:.2f}x (B {w['B'] / 1e6:.1f} MB, E {w['E'] / 1e6:.1f} MB, "
          f"M {w['M'] / 1e6:.1f} MB, C {w['C'] / 1e6:.1f} MB)")
    if abs(w["base_read_bytes"] - (w["B"] + w["E"])) > 0.01 * (w["B"] + w["E"]):
        print(f"note: a plain step of the base reads {w['base_read_bytes'] / 1e6:.1f} MB of "
              f"weights, the PIPO backbone {(w['B'] + w['E']) / 1e6:.1f} MB (another dtype or "
              "quantization?): the bounds assume the same weights on both sides")
    print(f"\n{'time to first token':<22}{'mlx-lm':>10}{'PIPO':>10}{'ratio':>8}{'peak GB':>17}")
    for t in r["ttft"]:
        peaks = f"{t['mlx_lm_peak_memory_gb']:.3f} / {t['pipo_peak_memory_gb']:.3f}"
        print(f"{str(t['prompt_tokens']) + ' prompt tokens':<22}{t['mlx_lm_s']:>9.3f}s"
              f"{t['pipo_s']:>9.3f}s{t['ratio']:>7.2f}x{peaks:>17}")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """The body of `pipo_mlx.benchmark`; returns what --json writes."""
    args = check_args(args)
    tic = time.perf_counter()
    folder = model_folder(args.model)
    model, tokenizer = load(str(folder))
    spec = base_spec(args, folder, model)
    base, base_tokenizer = load_base(spec, tokenizer)
    longest = max(args.prompt_tokens) + args.generation_tokens
    if longest > model.args.max_position_embeddings:
        raise PipoError(
            f"a {max(args.prompt_tokens)}-token prompt and {args.generation_tokens} generated "
            f"tokens exceed the model's context of {model.args.max_position_embeddings}"
        )
    thresholds = args.thresholds
    if thresholds is None:
        thresholds = sorted({recommended_threshold(model), 1.0})
    for tok in (tokenizer, base_tokenizer):
        tok.eos_token_ids = set()  # both sides generate exactly the requested tokens
    prompt = prompt_ids(args, tokenizer, model.pad_token_id)
    info = machine()
    load1, cores = info["load_average_start"][0], info["cores"] or 1
    log(f"load average {' '.join(f'{x:.2f}' for x in info['load_average_start'])} on {cores} cores")
    if load1 > cores:
        log(f"[WARN] the load average {load1:.2f} is above 1 per core: other work competes "
            "for the CPU, so timings will spread; compare ratios rather than speeds")
    log(f"measuring {folder} against {spec}")
    w = weight_bytes(model)
    results: Dict[str, Any] = {
        "model": str(folder),
        "base": spec,
        "machine": info,
        "settings": {
            "prompt_tokens": args.prompt_tokens,
            "generation_tokens": args.generation_tokens,
            "num_trials": args.num_trials,
            "thresholds": thresholds,
            "prompt": "random" if args.prompt is None else "given-text",
            "api": "stream_generate, detokenizing, no end-of-sequence",
        },
        "weights": {
            **w,
            "base_read_bytes": plain_read_bytes(base),
            "compressor_bound": compressor_bound(w),
            "keep_all_bound": keep_all_bound(w),
        },
        "decode": decode_rows(model, tokenizer, base, base_tokenizer,
                              prompt[: args.prompt_tokens[0]], thresholds,
                              args.generation_tokens, args.num_trials),
        "ttft": ttft_rows(model, tokenizer, base, base_tokenizer, prompt,
                          args.prompt_tokens, args.num_trials),
    }
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["settings"]["wall_s"] = time.perf_counter() - tic
    print_report(results)
    if args.json:
        path = Path(args.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, results)
        log(f"wrote {path}")
    log(f"done in {results['settings']['wall_s']:.0f} s")
    return results


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda: run(setup_arg_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
