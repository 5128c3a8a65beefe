"""An agent loop replayed against our server (both APIs) and against mlx_lm.server serving the base.

    python benchmarks/bench_agent.py            # the shipped demo and its base
    python benchmarks/bench_agent.py --quick    # a smoke run: build/bench/

A coding agent's session, scripted so that every side sees the same one: a
system prompt with four tool definitions, a task, then turns in which the
assistant calls a tool and the tool's result (a piece of this repository's
source) is appended, the context growing to about --context tokens. Each turn
sends the whole conversation, as agents do, and asks for --reply-tokens greedy
tokens; the scripted assistant turn, not the model's reply, goes on. Three
sides, each a fresh server started here, take every turn in rotating order:

- pipo-openai: our server, POST /v1/chat/completions;
- pipo-anthropic: our server, POST /v1/messages;
- mlx-lm: `mlx_lm.server` serving the base model, POST /v1/chat/completions.

Per turn: time to first token as the client sees it (request sent to the first
streamed token), and prompt tokens prefilled and read from the cache as each
server reports them; per side: total wall time. Models without a chat template
(the demo) are copied under build/bench/ with a Qwen-style one that renders
tools, the same for both models.
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS, SCRATCH = REPO / "benchmarks" / "results", REPO / "build" / "bench"
DEMO = REPO / "models" / "pipo-stdlib"
TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{{ messages[0].content if messages[0].role == 'system' else '' }}\n\n"
    "# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n"
    "Call a tool as <tool_call>\n<function=NAME>\n<parameter=ARG>\nVALUE\n</parameter>\n</function>\n</tool_call>"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if not (tools and loop.first and m.role == 'system') %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n<function={{ c.function.name }}>\n"
    "{% for k, v in c.function.arguments.items() %}<parameter={{ k }}>\n{{ v }}\n</parameter>\n{% endfor %}"
    "</function>\n</tool_call>{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYSTEM = ("You are a coding agent working in a Python repository. Read before you edit, run the tests after "
          "every change, and keep changes small. Use the tools; answer briefly when the task is done.")
TOOLS = [
    {"name": "read_file", "description": "Read a file of the repository.",
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}},
    {"name": "grep", "description": "Search the repository for a regular expression.",
     "input_schema": {"type": "object", "properties": {"pattern": {"type": "string"}}, "required": ["pattern"]}},
    {"name": "run_tests", "description": "Run pytest on a test file.",
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}},
    {"name": "edit_file", "description": "Replace a string in a file.",
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"}, "old": {"type": "string"},
                                                       "new": {"type": "string"}}, "required": ["path"]}},
]
SOURCES = ["pipo_mlx/engine.py", "pipo_mlx/prompt_cache.py", "pipo_mlx/batch.py", "pipo_mlx/decode.py",
           "pipo_mlx/cli/openai_api.py", "pipo_mlx/cli/server.py", "pipo_mlx/drafting.py", "pipo_mlx/model.py"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def session(tokenizer, turns: int, context: int) -> List[Dict[str, Any]]:
    """The scripted turns: (assistant text, tool call, tool result), results sized to reach `context` tokens."""
    # 510 tokens: the system prompt, tools and task in the demo's template; 112 per turn: the assistant's text,
    # its tool call and the result's wrapping (measured, 104 to 117). Sized otherwise, the last turn of the
    # default run overran the demo's 4096-token context (4266 tokens).
    per_turn = max(120, (context - 510) // turns)
    steps = []
    for n in range(turns):
        path = SOURCES[n % len(SOURCES)]
        ids = tokenizer.encode((REPO / path).read_text()[: 8 * per_turn * (1 + turns // len(SOURCES))],
                               add_special_tokens=False)
        start = (n // len(SOURCES)) * per_turn
        result = tokenizer.decode(ids[start: start + per_turn - 112])
        name, args = ("read_file", {"path": path}) if n % 3 != 2 else ("run_tests", {"path": "tests/test_server.py"})
        steps.append({"text": f"Step {n + 1}: I will check {path}.", "tool": name, "input": args,
                      "id": f"toolu_{n:04d}", "result": result})
    return steps


def openai_messages(steps: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "The server's tests fail after the last change; find out why and fix it."}]
    for s in steps:
        messages.append({"role": "assistant", "content": s["text"], "tool_calls": [
            {"id": s["id"], "type": "function", "function": {"name": s["tool"], "arguments": json.dumps(s["input"])}}]})
        messages.append({"role": "tool", "tool_call_id": s["id"], "content": s["result"]})
    return messages


def anthropic_messages(steps: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    messages = [{"role": "user", "content": "The server's tests fail after the last change; find out why and fix it."}]
    for s in steps:
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": s["text"]},
            {"type": "tool_use", "id": s["id"], "name": s["tool"], "input": s["input"]}]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": s["id"], "content": s["result"]}]})
    return messages


OPENAI_TOOLS = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                  "parameters": t["input_schema"]}} for t in TOOLS]


class Side:
    """A server process and how one turn is sent to it."""

    def __init__(self, name: str, command: List[str], port: int, anthropic: bool):
        self.name, self.port, self.anthropic = name, port, anthropic
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self.proc = subprocess.Popen(command, stderr=self.log, stdout=subprocess.DEVNULL, cwd=REPO)
        deadline = time.time() + 180
        while not self._up():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{name} did not start:\n{Path(self.log.name).read_text()}")
            time.sleep(0.2)

    def _up(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            conn.request("GET", "/v1/models")
            return conn.getresponse().status == 200
        except OSError:
            return False

    def warm(self) -> None:
        """One short request, so that no side's first turn pays for loading and compiling."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "default_model", "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2}),
            {"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
        conn.close()

    def turn(self, steps: List[Dict[str, Any]], reply_tokens: int) -> Dict[str, float]:
        """Seconds to the first token and in all, prompt tokens prefilled and cached, for one turn."""
        if self.anthropic:
            path, body = "/v1/messages", {"model": "default_model", "system": SYSTEM, "tools": TOOLS,
                                          "messages": anthropic_messages(steps)}
        else:
            path, body = "/v1/chat/completions", {"model": "default_model", "tools": OPENAI_TOOLS,
                                                  "messages": openai_messages(steps),
                                                  "stream_options": {"include_usage": True}}
        body.update(max_tokens=reply_tokens, temperature=0.0, stream=True)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        tic = time.perf_counter()
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        first, usage = None, {}
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            data = json.loads(line[6:])
            token = (data.get("type") in ("content_block_delta", "message_delta") if self.anthropic
                     else bool(data.get("choices")))
            if token and first is None:
                first = time.perf_counter() - tic
            usage = data.get("usage") or usage
        total = time.perf_counter() - tic
        conn.close()
        if self.anthropic:
            cached = usage["cache_read_input_tokens"]
            prompt = usage["input_tokens"] + cached
        else:
            prompt, cached = usage["prompt_tokens"], (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return {"ttft_s": first, "wall_s": total, "prompt_tokens": prompt, "cached": cached,
                "prefilled": prompt - cached}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_template(folder: Path, scratch: Path) -> Path:
    """`folder` itself when its tokenizer has a chat template, else a copy under `scratch` with ours."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    if hf.chat_template:
        return folder
    copy = scratch / "agent-models" / folder.name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy)
    hf.chat_template = TEMPLATE
    hf.save_pretrained(copy)
    return copy


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEMO), help="a converted PIPO folder (default: the shipped demo)")
    p.add_argument("--base", help="the base for mlx_lm.server (default: the one the model records)")
    p.add_argument("--quick", action="store_true", help="4 turns to about 1k tokens: a smoke run")
    p.add_argument("--turns", type=int, default=12)
    p.add_argument("--context", type=int, default=3800, help="tokens the conversation grows to (about; the "
                   "demo's context is 4096)")
    p.add_argument("--reply-tokens", type=int, default=16, help="greedy tokens asked for per turn")
    p.add_argument("--out", help="output folder (default: benchmarks/results for a full run, else build/bench)")
    args = p.parse_args(argv)
    settings = ("model", "base", "turns", "context", "reply_tokens")
    args.full = not args.quick and all(getattr(args, k) == p.get_default(k) for k in settings)
    if args.quick:
        args.turns, args.context, args.reply_tokens = 4, 1000, 4
    args.out = Path(args.out or (RESULTS if args.full else SCRATCH))
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    from pipo_mlx import load
    from pipo_mlx.model_io import recorded_base

    args = parse_args(argv)
    log(f"results go to {args.out}" + ("" if args.full else " (not a full run)"))
    model, tokenizer = load(args.model)
    base = args.base or recorded_base(Path(args.model), model.args.base_model)
    pipo_folder, base_folder = with_template(Path(args.model), SCRATCH), with_template(Path(base), SCRATCH)
    steps = session(tokenizer, args.turns, args.context)
    ours = [sys.executable, "-m", "pipo_mlx.server", "--model", str(pipo_folder), "--served-model-name", "*"]
    sides = []
    try:
        for name, anthropic in (("pipo-openai", False), ("pipo-anthropic", True)):
            port = free_port()
            sides.append(Side(name, ours + ["--port", str(port)], port, anthropic))
        port = free_port()
        sides.append(Side("mlx-lm", [sys.executable, "-m", "mlx_lm.server", "--model", str(base_folder),
                                     "--port", str(port)], port, False))
        for side in sides:
            side.warm()
        rows: Dict[str, List[Dict[str, float]]] = {s.name: [] for s in sides}
        for n in range(args.turns + 1):  # turn 0: the task alone
            for side in sides[n % len(sides):] + sides[: n % len(sides)]:
                rows[side.name].append(side.turn(steps[:n], args.reply_tokens))
            log(f"turn {n}: {rows['pipo-openai'][-1]['prompt_tokens']} prompt tokens")
    finally:
        for side in sides:
            side.close()
    results = {
        "model": str(args.model), "base": str(base),
        "settings": {k: getattr(args, k) for k in ("turns", "context", "reply_tokens", "quick")},
        "machine": {"cores": os.cpu_count(), "blas_preloaded": os.environ.get("LD_PRELOAD", ""),
                    "load_average": os.getloadavg()},
        "turns": rows,
        "totals": {name: {"wall_s": sum(r["wall_s"] for r in rs), "prefilled": sum(r["prefilled"] for r in rs),
                          "median_ttft_s": statistics.median(r["ttft_s"] for r in rs)} for name, rs in rows.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "agent.json"
    path.write_text(json.dumps(results, indent=1))
    names = list(rows)
    print("| turn | prompt tokens | " + " | ".join(f"{n} TTFT (prefilled)" for n in names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    for n in range(args.turns + 1):
        cells = [f"{1e3 * rows[s][n]['ttft_s']:.0f} ms ({rows[s][n]['prefilled']})" for s in names]
        print(f"| {n} | {rows[names[0]][n]['prompt_tokens']} | " + " | ".join(cells) + " |")
    print("| total wall | | " + " | ".join(f"{results['totals'][s]['wall_s']:.2f} s" for s in names) + " |")
    log(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
