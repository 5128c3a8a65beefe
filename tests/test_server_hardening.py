"""The server's edges on both APIs: keys, CORS, model names, field ranges, the request log, SIGTERM.

One server, started with --api-key, --allowed-origins and --served-model-name '*',
serves the module; the SIGTERM test starts its own.
"""

import http.client
import json
import re
import signal
import time

import anthropic
import pytest
from openai import OpenAI
from server_process import request, sse_events, start_server

KEY = "sekret-key"
ORIGIN = "http://ok.example"
BEARER = {"Authorization": f"Bearer {KEY}"}
COMPLETION = {"model": "gpt-4o", "prompt": "def f(x):", "max_tokens": 3}
MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 3, "messages": [{"role": "user", "content": "def f(x):"}]}


@pytest.fixture(scope="module")
def server(mlx_pipo, tmp_path_factory):
    s = start_server(mlx_pipo, tmp_path_factory.mktemp("hardening") / "server.log", "--max-tokens", "4",
                     "--api-key", KEY, "--allowed-origins", ORIGIN, "--served-model-name", "*")
    yield s
    s["proc"].terminate()
    s["proc"].wait(timeout=10)


def test_a_key_is_required_as_a_bearer_token_or_x_api_key(server):
    for path, body in (("/v1/completions", COMPLETION), ("/v1/messages", MESSAGE)):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"Authorization": KEY}):
            status, _, error = request(server, "POST", path, body, headers)
            assert status == 401, (path, headers)
            kind = error["error"]["type"] if path == "/v1/messages" else error["error"]["code"]
            assert kind == ("authentication_error" if path == "/v1/messages" else "invalid_api_key")
        for headers in (BEARER, {"x-api-key": KEY}, {"authorization": f"bearer {KEY}"}):
            assert request(server, "POST", path, body, headers)[0] == 200, (path, headers)
    assert request(server, "GET", "/v1/models")[0] == 401
    assert request(server, "GET", "/v1/models", headers=BEARER)[0] == 200
    assert request(server, "GET", "/health")[0] == 200  # for load balancers and scripts

    # The official clients send their key the way each API does.
    m = anthropic.Anthropic(base_url=server["url"], api_key=KEY, max_retries=0).messages.create(**MESSAGE)
    assert m.type == "message"
    r = OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0).completions.create(**COMPLETION)
    assert r.choices[0].text is not None
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server["url"], api_key="wrong", max_retries=0).messages.create(**MESSAGE)


