"""Generate text with a PIPO model: one backbone step yields one or two tokens."""

import argparse
import os
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import str2bool
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..chat import ChatSession
from ..conversion import MissingHeadsError, convert
from ..decode import (
    DEFAULT_CONF_THRESHOLD,
    DEFAULT_MAX_TOKENS,
    DEFAULT_PREFILL_STEP_SIZE,
    PipoResponse,
    check_threshold,
    print_figures,
)
from ..drafting import DEFAULT_DRAFT, DRAFT_MODES
from ..errors import PipoError
from ..hf_io import is_hub_id, read_json
from ..interrupts import ctrl_c_noted
from ..kv_cache import (
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_QUANTIZED_KV_START,
    KV_BITS,
    check_kv_options,
    kv_quantization,
)
from ..model_io import load
from ..prompt_cache_file import load_prompt_cache
from ..token2_head import DEFAULT_TOKEN2_HEAD, make_token2_head, parse_token2_head
from ..tokenizer_options import add_eos_tokens, read_chat_template, set_chat_template, template_kwargs
from . import run_cli

DEMO = Path("models") / "pipo-stdlib"  # built by scripts/make_demo.py, shipped in the repository
# Where the demo is looked for: the checkout this package runs from, then the
# working directory (a checkout with the package installed from a wheel).
DEMO_PLACES = (Path(__file__).resolve().parents[2] / DEMO, Path.cwd() / DEMO)
DEFAULT_CACHE_DIR = "~/.cache/pipo_mlx"  # hub repo ids are converted here once


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate with a PIPO (Pair-In, Pair-Out) model converted by convert.py. "
        "Each decoding step yields token1 and a drafted token2 that the confidence head "
        "keeps or drops (docs/design.md §5)."
    )
    parser.add_argument(
        "--model",
        help="folder written by convert.py, or the Hugging Face repo id of a merged "
        "PIPO checkpoint (converted once into ~/.cache/pipo_mlx, or $PIPO_MLX_CACHE); "
        "default: the demo model shipped in the repository's models/pipo-stdlib",
    )
    parser.add_argument(
        "--allow-fresh-heads",
        action="store_true",
        help="accept a hub repo id of a plain Qwen3.5 model and generate with fresh, "
        "untrained PIPO heads (the text is garbage until the heads are trained)",
    )
    parser.add_argument(
        "--adapter-path",
        help="a train_heads.py output folder (its latest checkpoint) or one of its "
        "step-NNNNNNN folders: its LoRA and heads are put on --model, unfused",
    )
    parser.add_argument("--prompt", "-p", help="the message ('-' reads stdin)")
    parser.add_argument(
        "--system-prompt", help="system message; needs a tokenizer with a chat template"
    )
    parser.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"most tokens to generate per reply, -1 for no limit (default {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--temp", type=float, default=0.0, help="sampling temperature, >= 0 (default 0: greedy)"
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1: off)"
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
        help="keep the drafted second token when the confidence head's probability "
        "reaches this; below 0 keeps all, 1 or more keeps none and skips the draft "
        f"(default: the threshold stored with the model, else {DEFAULT_CONF_THRESHOLD}, "
        "the paper's)",
    )
    parser.add_argument(
        "--draft",
        choices=DRAFT_MODES,
        default=DEFAULT_DRAFT,
        help="which steps run the MTP head that drafts token2: auto (default) drafts while "
        "the recent keep rate pays for the extra weights a drafting step reads, and "
        "probes now and then otherwise, so a model with poor drafts decodes about as "
        "fast as without them; always drafts at every step; never drafts (the same as "
        "--conf-threshold 1)",
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
        help=f"prompt tokens per prefill chunk, at least 2, kept even "
        f"(default {DEFAULT_PREFILL_STEP_SIZE})",
    )
    parser.add_argument(
        "--max-kv-size",
        type=int,
        help="rotating attention cache of this many tokens, in whole pairs (an odd size "
        "rounds down), the first 4 tokens kept (docs/memory.md)",
    )
    parser.add_argument(
        "--kv-bits",
        type=int,
        help=f"quantize the attention cache to this many bits ({', '.join(map(str, KV_BITS))}; "
        "default: not quantized)",
    )
    parser.add_argument(
        "--kv-group-size",
        type=int,
        help=f"group size of --kv-bits' quantization (default {DEFAULT_KV_GROUP_SIZE})",
    )
    parser.add_argument(
        "--quantized-kv-start",
        type=int,
        help="with --kv-bits, quantize once the cache holds this many tokens "
        f"(default {DEFAULT_QUANTIZED_KV_START})",
    )
    parser.add_argument(
        "--ignore-chat-template", action="store_true", help="use the prompt as raw text"
    )
    parser.add_argument(
        "--chat-template",
        help="a Jinja chat template, or a file holding one, to use instead of the tokenizer's",
    )
    parser.add_argument(
        "--chat-template-config",
        help="JSON object of keyword arguments for the chat template, as mlx_lm.generate "
        "takes, e.g. '{\"enable_thinking\": false}'",
    )
    parser.add_argument(
        "--extra-eos-token",
        nargs="+",
        default=(),
        help="more tokens (their text or id) that end generation, as in mlx_lm.generate",
    )
    parser.add_argument(
        "--prompt-cache-file",
        help="go on from a prompt cached by pipo_mlx.cache_prompt (made with this --model): "
        "--prompt continues its user message",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="interactive chat; the caches persist, so a turn prefills only its new tokens",
    )
    parser.add_argument(
        "--verbose",
        type=str2bool,
        nargs="?",
        const=True,
        default=True,
        help="print time to first token, speeds, tokens per step, token2 keep rate and peak "
        "memory after each reply (default True, as mlx_lm.generate; --verbose False or "
        "--quiet turns it off)",
    )
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="print only the generated text"
    )
    return parser


