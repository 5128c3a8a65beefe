"""Load on one server: many clients mixing both APIs, streaming and not, some leaving mid-stream.

    python benchmarks/bench_load.py            # 32 clients for 5 minutes, the shipped demo
    python benchmarks/bench_load.py --quick    # 8 clients for 20 seconds: a smoke run, build/bench/

Each client loops until the time is up, drawing a request at random: an
OpenAI completion or an Anthropic message, streamed or not, greedy (with a
threshold and drafting mode whose tokens do not depend on batch-mates, docs/design.md
§12) or sampled with a seed (which the server runs alone). Every answer that
completes is compared with the library's `stream_generate` for the same
tokens, settings and seed, computed here beforehand; one streamed request in
ten closes its connection after the first token. The server is loopback-only,
started here. Reported: status counts (any 5xx fails the run), answers that
differ (any fails it), the server's resident memory sampled through the run
(growth over 5% after the first third fails it), and time to first token of
the streams, p50 and p99.
"""

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import Served, log  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS, SCRATCH = REPO / "benchmarks" / "results", REPO / "build" / "bench"
DEMO = REPO / "models" / "pipo-stdlib"
PROMPTS = ["def fib(n):", "class Stack:", "import os\n", "for line in open(path):", "def parse(text):",
           "with open(name) as f:", "try:\n    import json\n", "def walk(tree):"]
GREEDY = [(-1.0, "always"), (0.5, "always"), (1.0, "never")]  # (threshold, drafting): batch-independent
SAMPLED = {"temperature": 1.0, "top_p": 0.95, "top_k": 20}
SEEDS = [11, 12, 13, 14]


