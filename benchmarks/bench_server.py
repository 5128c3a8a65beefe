"""What the server's prompt cache saves, and what serving costs, measured side by side.

    python benchmarks/bench_server.py            # the shipped demo model, about 6 minutes
    python benchmarks/bench_server.py --quick    # a smoke run: build/bench/

1. Time to first token of turn N (2, 4, 8) of a multi-turn chat, through two
   servers on the same model started by this script: one with the prompt cache
   (it served turns 1..N-1 just before, as in a real conversation) and one
   with --prompt-cache-bytes 0. Every turn adds a user message of about
   --turn-tokens tokens and the previous reply; replies are the greedy ones,
   fixed beforehand, so both servers see the same conversation. Each repeat
   uses a different conversation (no repeat finds another's cache).
2. Server overhead: generated tokens/s of a streamed completion, from the
   first token to the last as the client sees them, against the library's
   `stream_generate` in this process, alternating, on the same prompt.

A full run (defaults) writes benchmarks/results/server.json, which docs/serving.md
quotes; --quick or changed settings write to build/bench/ unless --out says.
"""

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
RESULTS, SCRATCH = REPO / "benchmarks" / "results", REPO / "build" / "bench"
DEMO = REPO / "models" / "pipo-stdlib"
TURNS = (2, 4, 8)
TOPICS = ["a queue", "a parser", "a cache", "a timer", "a logger", "a pool", "a walker", "a buffer"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Served:
    """A `python -m pipo_mlx.server` process on a free port."""

    def __init__(self, model: str, *flags: str):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipo_mlx.server", "--model", model, "--port", "0", *flags],
            stderr=self.log, stdout=subprocess.DEVNULL, cwd=REPO,
        )
        deadline = time.time() + 120
        while not (m := re.search(r"http://127\.0\.0\.1:(\d+)", Path(self.log.name).read_text())):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the server did not start:\n{Path(self.log.name).read_text()}")
            time.sleep(0.1)
        self.port = int(m.group(1))

    def stream(self, path: str, body: Dict[str, Any]) -> Tuple[float, List[float], Dict[str, Any]]:
        """(seconds to the first text, arrival time of every chunk, the usage object)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        tic = time.perf_counter()
        conn.request("POST", path, json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        first, times, usage = None, [], {}
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"]:
                times.append(time.perf_counter())
                if first is None:
                    first = times[-1] - tic
        conn.close()
        return first, times, usage

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def conversation(model, tokenizer, topic: str, turns: int, turn_tokens: int, reply_tokens: int) -> List[dict]:
    """User messages of about `turn_tokens` tokens each with the greedy replies between them."""
    from mlx_lm.server import convert_chat

    from pipo_mlx import generate

    messages: List[dict] = []
    filler = "Keep the names short and the code plain. " * max(1, turn_tokens // 9)
    for n in range(turns):
        messages.append({"role": "user", "content": f"Turn {n + 1}: write {topic}. {filler}"})
        if tokenizer.has_chat_template:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:  # as the server renders a chat for a tokenizer without a template
            prompt = convert_chat(messages)
        reply = generate(model, tokenizer, prompt, max_tokens=reply_tokens, conf_threshold=1.0)
        messages.append({"role": "assistant", "content": reply})
    return messages


def ttft_by_turn(model, tokenizer, cached: Served, uncached: Served, args) -> Dict[str, Any]:
    rows: Dict[int, Dict[str, List[float]]] = {n: {"cached": [], "uncached": [], "prefilled": []} for n in TURNS}
    for r in range(args.repeats):
        talk = conversation(model, tokenizer, TOPICS[r % len(TOPICS)], max(TURNS), args.turn_tokens, args.reply_tokens)
        for n in range(1, max(TURNS) + 1):
            body = {"messages": talk[: 2 * n - 1], "max_tokens": 1, "conf_threshold": 1.0}
            for name, server in (("cached", cached), ("uncached", uncached))[:: 1 if (r + n) % 2 else -1]:
                first, _, usage = server.stream("/v1/chat/completions", body)
                if n in TURNS:
                    rows[n][name].append(first)
                    if name == "cached":
                        rows[n]["prefilled"].append(usage["pipo"]["prefilled_tokens"])
                        rows[n]["prompt_tokens"] = usage["prompt_tokens"]
        log(f"ttft: repeat {r + 1}/{args.repeats}")
    out = {}
    for n, row in rows.items():
        c, u = statistics.median(row["cached"]), statistics.median(row["uncached"])
        out[str(n)] = {"prompt_tokens": row["prompt_tokens"], "prefilled_with_cache": statistics.median(row["prefilled"]),
                       "ttft_cached_s": c, "ttft_uncached_s": u, "speedup": u / c}
    return out


def overhead(model, tokenizer, server: Served, args) -> Dict[str, Any]:
    from pipo_mlx import stream_generate

    prompt = "def walk(tree):\n    \"\"\"Yield every node of the tree.\"\"\"\n"
    via, direct = [], []
    for r in range(args.repeats):
        for side in (("server", "library") if r % 2 else ("library", "server")):
            if side == "library":
                out = list(stream_generate(model, tokenizer, prompt, max_tokens=args.tokens))
                direct.append(out[-1].generation_tps)
            else:
                _, times, usage = server.stream("/v1/completions", {"prompt": prompt, "max_tokens": args.tokens})
                # chunks after the first carry completion_tokens - 1 tokens (a chunk may hold several)
                via.append((usage["completion_tokens"] - 1) / (times[-1] - times[0]))
    v, d = statistics.median(via), statistics.median(direct)
    return {"tokens": args.tokens, "server_tok_s": v, "library_tok_s": d, "ratio": v / d,
            "threshold": "the model's default"}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEMO), help="a converted PIPO folder (default: the shipped demo)")
    p.add_argument("--quick", action="store_true", help="one repeat, short turns: a smoke run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--turn-tokens", type=int, default=96, help="tokens per user message (about)")
    p.add_argument("--reply-tokens", type=int, default=64, help="tokens per assistant reply")
    p.add_argument("--tokens", type=int, default=256, help="generated tokens for the overhead figure")
    p.add_argument("--out", help="output folder (default: benchmarks/results for a full run, else build/bench)")
    args = p.parse_args(argv)
    settings = ("repeats", "turn_tokens", "reply_tokens", "tokens", "model")
    args.full = not args.quick and all(getattr(args, k) == p.get_default(k) for k in settings)
    if args.quick:
        args.repeats, args.turn_tokens, args.reply_tokens, args.tokens = 1, 16, 8, 32
    args.out = Path(args.out or (RESULTS if args.full else SCRATCH))
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    from pipo_mlx import load

    args = parse_args(argv)
    log(f"results go to {args.out}" + ("" if args.full else " (not a full run)"))
    model, tokenizer = load(args.model)
    cached, uncached = Served(args.model, "--prompt-cache-bytes", "1GB"), Served(args.model, "--prompt-cache-bytes", "0")
    tic = time.perf_counter()
    try:
        results = {
            "model": args.model if not Path(args.model).is_relative_to(REPO) else str(Path(args.model).relative_to(REPO)),
            "settings": {k: getattr(args, k) for k in ("repeats", "turn_tokens", "reply_tokens", "tokens", "quick")},
            "machine": {"cores": os.cpu_count(), "blas_preloaded": os.environ.get("LD_PRELOAD", ""),
                        "load_average_start": os.getloadavg()},
            "ttft_by_turn": ttft_by_turn(model, tokenizer, cached, uncached, args),
            "overhead": overhead(model, tokenizer, cached, args),
        }
    finally:
        cached.close()
        uncached.close()
    results["settings"]["wall_s"] = time.perf_counter() - tic
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "server.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
    print("| turn | prompt tokens | prefilled with cache | TTFT cached | TTFT uncached | speedup |")
    print("|---|---|---|---|---|---|")
    for n, row in results["ttft_by_turn"].items():
        print(f"| {n} | {row['prompt_tokens']} | {row['prefilled_with_cache']:.0f} | {1e3 * row['ttft_cached_s']:.1f} ms "
              f"| {1e3 * row['ttft_uncached_s']:.1f} ms | {row['speedup']:.2f}x |")
    o = results["overhead"]
    print(f"server {o['server_tok_s']:.1f} tok/s vs library {o['library_tok_s']:.1f} tok/s: {o['ratio']:.2f}")
    log(f"wrote {path} in {results['settings']['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
