"""The OpenAI-compatible server, over real HTTP on 127.0.0.1, against the library's decoder.

One server process serves the whole module (the tiny random checkpoint of
conftest.py); every expected output comes from `pipo_mlx.stream_generate`
run here, on a fresh cache, over the same tokens.
"""

import http.client
import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hf_reference import random_ids
from openai import OpenAI
from server_process import start_server, stop_server

from pipo_mlx import load, stream_generate

CACHE_BYTES = 2 * 2**20  # small, so the load test goes through evictions
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(mlx_pipo, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = start_server(mlx_pipo, log, "--prompt-cache-bytes", str(CACHE_BYTES), "--max-concurrent", "8",
                          "--max-request-bytes", str(MAX_BODY), "--max-tokens", "16")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def lib(mlx_pipo):
    return load(str(mlx_pipo))


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0, timeout=120)


def reference(lib, ids, threshold, max_tokens=16):
    """(text, tokens, last response) of the library's greedy decoder on a fresh cache."""
    model, tokenizer = lib
    out = list(stream_generate(model, tokenizer, list(ids), max_tokens=max_tokens, conf_threshold=threshold))
    return "".join(r.text for r in out), [r.token for r in out], out[-1]


def chat_ids(lib, messages):
    tokenizer = lib[1]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def post(server, path, body, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=120)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    status, raw = resp.status, resp.read()
    conn.close()
    return status, raw


def health(server):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    conn.request("GET", "/health")
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def assert_usage(usage, prompt_ids, last):
    assert usage.prompt_tokens == len(prompt_ids)
    assert usage.completion_tokens == last.generation_tokens
    assert usage.total_tokens == len(prompt_ids) + last.generation_tokens
    pipo = usage.pipo
    assert (pipo["steps"], pipo["token2_kept"]) == (last.steps, last.token2_kept)
    assert pipo["prefilled_tokens"] + usage.prompt_tokens_details.cached_tokens == len(prompt_ids)


# -- the API, against the library -------------------------------------------------


@pytest.mark.parametrize("threshold", [-1.0, 0.5, 1.0])
def test_chat_equals_the_library_token_for_token(server, client, lib, threshold):
    messages = [{"role": "user", "content": f"def add(a, b): {threshold}"}]
    ids = chat_ids(lib, messages)
    text, _, last = reference(lib, ids, threshold)
    for _ in range(2):  # the second time from the prompt cache
        r = client.chat.completions.create(model="default_model", messages=messages, max_tokens=16,
                                           extra_body={"conf_threshold": threshold})
        assert r.choices[0].message.content == text
        assert r.choices[0].finish_reason == last.finish_reason
        assert_usage(r.usage, ids, last)
    assert r.usage.prompt_tokens_details.cached_tokens == len(ids) + len(ids) % 2 - 2


@pytest.mark.parametrize("draft", ["always", "never"])
def test_the_drafting_mode_of_a_request(server, client, lib, draft):
    model, tokenizer = lib
    prompt = "def mul(a, b):"
    out = list(stream_generate(model, tokenizer, tokenizer.encode(prompt), max_tokens=16,
                               conf_threshold=0.5, draft=draft))
    r = client.completions.create(model="default_model", prompt=prompt, max_tokens=16,
                                  extra_body={"conf_threshold": 0.5, "draft": draft})
    assert r.choices[0].text == "".join(x.text for x in out)
    assert (out[-1].token2_kept > 0) == (draft == "always")


def test_streams_equal_the_library_and_end_with_usage(server, client, lib):
    messages = [{"role": "user", "content": "print(i * i)"}]
    ids = chat_ids(lib, messages)
    text, _, last = reference(lib, ids, -1.0, max_tokens=15)
    chunks = list(client.chat.completions.create(
        model="default_model", messages=messages, max_tokens=15, stream=True,
        stream_options={"include_usage": True}, extra_body={"conf_threshold": -1.0}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-2].choices[0].finish_reason == "length" and not chunks[-1].choices
    assert_usage(chunks[-1].usage, ids, last)

    prompt = "class Point:\n    def"
    text, tokens, last = reference(lib, lib[1].encode(prompt), 0.5)
    pieces = list(client.completions.create(model="default_model", prompt=prompt, max_tokens=16, stream=True,
                                            extra_body={"conf_threshold": 0.5}))
    assert "".join(p.choices[0].text for p in pieces) == text
    whole = client.completions.create(model="default_model", prompt=prompt, max_tokens=16,
                                      extra_body={"conf_threshold": 0.5})
    assert whole.choices[0].text == text
    assert_usage(whole.usage, lib[1].encode(prompt), last)


def test_stop_strings_cut_the_text_wherever_the_tokens_split_it(server, client, lib):
    prompt = "for i in range(10):"
    text, _, _ = reference(lib, lib[1].encode(prompt), -1.0, max_tokens=16)
    stop = text[3:6]
    assert len(stop) == 3 and stop.strip(), text
    r = client.completions.create(model="default_model", prompt=prompt, max_tokens=16, stop=[stop, "never seen"],
                                  extra_body={"conf_threshold": -1.0})
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="default_model", prompt=prompt, max_tokens=16, stop=stop,
                                         stream=True, extra_body={"conf_threshold": -1.0})
    assert "".join(p.choices[0].text for p in streamed) == text[: text.index(stop)]


