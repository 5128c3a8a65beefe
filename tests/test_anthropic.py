"""The Anthropic Messages API, through the official `anthropic` client, against the library's decoder.

One server serves the module: the tiny random checkpoint of conftest.py with
a chat template that declares tools and renders tool calls, served under two
names. Expected outputs come from `pipo_mlx.stream_generate` over the tokens
the template gives for the same conversation written as chat messages.
"""

import re
import shutil
import threading

import anthropic
import mlx.core as mx
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from mlx_lm.sample_utils import make_sampler
from openai import OpenAI
from server_process import request, sse_events, start_server, stop_server

from pipo_mlx import load, stream_generate

TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }}: {{ t.function.description }};{% endfor %}"
    "</tools>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n<function={{ c.function.name }}>\n"
    "{% for k, v in c.function.arguments.items() %}<parameter={{ k }}>\n{{ v }}\n</parameter>\n{% endfor %}"
    "</function>\n</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NAME, ALIAS = "pipo-tiny", "claude-sonnet-alias"
TOOLS = [{"name": "get_time", "description": "the time in a zone",
          "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}}}]
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "the time in a zone",
                                                "parameters": TOOLS[0]["input_schema"]}}]


@pytest.fixture(scope="module")
def tool_model(mlx_pipo, tmp_path_factory):
    """The tiny checkpoint with a tool-calling chat template."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tools") / "pipo"
    shutil.copytree(mlx_pipo, folder)
    hf = AutoTokenizer.from_pretrained(mlx_pipo)
    hf.chat_template = TEMPLATE
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(tool_model, tmp_path_factory):
    s = start_server(tool_model, tmp_path_factory.mktemp("anthropic") / "server.log",
                     "--max-tokens", "16", "--served-model-name", NAME, ALIAS)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def lib(tool_model):
    return load(str(tool_model))


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server["url"], api_key="none", max_retries=0, timeout=120)


def template_ids(lib, messages, tools=None):
    tokenizer = lib[1]
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def reference(lib, ids, threshold, max_tokens=16, sampler=None):
    """(text, last response) of the library's decoder on a fresh cache."""
    out = list(stream_generate(lib[0], lib[1], list(ids), max_tokens=max_tokens, conf_threshold=threshold,
                               sampler=sampler))
    return "".join(r.text for r in out), out[-1]


def visible(text):
    """What a message shows of a reply's text: a reply of whitespace alone opens no text block."""
    return text if text.strip() else ""


def text_of(message):
    return "".join(b.text for b in message.content if b.type == "text")


def greedy(threshold):
    return {"temperature": 0, "conf_threshold": threshold}


STOP_REASONS = {"length": "max_tokens", "stop": "end_turn"}


# -- the API, against the library ---------------------------------------------------


@pytest.mark.parametrize("threshold", [-1.0, 0.5])
def test_a_greedy_message_equals_the_library_token_for_token(server, client, lib, threshold):
    system = "You write Python."
    blocks = [{"type": "text", "text": "def add(a, b):"}, {"type": "text", "text": f" # {threshold}"}]
    ids = template_ids(lib, [{"role": "system", "content": system},
                             {"role": "user", "content": f"def add(a, b): # {threshold}"}])
    text, last = reference(lib, ids, threshold)
    for model in (NAME, ALIAS):  # the second time from the prompt cache
        m = client.messages.create(model=model, max_tokens=16, system=system,
                                   messages=[{"role": "user", "content": blocks}], extra_body=greedy(threshold))
        assert text_of(m) == visible(text)
        assert m.stop_reason == STOP_REASONS[last.finish_reason]
        assert m.usage.output_tokens == last.generation_tokens
        assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(ids)
        pipo = m.usage.pipo
        assert (pipo["steps"], pipo["token2_kept"]) == (last.steps, last.token2_kept)
        assert pipo["prefilled_tokens"] == m.usage.input_tokens
    assert m.usage.cache_read_input_tokens == len(ids) + len(ids) % 2 - 2


