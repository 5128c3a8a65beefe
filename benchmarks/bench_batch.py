"""Aggregate decoding throughput at batch sizes 1 to 16: PIPO's batch against mlx-lm's.

    python benchmarks/bench_batch.py            # about 22 minutes on 2 CPU cores
    python benchmarks/bench_batch.py --quick    # a smoke run: build/bench/

For each model and batch size B, B prompts of --prompt-tokens random ids each
generate exactly --tokens new tokens (no end-of-sequence) through:

* mlx-lm    mlx-lm's `BatchGenerator` on the backbone alone (the same arrays);
* keep-all  `pipo_mlx.BatchGenerator` keeping every draft (τ = -1);
* default   the same at the model's default threshold (its stored one, else 0.95).

Aggregate tokens/s = B x tokens / wall time of the whole call, prefill
included, the three run one after another in rotating order, median of
--repeats. Models: the random configurations of bench_decode.py (float32,
LM head 1/8 of the backbone) and the shipped demo model (8-bit) with its
backbone. A full run (defaults) writes benchmarks/results/batch.json and
batch.png, which docs/benchmarks.md quotes; other runs write to build/bench/.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import FULL_SIZES, QUICK_SIZE, baseline_of, log, machine, random_model  # noqa: E402

from pipo_mlx import load  # noqa: E402
from pipo_mlx.batch import BatchGenerator  # noqa: E402
from pipo_mlx.decode import recommended_threshold  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS, SCRATCH = REPO / "benchmarks" / "results", REPO / "build" / "bench"
DEMO = REPO / "models" / "pipo-stdlib"
SIZES = (1, 4, 8, 16)
RANDOM = ("20M", "80M", "190M")


def run_mlx_lm(base, prompts: List[List[int]], tokens: int) -> float:
    from mlx_lm.generate import BatchGenerator as LmBatch

    gen = LmBatch(base, completion_batch_size=max(32, len(prompts)))
    tic = time.perf_counter()
    gen.insert(prompts, [tokens] * len(prompts))
    n = 0
    while responses := gen.next_generated():
        n += len(responses)
    seconds = time.perf_counter() - tic
    gen.close()
    assert n == tokens * len(prompts), n
    return n / seconds


def run_pipo(model, prompts: List[List[int]], tokens: int, threshold: float) -> float:
    gen = BatchGenerator(model)
    tic = time.perf_counter()
    for p in prompts:
        gen.insert(p, tokens, conf_threshold=threshold)
    n = 0
    while len(gen):
        n += len(gen.next())
    seconds = time.perf_counter() - tic
    assert n == tokens * len(prompts), n
    return n / seconds


def measure(name: str, model, args) -> Dict[str, Any]:
    base = baseline_of(model)
    default = recommended_threshold(model)
    vocab = model.args.vocab_size
    rng = np.random.default_rng(0)
    sides = {"mlx-lm": lambda p: run_mlx_lm(base, p, args.tokens),
             "keep-all": lambda p: run_pipo(model, p, args.tokens, -1.0),
             "default": lambda p: run_pipo(model, p, args.tokens, default)}
    rows = []
    for b in args.sizes:
        prompts = [rng.integers(3, vocab - 2, args.prompt_tokens).tolist() for _ in range(b)]
        for side in sides.values():  # warm-up: compile and allocate once per shape
            side(prompts[:1])
        rates: Dict[str, List[float]] = {k: [] for k in sides}
        for r in range(args.repeats):
            order = list(sides)[r % 3:] + list(sides)[: r % 3]
            for k in order:
                rates[k].append(sides[k](prompts))
        row = {"batch": b, **{k: statistics.median(v) for k, v in rates.items()}}
        row["keep-all / mlx-lm"] = row["keep-all"] / row["mlx-lm"]
        row["default / mlx-lm"] = row["default"] / row["mlx-lm"]
        rows.append(row)
        log(f"{name} B={b}: mlx-lm {row['mlx-lm']:.0f}, keep-all {row['keep-all']:.0f} "
            f"({row['keep-all / mlx-lm']:.2f}x), τ={default} {row['default']:.0f} ({row['default / mlx-lm']:.2f}x) tok/s")
    return {"name": name, "default_threshold": default, "rows": rows}


def plot(results: Dict[str, Any], path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), squeeze=False)
    for ax, m in zip(axes[0], models):
        sizes = [r["batch"] for r in m["rows"]]
        for key, style in (("mlx-lm", "k--o"), ("keep-all", "C0-o"), ("default", "C1-o")):
            label = f"τ={m['default_threshold']}" if key == "default" else key
            ax.plot(sizes, [r[key] for r in m["rows"]], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_title(m["name"])
        ax.set_xlabel("batch size")
        ax.set_ylabel("aggregate tokens/s")
        ax.legend(fontsize=8)
    fig.suptitle(f"batched decoding, {results['machine']['cores']} CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model, batch 1 and 4, one repeat")
    p.add_argument("--model", default=str(DEMO), help="a converted PIPO folder (default: the shipped demo)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64, help="generated tokens per row")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--out", help="output folder (default: benchmarks/results for a full run, else build/bench)")
    args = p.parse_args(argv)
    settings = ("repeats", "tokens", "prompt_tokens", "model")
    args.full = not args.quick and all(getattr(args, k) == p.get_default(k) for k in settings)
    args.sizes = (1, 4) if args.quick else SIZES
    if args.quick:
        args.repeats, args.tokens, args.prompt_tokens = 1, 8, 16
    args.out = Path(args.out or (RESULTS if args.full else SCRATCH))
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    log(f"results go to {args.out}" + ("" if args.full else " (not a full run)"))
    tic = time.perf_counter()
    results: Dict[str, Any] = {
        "machine": machine(),
        "settings": {k: getattr(args, k) for k in ("repeats", "tokens", "prompt_tokens", "quick")},
        "models": [],
    }
    sizes = [QUICK_SIZE] if args.quick else [FULL_SIZES[s] for s in RANDOM]
    for size in sizes:
        model = random_model(size)
        model.args.pad_token_id = model.args.vocab_size - 1
        results["models"].append(measure(f"random {size.name} float32", model, args))
        del model
        mx.clear_cache()
    model, _ = load(args.model)
    results["models"].append(measure(f"{Path(args.model).name} (demo)", model, args))
    results["machine"]["load_average_end"] = os.getloadavg()
    results["settings"]["wall_s"] = time.perf_counter() - tic
    args.out.mkdir(parents=True, exist_ok=True)
    results["chart"] = plot(results, args.out / "batch.png")
    tmp = args.out / ".batch.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    os.replace(tmp, args.out / "batch.json")
    print("| model | batch | mlx-lm tok/s | keep-all tok/s | default τ tok/s | keep-all / mlx-lm | default / mlx-lm |")
    print("|---|---|---|---|---|---|---|")
    for m in results["models"]:
        for r in m["rows"]:
            print(f"| {m['name']} | {r['batch']} | {r['mlx-lm']:.0f} | {r['keep-all']:.0f} | {r['default']:.0f} "
                  f"| {r['keep-all / mlx-lm']:.2f}x | {r['default / mlx-lm']:.2f}x |")
    log(f"wrote {args.out / 'batch.json'} in {results['settings']['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
