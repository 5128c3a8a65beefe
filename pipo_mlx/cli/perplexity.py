"""Perplexity of a PIPO model on a text or JSONL file, per slot kind, beside its base's."""

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from ..calibration import base_spec, load_base
from ..errors import PipoError
from ..model_io import load, write_json_atomic
from ..scoring import cut_rows, perplexity, read_texts
from . import run_cli

RECORDED = "recorded"  # --base without a value: the base recorded with the model


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Per-token perplexity of a PIPO model on your text, as mlx_lm.perplexity: the "
        "text is cut into rows, each read as pairs under teacher forcing; token1 slots are "
        "scored by the backbone, token2 slots by the MTP head, reported apart and together, "
        "optionally beside the base model's perplexity on the same slots (docs/evaluation.md; pairs and slots: docs/design.md §1, §4).",
    )
    parser.add_argument("--model", required=True, help="PIPO model folder (written by convert.py)")
    parser.add_argument(
        "--data", required=True, type=Path,
        help="a text file (scored whole), or a .jsonl file of {\"text\"}, {\"prompt\", "
        "\"completion\"} or {\"messages\"} records (each scored whole, as training renders it)",
    )
    parser.add_argument(
        "--base", nargs="?", const=RECORDED,
        help="also score the base model: an mlx-lm folder or Hugging Face repo id; without a "
        "value, the one recorded with the model (config.json: pipo.base_model)",
    )
    parser.add_argument(
        "--sequence-length", type=int, default=512,
        help="tokens per row, even (default 512); the texts are joined and cut into rows",
    )
    parser.add_argument("--num-samples", type=int, default=-1, help="score the first N rows (default -1: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per pass (default 8)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--output", type=Path, help="also write the figures as JSON to this file")
    return parser


def log(message: str) -> None:
    print(f"[perplexity] {message}", file=sys.stderr, flush=True)


def print_table(figures: dict) -> None:
    print(f"{'':6} {'slots':7} {'tokens':>8} {'NLL':>8} {'perplexity':>11} {'± s.e.':>9}")
    for side, rows in figures.items():
        for kind, f in rows.items():
            print(f"{side:6} {kind:7} {f['tokens']:>8} {f['nll']:>8.4f} {f['perplexity']:>11.3f} "
                  f"{f['stderr']:>9.3f}")
    print("PIPO scores token1 slots with its backbone and token2 slots with its MTP head"
          + ("; the base scores the same slots, each from the token before it" if "base" in figures else ""))


def run(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise PipoError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_samples == 0 or args.num_samples < -1:
        raise PipoError(f"--num-samples must be positive or -1 (all), got {args.num_samples}")
    folder = Path(args.model).expanduser()
    model, tokenizer = load(str(folder))
    context = model.args.max_position_embeddings
    if args.sequence_length > context:
        raise PipoError(f"--sequence-length {args.sequence_length} is longer than the model's "
                        f"context of {context}")
    rows = cut_rows(read_texts(args.data, tokenizer), args.sequence_length, args.num_samples)
    base = None
    if args.base is not None:
        spec = base_spec(folder, None if args.base == RECORDED else args.base, model.args.base_model)
        base, _ = load_base(spec, tokenizer, model.args.vocab_size)
        log(f"base model: {spec}")
    log(f"{len(rows)} rows of up to {args.sequence_length} tokens from {args.data}")
    figures = perplexity(model, rows, base, args.batch_size, log)
    result = {side: {k: asdict(f) for k, f in rows_.items()} for side, rows_ in figures.items()}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    if args.output:
        write_json_atomic(args.output, {"model": str(folder), "data": str(args.data),
                                        "sequence_length": args.sequence_length, **result})
        log(f"wrote {args.output}")


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda: run(setup_arg_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