def test_the_stream_helper_reassembles_the_non_streamed_message(server, client, lib):
    kwargs = dict(model=NAME, max_tokens=14, messages=[{"role": "user", "content": "for i in range(3):"}],
                  extra_body=greedy(0.5))
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert [(b.type, b.text) for b in final.content] == [(b.type, b.text) for b in whole.content]
    assert (final.stop_reason, final.stop_sequence) == (whole.stop_reason, whole.stop_sequence)
    assert final.usage.output_tokens == whole.usage.output_tokens
    total = final.usage.input_tokens + final.usage.cache_read_input_tokens
    assert total == whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    assert text_of(whole) == visible(reference(lib, template_ids(lib, kwargs["messages"]), 0.5, 14)[0])

    # The raw events, in the API's order, each named as its type.
    status, _, raw = request(server, "POST", "/v1/messages", {**kwargs, **kwargs["extra_body"], "stream": True,
                                                              "extra_body": None})
    assert status == 200
    events = sse_events(raw)
    assert all(name == data["type"] for name, data in events)
    names = " ".join(name for name, _ in events) + " "
    pattern = (r"message_start (ping )*(content_block_start ((content_block_delta|ping) )+content_block_stop (ping )*)*"
               r"message_delta message_stop ")
    assert re.fullmatch(pattern, names), names
    start, delta = events[0][1], events[-2][1]
    assert start["message"]["content"] == [] and start["message"]["stop_reason"] is None
    assert delta["delta"]["stop_reason"] == whole.stop_reason
    assert delta["usage"]["output_tokens"] == whole.usage.output_tokens


def test_stop_sequences_end_the_message_and_are_reported(server, client, lib):
    messages = [{"role": "user", "content": "while True:"}]
    text, _ = reference(lib, template_ids(lib, messages), -1.0)
    stop = text[3:6]
    assert len(stop) == 3 and stop.strip() and text[:3].strip(), text
    kwargs = dict(model=NAME, max_tokens=16, messages=messages, stop_sequences=[stop, "never seen"],
                  extra_body=greedy(-1.0))
    for m in (client.messages.create(**kwargs), client.messages.stream(**kwargs).__enter__().get_final_message()):
        assert text_of(m) == text[: text.index(stop)]
        assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", stop)


def test_a_second_turn_reads_the_cache_and_prefills_only_the_new_tokens(server, client, lib):
    first = [{"role": "user", "content": "class Vector:"}]
    r1 = client.messages.create(model=NAME, max_tokens=12, messages=first, extra_body=greedy(0.5))
    reply = text_of(r1)
    assert reply, "the first reply is empty: pick another prompt"
    second = first + [{"role": "assistant", "content": [{"type": "text", "text": reply}]},
                      {"role": "user", "content": "def norm(v):"}]
    ids1 = template_ids(lib, first)
    ids2 = template_ids(lib, [first[0], {"role": "assistant", "content": reply}, second[2]])
    assert ids2[: len(ids1)] == ids1
    text, last = reference(lib, ids2, 0.5, 12)
    r2 = client.messages.create(model=NAME, max_tokens=12, messages=second, extra_body=greedy(0.5))
    assert text_of(r2) == visible(text)
    assert r2.usage.cache_read_input_tokens >= len(ids1) - 2 > 0
    assert r2.usage.input_tokens == len(ids2) - r2.usage.cache_read_input_tokens
    assert r2.usage.pipo["prefilled_tokens"] == r2.usage.input_tokens
    assert r2.usage.output_tokens == last.generation_tokens


def test_count_tokens_counts_what_the_template_renders(server, client, lib):
    messages = [{"role": "user", "content": "what time is it?"}]
    with_tools = template_ids(lib, messages, CHAT_TOOLS)
    assert client.messages.count_tokens(model=NAME, messages=messages, tools=TOOLS).input_tokens == len(with_tools)
    none = client.messages.count_tokens(model=NAME, messages=messages, tools=TOOLS, tool_choice={"type": "none"})
    assert none.input_tokens == len(template_ids(lib, messages))
    forced = client.messages.count_tokens(model=NAME, messages=messages, tools=TOOLS,
                                          tool_choice={"type": "tool", "name": "get_time"})
    assert forced.input_tokens == len(with_tools + lib[1].encode("<tool_call>", add_special_tokens=False))


# -- tools -----------------------------------------------------------------------------


