"""The OpenAI API's shapes: request bodies checked into `ApiRequest`s, engine events into JSON.

Field names, defaults and response layouts follow OpenAI's chat and legacy
completions APIs as `mlx_lm.server` serves them, so clients written for either
work unchanged. Our additions: the request fields `conf_threshold` and `draft`, and a
`pipo` object in `usage` (decode steps, drafted tokens kept, tokens per step).
"""

import json
import math
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from mlx_lm.generate import TextStateMachine, make_text_state_machine
from mlx_lm.server import ToolCallFormatter, convert_chat, process_message_content
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..drafting import DEFAULT_DRAFT, DRAFT_MODES
from ..engine import Finished, Sampling, TokenEvent

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; legacy completions allow 5
INT_MAX = 2**31 - 1  # MLX takes counts as 32-bit integers: a larger one would fail inside it, not here
SEED_MAX = 2**64 - 1  # MLX's random seed is an unsigned 64-bit integer


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> Dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Defaults:
    """The server's settings for fields a request leaves out."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    conf_threshold: Optional[float]  # None: the model's recommended threshold
    draft: str = DEFAULT_DRAFT
    chat_template_args: Dict[str, Any] = field(default_factory=dict)  # apply_chat_template's kwargs


@dataclass
class ApiRequest:
    kind: str  # "chat" or "completion"
    prompt: List[int]
    max_tokens: int
    sampling: Sampling
    conf_threshold: Optional[float]
    stop: List[str]
    draft: str = DEFAULT_DRAFT
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    tools: Optional[List[Any]] = None
    initial_state: str = "normal"
    model: Optional[str] = None


def _get(body: Dict[str, Any], name: str, kinds: tuple, default: Any, what: str) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, never a number in JSON
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", name, "invalid_type")
    return value


def _number(body, name, default, lo=None, hi=None, lo_open=False):
    value = _get(body, name, (int, float), default, "a number")
    if value is None:
        return None
    if math.isnan(value) or math.isinf(value):
        raise ApiError(400, f"'{name}' must be a finite number", name, "invalid_value")
    if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
        bounds = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ApiError(400, f"'{name}' must lie in {bounds}, got {value}", name, "invalid_value")
    return float(value)


def _integer(body, name, default, lo=None, hi=INT_MAX):
    value = _get(body, name, (int,), default, "an integer")
    if value is not None and ((lo is not None and value < lo) or value > hi):
        raise ApiError(400, f"'{name}' must lie in [{lo}, {hi}], got {value}", name, "invalid_value")
    return value


def _draft(body: Dict[str, Any], default: str) -> str:
    value = _get(body, "draft", (str,), default, "a string")
    if value not in DRAFT_MODES:
        raise ApiError(400, f"'draft' must be one of {', '.join(DRAFT_MODES)}, got {json.dumps(value)[:80]}",
                       "draft", "invalid_value")
    return value


def _stop_strings(body: Dict[str, Any]) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", "stop", "invalid_type")
    return stops


def parse_request(
    body: Any,
    kind: str,
    defaults: Defaults,
    tokenizer: TokenizerWrapper,
    tokenizer_lock: threading.Lock,
    context_length: int,
) -> ApiRequest:
    """Check a request body and tokenize its prompt; `ApiError` (4xx) for anything wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if _integer(body, "n", 1) != 1:
        raise ApiError(400, "only n = 1 is supported", "n", "invalid_value")
    max_tokens = _integer(body, "max_completion_tokens", None, lo=1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", defaults.max_tokens, lo=1)
    sampling = Sampling(
        temperature=_number(body, "temperature", defaults.temperature, lo=0),
        top_p=_number(body, "top_p", defaults.top_p, lo=0, hi=1, lo_open=True),
        top_k=_integer(body, "top_k", defaults.top_k, lo=0),
        min_p=_number(body, "min_p", defaults.min_p, lo=0, hi=1),
        presence_penalty=_number(body, "presence_penalty", None, lo=-2, hi=2),
        repetition_penalty=_number(body, "repetition_penalty", None, lo=0, lo_open=True),
        seed=_integer(body, "seed", None, lo=0, hi=SEED_MAX),
    )
    request = ApiRequest(
        kind=kind,
        prompt=[],
        max_tokens=max_tokens,
        sampling=sampling,
        conf_threshold=_number(body, "conf_threshold", defaults.conf_threshold),
        stop=_stop_strings(body),
        draft=_draft(body, defaults.draft),
        stream=_get(body, "stream", (bool,), False, "true or false"),
        model=_get(body, "model", (str,), None, "a string"),
    )
    options = _get(body, "stream_options", (dict,), {}, "an object")
    request.include_usage = _get(options, "include_usage", (bool,), False, "true or false")
    if kind == "chat":
        request.logprobs = _get(body, "logprobs", (bool,), False, "true or false")
        request.top_logprobs = _integer(body, "top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS)
        with tokenizer_lock:
            _chat_prompt(body, request, tokenizer, _template_args(body, defaults))
    else:
        top = _integer(body, "logprobs", None, lo=0, hi=5)
        request.logprobs, request.top_logprobs = top is not None, top or 0
        with tokenizer_lock:
            request.prompt = _text_prompt(body, tokenizer)
    if not request.prompt:
        raise ApiError(400, "the prompt is empty", "messages" if kind == "chat" else "prompt", "invalid_value")
    paired = len(request.prompt) + len(request.prompt) % 2
    if paired + 2 > context_length:  # a reply needs at least one more pair
        what = "more than" if paired > context_length else "which leaves no room for a reply in"
        raise ApiError(
            400,
            f"the prompt has {len(request.prompt)} tokens, {what} the model's context of "
            f"{context_length}; shorten it",
            "messages" if kind == "chat" else "prompt",
            "context_length_exceeded",
        )
    return request


def _template_args(body: Dict[str, Any], defaults: Defaults) -> Dict[str, Any]:
    """The server's chat template arguments, updated by the request's, as mlx-lm's server does."""
    given = _get(body, "chat_template_kwargs", (dict,), {}, "an object")
    return {**defaults.chat_template_args, **given}


def _chat_prompt(
    body: Dict[str, Any],
    request: ApiRequest,
    tokenizer: TokenizerWrapper,
    template_args: Optional[Dict[str, Any]] = None,
) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of messages", "messages", "invalid_type")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
        if not isinstance(m.get("content"), (str, list, type(None))):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", "messages")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list", "tools", "invalid_type")
    messages = json.loads(json.dumps(messages))  # process_message_content edits in place
    try:
        process_message_content(messages)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"unsupported message content: {e}", "messages") from None
    request.tools = tools or None
    if not tokenizer.has_chat_template:
        request.prompt = tokenizer.encode(convert_chat(messages))
        return
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=request.tools, add_generation_prompt=True, tokenize=False,
            **(template_args or {}),
        )
    except Exception as e:  # the template's own checks (roles, order) speak for themselves
        raise ApiError(400, f"the chat template refused the messages: {e}", "messages") from None
    request.prompt = tokenizer.encode(text, add_special_tokens=False)
    state = tokenizer.response_initial_state or "normal"
    if tokenizer.has_thinking and tokenizer.rfind_think_start(request.prompt) > tokenizer.rfind_think_end(
        request.prompt
    ):
        state = "reasoning"  # the template opened a reasoning block for the reply
    request.initial_state = state


