"""An OpenAI-compatible HTTP server for PIPO models, with the surface of `mlx_lm.server`.

    python -m pipo_mlx.server --model PATH [--host 127.0.0.1] [--port 8080]

POST /v1/chat/completions and /v1/completions (streamed as server-sent events
or not), Anthropic's POST /v1/messages and /v1/messages/count_tokens,
GET /v1/models and /health. The standard library's threading HTTP
server is enough, as for mlx-lm: one thread per connection parses and
tokenizes, and a single engine thread runs the model (pipo_mlx.engine).
There is no authentication unless --api-key is given: keep it on 127.0.0.1.
"""

import argparse
import logging
import os
import threading
import time
from typing import Dict, List, Optional

from mlx_lm.utils import _parse_size

from ..decode import DEFAULT_PREFILL_STEP_SIZE, check_threshold
from ..drafting import DEFAULT_DRAFT, DRAFT_MODES
from ..engine import Engine
from ..errors import PipoError
from ..kv_cache import DEFAULT_KV_GROUP_SIZE, DEFAULT_QUANTIZED_KV_START
from ..token2_head import DEFAULT_TOKEN2_HEAD, make_token2_head, parse_token2_head
from ..tokenizer_options import read_chat_template, set_chat_template, template_kwargs
from . import run_cli
from .anthropic_api import default_sampling, model_folder
from .generate import check_kv_args, kv_options, load_model
from .http_handler import GREEDY, STOP_SECONDS, App, Server
from .openai_api import Defaults
from .server_access import add_access_args, model_names, stop_on_sigterm


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Serve a PIPO model over an OpenAI-compatible HTTP API (chat and text "
        "completions, streaming or not) and Anthropic's Messages API, with prompt caching across "
        "requests. The server has NO authentication unless --api-key is given: it binds to "
        "127.0.0.1 unless told otherwise.",
    )
    p.add_argument("--model", help="folder written by convert.py or train_heads.py --fuse, or a hub "
                   "repo id of a merged PIPO checkpoint (default: the shipped demo model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; anything else exposes an unauthenticated server)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    g = p.add_argument_group("defaults for requests that leave a field out")
    g.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply (default 512)")
    g.add_argument("--temp", type=float, help="sampling temperature (default: 0, greedy, on the OpenAI routes "
                   "as mlx_lm.server; on /v1/messages the model's generation_config.json, else the paper's "
                   "1.0 with --top-p 0.95 --top-k 20)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (default: 1, off; /v1/messages as --temp)")
    g.add_argument("--top-k", type=int, help="top-k sampling (default: 0, off; /v1/messages as --temp)")
    g.add_argument("--min-p", type=float, default=0.0, help="min-p sampling (default 0: off)")
    g.add_argument("--conf-threshold", type=float,
                   help="keep a drafted token2 when the confidence reaches this (default: the "
                   "model's recommended threshold, else 0.95); requests override it with conf_threshold")
    g.add_argument("--draft", choices=DRAFT_MODES, default=DEFAULT_DRAFT,
                   help="which decode steps run the MTP head, as in generate.py (default auto: while "
                   "drafts pay); requests override it with draft"),
    g.add_argument("--chat-template", help="a Jinja chat template, or a file holding one, instead of the "
                   "tokenizer's (as mlx_lm.server)")
    g.add_argument("--chat-template-args", help="JSON object of keyword arguments for the chat template, "
                   "e.g. '{\"enable_thinking\": false}'; requests add theirs as chat_template_kwargs")
    g = p.add_argument_group("capacity")
    g.add_argument("--prompt-cache-bytes", default="1GB",
                   help="memory for cached conversations, e.g. 512MB or 4GB (default 1GB); 0 turns caching off")
    g.add_argument("--max-concurrent", type=int, default=8,
                   help="requests decoding at once, as the rows of one batch; later ones queue (default 8)")
    g.add_argument("--max-request-bytes", type=int, default=16 * 2**20,
                   help="largest request body accepted (default 16 MiB)")
    g.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE,
                   help=f"prompt tokens per prefill chunk (default {DEFAULT_PREFILL_STEP_SIZE})")
    g.add_argument("--token2-head", default=DEFAULT_TOKEN2_HEAD,
                   help="how token2's logits are computed, as in generate.py (default full)")
    g.add_argument("--max-kv-size", type=int,
                   help="rotating attention cache of this many tokens per request, in whole pairs, "
                   "as mlx-lm's batches rotate: no first tokens kept (docs/memory.md)")
    g.add_argument("--kv-bits", type=int,
                   help="quantize the attention caches to this many bits, as in generate.py; mlx-lm's "
                   "batch caches cannot be quantized, so requests then decode one at a time")
    g.add_argument("--kv-group-size", type=int,
                   help=f"group size of --kv-bits' quantization (default {DEFAULT_KV_GROUP_SIZE})")
    g.add_argument("--quantized-kv-start", type=int,
                   help=f"with --kv-bits, quantize once a cache holds this many tokens (default "
                   f"{DEFAULT_QUANTIZED_KV_START})")
    add_access_args(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def check_args(args: argparse.Namespace) -> int:
    """Refuse bad settings before loading anything; the prompt cache budget in bytes."""
    if args.max_tokens < 1:
        raise PipoError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.max_concurrent < 1:
        raise PipoError(f"--max-concurrent must be at least 1, got {args.max_concurrent}")
    if not 0 <= args.port < 65536:
        raise PipoError(f"--port must lie in [0, 65535], got {args.port}")
    if args.conf_threshold is not None:
        check_threshold(args.conf_threshold)
    parse_token2_head(args.token2_head)
    check_kv_args(args)
    try:
        budget = int(_parse_size(args.prompt_cache_bytes))
    except (ValueError, ArithmeticError, KeyError, TypeError):
        raise PipoError(f"--prompt-cache-bytes {args.prompt_cache_bytes!r} is not a size; use e.g. 512MB or 4GB") from None
    if budget < 0:
        raise PipoError("--prompt-cache-bytes must not be negative")
    return budget


def make_server(args: argparse.Namespace) -> Server:
    """Load the model, start the engine and bind the socket (serving starts with serve_forever)."""
    budget = check_args(args)
    template = read_chat_template(args.chat_template) if args.chat_template is not None else None
    template_args = template_kwargs(args.chat_template_args, "--chat-template-args")
    model, tokenizer = load_model(args.model)
    set_chat_template(tokenizer, template)
    tokenizer.model_max_length = 1 << 62  # our own context check speaks instead of its warning
    engine = Engine(model, tokenizer, budget, args.max_concurrent, args.prefill_step_size,
                    make_token2_head(model, args.token2_head), **kv_options(args)).start()
    model_id, names = model_names(args.model or "pipo-stdlib", args.served_model_name)
    given = {"temperature": args.temp, "top_p": args.top_p, "top_k": args.top_k}

    def defaults(base: Dict[str, float]) -> Defaults:
        s = {k: base[k] if v is None else v for k, v in given.items()}
        return Defaults(args.max_tokens, s["temperature"], s["top_p"], s["top_k"], args.min_p, args.conf_threshold,
                        args.draft, template_args)

    app = App(
        engine=engine, tokenizer=tokenizer, model_id=model_id, model_names=names,
        context_length=model.args.max_position_embeddings, defaults=defaults(GREEDY),
        max_request_bytes=args.max_request_bytes, created=int(time.time()), tokenizer_lock=threading.Lock(),
        message_defaults=defaults(default_sampling(model_folder(args.model))), api_key=args.api_key,
        allowed_origins=args.allowed_origins,
    )
    try:
        return Server((args.host, args.port), app)
    except OSError as e:
        engine.stop()
        raise PipoError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None


def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    server = make_server(args)
    host, port = server.server_address[:2]
    keyed = "API key required" if args.api_key else "no authentication"
    logging.info("serving %s on http://%s:%d (%s; Ctrl-C or SIGTERM stops)", server.app.model_id, host, port, keyed)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logging.warning("bound to %s: anyone who can reach it can use the model", args.host)
    m, o = server.app.message_defaults, server.app.defaults
    logging.info("default sampling: /v1/messages temperature %g, top-p %g, top-k %d; OpenAI routes temperature %g, "
                 "top-p %g, top-k %d (--temp, --top-p, --top-k)", m.temperature, m.top_p, m.top_k,
                 o.temperature, o.top_p, o.top_k)
    stop_on_sigterm(server.shutdown)
    try:
        server.serve_forever()
    finally:
        server.server_close()  # no new connections; open requests end with an event saying why
        server.app.engine.stop()
        server.app.inflight.wait(STOP_SECONDS)
        logging.info("stopped")
    logging.shutdown()
    # Stopped on request, every answer sent: skip the interpreter's teardown, in which the C++ destructors
    # of MLX's and torch's threads now and then abort the process ("terminate called ...").
    os._exit(0)


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda: run(setup_arg_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
