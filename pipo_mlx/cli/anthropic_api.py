"""The Anthropic Messages API's shapes: request bodies checked into `ApiRequest`s, engine events into events.

`POST /v1/messages` takes Anthropic's `system`, `messages` of content blocks
(text, tool_use, tool_result), `tools` and `tool_choice`; they become the chat
messages and tools that the OpenAI route hands the chat template, so both
routes share one prompt format and one prompt cache. Our additions, as on the
OpenAI routes: the request fields `conf_threshold`, `draft` and `seed`, and a
`pipo` object in `usage`.
"""

import json
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mlx_lm.generate import TextStateMachine, make_text_state_machine
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..engine import Finished, Sampling, TokenEvent
from .generate import DEFAULT_CACHE_DIR, DEMO_PLACES
from .openai_api import (
    SEED_MAX, ApiError, ApiRequest, Defaults, _chat_prompt, _draft, _get, _integer, _number, usage as openai_usage,
)

# The paper's sampling settings, for a model whose folder has no generation_config.json.
PAPER_SAMPLING = {"temperature": 1.0, "top_p": 0.95, "top_k": 20}
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
SKIPPED_BLOCKS = ("thinking", "redacted_thinking")  # the chat templates drop earlier reasoning anyway


def error_body(status: int, message: str) -> Dict[str, Any]:
    """Anthropic's error object for an HTTP status."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def model_folder(spec: Optional[str]) -> Optional[Path]:
    """Where the served model's files are (as `load_model` finds them), if anywhere."""
    if spec is None:
        return next((p for p in DEMO_PLACES if p.is_dir()), None)
    local = Path(spec).expanduser()
    if local.is_dir():
        return local
    return Path(os.environ.get("PIPO_MLX_CACHE", DEFAULT_CACHE_DIR)).expanduser() / spec.replace("/", "--")