def test_cors_answers_allowed_origins_only(server):
    status, headers, _ = request(server, "OPTIONS", "/v1/messages", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key, content-type"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "x-api-key" in headers["Access-Control-Allow-Headers"].lower()
    status, headers, _ = request(server, "POST", "/v1/completions", COMPLETION, {**BEARER, "Origin": ORIGIN})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    _, headers, _ = request(server, "POST", "/v1/completions", COMPLETION, {**BEARER, "Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in headers


def test_any_model_name_is_served_with_a_star(server):
    for name in ("claude-opus-4-1", "gpt-4o-mini", "default_model"):
        assert request(server, "POST", "/v1/messages", {**MESSAGE, "model": name}, BEARER)[0] == 200
        assert request(server, "POST", "/v1/completions", {**COMPLETION, "model": name}, BEARER)[0] == 200


OUT_OF_RANGE = [
    ("/v1/completions", "max_tokens", 2**63),
    ("/v1/completions", "max_tokens", 2**31),
    ("/v1/completions", "max_completion_tokens", -(2**70)),
    ("/v1/completions", "seed", -1),
    ("/v1/completions", "seed", 10**20),
    ("/v1/completions", "seed", 1.5),
    ("/v1/completions", "top_k", 2**63),
    ("/v1/completions", "n", 2**64),
    ("/v1/completions", "logprobs", 2**63),
    ("/v1/completions", "temperature", True),
    ("/v1/completions", "stream_options", [1]),
    ("/v1/chat/completions", "top_logprobs", 2**63),
    ("/v1/chat/completions", "logprobs", "yes"),
    ("/v1/messages", "max_tokens", 2**63),
    ("/v1/messages", "seed", -1),
    ("/v1/messages", "seed", 10**20),
    ("/v1/messages", "top_k", 2**63),
    ("/v1/messages", "top_p", "x"),
    ("/v1/messages", "stream", 1),
    ("/v1/messages", "tool_choice", "auto"),
    ("/v1/messages", "conf_threshold", [0.5]),
]


@pytest.mark.parametrize("path,field,value", OUT_OF_RANGE, ids=[f"{p} {f}={v!r}" for p, f, v in OUT_OF_RANGE])
def test_a_field_out_of_range_or_of_the_wrong_type_is_a_400(server, path, field, value):
    base = MESSAGE if path == "/v1/messages" else COMPLETION
    if path == "/v1/chat/completions":
        base = {"model": "m", "max_tokens": 3, "messages": MESSAGE["messages"]}
    status, _, error = request(server, "POST", path, {**base, field: value}, BEARER)
    assert status == 400, error
    assert field in error["error"]["message"] or json.dumps(value) in error["error"]["message"], error
    assert request(server, "POST", path, base, BEARER)[0] == 200


def test_a_top_k_over_the_vocabulary_samples_from_all_of_it(server):
    """mlx-lm's top-k refuses k >= vocabulary at sampling time, which would fail the whole batch."""
    status, _, body = request(server, "POST", "/v1/completions", {**COMPLETION, "top_k": 10**6, "temperature": 1.0},
                              BEARER)
    assert status == 200, body
    status, _, body = request(server, "POST", "/v1/messages", {**MESSAGE, "top_k": 10**6}, BEARER)
    assert status == 200, body


def log_lines(server, method, path):
    pattern = re.compile(rf"INFO {method} {re.escape(path)} (\d+)(.*) (\d+\.\d+)s$")
    return [m.groups() for line in server["log"].read_text().splitlines() if (m := pattern.search(line))]


def test_one_log_line_per_request_with_its_tokens(server):
    before = log_lines(server, "POST", "/v1/completions")
    status, _, body = request(server, "POST", "/v1/completions", {**COMPLETION, "prompt": "class Log:"}, BEARER)
    assert status == 200
    request(server, "POST", "/v1/completions", {**COMPLETION, "max_tokens": -1}, BEARER)
    request(server, "POST", "/v1/completions", COMPLETION)
    deadline = time.time() + 30  # a line is written once its answer is sent: the last may lag the client
    while len(lines := log_lines(server, "POST", "/v1/completions")[len(before):]) < 3 and time.time() < deadline:
        time.sleep(0.05)
    assert [status for status, _, _ in lines] == ["200", "400", "401"]
    u = body["usage"]
    keep = u["pipo"]["token2_kept"] / max(u["pipo"]["steps"], 1)
    assert lines[0][1] == (f" prompt={u['prompt_tokens']} cached={u['prompt_tokens_details']['cached_tokens']} "
                           f"generated={u['completion_tokens']} keep={keep:.2f}")
    assert lines[1][1] == lines[2][1] == ""


def open_stream(port, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return resp


def test_sigterm_ends_open_streams_with_a_final_event_and_exits_0(mlx_pipo, tmp_path):
    s = start_server(mlx_pipo, tmp_path / "server.log", "--max-concurrent", "1", "--served-model-name", "*")
    long = {"max_tokens": 4000, "stream": True, "conf_threshold": 1.0, "temperature": 0}  # greedy: loops, no EOS
    running = open_stream(s["port"], "/v1/messages", {**MESSAGE, **long})
    assert running.readline().startswith(b"event: message_start")
    queued = open_stream(s["port"], "/v1/completions", {**COMPLETION, **long})  # waits: one row at a time
    s["proc"].send_signal(signal.SIGTERM)
    events = sse_events(running.read())
    assert events[-1][0] == "error", (len(events), events[-3:])
    assert events[-1][1]["error"]["type"] == "overloaded_error"
    assert [e for e in events if e[0] in ("message_delta", "message_stop")] == []
    chunks = queued.read().decode().strip().split("\n\n")
    assert chunks[-1] == "data: [DONE]" and "shutting down" in json.loads(chunks[-2][6:])["error"]["message"]
    assert s["proc"].wait(timeout=10) == 0
    log = s["log"].read_text()
    assert "stopped" in log and "Traceback" not in log


@pytest.mark.parametrize("raw,status", [(b"GARBAGE\r\n\r\n", b"400"), (b"GET /x HTTP/1.1 more\r\n\r\n", b"400"),
                                        (b"GET /" + b"x" * 70000 + b" HTTP/1.0\r\n\r\n", b"414")])
def test_a_malformed_request_line_is_refused_and_the_server_goes_on(server, raw, status):
    import socket

    with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as s:
        s.sendall(raw)
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except ConnectionResetError:  # the server closes on the rest of an overlong line it never read
            assert status == b"414"
    # The standard library's error page (no status line for HTTP/0.9), unless a reset ate it.
    assert b"Error code: " + status in got or status == b"414"
    assert request(server, "POST", "/v1/completions", COMPLETION, BEARER)[0] == 200
    assert "Traceback" not in server["log"].read_text()


def test_a_one_pair_prompt_that_never_drafts_ends_well_beside_another(server, mlx_pipo):
    """Its rows' MTP cache is never written; releasing it failed the whole batch with a 500."""
    from concurrent.futures import ThreadPoolExecutor

    from pipo_mlx import load, stream_generate

    model, tokenizer = load(str(mlx_pipo))
    bodies = [{"model": "m", "prompt": prompt, "max_tokens": 12, "conf_threshold": 1.0}
              for prompt in ([5], [7, 8], [9], "def g(y):")]
    answers = [request(server, "POST", "/v1/completions", bodies[0], BEARER)]  # alone in the batch
    with ThreadPoolExecutor(3) as pool:
        answers += pool.map(lambda b: request(server, "POST", "/v1/completions", b, BEARER), bodies[1:])
    for body, (status, _, answer) in zip(bodies, answers):
        assert status == 200, answer
        want = stream_generate(model, tokenizer, body["prompt"], max_tokens=12, conf_threshold=1.0)
        assert answer["choices"][0]["text"] == "".join(r.text for r in want)
