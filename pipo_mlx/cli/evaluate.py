"""Evaluate a PIPO model with lm-evaluation-harness, as mlx_lm.evaluate does for mlx-lm models."""

import argparse
import json
import os
import re
from pathlib import Path
from typing import List, Optional

from ..decode import DEFAULT_CONF_THRESHOLD, check_threshold
from ..drafting import DEFAULT_DRAFT, DRAFT_MODES
from ..errors import PipoError
from ..likelihood import DEFAULT_LAYOUT, LAYOUTS
from ..model_io import load, write_json_atomic
from . import run_cli


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a PIPO model on lm-evaluation-harness tasks (pip install "
        "'pipo_mlx[eval]'). Log-likelihoods come from one teacher-forced pass: the context "
        "paired as the decoder pairs a prompt, the continuation's token1 slots scored by the "
        "backbone and its token2 slots by the MTP head; generation tasks decode with PIPO at "
        "the chosen threshold and drafting policy, and the keep rate is printed beside the "
        "scores (docs/evaluation.md; pairs and slots: docs/design.md §1, §4).",
    )
    parser.add_argument("--model", required=True, help="PIPO model folder (written by convert.py)")
    parser.add_argument("--tasks", nargs="+", required=True, help="lm-eval task or group names")
    parser.add_argument(
        "--include-path", action="append", default=[], metavar="DIR",
        help="a folder of your own task YAML files (repeatable), as lm_eval's --include_path",
    )
    parser.add_argument("--output-dir", default=".", help="where the results JSON goes (default .)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="requests scored in one pass (default 8)"
    )
    parser.add_argument("--num-shots", type=int, help="few-shot examples (default: the task's)")
    parser.add_argument(
        "--max-tokens", type=int,
        help="most tokens to generate per request; overrides the tasks' max_gen_toks",
    )
    parser.add_argument("--limit", type=int, help="at most this many examples per task")
    parser.add_argument("--seed", type=int, default=123, help="random seed (default 123)")
    parser.add_argument(
        "--apply-chat-template", action=argparse.BooleanOptionalAction, default=None,
        help="render prompts through the chat template (default: when the tokenizer has one)",
    )
    parser.add_argument(
        "--chat-template-args", type=json.loads, default={},
        help='JSON arguments for the chat template, e.g. \'{"enable_thinking": false}\'',
    )
    parser.add_argument(
        "--fewshot-as-multiturn", action="store_true",
        help="few-shot examples as a multi-turn conversation (with --apply-chat-template)",
    )
    parser.add_argument(
        "--layout", choices=LAYOUTS, default=DEFAULT_LAYOUT,
        help="how a continuation is read for log-likelihoods: pairs (default; two tokens a "
        "pair, every second token from the MTP head: every draft kept) or token1 (each token "
        "paired with PAD and scored by the backbone, as decoding at τ ≥ 1 reads it)",
    )
    parser.add_argument(
        "--conf-threshold", type=float,
        help="generation: keep a drafted token2 when the confidence head reaches this; below 0 "
        f"keeps all, 1 or more none (default: the model's stored threshold, else "
        f"{DEFAULT_CONF_THRESHOLD})",
    )
    parser.add_argument(
        "--draft", choices=DRAFT_MODES, default=DEFAULT_DRAFT,
        help="generation: which steps draft token2 (default auto; see pipo_mlx.generate --help)",
    )
    parser.add_argument("--temp", type=float, default=0.0, help="generation temperature (default 0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="generation top-p (default 1: off)")
    parser.add_argument("--top-k", type=int, default=0, help="generation top-k (default 0: off)")
    parser.add_argument(
        "--confirm-run-unsafe-code", action="store_true",
        help="allow tasks that execute the model's code",
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise PipoError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise PipoError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.limit is not None and args.limit < 1:
        raise PipoError(f"--limit must be at least 1, got {args.limit}")
    if args.conf_threshold is not None:
        check_threshold(args.conf_threshold)
    for folder in args.include_path:
        if not Path(folder).is_dir():
            raise PipoError(f"--include-path {folder}: no such folder")


def task_manager(names: List[str], include: List[str]):
    """lm-eval's task index: the user's folders alone when they hold every task named (indexing
    lm-eval's own thousands of tasks takes seconds), else with lm-eval's."""
    from lm_eval.tasks import TaskManager

    def missing(manager) -> List[str]:
        known = set(manager.all_tasks)
        return [n for n in names if n not in known]

    if include:
        manager = TaskManager(include_path=include, include_defaults=False)
        if not missing(manager):
            return manager
    manager = TaskManager(include_path=include or None)
    unknown = missing(manager)
    if unknown:
        raise PipoError(f"unknown task {', '.join(unknown)}: not an lm-eval task"
                        + (" nor in --include-path" if include else "; for your own YAML tasks "
                           "pass their folder with --include-path"))
    return manager


def run(args: argparse.Namespace) -> None:
    check_args(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import lm_eval
        from lm_eval.utils import make_table
    except ImportError:
        raise PipoError("pipo_mlx.evaluate needs lm-evaluation-harness: pip install 'pipo_mlx[eval]'") from None
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from ..harness import PipoLM, stderr_log

    manager = task_manager(args.tasks, args.include_path)
    model, tokenizer = load(args.model)
    chat = tokenizer.has_chat_template if args.apply_chat_template is None else args.apply_chat_template
    if chat and not tokenizer.has_chat_template:
        raise PipoError("--apply-chat-template: the model's tokenizer has no chat template")
    mx.random.seed(args.seed)
    lm = PipoLM(
        model, tokenizer, layout=args.layout, batch_size=args.batch_size, max_tokens=args.max_tokens,
        conf_threshold=args.conf_threshold, draft=args.draft,
        sampler=make_sampler(args.temp, args.top_p, top_k=args.top_k), use_chat_template=chat,
        chat_template_args=args.chat_template_args,
    )
    results = lm_eval.simple_evaluate(
        model=lm, tasks=args.tasks, task_manager=manager, num_fewshot=args.num_shots,
        limit=args.limit, apply_chat_template=chat, fewshot_as_multiturn=args.fewshot_as_multiturn,
        random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
        fewshot_random_seed=args.seed, confirm_run_unsafe_code=args.confirm_run_unsafe_code,
    )
    figures = lm.figures()
    out = Path(args.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]+", "_", Path(args.model).name or "model")
    path = out / f"eval_{name}_{'_'.join(args.tasks)}.json"
    record = {"model": str(args.model), "pipo": figures, "results": results["results"],
              "n-samples": results.get("n-samples"), "configs": results.get("configs")}
    write_json_atomic(path, json.loads(json.dumps(record, default=str)))
    print(make_table(results))
    if figures["generations"]:
        print(f"PIPO decoding over {figures['generations']} generations at τ = "
              f"{figures['conf_threshold']:g}, drafting {figures['draft']}: keep rate "
              f"{figures['keep_rate']:.3f}, {figures['tokens_per_step']:.2f} tokens per step")
    stderr_log(f"wrote {path}")


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda: run(setup_arg_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
