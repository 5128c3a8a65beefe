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
import json
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from queue import Empty
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import _parse_size

from ..decode import DEFAULT_PREFILL_STEP_SIZE, check_threshold
from ..drafting import DEFAULT_DRAFT, DRAFT_MODES
from ..engine import Engine, Failed, Finished, Job, ShuttingDown
from ..errors import PipoError
from ..kv_cache import DEFAULT_KV_GROUP_SIZE, DEFAULT_QUANTIZED_KV_START
from ..token2_head import DEFAULT_TOKEN2_HEAD, make_token2_head, parse_token2_head
from ..tokenizer_options import read_chat_template, set_chat_template, template_kwargs
from . import run_cli
from .anthropic_api import MessageReply, default_sampling, model_folder, parse_messages
from .anthropic_api import error_body as anthropic_error
from .generate import check_kv_args, kv_options, load_model
from .openai_api import ApiError, ApiRequest, Defaults, Reply, parse_request
from .server_access import (
    InFlight, add_access_args, authorized, cors_headers, known_name, log_request, model_names, stop_on_sigterm,
)

ROUTES = {"/v1/chat/completions": "chat", "/chat/completions": "chat", "/v1/completions": "completion",
          "/v1/messages": "messages", "/v1/messages/count_tokens": "count_tokens"}
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}  # the OpenAI routes' default, as mlx_lm.server's
STOP_SECONDS = 8.0  # how long a stopping server waits for open requests to send their last event
KEEPALIVE_SECONDS = 2.0  # how often a waiting stream is probed for a client that left


@dataclass
class App:
    """What every request handler shares."""

    engine: Engine
    tokenizer: TokenizerWrapper
    model_id: str
    model_names: frozenset  # names a request may give for our one model
    context_length: int
    defaults: Defaults
    max_request_bytes: int
    created: int
    tokenizer_lock: threading.Lock
    message_defaults: Optional[Defaults] = None  # for /v1/messages, whose clients rarely name a sampling
    api_key: Optional[str] = None
    allowed_origins: List[str] = field(default_factory=list)
    inflight: InFlight = field(default_factory=InFlight)