def test_logprobs_are_the_decoders(server, client, lib):
    messages = [{"role": "user", "content": "import os"}]
    ids = chat_ids(lib, messages)
    model, tokenizer = lib
    out = list(stream_generate(model, tokenizer, ids, max_tokens=6, conf_threshold=-1.0))
    r = client.chat.completions.create(model="default_model", messages=messages, max_tokens=6, logprobs=True,
                                       top_logprobs=3, extra_body={"conf_threshold": -1.0})
    content = r.choices[0].logprobs.content
    assert len(content) == len(out)
    for got, want in zip(content, out):
        assert got.logprob == pytest.approx(want.logprobs[want.token].item(), abs=1e-4)
        assert len(got.top_logprobs) == 3
        values = [t.logprob for t in got.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert values[0] == pytest.approx(got.logprob, abs=1e-4)  # greedy takes the top token
    text = lib[1].encode("import os")
    legacy = client.completions.create(model="default_model", prompt="import os", max_tokens=5, logprobs=2,
                                       extra_body={"conf_threshold": -1.0})
    want = list(stream_generate(model, tokenizer, text, max_tokens=5, conf_threshold=-1.0))
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(want)
    for got, w, top in zip(lp.token_logprobs, want, lp.top_logprobs):
        assert got == pytest.approx(w.logprobs[w.token].item(), abs=1e-4) and len(top) <= 2


# -- the prompt cache ---------------------------------------------------------------


def completion(server, ids, threshold, max_tokens=8):
    status, raw = post(server, "/v1/completions",
                       {"prompt": list(ids), "max_tokens": max_tokens, "conf_threshold": threshold})
    assert status == 200, raw
    return json.loads(raw)


def test_an_extended_prompt_prefills_only_its_new_tokens(server, lib):
    p1 = random_ids(1, 20, seed=12)[0].tolist()  # a seed whose reply has no EOS
    text, reply, last = reference(lib, p1, -1.0, max_tokens=8)
    assert len(reply) == 8 and last.token2_kept == 4  # keep-all: no PAD in the cached pairs
    assert completion(server, p1, -1.0)["choices"][0]["text"] == text
    p2 = p1 + reply + random_ids(1, 6, seed=13)[0].tolist()  # e.g. an agent appending a tool result
    text2, _, _ = reference(lib, p2, -1.0, max_tokens=8)
    body = completion(server, p2, -1.0)
    assert body["choices"][0]["text"] == text2
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == len(p1) + 8
    assert body["usage"]["pipo"]["prefilled_tokens"] == 6


def test_a_second_chat_turn_reuses_the_first_and_answers_as_a_fresh_run(server, client, lib):
    first = [{"role": "user", "content": "def add(a, b):"}]
    r1 = client.chat.completions.create(model="default_model", messages=first, max_tokens=12,
                                        extra_body={"conf_threshold": 0.5})
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "class Point:"}]
    ids1, ids2 = chat_ids(lib, first), chat_ids(lib, second)
    assert ids2[: len(ids1)] == ids1
    text, _, last = reference(lib, ids2, 0.5, max_tokens=12)
    r2 = client.chat.completions.create(model="default_model", messages=second, max_tokens=12,
                                        extra_body={"conf_threshold": 0.5})
    assert r2.choices[0].message.content == text
    assert r2.usage.prompt_tokens_details.cached_tokens >= len(ids1) - 2
    assert_usage(r2.usage, ids2, last)