def not_converted(spec: str) -> PipoError:
    return PipoError(
        f"{spec} is not a PIPO conversion with trained heads; convert it with "
        f"`python convert.py --hf-path {spec} --mlx-path DIR`, train the heads of a plain "
        "Qwen3.5 with `python train_heads.py --model DIR ...`, and pass the result as "
        "--model (or pass --allow-fresh-heads to try a hub model's untrained heads)"
    )


def load_model(
    spec: Optional[str], allow_fresh_heads: bool = False, adapter_path: Optional[str] = None
) -> Tuple[nn.Module, TokenizerWrapper]:
    """A converted folder, or a Hugging Face repo id converted once into a local cache,
    with a training checkpoint on top when `adapter_path` names one."""
    if spec is None:
        demo = next((p for p in DEMO_PLACES if p.is_dir()), None)
        if demo is None:
            raise PipoError(
                f"no --model given and the demo model {DEMO} is not here (it ships with a "
                "checkout of the repository); pass --model with a folder written by "
                "convert.py or the Hugging Face repo id of a merged PIPO checkpoint"
            )
        print(
            f"[INFO] no --model given: using the shipped demo model {demo} "
            "(trained on Python's standard library)",
            file=sys.stderr,
        )
        return load(str(demo), adapter_path=adapter_path)
    local = Path(spec).expanduser()
    if not is_hub_id(spec):
        if local.is_dir() and "pipo" not in read_json(local / "config.json", "a model folder"):
            raise not_converted(spec)
        return load(str(local), adapter_path=adapter_path)
    root = Path(os.environ.get("PIPO_MLX_CACHE", DEFAULT_CACHE_DIR)).expanduser()
    target = root / spec.replace("/", "--")
    if not target.is_dir():
        print(f"[INFO] converting {spec} into {target} (first use only)", file=sys.stderr)
        try:
            convert(spec, str(target), require_trained_heads=not allow_fresh_heads)
        except MissingHeadsError:
            raise not_converted(spec) from None
    return load(str(target), adapter_path=adapter_path)


def _interrupt() -> None:
    raise KeyboardInterrupt