def default_sampling(folder: Optional[Path]) -> Dict[str, float]:
    """Sampling for requests that name none: the model's generation config, else the paper's settings."""
    path = folder / "generation_config.json" if folder is not None else None
    config = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    if not config.get("do_sample", True):
        return {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
    return {k: v if config.get(k) is None else type(v)(config[k]) for k, v in PAPER_SAMPLING.items()}


def parse_messages(
    body: Any,
    defaults: Defaults,
    tokenizer: TokenizerWrapper,
    tokenizer_lock: threading.Lock,
    context_length: int,
    count_only: bool = False,
) -> ApiRequest:
    """Check a Messages request (or a count_tokens one) and tokenize its prompt; `ApiError` (4xx) if wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    max_tokens = 1
    if not count_only:
        if body.get("max_tokens") is None:
            raise ApiError(400, "max_tokens: field required")
        max_tokens = _integer(body, "max_tokens", None, lo=1)
    sampling = Sampling(
        temperature=_number(body, "temperature", defaults.temperature, lo=0),
        top_p=_number(body, "top_p", defaults.top_p, lo=0, hi=1, lo_open=True),
        top_k=_integer(body, "top_k", defaults.top_k, lo=0),
        min_p=defaults.min_p,
        seed=_integer(body, "seed", None, lo=0, hi=SEED_MAX),
    )
    stops = _get(body, "stop_sequences", (list,), [], "a list of strings")
    if not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop_sequences: each must be a non-empty string")
    metadata = _get(body, "metadata", (dict,), {}, "an object")
    _get(metadata, "user_id", (str,), None, "a string")
    thinking = _get(body, "thinking", (dict,), {}, "an object")
    if thinking and thinking.get("type") not in ("enabled", "disabled", "adaptive"):
        raise ApiError(400, "thinking.type must be 'enabled', 'disabled' or 'adaptive'")
    request = ApiRequest(
        kind="messages", prompt=[], max_tokens=max_tokens, sampling=sampling,
        conf_threshold=_number(body, "conf_threshold", defaults.conf_threshold), stop=stops,
        draft=_draft(body, defaults.draft), stream=_get(body, "stream", (bool,), False, "true or false"),
        model=_get(body, "model", (str,), None, "a string"),
    )
    if request.model is None:
        raise ApiError(400, "model: field required")
    tools, choice = _tools(body)
    messages, prefill = _messages(body)
    with tokenizer_lock:
        _chat_prompt({"messages": messages, "tools": None if choice == "none" else tools}, request, tokenizer,
                     _template_args(body, defaults, thinking))
        _continue(request, tokenizer, prefill, choice)
    if len(request.prompt) + len(request.prompt) % 2 + 2 > context_length:  # and a pair for the reply
        raise ApiError(400, f"prompt is too long: {len(request.prompt)} tokens > {context_length - 2} maximum")
    return request


def _template_args(body: Dict[str, Any], defaults: Defaults, thinking: Dict[str, Any]) -> Dict[str, Any]:
    """The chat template's arguments: the server's, then `thinking` as Qwen3.5's templates take it, then the
    request's own `chat_template_kwargs` (mlx-lm's field, as on the OpenAI route)."""
    args = dict(defaults.chat_template_args)
    if thinking.get("type") in ("enabled", "disabled"):
        args["enable_thinking"] = thinking["type"] == "enabled"
    return {**args, **_get(body, "chat_template_kwargs", (dict,), {}, "an object")}


def _tools(body: Dict[str, Any]) -> Tuple[Optional[List[Dict[str, Any]]], str]:
    """The tools in the chat template's (OpenAI's) shape, and the tool choice: auto, any or none (a named
    tool shows the template that tool alone and is then 'any')."""
    tools = _get(body, "tools", (list,), [], "a list of tools")
    out = []
    for i, t in enumerate(tools):
        if not (isinstance(t, dict) and isinstance(t.get("name"), str) and t["name"]):
            raise ApiError(400, f"tools.{i}: a tool needs a non-empty string 'name'")
        if t.get("type", "custom") != "custom":
            raise ApiError(400, f"tools.{i}: tool type {t.get('type')!r} is not supported here; only client tools")
        if not isinstance(t.get("input_schema"), dict):
            raise ApiError(400, f"tools.{i}.input_schema: must be a JSON schema object")
        description = _get(t, "description", (str,), "", "a string")
        out.append({"type": "function", "function": {"name": t["name"], "description": description,
                                                     "parameters": t["input_schema"]}})
    choice = _get(body, "tool_choice", (dict,), {"type": "auto"}, "an object")
    kind = choice.get("type")
    _get(choice, "disable_parallel_tool_use", (bool,), False, "true or false")
    if kind not in ("auto", "any", "tool", "none"):
        raise ApiError(400, "tool_choice.type must be 'auto', 'any', 'tool' or 'none'")
    if kind in ("any", "tool") and not out:
        raise ApiError(400, f"tool_choice {kind!r} needs tools")
    if kind == "tool":
        named = [t for t in out if t["function"]["name"] == choice.get("name")]
        if not named:
            raise ApiError(400, f"tool_choice.name {choice.get('name')!r} is not one of the tools")
        return named, "any"
    return out or None, kind


def _text_of(blocks: Sequence[Any], where: str) -> str:
    """The text of a list of text blocks (a system prompt, a tool result)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise ApiError(400, f"{where}: must be a string or a list of text blocks")
    for j, b in enumerate(blocks):
        if not (isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)):
            raise ApiError(400, f"{where}.{j}: only text blocks are supported here (this model reads text)")
    return "".join(b["text"] for b in blocks)


