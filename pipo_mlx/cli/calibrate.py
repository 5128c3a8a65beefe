"""Choose a PIPO model's confidence threshold on your own prompts, against its base model."""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from ..calibration import (
    DEFAULT_THRESHOLDS,
    KEEP_ALL,
    KEEP_NONE,
    Settings,
    base_spec,
    calibrate,
    check_writable,
    load_base,
    read_prompts,
    sweep,
    write_results,
)
from ..errors import PipoError
from ..model_io import load
from . import run_cli

D = Settings()


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Calibrate a PIPO model on your prompts: decode them with the base model "
        "(mlx-lm) and with PIPO at each confidence threshold τ, side by side; measure speed, "
        "keep rate and quality against the base; write the fastest τ within the quality margin "
        "(and the measured cost of a drafting step) into the model folder's config.json, and the "
        "measurements into calibration.json beside it (docs/design.md §5)."
    )
    parser.add_argument("--model", required=True, help="PIPO model folder (written by convert.py)")
    parser.add_argument(
        "--base",
        help="the base model: an mlx-lm folder or Hugging Face repo id with the same tokenizer "
        "(default: the one recorded in the model's config.json, pipo.base_model)",
    )
    parser.add_argument(
        "--prompts",
        required=True,
        nargs="+",
        metavar="PATH",
        help="prompts: .jsonl files of {\"prompt\"}, {\"messages\"} (through the chat template) "
        "or {\"text\"} (raw) records; text files, one prompt per blank-line-separated block; "
        "folders, one prompt per file",
    )
    parser.add_argument(
        "--max-prompts", type=int, default=32, help="use the first N prompts (default 32)"
    )
    parser.add_argument(
        "--thresholds",
        nargs="+",
        default=[",".join(map(str, DEFAULT_THRESHOLDS))],
        help=f"the thresholds τ to sweep, comma- or space-separated (default "
        f"{','.join(map(str, DEFAULT_THRESHOLDS))}); keep-all ({KEEP_ALL}) and keep-none "
        f"({KEEP_NONE}) are always measured",
    )
    parser.add_argument(
        "--max-tokens", "-m", type=int, default=D.max_tokens,
        help=f"most tokens to generate per prompt and side (default {D.max_tokens})",
    )
    parser.add_argument(
        "--max-nll-increase", type=float, default=D.max_nll_increase,
        help="quality margin: the base's NLL of PIPO's text at τ may exceed that at τ = 1 "
        f"(keep-none, PIPO's own floor) by this fraction (default {D.max_nll_increase})",
    )
    parser.add_argument(
        "--min-alpha", type=float, default=D.min_alpha,
        help="quality margin: least mean acceptance α = min(1, p_base / p_pipo) of the kept "
        "drafts (default 0: none)",
    )
    parser.add_argument("--temp", type=float, default=D.temp, help="temperature (default 0: greedy)")
    parser.add_argument("--top-p", type=float, default=D.top_p, help="nucleus mass (default 1: off)")
    parser.add_argument("--top-k", type=int, default=D.top_k, help="the k likeliest (default 0: off)")
    parser.add_argument("--min-p", type=float, default=D.min_p, help="min-p (default 0: off)")
    parser.add_argument("--seed", type=int, default=D.seed, help="prompt k is seeded seed + k (default 0)")
    parser.add_argument(
        "--dry-run", "--no-write", action="store_true", help="print the results, write nothing"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON, not a table")
    parser.add_argument(
        "--plot", metavar="PNG",
        help="also draw the speed-quality curve (speed against the base and the base NLL of "
        "PIPO's text, per τ) into this PNG file; needs matplotlib",
    )
    return parser


def thresholds(values: List[str]) -> List[float]:
    try:
        return [float(t) for v in values for t in v.replace(",", " ").split()]
    except ValueError:
        raise PipoError(f"--thresholds {' '.join(values)!r}: not numbers; use e.g. 0.5,0.9,0.95") from None


def check_args(args: argparse.Namespace) -> None:
    if args.max_tokens < 4:
        raise PipoError(f"--max-tokens must be at least 4 (a few steps to time), got {args.max_tokens}")
    if args.max_prompts < 1:
        raise PipoError(f"--max-prompts must be at least 1, got {args.max_prompts}")
    if not args.max_nll_increase >= 0:
        raise PipoError(f"--max-nll-increase must be 0 or more, got {args.max_nll_increase}")
    if not 0 <= args.min_alpha <= 1:
        raise PipoError(f"--min-alpha must lie in [0, 1], got {args.min_alpha}")
    if not args.temp >= 0:
        raise PipoError(f"--temp must be 0 (greedy) or more, got {args.temp}")
    if not 0 < args.top_p <= 1:
        raise PipoError(f"--top-p must lie in (0, 1] (1 turns it off), got {args.top_p}")


def log(message: str) -> None:
    print(f"[calibrate] {message}", file=sys.stderr, flush=True)


def fmt(x: Optional[float], spec: str = ".3f", unit: str = "") -> str:
    return "" if x is None else format(x, spec) + unit


def print_table(r: dict) -> None:
    head = ["τ", "keep", "tok/step", "tok/s", "vs base", "ms/step", "α", "base NLL", "vs τ=1", "margins"]
    b = r["base"]
    rows = [["base", "", "", fmt(b["decode_tokens_per_s"], ".1f"), "1.00x", "", "", fmt(b["nll"]), "", ""]]
    passes = {c["threshold"]: c["passes"] for c in r["recommended"]["candidates"]}
    for tau, x in r["by_threshold"].items():
        name = "keep all" if float(tau) < 0 else "keep none" if float(tau) >= 1 else tau
        ms = x["s_per_step"] and 1e3 * x["s_per_step"]
        rows.append([name, fmt(x["keep_rate"]), fmt(x["tokens_per_step"], ".2f"),
                     fmt(x["decode_tokens_per_s"], ".1f"), fmt(x["speedup"], ".2f", "x"), fmt(ms, ".2f"),
                     fmt(x["alpha"]), fmt(x["nll"]), fmt(100 * x["nll_increase"], "+.1f", "%"),
                     "in" if passes[float(tau)] else "out"])
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    for row in [head, ["-" * w for w in widths]] + rows:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
    a, rec = r["agreement"], r["recommended"]
    print(f"\nagreement with the base (1 - TV, teacher-forced over {a['slots']} slots): "
          f"token1 {fmt(a['token1'])}, token2 {fmt(a['token2'])}")
    if r["draft_cost"] is not None:
        print(f"draft cost: a drafting step takes {100 * r['draft_cost']:.0f}% longer than a plain one")
    print(f"recommended τ: {rec['threshold']} ({rec['reason']})")


def plot_curve(r: dict, path: Path) -> None:
    """Speed against the base and the base's NLL of the text against keep-none's, per τ."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PipoError("--plot needs matplotlib (pip install matplotlib)") from None
    taus = sorted(r["by_threshold"], key=float)
    rows = [r["by_threshold"][t] for t in taus]
    labels = ["keep all" if float(t) < 0 else "keep none" if float(t) >= 1 else t for t in taus]
    fig, speed = plt.subplots(figsize=(7, 4))
    x = range(len(taus))
    speed.plot(x, [row["speedup"] for row in rows], "o-", color="tab:blue", label="speed vs base")
    speed.axhline(1.0, color="gray", lw=0.8, ls=":")
    speed.set_xticks(list(x), labels)
    speed.set_xlabel("confidence threshold τ (drafting every step)")
    speed.set_ylabel("decode speed / base's", color="tab:blue")
    nll = speed.twinx()
    nll.plot(x, [100 * row["nll_increase"] for row in rows], "^-", color="tab:red", label="NLL vs keep-none")
    nll.axhline(100 * r["settings"]["max_nll_increase"], color="tab:red", lw=0.8, ls="--")
    nll.set_ylabel("base NLL of PIPO's text, % above keep-none", color="tab:red")
    chosen = r["recommended"]["threshold"]
    if chosen is not None:
        i = [float(t) for t in taus].index(chosen)
        speed.plot([i], [rows[i]["speedup"]], "s", ms=12, mfc="none", color="black", label=f"chosen τ={chosen}")
    speed.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> None:
    check_args(args)
    settings = Settings(
        thresholds=thresholds(args.thresholds), max_tokens=args.max_tokens,
        max_nll_increase=args.max_nll_increase, min_alpha=args.min_alpha, temp=args.temp,
        top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed,
    )
    taus = ", ".join(f"{t:g}" for t in sweep(settings.thresholds))  # checked before the models load
    folder = Path(args.model).expanduser()
    pipo, tokenizer = load(str(folder))
    spec = base_spec(folder, args.base, pipo.args.base_model)
    if not args.dry_run:
        check_writable(folder)
    tokenizer.model_max_length = sys.maxsize  # our context check names the prompt instead
    prompts = read_prompts(args.prompts, tokenizer, pipo.args.max_position_embeddings, args.max_tokens,
                           args.max_prompts)
    base, base_tokenizer = load_base(spec, tokenizer, pipo.args.vocab_size)
    log(f"{len(prompts)} prompts, up to {args.max_tokens} new tokens each, side by side: the base "
        f"{spec} and PIPO at τ = {taus}")
    results = {"models": {"pipo": str(folder), "base": spec},
               **calibrate(pipo, base, tokenizer, base_tokenizer, prompts, settings, log)}
    if args.json:
        print(json.dumps(results, indent=1, ensure_ascii=False))
    else:
        print_table(results)
    if args.plot:
        plot_curve(results, Path(args.plot).expanduser())
        log(f"wrote {args.plot}")
    if args.dry_run:
        log("dry run: nothing written")
        return
    written = write_results(folder, results)
    log(f"wrote {' and '.join(map(str, written))} (pipo.conf_threshold "
        f"{results['recommended']['threshold']}, pipo.draft_cost {fmt(results['draft_cost'])})")


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda: run(setup_arg_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
