"""Adaptive drafting against drafting always and never, at keep rates forced from 0 to 1.

    python benchmarks/bench_policy.py           # the full run (minutes; for a quiet machine)
    python benchmarks/bench_policy.py --quick   # a smoke run, seconds

Only a full run (no --quick; --repeats, --tokens, --prompt-tokens and --model
at their defaults) writes benchmarks/results/policy.json; any other run writes
to build/bench/ unless --out says where.

The policy. On the random-weight 80M config of bench_decode.py (hidden 384, 28
layers, float32), a benchmark-only gate stands in for the confidence head: at
τ = 0.5 it keeps each drafted token2 with a chosen probability (0, 0.25, 0.5,
0.75, 1), drawn from MLX's generator seeded before every run, so the runs are
repeatable. draft="always", "never" and "auto" (the adaptive policy of
pipo_mlx/drafting.py) then each generate exactly --tokens tokens after a
random prompt (generate_step, no detokenizing, no end-of-sequence),
interleaved, median of --repeats. For each rate the table prints auto's speed
over the better of the other two; the target is within 3%.

Keep-none. τ = 1 (never drafting) against mlx-lm's own generate_step on the
same backbone arrays (bench_decode.baseline_of), beside the compressor bound
(B + E) / (B + E + C) that reading weights puts on it (docs/design.md §5),
for the shipped demo model and the 80M config.
"""

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (  # noqa: E402
    FULL_SIZES, QUICK_SIZE, base_tokens, baseline_of, log, machine, random_model, random_prompt,
)

from pipo_mlx import load  # noqa: E402
from pipo_mlx.decode import generate_step  # noqa: E402
from pipo_mlx.drafting import DRAFT_MODES, draft_cost, weight_bytes  # noqa: E402
from pipo_mlx.model import PipoModel  # noqa: E402
from pipo_mlx.model_io import write_json_atomic  # noqa: E402
from pipo_mlx.speed import Side, Tokens, compressor_bound, interleave, summary  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS, SCRATCH = REPO / "benchmarks" / "results", REPO / "build" / "bench"
DEMO = REPO / "models" / "pipo-stdlib"
RATES = (0.0, 0.25, 0.5, 0.75, 1.0)
GATE = 0.5  # the threshold the forced gate is read at
TARGET = 0.97  # auto within 3% of the better fixed mode
SEED = 0


@contextmanager
def forced_keep_rate(model: PipoModel, rate: float) -> Iterator[None]:
    """Benchmark only: each drafted token2 passes the gate at τ = GATE with
    probability `rate` (sigmoid(±1) falls on either side of 0.5), whatever the
    confidence head would say. Uniform draws below `rate` keep: none at 0, all at 1."""

    def confidence(hidden: mx.array, mtp_hidden: mx.array) -> mx.array:
        u = mx.random.uniform(shape=mtp_hidden.shape[:2])
        return mx.where(u < rate, 1.0, -1.0)

    model.confidence = confidence  # an instance attribute shadows the method
    try:
        yield
    finally:
        del model.confidence


def pipo_side(model: PipoModel, prompt: List[int], threshold: float, draft: str) -> Side:
    def tokens(n: int) -> Tokens:
        mx.random.seed(SEED)  # the forced gate draws the same keeps run after run
        for token, _, is_token2 in generate_step(
            prompt, model, max_tokens=n, conf_threshold=threshold, draft=draft
        ):
            yield token, is_token2

    return tokens


def policy_rows(model: PipoModel, prompt: List[int], args: argparse.Namespace) -> List[Dict[str, Any]]:
    rows = []
    for rate in RATES:
        with forced_keep_rate(model, rate):
            sides = {mode: pipo_side(model, prompt, GATE, mode) for mode in DRAFT_MODES}
            runs = interleave(sides, args.tokens, args.repeats, warmup_tokens=8)
        row: Dict[str, Any] = {"forced_keep_rate": rate, **{m: summary(rs) for m, rs in runs.items()}}
        best = max(row["always"]["tokens_per_s"], row["never"]["tokens_per_s"])
        row["auto_over_best"] = row["auto"]["tokens_per_s"] / best
        row["within_target"] = row["auto_over_best"] >= TARGET
        rows.append(row)
        log(f"  keep rate {rate:.2f}: " + ", ".join(
            f"{m} {row[m]['tokens_per_s']:.1f}" for m in DRAFT_MODES
        ) + f" tokens/s; auto / best {row['auto_over_best']:.3f}")
    return rows


