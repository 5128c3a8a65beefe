"""Generate text with a PIPO model: one backbone step yields one or two tokens."""

import argparse

from pipo_mlx.errors import run_cli
from pipo_mlx.generate import (
    DEFAULT_CONF_THRESHOLD,
    DEFAULT_MAX_TOKENS,
    DEFAULT_PREFILL_STEP_SIZE,
    DEFAULT_TOKEN2_HEAD,
    run,
)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate with a PIPO (Pair-In, Pair-Out) model converted by convert.py."
    )
    parser.add_argument(
        "--model",
        help="folder written by convert.py, or the Hugging Face repo id of a merged "
        "PIPO checkpoint (converted once into ~/.cache/pipo_mlx, or $PIPO_MLX_CACHE)",
    )
    parser.add_argument("--prompt", "-p", help="the message ('-' reads stdin)")
    parser.add_argument("--system-prompt", help="system message for the chat template")
    parser.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"most tokens to generate per reply, -1 for no limit (default {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--temp", type=float, default=0.0, help="sampling temperature (default 0: greedy)"
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)"
    )
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: off)"
    )
    parser.add_argument("--min-p", type=float, default=0.0, help="min-p sampling (default 0: off)")
    parser.add_argument(
        "--presence-penalty", type=float, help="subtracted from the logits of recent tokens"
    )
    parser.add_argument(
        "--repetition-penalty", type=float, help="divides the logits of recent tokens"
    )
    parser.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    parser.add_argument(
        "--conf-threshold",
        default=str(DEFAULT_CONF_THRESHOLD),
        help="keep the drafted second token when the confidence head's probability "
        f"reaches this (default {DEFAULT_CONF_THRESHOLD}); below 0 keeps all, 1 or "
        "more keeps none and skips the draft",
    )
    parser.add_argument(
        "--token2-head",
        default=DEFAULT_TOKEN2_HEAD,
        help="how the drafted token2's logits are computed: full (the LM head, default), "
        "q4 or q8 (a 4- or 8-bit copy of it), top:K (only the first K token ids, the "
        "frequent ones in a BPE vocabulary), or q4+top:K / q8+top:K",
    )
    parser.add_argument(
        "--prefill-step-size",
        type=int,
        default=DEFAULT_PREFILL_STEP_SIZE,
        help=f"prompt tokens per prefill chunk, kept even (default {DEFAULT_PREFILL_STEP_SIZE})",
    )
    parser.add_argument(
        "--ignore-chat-template", action="store_true", help="use the prompt as raw text"
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="interactive chat; the caches persist, so a turn prefills only its new tokens",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print time to first token, speeds, tokens per step, token2 keep rate and peak memory",
    )
    return parser


if __name__ == "__main__":
    run_cli(lambda: run(setup_arg_parser().parse_args()))
