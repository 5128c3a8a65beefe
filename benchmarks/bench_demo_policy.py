"""Adaptive drafting on the shipped demo at the paper's threshold, paired round by round.

    python benchmarks/bench_demo_policy.py            # about 2 minutes; results/policy_demo.json
    python benchmarks/bench_demo_policy.py --quick    # a smoke run, to build/bench/

At τ = 0.95 the demo keeps almost no drafts, so drafting at every step is
slower than never drafting. Each round decodes the same random 128-token
prompt with draft="always", "never" and "auto" (256 tokens, stream_generate,
no end-of-sequence), the order rotating from round to round; the figures are
medians of the per-round ratios to "never", which cancel the slow and fast
stretches this machine goes through better than medians of the speeds do.
"""

import argparse
import os
import statistics
from pathlib import Path

import numpy as np

from pipo_mlx import load
from pipo_mlx.model_io import write_json_atomic
from pipo_mlx.speed import interleave, pipo_side

REPO = Path(__file__).resolve().parents[1]
MODES = ("always", "never", "auto")
THRESHOLD = 0.95


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds of 16 tokens")
    p.add_argument("--out", help="the JSON file (default: see above)")
    a = p.parse_args()
    rounds, n = (2, 16) if a.quick else (9, 256)
    model, tokenizer = load(str(REPO / "models" / "pipo-stdlib"))
    tokenizer.eos_token_ids = set()
    prompt = np.random.default_rng(0).integers(2, model.args.vocab_size - 8, 128).tolist()
    load_start = os.getloadavg()
    sides = {m: pipo_side(model, tokenizer, prompt, conf_threshold=THRESHOLD, draft=m) for m in MODES}
    runs = {m: [1 / r.s_per_token for r in rs] for m, rs in interleave(sides, n, rounds, 16).items()}
    ratios = {m: [x / y for x, y in zip(runs[m], runs["never"])] for m in ("always", "auto")}
    results = {
        "threshold": THRESHOLD, "tokens": n, "rounds": rounds,
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "tokens_per_s_runs": runs,
        "over_never_runs": ratios,
        "over_never": {m: statistics.median(v) for m, v in ratios.items()},
    }
    out = Path(a.out) if a.out else REPO / ("build/bench" if a.quick else "benchmarks/results") / "policy_demo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, results)
    for m, v in results["over_never"].items():
        print(f"τ = {THRESHOLD}, draft={m}: {v:.3f}x of draft=never (median of {rounds} paired rounds)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
