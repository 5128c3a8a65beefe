"""Data-parallel head training on this machine's loopback: one rank against two
over the same global batch (docs/training.md, "Training on several Macs").

    python benchmarks/bench_distributed.py           # the full run: results/distributed.json
    python benchmarks/bench_distributed.py --smoke   # a few steps, into build/

What it measures:
1. s/step of the demo's fine-tuning (models/pipo-stdlib on examples/data, LoRA
   rank 8, global batch 4) by train_heads.py alone and under
   `mlx.launch --backend ring -n 2` on 127.0.0.1, and the part of the two-rank
   step that rank 0 spent in collectives (its wait for rank 1 included), from
   its reports; the first two steps are left out.
2. The exchange alone: `mlx.nn.average_gradients` over float32 arrays shaped
   like the trainable set, timed under `mlx.launch -n 2`, for the demo and for
   the real Qwen3.5-4B geometry at rank 64. The 4B set is computed from its
   shapes (benchmarks/real_size.py's GEOMETRY), not built; the same formula is
   checked against the demo model's real trainable set first.
3. From those, the step time projected for 2 and 4 Macs: the one-rank compute
   split N ways plus a ring all-reduce (each rank sends and receives 2(N-1)/N
   of the bytes) at Thunderbolt 4's 40 Gb/s. IP over a Thunderbolt bridge
   reaches less than the link's rate, so these are lower bounds on the time.
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "distributed.json"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_size import GEOMETRY  # noqa: E402

# Apple: "Thunderbolt 4 ... up to 40Gb/s" (https://support.apple.com/en-us/111828).
THUNDERBOLT_BYTES_PER_S = 40e9 / 8
DEMO = dict(model="models/pipo-stdlib", data="examples/data", rank=8, alpha=16, batch=4, seq=256)
# The 4B's single-rank step on this CPU (benchmarks/results/real_size.json:
# 32 layers, bfloat16, --grad-checkpoint, one 2048-token sequence).
REAL_STEP_S_PER_SEQUENCE = 320.98


def trainable_shapes(g: Dict[str, int], rank: int) -> List[Tuple[int, ...]]:
    """The trainable set's shapes (docs/design.md §6): LoRA on the seven
    projections of the attention layers (every `interval`-th) and the MTP layer,
    on every MLP, and the heads in full."""
    h, i, hd = g["hidden_size"], g["intermediate_size"], g["head_dim"]
    nh, nkv = g["num_attention_heads"], g["num_key_value_heads"]

    def lora(fan_in: int, fan_out: int) -> List[Tuple[int, ...]]:
        return [(fan_in, rank), (rank, fan_out)]

    # q_proj also writes the output gate: twice the heads.
    attention = lora(h, 2 * nh * hd) + lora(h, nkv * hd) * 2 + lora(nh * hd, h)
    mlp = lora(h, i) * 2 + lora(i, h)
    layers = g["num_hidden_layers"]
    shapes = mlp * layers + attention * (layers // g.get("full_attention_interval", 4))
    shapes += attention + mlp  # the MTP layer
    shapes += [(2 * h, 2 * h), (2 * h,), (h, 2 * h), (h,)]  # the mlp compressor
    shapes += [(h,), (h,), (h, 2 * h), (h,), (h,), (h,), (hd,), (hd,)]  # MTP head, its norms
    shapes += [(2 * h,), (h, 2 * h), (1, h)]  # confidence head
    return shapes


def count(shapes: List[Tuple[int, ...]]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def demo_shapes() -> List[Tuple[int, ...]]:
    """The demo's trainable shapes by the formula, checked against its real set."""
    from mlx.utils import tree_flatten

    from pipo_mlx import load
    from pipo_mlx.adapters import setup_trainable
    from pipo_mlx.train_config import TrainConfig

    model, _ = load(str(ROOT / DEMO["model"]))
    setup_trainable(model, TrainConfig("", "", "", lora_rank=DEMO["rank"], lora_alpha=DEMO["alpha"]))
    real = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    geometry = {k: getattr(model.args, k) for k in GEOMETRY if hasattr(model.args, k)}
    geometry["full_attention_interval"] = model.args.full_attention_interval
    shapes = trainable_shapes(geometry, DEMO["rank"])
    assert count(shapes) == real, (count(shapes), real)
    return shapes


def free_port() -> int:
    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def launched(ranks: int, cmd: List[str]) -> List[str]:
    if ranks == 1:
        return cmd
    launch = str(Path(sys.executable).parent / "mlx.launch")
    return [launch, "--backend", "ring", "-n", str(ranks), "-p", str(free_port()), "--", *cmd]