def _stream(responses: Iterator[PipoResponse], tokenizer: TokenizerWrapper, verbose: bool) -> None:
    """Print text as it comes; on Ctrl-C print the rest of what was produced and re-raise."""
    printed, tokens, response = "", [], None
    try:
        # Noted as well as raised: an interrupt swallowed in a finaliser still
        # stops the stream at the next token.
        with ctrl_c_noted(_interrupt) as pressed:
            for response in responses:
                print(response.text, end="", flush=True)
                printed += response.text
                tokens.append(response.token)
                if pressed():
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        # The streaming detokenizer may hold back the end of a word.
        text = tokenizer.decode([t for t in tokens if t not in tokenizer.eos_token_ids])
        print(text[len(printed) :] if text.startswith(printed) else "", flush=True)
        if verbose and response is not None:
            print_figures(response)
        raise
    print(flush=True)
    if verbose and response is not None:
        print_figures(response)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be refused before loading a model."""
    parse_token2_head(args.token2_head)
    if args.max_tokens == 0 or args.max_tokens < -1:
        raise PipoError(
            f"--max-tokens must be positive (or -1 for no limit), got {args.max_tokens}"
        )
    if not args.temp >= 0:
        raise PipoError(f"--temp must be 0 (greedy) or more, got {args.temp}")
    if not 0 < args.top_p <= 1:
        raise PipoError(f"--top-p must lie in (0, 1] (1 turns it off), got {args.top_p}")
    if args.prefill_step_size < 2:
        raise PipoError(
            f"--prefill-step-size must be at least 2 (one pair), got {args.prefill_step_size}"
        )
    check_kv_args(args)


def check_kv_args(args: argparse.Namespace) -> None:
    """The KV-cache flags (here and in the server) checked on their own and together."""
    if args.kv_bits is None and (args.kv_group_size, args.quantized_kv_start) != (None, None):
        raise PipoError("--kv-group-size and --quantized-kv-start only apply with --kv-bits")
    check_kv_options(**kv_options(args))


def kv_options(args: argparse.Namespace) -> dict:
    """The KV-cache options as `stream_generate` takes them."""
    group = DEFAULT_KV_GROUP_SIZE if args.kv_group_size is None else args.kv_group_size
    start = DEFAULT_QUANTIZED_KV_START if args.quantized_kv_start is None else args.quantized_kv_start
    return dict(kv_bits=args.kv_bits, kv_group_size=group, quantized_kv_start=start,
                max_kv_size=args.max_kv_size)


def read_prompt(args: argparse.Namespace) -> Optional[str]:
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    elif prompt is not None:  # as mlx-lm: escapes typed on the command line
        prompt = prompt.replace("\\n", "\n").replace("\\t", "\t")
    if prompt is not None:
        if not prompt.strip():
            raise PipoError("the prompt is empty; pass some text with --prompt ('-' reads stdin)")
    elif not args.chat:
        raise PipoError("no prompt; pass --prompt TEXT ('-' reads stdin) or use --chat")
    return prompt


def run(args: argparse.Namespace) -> None:
    """The body of generate.py; `args` are its parsed options."""
    threshold = None
    if args.conf_threshold is not None:
        try:
            threshold = check_threshold(float(args.conf_threshold))
        except ValueError:  # not a number, or NaN (check_threshold's PipoError is one too)
            raise PipoError(
                f"--conf-threshold {args.conf_threshold!r} is not a number; use e.g. 0.95 "
                "(below 0 keeps every drafted token, 1 or more never drafts)"
            ) from None
    check_args(args)
    prompt = read_prompt(args)
    template = read_chat_template(args.chat_template) if args.chat_template is not None else None
    chat_template_kwargs = template_kwargs(args.chat_template_config, "--chat-template-config")

    model, tokenizer = load_model(args.model, args.allow_fresh_heads, args.adapter_path)
    kv_quantization(model, **kv_options(args))  # the group size against the model's heads
    # Our own context check names the problem; the tokenizer's length warning
    # would only print ahead of it.
    tokenizer.model_max_length = sys.maxsize
    add_eos_tokens(tokenizer, args.extra_eos_token)
    set_chat_template(tokenizer, template)
    cached = None
    if args.prompt_cache_file is not None:
        if args.system_prompt is not None:
            raise PipoError("a system prompt belongs in the cached prompt: give it to "
                            "pipo_mlx.cache_prompt --system-prompt")
        cached = load_prompt_cache(args.prompt_cache_file, model)
    if not tokenizer.has_chat_template and not args.ignore_chat_template:
        print("[INFO] the tokenizer has no chat template: prompts are sent as raw text",
              file=sys.stderr)
    if threshold is None and model.args.conf_threshold is not None:
        print(
            f"[INFO] confidence threshold {model.args.conf_threshold} (the model's "
            "recommended; --conf-threshold overrides it)",
            file=sys.stderr,
        )
    if args.seed is not None:
        mx.random.seed(args.seed)
    session = ChatSession(
        model,
        tokenizer,
        system_prompt=args.system_prompt,
        chat_template_kwargs=chat_template_kwargs,
        cached=cached,
        use_chat_template=not args.ignore_chat_template,
        max_tokens=args.max_tokens,
        sampler=make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k),
        logits_processors=make_logits_processors(
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
        ),
        conf_threshold=threshold,
        draft=args.draft,
        prefill_step_size=args.prefill_step_size,
        token2_head=make_token2_head(model, args.token2_head),
        **kv_options(args),
    )
    verbose = args.verbose and not args.quiet
    if not args.chat:
        responses = session.turn(prompt)
        _stream(_after_banner(responses) if verbose else responses, tokenizer, verbose)
        return
    chat_loop(session, tokenizer, prompt, verbose)


def _after_banner(responses: Iterator[PipoResponse]) -> Iterator[PipoResponse]:
    """mlx_lm.generate's banner, printed once the stream has started: the prompt's
    checks (its length against the context) run first and may refuse it."""
    for i, response in enumerate(responses):
        if i == 0:
            print("=" * 10)
        yield response


def chat_loop(
    session: ChatSession, tokenizer: TokenizerWrapper, first: Optional[str], verbose: bool
) -> None:
    print("[INFO] chat: 'q' or Ctrl-D quits, 'r' starts over", file=sys.stderr)
    query = first
    while True:
        if query is None:
            try:
                query = input(">> ")
            except EOFError:
                print()
                return
        if query.strip() == "q":
            return
        if query.strip() == "r":
            session.reset()
        elif query.strip():
            try:
                _stream(session.turn(query), tokenizer, verbose)
            except PipoError as e:  # e.g. the conversation outgrew the context
                print(f"error: {e} ('r' starts over)", file=sys.stderr)
        query = None


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda: run(setup_arg_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