def chat_ids(tokenizer, prompt: str) -> List[int]:
    """The tokens the server's chat routes read for one user message."""
    from mlx_lm.server import convert_chat

    messages = [{"role": "user", "content": prompt}]
    if not tokenizer.has_chat_template:
        return tokenizer.encode(convert_chat(messages))
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def requests_and_answers(model, tokenizer, max_tokens: int) -> List[Tuple[str, Dict[str, Any], str]]:
    """(api, body, the library's text) for every request a client may draw."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from pipo_mlx import stream_generate

    out = []
    for prompt in PROMPTS:
        for api in ("openai", "anthropic"):
            ids = tokenizer.encode(prompt) if api == "openai" else chat_ids(tokenizer, prompt)
            base = ({"prompt": prompt} if api == "openai"
                    else {"messages": [{"role": "user", "content": prompt}]})
            base.update(model="default_model", max_tokens=max_tokens)
            settings = [{"temperature": 0.0, "conf_threshold": t, "draft": d} for t, d in GREEDY]
            settings += [{**SAMPLED, "seed": s, "conf_threshold": 0.5, "draft": "always"} for s in SEEDS]
            for s in settings:
                sampler = None
                if "seed" in s:
                    mx.random.seed(s["seed"])
                    sampler = make_sampler(s["temperature"], s["top_p"], top_k=s["top_k"])
                text = "".join(r.text for r in stream_generate(
                    model, tokenizer, list(ids), max_tokens=max_tokens, sampler=sampler,
                    conf_threshold=s["conf_threshold"], draft=s["draft"]))
                out.append((api, {**base, **s}, text))
    return out


def send(port: int, api: str, body: Dict[str, Any], stream: bool, leave: bool) -> Dict[str, Any]:
    """One request: its status, the text it got (None if it left or failed) and its time to first token."""
    path = "/v1/completions" if api == "openai" else "/v1/messages"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    tic = time.perf_counter()
    conn.request("POST", path, json.dumps({**body, "stream": stream}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    result: Dict[str, Any] = {"status": resp.status, "text": None, "ttft_s": None, "failed": False}
    if resp.status != 200 or not stream:
        raw = resp.read()
        if resp.status == 200:
            data = json.loads(raw)
            result["text"] = (data["choices"][0]["text"] if api == "openai"
                              else "".join(b.get("text", "") for b in data["content"]))
        conn.close()
        return result
    text, failed = "", False
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        data = json.loads(line[6:])
        if api == "openai":
            piece = data["choices"][0]["text"] if data.get("choices") else None
            failed |= "error" in data
        else:
            kind = data["type"]
            piece = data["delta"].get("text", "") if kind == "content_block_delta" else None
            piece = "" if kind == "message_delta" else piece
            failed |= kind == "error"
        if piece is not None:
            if result["ttft_s"] is None:
                result["ttft_s"] = time.perf_counter() - tic
                if leave:
                    conn.close()
                    return result
            text += piece
    conn.close()
    # An error event inside a 200 stream is the server failing as surely as a 5xx: counted, and fails the run.
    result["text"], result["failed"] = (None if failed else text), failed
    return result


def rss_mb(pid: int) -> float:
    return int(subprocess.check_output(["ps", "-o", "rss=", "-p", str(pid)]).decode()) / 1024


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEMO), help="a converted PIPO folder (default: the shipped demo)")
    p.add_argument("--quick", action="store_true", help="8 clients for 20 seconds: a smoke run")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--out", help="output folder (default: benchmarks/results for a full run, else build/bench)")
    args = p.parse_args(argv)
    settings = ("model", "clients", "duration", "max_tokens")
    args.full = not args.quick and all(getattr(args, k) == p.get_default(k) for k in settings)
    if args.quick:
        args.clients, args.duration = 8, 20.0
    args.out = Path(args.out or (RESULTS if args.full else SCRATCH))
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    from pipo_mlx import load

    args = parse_args(argv)
    log(f"results go to {args.out}" + ("" if args.full else " (not a full run)"))
    model, tokenizer = load(args.model)
    menu = requests_and_answers(model, tokenizer, args.max_tokens)
    log(f"{len(menu)} requests with the library's answers")
    server = Served(args.model, "--served-model-name", "*")
    proc, port = server.proc, server.port
    done: List[Dict[str, Any]] = []
    lock = threading.Lock()
    deadline = time.time() + args.duration

    def client(n: int) -> None:
        rng = random.Random(n)
        while time.time() < deadline:
            api, body, want = rng.choice(menu)
            stream = rng.random() < 0.5
            leave = stream and rng.random() < 0.1
            try:
                got = send(port, api, body, stream, leave)
            except (OSError, http.client.HTTPException) as e:
                got = {"status": 0, "text": None, "ttft_s": None, "failed": True, "error": repr(e)}
            visible = want if api == "openai" or want.strip() else ""
            got.update(api=api, stream=stream, left=leave,
                       wrong=got["text"] is not None and got["text"] != visible)
            with lock:
                done.append(got)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    rss = []
    while any(t.is_alive() for t in threads):
        rss.append((round(time.perf_counter() - tic, 1), rss_mb(proc.pid)))
        time.sleep(min(5.0, args.duration / 10))
    proc.terminate()
    proc.wait(timeout=30)
    statuses: Dict[str, int] = {}
    for d in done:
        statuses[str(d["status"])] = statuses.get(str(d["status"]), 0) + 1
    ttft = sorted(d["ttft_s"] for d in done if d["ttft_s"] is not None)
    # Growth within the last two thirds only: the first third is warm-up (compiles, the prompt cache filling),
    # and a peak there followed by a fall is not growth.
    third = [m for t, m in rss if t >= args.duration / 3] or [rss[-1][1]]
    growth = max(third) / third[0] - 1
    results = {
        "model": args.model, "settings": {k: getattr(args, k) for k in ("clients", "duration", "max_tokens", "quick")},
        "machine": {"cores": os.cpu_count(), "load_average": os.getloadavg()},
        "requests": len(done), "statuses": statuses, "server_errors": sum(d["status"] >= 500 for d in done),
        "completed": sum(d["text"] is not None for d in done), "wrong_answers": sum(d["wrong"] for d in done),
        "left_mid_stream": sum(d["left"] for d in done),
        # Connections the server dropped and error events inside streams; a client's own leaving is not one.
        "failed": sum(d["failed"] for d in done),
        "errors": sorted({d["error"] for d in done if "error" in d})[:5],
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
        "rss_mb": rss, "rss_growth_after_first_third": growth,
    }
    results["ok"] = (results["server_errors"] == 0 and results["failed"] == 0 and results["wrong_answers"] == 0
                     and growth <= 0.05)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(results, indent=1))
    log(f"{results['requests']} requests ({statuses}), {results['completed']} completed, "
        f"{results['wrong_answers']} differ from the library, {results['failed']} failed, "
        f"{results['left_mid_stream']} left mid-stream; "
        f"TTFT p50 {results['ttft_p50_s']:.3f} s, p99 {results['ttft_p99_s']:.3f} s; resident memory "
        f"{rss[0][1]:.0f} -> {rss[-1][1]:.0f} MB ({100 * growth:+.1f}% after the first third): "
        f"{'ok' if results['ok'] else 'FAILED'}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
