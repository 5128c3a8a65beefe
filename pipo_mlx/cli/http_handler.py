"""The HTTP side of the server: one handler thread per connection parses, checks and
answers a request; the model runs on the engine thread (pipo_mlx.engine, docs/design.md §11)."""

import json
import logging
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

from ..engine import Engine, Failed, Finished, Job, ShuttingDown
from ..errors import PipoError
from .anthropic_api import MessageReply, parse_messages
from .anthropic_api import error_body as anthropic_error
from .openai_api import ApiError, ApiRequest, Defaults, Reply, parse_request
from .server_access import InFlight, authorized, cors_headers, known_name, log_request

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