def keep_none_row(name: str, model: PipoModel, prompt: List[int], args: argparse.Namespace) -> Dict[str, Any]:
    base = baseline_of(model)
    sides = {
        "mlx-lm": lambda n: base_tokens(base, prompt, n),
        "keep-none": pipo_side(model, prompt, 1.0, "always"),  # τ >= 1 never drafts
    }
    runs = {k: summary(rs) for k, rs in interleave(sides, args.tokens, args.repeats, 8).items()}
    w = weight_bytes(model)
    row = {
        "model": name,
        "mlx_lm": runs["mlx-lm"],
        "keep_none": runs["keep-none"],
        "ratio": runs["keep-none"]["tokens_per_s"] / runs["mlx-lm"]["tokens_per_s"],
        "compressor_bound": compressor_bound(w),
        "weight_bytes": w,
    }
    log(f"  {name} keep-none {row['ratio']:.3f}x mlx-lm, bound {row['compressor_bound']:.3f}x")
    return row


def print_tables(results: Dict[str, Any]) -> None:
    p = results["policy"]
    print(f"\n## {p['model']}: drafting at forced keep rates, τ = {GATE}, tokens/s "
          f"(draft cost {p['draft_cost']:.3f}: auto drafts while the keep rate is above it)")
    print(f"{'keep rate':>10}{'always':>10}{'never':>10}{'auto':>10}{'auto/best':>11}"
          f"{'auto keep':>11}")
    for r in p["rows"]:
        flag = "" if r["within_target"] else f"   below {TARGET:.2f}"
        print(f"{r['forced_keep_rate']:>10.2f}{r['always']['tokens_per_s']:>10.1f}"
              f"{r['never']['tokens_per_s']:>10.1f}{r['auto']['tokens_per_s']:>10.1f}"
              f"{r['auto_over_best']:>10.3f}x{r['auto']['keep_rate']:>11.2f}{flag}")
    print("\n## keep-none (τ = 1) against mlx-lm on the same backbone arrays, tokens/s")
    print(f"{'model':<24}{'mlx-lm':>10}{'keep-none':>11}{'ratio':>9}{'bound':>9}")
    for r in results["keep_none"]:
        print(f"{r['model']:<24}{r['mlx_lm']['tokens_per_s']:>10.1f}"
              f"{r['keep_none']['tokens_per_s']:>11.1f}{r['ratio']:>8.3f}x"
              f"{r['compressor_bound']:>8.3f}x")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny config, few tokens, one repeat")
    p.add_argument("--model", default=str(DEMO), help="PIPO folder for the keep-none row (default: the demo)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=256, help="generated tokens per run")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--out", help="output folder (default: benchmarks/results for a full run, else build/bench)")
    args = p.parse_args(argv)
    settings = ("repeats", "tokens", "prompt_tokens", "model")
    args.full = not args.quick and all(getattr(args, k) == p.get_default(k) for k in settings)
    if args.quick:
        args.repeats, args.tokens, args.prompt_tokens = 1, 16, 16
    args.out = Path(args.out or (RESULTS if args.full else SCRATCH))
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    log(f"results go to {args.out}" + ("" if args.full else " (not a full run)"))
    tic = time.perf_counter()
    size = QUICK_SIZE if args.quick else FULL_SIZES["80M"]
    model = random_model(size)
    model.args.pad_token_id = model.args.vocab_size - 1  # random_prompt stays below it
    prompt = random_prompt(model.args.vocab_size, args.prompt_tokens, seed=1)
    name = f"random {size.name} float32"
    log(f"{name}: policy at forced keep rates")
    results: Dict[str, Any] = {
        "machine": machine(),
        "settings": {k: getattr(args, k) for k in ("repeats", "tokens", "prompt_tokens", "quick")},
        "policy": {"model": name, "gate": GATE, "target": TARGET, "draft_cost": draft_cost(model),
                   "rows": policy_rows(model, prompt, args)},
        "keep_none": [keep_none_row(name, model, prompt, args)],
    }
    del model
    demo, tokenizer = load(args.model)
    text = tokenizer.encode("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n")
    demo_prompt = (text * (args.prompt_tokens // len(text) + 1))[: args.prompt_tokens]
    results["keep_none"].append(keep_none_row(Path(args.model).name, demo, demo_prompt, args))
    results["machine"]["load_average_end"] = os.getloadavg()
    results["settings"]["wall_s"] = time.perf_counter() - tic
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "policy.json", results)
    print_tables(results)
    log(f"wrote {args.out / 'policy.json'} in {results['settings']['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
