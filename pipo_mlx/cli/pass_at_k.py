"""pass@k of a PIPO model and its base on the paper's benchmarks or your own problems."""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ..calibration import base_spec, load_base
from ..decode import DEFAULT_CONF_THRESHOLD, check_threshold
from ..drafting import DEFAULT_DRAFT, DRAFT_MODES
from ..errors import PipoError
from ..model_io import load, write_json_atomic
from ..passk import Settings, base_side, budgets, pipo_side, run
from ..problems import HUB_DATASETS, hub_problems, read_problems
from . import run_cli

D = Settings()


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Sample answers to math and multiple-choice problems with a PIPO model and its "
        "base, side by side, and score pass@1 and pass@k. Each side's answers go to "
        "OUT/pipo/{dataset}-results.jsonl and OUT/base/{dataset}-results.jsonl in the PIPO "
        "authors' results format, which their rule scorer (pipo/eval/eval_1_rule.py OUT/pipo) "
        "reads unchanged; a stopped run resumes where it stopped (docs/evaluation.md; the decoder: docs/design.md §5).",
    )
    parser.add_argument("--model", required=True, help="PIPO model folder (written by convert.py)")
    parser.add_argument(
        "--base", help="the base model: an mlx-lm folder or Hugging Face repo id (default: the one "
        "recorded in the model's config.json, pipo.base_model)",
    )
    parser.add_argument("--no-base", action="store_true", help="run PIPO alone")
    parser.add_argument(
        "--problems", action="append", type=Path, default=[], metavar="JSONL",
        help="your problems (repeatable): one {\"prompt\", \"final_answer\"} object a line, optionally "
        "with \"dataset\" (default: the file name), \"micro_index\" and \"metadata\"",
    )
    parser.add_argument(
        "--datasets", default="",
        help=f"the paper's rule-scored benchmarks from the Hugging Face hub, comma-separated: "
        f"{', '.join(HUB_DATASETS)} (needs pip install 'pipo_mlx[eval]' and a network)",
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="where the results go")
    parser.add_argument("--limit", type=int, help="the first N problems of each file or benchmark")
    parser.add_argument("--num-samples", "-k", type=int, default=D.num_samples,
                        help=f"answers per problem and side, the k of pass@k (default {D.num_samples})")
    parser.add_argument("--max-tokens", "-m", type=int, default=D.max_tokens,
                        help=f"most tokens per answer, cut to the model's context (default {D.max_tokens})")
    parser.add_argument("--temp", type=float, default=D.temp, help=f"temperature (default {D.temp})")
    parser.add_argument("--top-p", type=float, default=D.top_p, help=f"top-p (default {D.top_p})")
    parser.add_argument("--top-k", type=int, default=D.top_k, help=f"top-k (default {D.top_k})")
    parser.add_argument("--presence-penalty", type=float, default=D.presence_penalty,
                        help=f"presence penalty over the last 20 tokens, mlx-lm's (default {D.presence_penalty})")
    parser.add_argument("--seed", type=int, default=D.seed, help="answer j of a problem is seeded from "
                        "(seed, dataset, micro_index, j), the same on both sides (default 0)")
    parser.add_argument(
        "--conf-threshold", type=float,
        help=f"PIPO's gate (default: the model's stored threshold, else {DEFAULT_CONF_THRESHOLD})",
    )
    parser.add_argument("--draft", choices=DRAFT_MODES, default=DEFAULT_DRAFT,
                        help="which PIPO steps draft token2 (default auto)")
    parser.add_argument("--no-thinking", action="store_true",
                        help="render prompts with the chat template's enable_thinking off")
    return parser


def log(message: str) -> None:
    print(f"[pass@k] {message}", file=sys.stderr, flush=True)


def check_args(args: argparse.Namespace) -> None:
    if not args.problems and not args.datasets:
        raise PipoError("no problems: give --problems FILE.jsonl or --datasets " + ",".join(HUB_DATASETS))
    for name, least in (("num_samples", 1), ("max_tokens", 1), ("limit", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise PipoError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if args.conf_threshold is not None:
        check_threshold(args.conf_threshold)
    if not args.temp >= 0 or not 0 < args.top_p <= 1:
        raise PipoError("--temp must be 0 or more and --top-p in (0, 1]")


def print_table(table: dict) -> None:
    head = f"{'dataset':16} {'side':5} {'problems':>8} {'answers':>8} {'pass@1':>7} {'pass@k':>7} " \
           f"{'tokens':>8} {'PADs':>7} {'keep':>6}"
    print(head)
    for name, sides in table.items():
        for side, f in sides.items():
            keep = f"{f['keep_rate']:.3f}" if "keep_rate" in f else ""
            print(f"{name:16} {side:5} {f['problems']:>8} {f['answers']:>8} {f['pass@1']:>7.3f} "
                  f"{f['pass@k']:>7.3f} {f['mean_tokens']:>8.1f} {f['mean_pads']:>7.1f} {keep:>6}")


def main_run(args: argparse.Namespace) -> None:
    check_args(args)
    problems = []
    for path in args.problems:
        problems += read_problems(path)[: args.limit]
    for name in filter(None, (n.strip() for n in args.datasets.split(","))):
        problems += hub_problems(name)[: args.limit]
    folder = Path(args.model).expanduser()
    model, tokenizer = load(str(folder))
    settings = Settings(
        num_samples=args.num_samples, max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p,
        top_k=args.top_k, presence_penalty=args.presence_penalty, seed=args.seed,
        conf_threshold=args.conf_threshold, draft=args.draft, enable_thinking=not args.no_thinking)
    prompts = budgets(problems, tokenizer, model.args.max_position_embeddings, settings)
    sides = [pipo_side(model, tokenizer, settings)]
    if not args.no_base:
        spec = base_spec(folder, args.base, model.args.base_model)
        base, base_tokenizer = load_base(spec, tokenizer, model.args.vocab_size)
        sides.append(base_side(base, base_tokenizer, settings))
        log(f"base model: {spec}")
    log(f"{len(problems)} problems x {args.num_samples} answers on {' and '.join(s.name for s in sides)} "
        f"into {args.output_dir}")
    table = run(problems, prompts, sides, args.output_dir, settings, log)
    print_table(table)
    write_json_atomic(args.output_dir / "summary.json", {"model": str(folder), "settings": vars(settings),
                                                         "results": table})
    log(f"wrote {args.output_dir}/summary.json and the results files")


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda: main_run(setup_arg_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