class Handler(BaseHTTPRequestHandler):
    server_version = "pipo_mlx"

    @property
    def app(self) -> App:
        return self.server.app

    def log_message(self, fmt: str, *args: Any) -> None:
        logging.debug("%s - %s", self.address_string(), fmt % args)

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        self.status = code
        super().send_response(code, message)

    def end_headers(self) -> None:
        headers = getattr(self, "headers", None)  # absent when the request line itself was refused
        origin = headers.get("Origin") if headers is not None else None
        for name, value in cors_headers(origin, self.app.allowed_origins):
            self.send_header(name, value)
        super().end_headers()

    def do_GET(self) -> None:
        self._serve(self._get)

    def do_POST(self) -> None:
        self._serve(self._post)

    def do_OPTIONS(self) -> None:  # a browser's CORS preflight: no body, no key
        self.send_response(204)
        self.end_headers()

    def _serve(self, method) -> None:
        """Check the key, answer, and log one line for the request."""
        started, self.status, self.finished = time.perf_counter(), 0, None
        path = urlparse(self.path).path.rstrip("/")
        self.anthropic = path.startswith("/v1/messages")  # answered in Anthropic's error shape
        with self.app.inflight:
            try:
                if path != "/health" and not authorized(self.headers, self.app.api_key):
                    self.close_connection = True
                    self._send_error(ApiError(401, "a valid API key is required: 'Authorization: Bearer KEY' "
                                                   "or 'x-api-key: KEY'", code="invalid_api_key"))
                else:
                    method(path)
            finally:
                log_request(self.command, path, self.status, time.perf_counter() - started, self.finished)

    def _send_error(self, e: ApiError) -> None:
        self._send_json(e.status, anthropic_error(e.status, e.message) if self.anthropic else e.body())

    def _failure(self, error: BaseException) -> ApiError:
        status = 400 if isinstance(error, PipoError) else 503 if isinstance(error, ShuttingDown) else 500
        return ApiError(status, str(error))

    # -- plumbing ---------------------------------------------------------------

    def _send_json(self, status: int, body: Dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_event(self, body: Any) -> None:
        payload = body if isinstance(body, str) else json.dumps(body)
        self.wfile.write(f"data: {payload}\n\n".encode())
        self.wfile.flush()

    def _client_gone(self) -> bool:
        """True once the client has closed its side (it sends nothing after its request)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _read_body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required")
        try:
            length = int(length)
        except ValueError:
            raise ApiError(400, f"invalid Content-Length {length!r}") from None
        limit = self.app.max_request_bytes
        if length > limit:
            if length <= 8 * limit:  # read it, so the client sees our answer, not a reset
                while length > 0:
                    got = self.rfile.read(min(length, 1 << 20))
                    if not got:
                        break
                    length -= len(got)
            self.close_connection = True
            raise ApiError(413, f"the request body is over the server's limit of {limit} bytes "
                                "(--max-request-bytes)", code="request_too_large")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    # -- GET ----------------------------------------------------------------------

    def _get(self, path: str) -> None:
        app = self.app
        card = {"id": app.model_id, "object": "model", "created": app.created, "owned_by": "pipo_mlx"}
        if path == "/health":
            ok = app.engine.alive
            self._send_json(200 if ok else 503, {"status": "ok" if ok else "unavailable", **app.engine.stats()})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [card]})
        elif path.startswith("/v1/models/") and known_name(path[len("/v1/models/"):], app.model_names):
            self._send_json(200, card)
        else:
            self._send_error(ApiError(404, f"no such resource: GET {path}", code="not_found"))

    # -- POST ---------------------------------------------------------------------

    def _post(self, path: str) -> None:
        app = self.app
        try:
            kind = ROUTES.get(path)
            if kind is None:
                raise ApiError(404, f"no such endpoint: POST {self.path}", code="not_found")
            if self.anthropic and (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                raise ApiError(415, "the request body must be sent as Content-Type: application/json")
            body = self._read_body()
            if self.anthropic:
                request = parse_messages(body, app.message_defaults, app.tokenizer, app.tokenizer_lock,
                                         app.context_length, count_only=kind == "count_tokens")
            else:
                request = parse_request(body, kind, app.defaults, app.tokenizer, app.tokenizer_lock,
                                        app.context_length)
            if not known_name(request.model, app.model_names):
                raise ApiError(404, f"the model {request.model!r} is not served here; this server "
                                    f"serves {app.model_id!r} (GET /v1/models)", "model", "model_not_found")
        except ApiError as e:
            self._send_error(e)
            return
        if kind == "count_tokens":
            self._send_json(200, {"input_tokens": len(request.prompt)})
            return
        job = app.engine.submit(Job(
            prompt=request.prompt, max_tokens=request.max_tokens, sampling=request.sampling,
            conf_threshold=request.conf_threshold, draft=request.draft, stop=request.stop, logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
        ))
        if self.anthropic:
            reply = MessageReply(request, app.tokenizer, app.model_id)
        else:
            reply = Reply(request, app.tokenizer, app.model_id, int(time.time()))
        try:
            if request.stream and self.anthropic:
                self._stream_messages(job, reply)
            elif request.stream:
                self._stream(job, reply)
            else:
                self._complete(job, reply, request)
        except (BrokenPipeError, ConnectionResetError):
            job.cancel()

    def _next_event(self, job: Job, idle=None):
        """The engine's next event; None if the client left meanwhile (the job is cancelled).

        `idle` is called whenever the engine has been quiet for a while (a stream's ping)."""
        while True:
            try:
                event = job.events.get(timeout=KEEPALIVE_SECONDS)
                if isinstance(event, Finished):
                    self.finished = event
                return event
            except Empty:
                if self._client_gone():
                    job.cancel()
                    return None
                if idle is not None:
                    idle()

    def _complete(self, job: Job, reply: Reply, request: ApiRequest) -> None:
        while True:
            event = self._next_event(job)
            if event is None:
                return
            if isinstance(event, Failed):
                self._send_error(self._failure(event.error))
                return
            if isinstance(event, Finished):
                self._send_json(200, reply.body(event))
                return
            reply.add(event)
            if self._client_gone():
                job.cancel()
                return

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True

    def _stream(self, job: Job, reply: Reply) -> None:
        self._start_stream()
        while True:
            event = self._next_event(job)
            if event is None:
                return
            if isinstance(event, Failed):
                self._send_event(self._failure(event.error).body())
                break
            if isinstance(event, Finished):
                for chunk in reply.final_chunks(event):
                    self._send_event(chunk)
                break
            reply.add(event)
            chunk = reply.chunk()
            if chunk is not None:
                self._send_event(chunk)
        self._send_event("[DONE]")

    def _send_named(self, body: Dict[str, Any]) -> None:
        self.wfile.write(f"event: {body['type']}\ndata: {json.dumps(body)}\n\n".encode())
        self.wfile.flush()

    def _stream_messages(self, job: Job, reply: MessageReply) -> None:
        """The Messages API's stream: message_start, the blocks' events, message_delta, message_stop."""
        self._start_stream()
        self._send_named(reply.start())
        ping = {"type": "ping"}
        self._send_named(ping)
        while True:
            event = self._next_event(job, idle=lambda: self._send_named(ping))
            if event is None:
                return
            if isinstance(event, Failed):
                failure = self._failure(event.error)
                self._send_named(anthropic_error(failure.status, failure.message))
                return
            for out in reply.finish(event) if isinstance(event, Finished) else reply.add(event):
                self._send_named(out)
            if isinstance(event, Finished):
                return


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's listen backlog is 5: with 32 clients connecting at once (benchmarks/bench_load.py) and the
    # accept loop sharing the GIL with the batch, 7 of 1195 requests got a connection reset before reaching a
    # handler; with 128, none of 1525, and the kernel counted no listen overflow.
    request_queue_size = 128

    def __init__(self, address, app: App):
        self.app = app
        super().__init__(address, Handler)


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
