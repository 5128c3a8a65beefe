"""Write held-out prompts for the demo model: function starts from one corpus split.

    python scripts/demo_prompts.py --split valid --out build/demo_prompts/valid.jsonl

The same function starts (signature and docstring) that benchmarks/eval_quality.py
generates from, as `{"text": ...}` records for `pipo_mlx.calibrate --prompts`.
Calibrate on the valid split; the test split is for reporting only.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from eval_quality import function_prompts  # noqa: E402

from pipo_mlx import load  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", default="valid", choices=("train", "valid", "test"))
    p.add_argument("--count", type=int, default=32, help="prompts to write (default 32)")
    p.add_argument("--model", default=str(REPO / "models" / "pipo-stdlib"), help="whose tokenizer limits the length")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    a = p.parse_args()
    _, tokenizer = load(a.model)
    prompts = function_prompts(tokenizer, a.split, a.count)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps({"text": x.text}) + "\n" for x in prompts))
    tmp.replace(out)
    print(f"wrote {len(prompts)} {a.split}-split prompts to {out}")


if __name__ == "__main__":
    main()