def train_steps(ranks: int, iters: int, out: Path) -> Tuple[List[float], List[float]]:
    """s/step of each step after the first two, and of that the seconds rank 0
    spent in collectives (two ranks only; its wait for the other included)."""
    cmd = [
        sys.executable, str(ROOT / "train_heads.py"), "--model", DEMO["model"],
        "--data", DEMO["data"], "--adapter-path", str(out), "--force",
        "--iters", str(iters), "--warmup", "1", "--batch-size", str(DEMO["batch"]),
        "--lora-rank", str(DEMO["rank"]), "--lora-alpha", str(DEMO["alpha"]),
        "--max-seq-length", str(DEMO["seq"]), "--steps-per-report", "1",
        "--val-every", str(10 * iters), "--save-every", str(10 * iters),
    ]
    run = subprocess.run(launched(ranks, cmd), cwd=ROOT, capture_output=True, text=True)
    steps = [float(s) for s in re.findall(r"([\d.]+) s/step", run.stdout)]
    exchanging = [float(s) for s in re.findall(r"([\d.]+) exchanging", run.stdout)]
    if run.returncode or len(steps) != iters or "WARN" in run.stderr:
        raise SystemExit(f"train_heads.py on {ranks} rank(s) failed:\n{run.stderr[-2000:]}")
    return steps[2:], exchanging[2:]


def exchange_worker(spec: str) -> None:
    """Under mlx.launch: time average_gradients over arrays of the given shapes."""
    import mlx.core as mx
    from mlx.nn.utils import average_gradients

    shapes, repeats = json.loads(spec)
    world = mx.distributed.init()
    grads = [mx.ones(tuple(s)) for s in shapes]
    mx.eval(grads)
    times = []
    for _ in range(repeats + 1):
        tic = time.perf_counter()
        mx.eval(average_gradients(grads, communication_stream=mx.cpu))
        times.append(time.perf_counter() - tic)
    if world.rank() == 0:
        print(json.dumps(sorted(times[1:])[len(times[1:]) // 2]))


def exchange_s(shapes: List[Tuple[int, ...]], repeats: int) -> float:
    """Median seconds of one all-reduce of `shapes` between two ranks on the loopback."""
    spec = json.dumps([shapes, repeats])
    cmd = [sys.executable, __file__, "--exchange-worker", spec]
    run = subprocess.run(launched(2, cmd), cwd=ROOT, capture_output=True, text=True)
    if run.returncode or "WARN" in run.stderr:
        raise SystemExit(f"the exchange failed:\n{run.stderr[-2000:]}")
    return float(run.stdout.strip().splitlines()[-1])


def projected(one_rank_s: float, nbytes: int, ranks: int) -> float:
    return one_rank_s / ranks + 2 * (ranks - 1) / ranks * nbytes / THUNDERBOLT_BYTES_PER_S


def mean(xs: List[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few steps, results into build/")
    p.add_argument("--exchange-worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.exchange_worker:
        return exchange_worker(a.exchange_worker)

    work = ROOT / "build" / "bench_distributed"
    work.mkdir(parents=True, exist_ok=True)
    iters, repeats = (4, 2) if a.smoke else (12, 5)
    demo, real = demo_shapes(), trainable_shapes(GEOMETRY, 64)
    demo_params, real_params = count(demo), count(real)

    one, _ = train_steps(1, iters, work / "one")
    two, exchanging = train_steps(2, iters, work / "two")
    demo_x = exchange_s(demo, repeats)
    real_x = exchange_s(real, repeats)
    load = os.getloadavg()
    demo_bytes, real_bytes = 4 * demo_params, 4 * real_params
    real_one = 4 * REAL_STEP_S_PER_SEQUENCE  # a global batch of 4 sequences on one rank
    result = {
        "machine": f"{os.cpu_count()} CPU cores, load average {load[0]:.2f} at the end",
        "demo": {
            "setup": DEMO, "trainable_params": demo_params, "bytes_per_step": demo_bytes,
            "s_per_step_1_rank": mean(one), "s_per_step_2_ranks": mean(two),
            "of_which_in_collectives_2_ranks": mean(exchanging),
            "allreduce_s_2_ranks_loopback": demo_x,
            "projected_s_per_step": {
                n: projected(mean(one), demo_bytes, n) for n in (2, 4)
            },
        },
        "qwen3.5_4b_rank64": {
            "trainable_params": real_params, "bytes_per_step": real_bytes,
            "allreduce_s_2_ranks_loopback": real_x,
            "one_rank_s_per_step_batch_4": real_one,
            "projected_s_per_step_batch_4": {n: projected(real_one, real_bytes, n) for n in (2, 4)},
        },
        "bandwidth_assumed_bytes_per_s": THUNDERBOLT_BYTES_PER_S,
        "bandwidth_source": "Thunderbolt 4, up to 40 Gb/s: https://support.apple.com/en-us/111828",
    }
    text = json.dumps(result, indent=1) + "\n"
    print(text)
    out = work / "smoke.json" if a.smoke else RESULTS
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