def _text_prompt(body: Dict[str, Any], tokenizer: TokenizerWrapper) -> List[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        return tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    vocab = len(tokenizer.get_vocab())
    if isinstance(prompt, list) and all(type(t) is int and 0 <= t < vocab for t in prompt):
        return prompt
    raise ApiError(
        400, "'prompt' must be a string or a list of token ids (one prompt per request)", "prompt", "invalid_type"
    )


class Reply:
    """Turns one request's engine events into OpenAI response objects."""

    def __init__(self, request: ApiRequest, tokenizer: TokenizerWrapper, model_id: str, created: int):
        self.request, self.tokenizer = request, tokenizer
        self.chat = request.kind == "chat"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4()}"
        self.model_id, self.created = model_id, created
        self.sm = make_text_state_machine(tokenizer) if self.chat else None
        self.state = self.sm.make_state(request.initial_state) if self.chat else None
        self.tools = ToolCallFormatter(tokenizer.tool_parser, request.tools, request.stream) if self.chat else None
        self.text, self.reasoning, self.tool_text = "", "", ""
        self.tool_calls: List[str] = []
        self.logprobs: List[Dict[str, Any]] = []
        self.sent_role = False
        self.called = False  # a tool call was made (a stream sends it before the end)

    # -- events in ------------------------------------------------------------

    def add(self, event: TokenEvent) -> None:
        if self.chat:
            self.state, segments = TextStateMachine.split(self.state, event.text)
            self._collect(segments)
        else:
            self.text += event.text
        if self.request.logprobs or self.request.top_logprobs:
            self.logprobs.append(self._logprob(event))

    def _collect(self, segments: Sequence) -> None:
        for state, text in segments:
            if state == "reasoning":
                self.reasoning += text
            elif state == "tool":
                self.tool_text += text
            else:
                if self.tool_text:  # a call just closed
                    self._call()
                self.text += text or ""

    def _call(self) -> None:
        self.tool_calls.append(self.tool_text)
        self.tool_text, self.called = "", True

    def _logprob(self, event: TokenEvent) -> Dict[str, Any]:
        token = self.tokenizer.decode([event.token])
        top = [(self.tokenizer.decode([t]), lp) for t, lp in event.top_logprobs]
        if self.chat:
            return {"token": token, "logprob": event.logprob, "bytes": list(token.encode()),
                    "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]}
        return {"token": token, "logprob": event.logprob, "top": dict(top)}

    # -- objects out ------------------------------------------------------------

    def _finish_text(self, finished: Finished) -> str:
        """Flush what the state machine holds back; the finish reason, tool calls counted."""
        if self.chat:
            self.state, flushed, current = TextStateMachine.flush(self.state)
            self._collect([(current, flushed)])
            if self.tool_text:
                self._call()
        reason = "stop" if finished.finish_reason == "cancelled" else finished.finish_reason
        return "tool_calls" if reason == "stop" and self.called else reason

    def _choice(self, finish_reason: Optional[str]) -> Dict[str, Any]:
        choice: Dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.logprobs:
            choice["logprobs"] = self._logprobs_object()
        if not self.chat:
            choice["text"] = self.text
            return choice
        message: Dict[str, Any] = {}
        if not self.request.stream or not self.sent_role:
            message["role"] = "assistant"
            self.sent_role = True
        if self.text or not self.request.stream:
            message["content"] = self.text or (None if self.tool_calls else "")
        if self.reasoning:
            message["reasoning"] = self.reasoning
        calls = self.tools(self.tool_calls)
        if calls:
            message["tool_calls"] = calls
        choice["delta" if self.request.stream else "message"] = message
        return choice

    def _logprobs_object(self) -> Dict[str, Any]:
        if self.chat:
            return {"content": self.logprobs}
        return {
            "tokens": [e["token"] for e in self.logprobs],
            "token_logprobs": [e["logprob"] for e in self.logprobs],
            "top_logprobs": [e["top"] for e in self.logprobs] if self.request.top_logprobs else None,
        }

    def _envelope(self, choices: List[Dict[str, Any]]) -> Dict[str, Any]:
        stream = self.request.stream
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id,
                "system_fingerprint": None, "choices": choices}

    def _drain(self) -> None:
        self.text, self.reasoning, self.tool_calls, self.logprobs = "", "", [], []

    def chunk(self) -> Optional[Dict[str, Any]]:
        """A streaming chunk with what came since the last one, or None (nothing to show yet)."""
        if not (self.text or self.reasoning or self.tool_calls or self.logprobs):
            return None
        out = self._envelope([self._choice(None)])
        self._drain()
        return out

    def final_chunks(self, finished: Finished) -> List[Dict[str, Any]]:
        reason = self._finish_text(finished)
        out = [self._envelope([self._choice(reason)])]
        if self.request.include_usage:
            out.append({**self._envelope([]), "usage": usage(finished)})
        return out

    def body(self, finished: Finished) -> Dict[str, Any]:
        reason = self._finish_text(finished)
        return {**self._envelope([self._choice(reason)]), "usage": usage(finished)}


def usage(f: Finished) -> Dict[str, Any]:
    return {
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_tokens},
        "pipo": {
            "steps": f.steps,
            "token2_kept": f.token2_kept,
            "tokens_per_step": round(f.completion_tokens / max(f.steps, 1), 4),
            "prefilled_tokens": f.prompt_tokens - f.cached_tokens,
            "time_to_first_token": round(f.time_to_first_token, 6),
        },
    }


def error_body(message: str, status: int = 500) -> Dict[str, Any]:
    return ApiError(status, message).body()