def test_a_diverging_prompt_never_reuses_a_wrong_state(server, lib):
    p = random_ids(1, 21, seed=21)[0].tolist()  # odd: the server pairs it with a PAD
    completion(server, p, 0.5)
    other = random_ids(1, 7, seed=22)[0].tolist()
    cases = {
        "diverges after 10 tokens": (p[:10] + other, 0),
        "diverges in the last pair": (p[:20] + other[:3], 20),
        "a real token where the cache holds PAD": (p + other[:1], 20),
        "the reply's text without its PADs": (p + reference(lib, p, 0.5, 8)[1], 20),
    }
    for name, (ids, cached) in cases.items():
        text, _, _ = reference(lib, ids, 0.5)
        body = completion(server, ids, 0.5, max_tokens=16)
        assert body["choices"][0]["text"] == text, name
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == cached, name


# -- load -----------------------------------------------------------------------------

KILLED_CLIENT = textwrap.dedent("""
    import http.client, json, sys
    conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "def", "max_tokens": 4000,
                 "stream": True, "conf_threshold": 1.0}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    while True:
        line = resp.readline()
        print(line.decode().strip(), flush=True)
""")


def rss_mb(pid: int) -> float:
    return int(subprocess.check_output(["ps", "-o", "rss=", "-p", str(pid)]).decode()) / 1024


def test_sixteen_streaming_clients_and_a_killed_one(server, lib):
    prompts = [(f"x = {i} * {i}\nprint(x)", (-1.0, 0.5, 1.0)[i % 3]) for i in range(16)]
    expected = {p: reference(lib, lib[1].encode(p), t, max_tokens=12)[0] for p, t in prompts}

    def one_client(prompt_threshold):
        prompt, threshold = prompt_threshold
        client = OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0, timeout=300)
        texts = []
        for _ in range(2):
            stream = client.completions.create(model="default_model", prompt=prompt, max_tokens=12, stream=True,
                                               extra_body={"conf_threshold": threshold})
            texts.append("".join(c.choices[0].text for c in stream))
        return prompt, texts

    rss = []
    for round_ in range(3):
        killed = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(server["port"])],
                                  stdout=subprocess.PIPE, text=True)
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(one_client, p) for p in prompts]
            assert killed.stdout.readline().startswith("data:")  # streaming, then killed
            killed.kill()
            killed.wait()
            for f in futures:
                prompt, texts = f.result()
                assert texts == [expected[prompt]] * 2, prompt
        # The killed request had 4000 tokens to go; it must be gone, not finishing.
        deadline = time.time() + 10
        while (h := health(server))["running"] or h["queued"]:
            assert time.time() < deadline, h
            time.sleep(0.05)
        assert h["prompt_cache"]["bytes"] <= CACHE_BYTES
        rss.append(rss_mb(server["proc"].pid))
    print(f"server resident memory after each round: {', '.join(f'{m:.1f}' for m in rss)} MB")
    assert rss[2] - rss[1] < 0.05 * rss[1], rss


# -- bad input ---------------------------------------------------------------------------

GOOD = {"prompt": "def", "max_tokens": 2}
BAD = [
    ("malformed JSON", "/v1/completions", b"{'prompt': ", 400, "invalid_json"),
    ("a list for a body", "/v1/completions", [1, 2], 400, None),
    ("no messages", "/v1/chat/completions", {"max_tokens": 3}, 400, "invalid_type"),
    ("a message without a role", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, None),
    ("max_tokens as a string", "/v1/completions", {**GOOD, "max_tokens": "10"}, 400, "invalid_type"),
    ("max_tokens 0", "/v1/completions", {**GOOD, "max_tokens": 0}, 400, "invalid_value"),
    ("max_tokens -1", "/v1/completions", {**GOOD, "max_tokens": -1}, 400, "invalid_value"),
    ("temperature as a string", "/v1/completions", {**GOOD, "temperature": "hot"}, 400, "invalid_type"),
    ("stream as a string", "/v1/completions", {**GOOD, "stream": "yes"}, 400, "invalid_type"),
    ("top_p 0", "/v1/completions", {**GOOD, "top_p": 0}, 400, "invalid_value"),
    ("a threshold that is a word", "/v1/completions", {**GOOD, "conf_threshold": "high"}, 400, "invalid_type"),
    ("a threshold that is NaN", "/v1/completions", b'{"prompt": "def", "conf_threshold": NaN}', 400,
     "invalid_value"),
    ("an unknown model", "/v1/completions", {**GOOD, "model": "gpt-17"}, 404, "model_not_found"),
    ("a prompt over the context", "/v1/completions", {"prompt": "a " * 5000}, 400, "context_length_exceeded"),
    ("token ids out of the vocabulary", "/v1/completions", {"prompt": [1, 2, 10**6]}, 400, "invalid_type"),
    ("n = 2", "/v1/completions", {**GOOD, "n": 2}, 400, "invalid_value"),
    ("an unknown drafting mode", "/v1/completions", {**GOOD, "draft": "sometimes"}, 400, "invalid_value"),
    ("a drafting mode that is a number", "/v1/completions", {**GOOD, "draft": 1}, 400, "invalid_type"),
    ("an oversized body", "/v1/completions", {"prompt": "x" * (2 * MAX_BODY)}, 413, "request_too_large"),
    ("an unknown endpoint", "/v1/embeddings", GOOD, 404, "not_found"),
]