def generated_tool_call(tool_model, stream):
    """A reply whose model writes text and then a tool call, fed to MessageReply in process."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from pipo_mlx.cli.anthropic_api import MessageReply, parse_messages
    from pipo_mlx.cli.openai_api import Defaults
    from pipo_mlx.engine import Finished, TokenEvent

    tokenizer = load_tokenizer(tool_model)
    assert tokenizer.has_tool_calling  # mlx-lm reads Qwen3.5's tool-call format off the template
    body = {"model": NAME, "max_tokens": 16, "tools": TOOLS, "stream": stream,
            "messages": [{"role": "user", "content": "time in UTC?"}]}
    req = parse_messages(body, Defaults(16, 0.0, 1.0, 0, 0.0, None), tokenizer, threading.Lock(), 4096)
    reply = MessageReply(req, tokenizer, NAME)
    pieces = ["Sure.", "\n<tool", "_call>\n<function=get_time>\n<parameter=tz>\n", "UTC\n</parameter>\n</function>",
              "\n</tool_", "call>"]
    done = Finished("stop", len(req.prompt), 0, len(pieces), len(pieces), 0, 0.01)
    events = [reply.start()] + [e for p in pieces for e in reply.add(TokenEvent(p, 5, False, None, []))]
    if not stream:
        return reply.body(done)
    events += reply.finish(done)
    snapshot = None
    for event in events:  # the official SDK's own reassembly of a stream
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs={})
    return snapshot.to_dict()


def test_a_tool_use_round_trip(server, client, lib, tool_model):
    calls = [generated_tool_call(tool_model, stream) for stream in (False, True)]
    for message in calls:
        assert message["stop_reason"] == "tool_use"
        text, use = message["content"]
        assert text == {"type": "text", "text": "Sure.\n"}
        assert (use["type"], use["name"], use["input"]) == ("tool_use", "get_time", {"tz": "UTC"})
        assert use["id"].startswith("toolu_")
    use = calls[0]["content"][1]

    # The client runs the tool and sends its result; the template sees the call and the result.
    messages = [{"role": "user", "content": "time in UTC?"},
                {"role": "assistant", "content": calls[0]["content"]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "12:00"},
                                             {"type": "text", "text": "and in Paris?"}]}]
    chat = [{"role": "user", "content": "time in UTC?"},
            {"role": "assistant", "content": "Sure.\n", "tool_calls": [
                {"id": use["id"], "type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}]},
            {"role": "tool", "tool_call_id": use["id"], "content": "12:00"},
            {"role": "user", "content": "and in Paris?"}]
    ids = template_ids(lib, chat, CHAT_TOOLS)
    assert "<function=get_time>\n<parameter=tz>\nUTC\n</parameter>" in lib[1].decode(ids)
    text, last = reference(lib, ids, 0.5)
    m = client.messages.create(model=NAME, max_tokens=16, tools=TOOLS, messages=messages, extra_body=greedy(0.5))
    assert text_of(m) == visible(text)
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(ids)
    assert m.usage.output_tokens == last.generation_tokens


# -- default sampling --------------------------------------------------------------------


def test_messages_sample_as_the_model_config_says_else_as_the_paper(server, lib, tmp_path):
    from pipo_mlx.cli.anthropic_api import PAPER_SAMPLING, default_sampling

    messages = [{"role": "user", "content": "import sys"}]
    ids = template_ids(lib, messages)
    mx.random.seed(7)
    p = PAPER_SAMPLING
    text, _ = reference(lib, ids, 1.0, sampler=make_sampler(p["temperature"], p["top_p"], top_k=p["top_k"]))
    status, _, body = request(server, "POST", "/v1/messages", {"model": NAME, "max_tokens": 16, "seed": 7,
                                                               "conf_threshold": 1.0, "messages": messages})
    assert status == 200 and "".join(b["text"] for b in body["content"]) == visible(text)
    # The OpenAI routes stay greedy, as mlx_lm.server's.
    openai = OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)
    r = openai.chat.completions.create(model=NAME, messages=messages, max_tokens=16, seed=7,
                                       extra_body={"conf_threshold": 1.0})
    assert r.choices[0].message.content == reference(lib, ids, 1.0)[0]

    assert default_sampling(tmp_path) == PAPER_SAMPLING
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.6, "top_k": 40, "top_p": null}')
    assert default_sampling(tmp_path) == {"temperature": 0.6, "top_p": PAPER_SAMPLING["top_p"], "top_k": 40}
    (tmp_path / "generation_config.json").write_text('{"do_sample": false, "temperature": 0.6}')
    assert default_sampling(tmp_path) == {"temperature": 0.0, "top_p": 1.0, "top_k": 0}


# -- bad requests --------------------------------------------------------------------------

GOOD = {"model": NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "def"}]}
USER = {"role": "user", "content": "hi"}
CALL = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {}}]}


def with_messages(*messages, **fields):
    return {**GOOD, "messages": list(messages), **fields}


BAD = [
    ("malformed JSON", b'{"model": "pipo-tiny", ', 400, "invalid_request_error"),
    ("a list for a body", [GOOD], 400, "invalid_request_error"),
    ("no messages", {"model": NAME, "max_tokens": 2}, 400, "invalid_request_error"),
    ("messages as a string", {**GOOD, "messages": "hi"}, 400, "invalid_request_error"),
    ("a system role in messages", with_messages({"role": "system", "content": "be nice"}, USER), 400,
     "invalid_request_error"),
    ("a tool role", with_messages({"role": "tool", "content": "12:00"}), 400, "invalid_request_error"),
    ("empty content", with_messages({"role": "user", "content": ""}), 400, "invalid_request_error"),
    ("an empty list of blocks", with_messages({"role": "user", "content": []}), 400, "invalid_request_error"),
    ("a tool_result without its tool_use", with_messages(
        USER, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}]}),
     400, "invalid_request_error"),
    ("a tool_use never answered", with_messages(USER, CALL, USER), 400, "invalid_request_error"),
    ("an unknown block type", with_messages({"role": "user", "content": [{"type": "video", "url": "x"}]}), 400,
     "invalid_request_error"),
    ("an image", with_messages({"role": "user", "content": [{"type": "image", "source": {}}]}), 400,
     "invalid_request_error"),
    ("a block without a type", with_messages({"role": "user", "content": [{"text": "hi"}]}), 400,
     "invalid_request_error"),
    ("text that is a number", with_messages({"role": "user", "content": [{"type": "text", "text": 5}]}), 400,
     "invalid_request_error"),
    ("no max_tokens", {"model": NAME, "messages": [USER]}, 400, "invalid_request_error"),
    ("max_tokens -1", {**GOOD, "max_tokens": -1}, 400, "invalid_request_error"),
    ("max_tokens 0", {**GOOD, "max_tokens": 0}, 400, "invalid_request_error"),
    ("max_tokens 2**63", {**GOOD, "max_tokens": 2**63}, 400, "invalid_request_error"),
    ("max_tokens as a string", {**GOOD, "max_tokens": "10"}, 400, "invalid_request_error"),
    ("stop_sequences as a string", {**GOOD, "stop_sequences": "\n"}, 400, "invalid_request_error"),
    ("an empty stop sequence", {**GOOD, "stop_sequences": [""]}, 400, "invalid_request_error"),
    ("a stop sequence that is a number", {**GOOD, "stop_sequences": [3]}, 400, "invalid_request_error"),
    ("temperature as a word", {**GOOD, "temperature": "hot"}, 400, "invalid_request_error"),
    ("top_k 2**63", {**GOOD, "top_k": 2**63}, 400, "invalid_request_error"),
    ("seed -1", {**GOOD, "seed": -1}, 400, "invalid_request_error"),
    ("a 21-digit seed", {**GOOD, "seed": 10**20}, 400, "invalid_request_error"),
    ("a tool without a schema", {**GOOD, "tools": [{"name": "f"}]}, 400, "invalid_request_error"),
    ("tool_choice of a tool not given", {**GOOD, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "g"}},
     400, "invalid_request_error"),
    ("system as a number", {**GOOD, "system": 5}, 400, "invalid_request_error"),
    ("metadata as a string", {**GOOD, "metadata": "me"}, 400, "invalid_request_error"),
    ("trailing whitespace in the final assistant turn", with_messages(USER, {"role": "assistant", "content": "a "}),
     400, "invalid_request_error"),
    ("a prompt over the context", with_messages({"role": "user", "content": "a " * 5000}), 400,
     "invalid_request_error"),
    ("an unknown model", {**GOOD, "model": "gpt-17"}, 404, "not_found_error"),
    ("an unknown endpoint", GOOD, 404, "not_found_error"),
]


@pytest.mark.parametrize("name,body,status,kind", BAD, ids=[b[0] for b in BAD])
def test_a_bad_request_gets_an_anthropic_error_and_the_server_goes_on(server, name, body, status, kind):
    path = "/v1/messages/batches" if name == "an unknown endpoint" else "/v1/messages"
    got, _, error = request(server, "POST", path, body)
    assert got == status, error
    assert error["type"] == "error" and error["error"]["type"] == kind and error["error"]["message"]
    ok, _, message = request(server, "POST", "/v1/messages", GOOD)
    assert ok == 200 and message["type"] == "message"


def test_a_body_that_is_not_json_by_its_content_type_gets_415(server):
    got, _, error = request(server, "POST", "/v1/messages", b'{"a": 1}', {"Content-Type": "text/plain"})
    assert got == 415 and error["error"]["type"] == "invalid_request_error"
    assert request(server, "POST", "/v1/messages", GOOD)[0] == 200


def test_reasoning_becomes_thinking_blocks_and_tool_choice_any_opens_a_call(mlx_pipo, tmp_path):
    """In process, with a template that opens a reasoning block as Qwen3.5's does."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from transformers import AutoTokenizer

    from pipo_mlx.cli.anthropic_api import MessageReply, parse_messages
    from pipo_mlx.cli.openai_api import Defaults
    from pipo_mlx.engine import Finished, TokenEvent

    hf = AutoTokenizer.from_pretrained(mlx_pipo)
    hf.add_tokens(["<think>", "</think>"])
    hf.chat_template = TEMPLATE.replace("assistant\n{% endif %}", "assistant\n<think>\n{% if enable_thinking is "
                                        "defined and not enable_thinking %}\n</think>\n\n{% endif %}{% endif %}")
    hf.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.has_thinking and tokenizer.has_tool_calling
    body = {"model": NAME, "max_tokens": 16, "tools": TOOLS, "messages": [{"role": "user", "content": "time?"}]}
    defaults = Defaults(16, 0.0, 1.0, 0, 0.0, None)

    def answer(request, pieces):
        reply = MessageReply(request, tokenizer, NAME)
        for p in pieces:
            reply.add(TokenEvent(p, 5, False, None, []))
        return reply.body(Finished("stop", len(request.prompt), 0, len(pieces), len(pieces), 0, 0.01))

    request = parse_messages(body, defaults, tokenizer, threading.Lock(), 4096)
    assert request.initial_state == "reasoning"
    message = answer(request, ["The user", " wants the time.", "</think>", "\n\n", "It is noon."])
    assert message["content"] == [{"type": "thinking", "thinking": "The user wants the time.", "signature": ""},
                                  {"type": "text", "text": "\n\nIt is noon."}]
    assert message["stop_reason"] == "end_turn"

    quiet = parse_messages({**body, "thinking": {"type": "disabled"}}, defaults, tokenizer, threading.Lock(), 4096)
    assert tokenizer.decode(quiet.prompt).endswith("</think>\n\n") and quiet.initial_state == "normal"
    assert answer(quiet, ["It is noon."])["content"] == [{"type": "text", "text": "It is noon."}]

    forced = parse_messages({**body, "tool_choice": {"type": "any"}}, defaults, tokenizer, threading.Lock(), 4096)
    assert tokenizer.decode(forced.prompt).endswith("<think>\n</think>\n\n<tool_call>")
    assert forced.initial_state == "tool"
    message = answer(forced, ["\n<function=get_time>\n", "<parameter=tz>\nUTC\n</parameter>\n</function>\n",
                              "</tool_call>"])
    assert [(b["type"], b.get("input")) for b in message["content"]] == [("tool_use", {"tz": "UTC"})]
    assert message["stop_reason"] == "tool_use"