def _messages(body: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], str]:
    """Anthropic's messages as chat-template messages, and the text of a final assistant turn to continue."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: must be a non-empty list")
    out: List[Dict[str, Any]] = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": _text_of(body["system"], "system")})
    open_calls: List[str] = []  # tool_use ids the next user turn must answer
    prefill = ""
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"{where}.role: must be 'user' or 'assistant' (a system prompt goes in 'system')")
        content, last = m.get("content"), i == len(messages) - 1
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list) or not all(isinstance(b, dict) and isinstance(b.get("type"), str)
                                                   for b in blocks):
            raise ApiError(400, f"{where}.content: must be a string or a list of content blocks with a 'type'")
        empty = not blocks or all(b["type"] == "text" and not b.get("text") for b in blocks)
        if empty and not (last and m["role"] == "assistant"):
            raise ApiError(400, f"{where}: all messages must have non-empty content except for an optional "
                                "final assistant message")
        if m["role"] == "user":
            out += _user_turn(blocks, where, open_calls)
            open_calls = []
            continue
        if open_calls:
            raise ApiError(400, f"{where}: tool_use ids {open_calls} have no tool_result in the user turn after them")
        turn, open_calls = _assistant_turn(blocks, where)
        if last:
            if open_calls:
                raise ApiError(400, f"{where}: a final assistant turn cannot end in tool_use; send its tool_result")
            prefill = turn["content"]
            if prefill != prefill.rstrip():
                raise ApiError(400, "final assistant content cannot end with trailing whitespace")
        else:
            out.append(turn)
    if open_calls:
        raise ApiError(400, f"tool_use ids {open_calls} have no tool_result after them")
    return out, prefill


def _user_turn(blocks: List[Dict[str, Any]], where: str, open_calls: List[str]) -> List[Dict[str, Any]]:
    results, texts = [], []
    for j, b in enumerate(blocks):
        kind = b["type"]
        if kind == "text":
            texts.append(_get(b, "text", (str,), "", "a string"))
        elif kind == "tool_result":
            tid = b.get("tool_use_id")
            if tid not in open_calls:
                raise ApiError(400, f"{where}.content.{j}: unexpected tool_use_id {tid!r} in tool_result; each "
                                    "tool_result must answer a tool_use of the assistant turn just before")
            text = _text_of(b.get("content", ""), f"{where}.content.{j}.content")
            if _get(b, "is_error", (bool,), False, "true or false"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": tid, "content": text})
        else:
            raise ApiError(400, f"{where}.content.{j}: block type {kind!r} is not supported in a user turn "
                                "(text and tool_result are)")
    missing = [t for t in open_calls if t not in {r["tool_call_id"] for r in results}]
    if missing:
        raise ApiError(400, f"{where}: tool_use ids {missing} have no tool_result in this turn")
    return results + ([{"role": "user", "content": "".join(texts)}] if texts else [])


def _assistant_turn(blocks: List[Dict[str, Any]], where: str) -> Tuple[Dict[str, Any], List[str]]:
    texts, calls = [], []
    for j, b in enumerate(blocks):
        kind = b["type"]
        if kind == "text":
            texts.append(_get(b, "text", (str,), "", "a string"))
        elif kind == "tool_use":
            if not (isinstance(b.get("id"), str) and isinstance(b.get("name"), str) and isinstance(b.get("input"), dict)):
                raise ApiError(400, f"{where}.content.{j}: tool_use needs a string id and name and an object input")
            calls.append({"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": b["input"]}})
        elif kind not in SKIPPED_BLOCKS:
            raise ApiError(400, f"{where}.content.{j}: block type {kind!r} is not supported in an assistant turn "
                                "(text, tool_use and thinking are)")
    turn: Dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        turn["tool_calls"] = calls
    return turn, [c["id"] for c in calls]


def _continue(request: ApiRequest, tokenizer: TokenizerWrapper, prefill: str, choice: str) -> None:
    """Append a final assistant turn's text, or open a tool call for tool_choice any / tool."""
    extra = prefill
    if choice == "any":
        if not tokenizer.has_tool_calling:
            raise ApiError(400, "tool_choice 'any' or 'tool' needs a chat template with tool calling")
        if request.initial_state == "reasoning":
            extra += tokenizer.think_end + "\n\n"
        extra += tokenizer.tool_call_start
    if not extra:
        return
    request.prompt += tokenizer.encode(extra, add_special_tokens=False)
    if choice == "any":
        request.initial_state = "tool"
    elif tokenizer.has_thinking and request.initial_state == "reasoning":
        opened, closed = tokenizer.rfind_think_start(request.prompt), tokenizer.rfind_think_end(request.prompt)
        request.initial_state = "reasoning" if opened > closed else "normal"


def usage(f: Finished) -> Dict[str, Any]:
    return {
        "input_tokens": f.prompt_tokens - f.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": f.cached_tokens,
        "output_tokens": f.completion_tokens,
        "pipo": openai_usage(f)["pipo"],
    }