@pytest.mark.parametrize("name,path,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error_and_the_server_goes_on(server, name, path, body, status, code):
    got, raw = post(server, path, body)
    assert got == status, raw
    error = json.loads(raw)["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code
    ok, raw = post(server, "/v1/completions", GOOD)
    assert ok == 200 and json.loads(raw)["choices"][0]["text"] is not None


def test_a_request_without_content_length_gets_411(server):
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n\r\n")
        assert s.recv(4096).split(b"\r\n")[0].endswith(b"411 Length Required")
    assert post(server, "/v1/completions", GOOD)[0] == 200


def test_models_and_health(server):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    conn.request("GET", "/v1/models")
    models = json.loads(conn.getresponse().read())
    assert models["object"] == "list" and len(models["data"]) == 1
    assert health(server)["status"] == "ok"


def test_help_says_there_is_no_authentication_and_bad_flags_exit_2():
    out = subprocess.run([sys.executable, "-m", "pipo_mlx.server", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "NO authentication" in out.stdout and "127.0.0.1" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "pipo_mlx.server", "--prompt-cache-bytes", "lots"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --prompt-cache-bytes")
    assert "Traceback" not in bad.stderr


# -- tools, in process: the template sees them, the reply parses the calls ------------------

TOOL_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for tool_call in m.tool_calls or [] %}<tool_call>{{ tool_call.name }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tools_reach_the_template_and_tool_calls_come_back_parsed(mlx_pipo, tmp_path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from transformers import AutoTokenizer

    from pipo_mlx.cli.openai_api import Defaults, Reply, parse_request
    from pipo_mlx.engine import Finished, TokenEvent

    hf = AutoTokenizer.from_pretrained(mlx_pipo)
    hf.chat_template = TOOL_TEMPLATE
    hf.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.has_tool_calling  # mlx-lm reads the Qwen-style JSON tool calls off the template
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "user", "content": "time?"}], "tools": tools}
    defaults = Defaults(16, 0.0, 1.0, 0, 0.0, None)
    for stream in (False, True):
        request = parse_request({**body, "stream": stream}, "chat", defaults, tokenizer, threading.Lock(), 4096)
        assert "<tools>get_time;</tools>" in tokenizer.decode(request.prompt)
        reply = Reply(request, tokenizer, "m", 0)
        pieces = ["Sure.", "<tool", '_call>\n{"name": "get_time", ', '"arguments": {"tz": "UTC"}}\n</tool_', "call>"]
        chunks = []
        for piece in pieces:
            reply.add(TokenEvent(piece, 5, False, -0.1, []))
            chunks.append(reply.chunk()) if stream else None
        done = Finished("stop", len(request.prompt), 0, len(pieces), len(pieces), 0, 0.01)
        if stream:
            chunks += reply.final_chunks(done)
            messages = [c["choices"][0]["delta"] for c in chunks if c]
            assert "".join(m.get("content", "") for m in messages) == "Sure."
            calls = [tc for m in messages for tc in m.get("tool_calls", [])]
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            out = reply.body(done)["choices"][0]
            assert out["message"]["content"] == "Sure."
            calls, finish = out["message"]["tool_calls"], out["finish_reason"]
        assert finish == "tool_calls" and len(calls) == 1
        assert calls[0]["function"]["name"] == "get_time"
        assert json.loads(calls[0]["function"]["arguments"]) == {"tz": "UTC"}


def test_stop_strings_cut_at_the_first_stop_for_any_split():
    import random

    from pipo_mlx.engine import StopStrings

    rng = random.Random(0)
    text = "def f(x):\n    return x\n\n\nclass A:\n    pass\n"
    for stops in (["\n\n"], ["class", "\n\n\n"], ["return x\n"], ["never"], ["A:", "f("]):
        hits = [text.find(s) for s in stops if s in text]
        want = text[: min(hits)] if hits else text
        for _ in range(50):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
            pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            s, out = StopStrings(stops), ""
            for piece in pieces:
                released, stopped = s.feed(piece)
                out += released
                if stopped:
                    break
            else:
                out += s.flush()
            assert out == want, (stops, pieces)
