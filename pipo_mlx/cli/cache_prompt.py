"""Save the caches of a prompt to a file that generate.py --prompt-cache-file goes on from."""

import argparse
import sys
import time
from typing import List, Optional

import mlx.core as mx
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START

from ..decode import DEFAULT_PREFILL_STEP_SIZE
from ..errors import PipoError
from ..kv_cache import DEFAULT_KV_GROUP_SIZE
from ..prompt_cache_file import fill_prompt_cache, prompt_to_cache, save_prompt_cache
from ..tokenizer_options import read_chat_template, set_chat_template, template_kwargs
from . import run_cli
from .generate import load_model


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Cache the state of a prompt (a long system prompt, a document) in a "
        "file, so that generate.py --prompt-cache-file answers queries about it without "
        "reading it again. The file holds whole pairs of tokens with the MTP head's "
        "entries (docs/design.md §5) and names the model it was made with."
    )
    p.add_argument("--model", help="as generate.py's --model (default: the shipped demo model)")
    p.add_argument("--adapter-path", help="as generate.py's --adapter-path")
    p.add_argument("--prompt-cache-file", required=True, help="the file to write, ending in .safetensors")
    p.add_argument("--prompt", "-p", required=True, help="the text to cache ('-' reads stdin)")
    p.add_argument("--system-prompt", help="system message cached before the prompt (needs a chat template)")
    p.add_argument("--ignore-chat-template", action="store_true", help="cache the prompt as raw text")
    p.add_argument("--chat-template", help="a Jinja chat template, or a file holding one, "
                   "instead of the tokenizer's")
    p.add_argument("--chat-template-config", help="JSON object of keyword arguments for the "
                   "chat template, e.g. '{\"enable_thinking\": false}'")
    p.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE,
                   help=f"prompt tokens per prefill chunk (default {DEFAULT_PREFILL_STEP_SIZE})")
    p.add_argument("--max-kv-size", type=int, help="a rotating attention cache over this many tokens")
    p.add_argument("--kv-bits", type=int, help="quantize the attention cache to this many bits")
    p.add_argument("--kv-group-size", type=int, default=DEFAULT_KV_GROUP_SIZE,
                   help=f"group size of --kv-bits' quantization (default {DEFAULT_KV_GROUP_SIZE})")
    p.add_argument("--quantized-kv-start", type=int, default=DEFAULT_QUANTIZED_KV_START,
                   help=f"with --kv-bits, quantize from this many tokens on (default {DEFAULT_QUANTIZED_KV_START})")
    return p


def run(args: argparse.Namespace) -> None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    if not prompt.strip():
        raise PipoError("the prompt is empty; pass some text with --prompt ('-' reads stdin)")
    kwargs = template_kwargs(args.chat_template_config, "--chat-template-config")
    template = read_chat_template(args.chat_template) if args.chat_template is not None else None
    model, tokenizer = load_model(args.model, adapter_path=args.adapter_path)
    tokenizer.model_max_length = sys.maxsize  # our own context check speaks instead
    set_chat_template(tokenizer, template)
    chat = tokenizer.has_chat_template and not args.ignore_chat_template
    ids = prompt_to_cache(tokenizer, prompt, args.system_prompt, chat, kwargs)
    tic = time.perf_counter()
    cache, pending = fill_prompt_cache(
        model, ids, args.prefill_step_size, args.max_kv_size, args.kv_bits, args.kv_group_size,
        args.quantized_kv_start,
    )
    seconds = time.perf_counter() - tic
    save_prompt_cache(args.prompt_cache_file, cache, model, pending, chat,
                      {"model": args.model or "pipo-stdlib"})
    print(
        f"Cached {len(ids)} prompt tokens ({len(cache.tokens) // 2} pairs) in "
        f"{args.prompt_cache_file}: {len(ids) / seconds:.1f} tokens-per-sec, "
        f"peak memory {mx.get_peak_memory() / 1e9:.3f} GB"
    )


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda: run(setup_arg_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