class MessageReply:
    """Turns one request's engine events into the Messages API's stream events and message.

    The message's content is built by the very events a stream sends, so a
    stream reassembles into what the non-streamed answer holds. Whitespace
    before a block's first visible character waits for it (a block of
    whitespace alone, as between reasoning and a tool call, is never opened).
    """

    def __init__(self, request: ApiRequest, tokenizer: TokenizerWrapper, model_id: str):
        self.request, self.tokenizer, self.model_id = request, tokenizer, model_id
        self.id = f"msg_{uuid.uuid4().hex}"
        self.state = make_text_state_machine(tokenizer).make_state(request.initial_state)
        self.content: List[Dict[str, Any]] = []
        self.open: Optional[str] = None  # "text" or "thinking": the block taking deltas
        self.held, self.held_kind = "", None  # whitespace waiting for a block's first visible text
        self.in_tool = request.initial_state == "tool"
        self.tool_text = ""
        self.called = False
        self.events: List[Dict[str, Any]] = []
        self.stop: Tuple[Optional[str], Optional[str], Optional[Dict[str, Any]]] = (None, None, None)

    def message(self, stop_reason: Optional[str] = None, stop_sequence: Optional[str] = None,
                use: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model_id,
                "content": self.content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": use or {"input_tokens": len(self.request.prompt), "output_tokens": 0}}

    def start(self) -> Dict[str, Any]:
        return {"type": "message_start", "message": {**self.message(), "content": []}}

    def add(self, event: TokenEvent) -> List[Dict[str, Any]]:
        """The stream events this token releases."""
        self.state, segments = TextStateMachine.split(self.state, event.text)
        self._collect(segments)
        return self._drain()

    def finish(self, finished: Finished) -> List[Dict[str, Any]]:
        """The last stream events: what the state machine held back, message_delta and message_stop."""
        self.state, flushed, current = TextStateMachine.flush(self.state)
        self._collect([(current, flushed)])
        if self.in_tool:
            self._tool_call()
        self._close()
        hit = finished.stop_string
        reason = ("tool_use" if self.called else "stop_sequence" if hit else
                  "max_tokens" if finished.finish_reason == "length" else "end_turn")
        self.stop = (reason, hit if reason == "stop_sequence" else None, usage(finished))
        self.events.append({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": self.stop[1]},
                            "usage": self.stop[2]})
        self.events.append({"type": "message_stop"})
        return self._drain()

    def body(self, finished: Finished) -> Dict[str, Any]:
        self.finish(finished)
        return self.message(*self.stop)

    def _drain(self) -> List[Dict[str, Any]]:
        out, self.events = self.events, []
        return out

    def _collect(self, segments: Sequence[Tuple[Optional[str], str]]) -> None:
        for state, text in segments:
            if state == "tool":
                self._close()
                self.in_tool, self.held = True, ""
                self.tool_text += text
            elif state is not None:
                if self.in_tool:
                    self._tool_call()
                self._text("thinking" if state == "reasoning" else "text", text)

    def _text(self, kind: str, text: str) -> None:
        if self.open != kind:
            if self.held_kind == kind:
                text = self.held + text
            if not text.strip():
                self.held, self.held_kind = text, kind
                return
            self._close()
            self.held = ""
            block = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "",
                                                                          "signature": ""}
            self._start_block(block)
            self.open = kind
        self.content[-1][kind] += text
        delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta",
                                                                             "thinking": text}
        self.events.append({"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta})

    def _start_block(self, block: Dict[str, Any]) -> None:
        self.content.append(block)
        self.events.append({"type": "content_block_start", "index": len(self.content) - 1,
                            "content_block": dict(block)})

    def _close(self) -> None:
        if self.open is not None:
            self.events.append({"type": "content_block_stop", "index": len(self.content) - 1})
            self.open = None

    def _tool_call(self) -> None:
        text, self.tool_text, self.in_tool = self.tool_text, "", False
        try:
            parsed = self.tokenizer.tool_parser(text, self.request.tools)
        except Exception as e:  # the model's text, in whatever state: drop the call, as mlx-lm's server does
            logging.warning("dropped a tool call that does not parse (%s: %s)", type(e).__name__, e)
            return
        for call in parsed if isinstance(parsed, list) else [parsed]:
            args = call.get("arguments") or {}
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    args = {"arguments": args}
            self._start_block({"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex}", "name": call.get("name", ""),
                               "input": {}})
            self.content[-1]["input"] = args
            index = len(self.content) - 1
            self.events.append({"type": "content_block_delta", "index": index,
                                "delta": {"type": "input_json_delta", "partial_json": json.dumps(args)}})
            self.events.append({"type": "content_block_stop", "index": index})
            self.called = True
