"""Where the time of a keep-none PIPO step goes, part by part, against mlx-lm's step.

    python benchmarks/step_attribution.py                 # demo, 80M, 4B geometry: about 15 minutes
    python benchmarks/step_attribution.py --quick         # smoke run, seconds
    python benchmarks/step_attribution.py --models demo   # one of them

A keep-none step (threshold >= 1 or drafting off) differs from mlx-lm's in its
input only: it embeds two tokens and folds them with the compressor, where
mlx-lm embeds one. Everything else (the backbone, the LM head, the sampling) is
the same computation on the same arrays. Each part below is built as a lazy
graph on caches holding a 64-token prompt and evaluated alone, `--steps` times
per repeat, the parts interleaved within a repeat; medians over `--repeats`:

* `mlx-lm step` / `PIPO step`: the whole step as each decoder builds it;
* `backbone`: the layers and final norm, from token ids (mlx-lm) or from the
  compressed pair (PIPO);
* `input`: one embedding row (mlx-lm) / two rows and the compressor (PIPO);
* `head`: LM head, PAD mask (PIPO), log-softmax and argmax;
* `bookkeeping`: the next pair of a keep-none step, (token1, PAD);
* `build`: host time spent building a step's graph (overlapped with the
  previous step's evaluation when decoding is pipelined).

Then both generators are timed end to end, pipelined as users run them
(`generate_step` of each, 64-token prompt, --tokens tokens, runs interleaved
and their order rotated), with the compressor bound (B + E) / (B + E + C)
beside the ratio. Models: the shipped demo (against mlx-lm on its own arrays),
the random 80M config of bench_decode.py, and the Qwen3.5-4B geometry of
real_size.py (random weights, float32, --layers-4b layers; 32 needs about
18 GB; a step takes over a second here, so it runs 4 steps per part, 3 repeats
and loops of 16 tokens). Writes benchmarks/results/step_attribution.json on a
full run, else build/bench/.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import mlx.core as mx
from mlx_lm.generate import generate_step as mlx_generate_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import FULL_SIZES, Size, baseline_of, machine, random_model, random_prompt  # noqa: E402

from pipo_mlx import load, make_prompt_cache  # noqa: E402
from pipo_mlx.decode import generate_step  # noqa: E402
from pipo_mlx.drafting import weight_bytes  # noqa: E402
from pipo_mlx.prompt_cache import prefill  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "step_attribution.json"
SCRATCH = REPO / "build" / "bench" / "step_attribution.json"
PROMPT = 64
# The 4B geometry at over a second per step: fewer steps, repeats and tokens.
FOUR_B = {"steps": 4, "repeats": 3, "tokens": 16, "loop_repeats": 3}


def model_4b(layers: int):
    from real_size import GEOMETRY, text_config

    from pipo_mlx.backbones.qwen3_5 import Model, ModelArgs

    config = text_config(GEOMETRY, layers)
    config["pipo"] = {"pad_token_id": config.pop("pad_token_id")}
    config.pop("dtype")
    model = Model(ModelArgs.from_dict(config))
    for layer in model.layers:  # one layer at a time keeps the peak near the model's size
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model


def parts(model, base) -> Dict[str, Callable]:
    """name -> f(base caches, PIPO backbone caches, i) returning the arrays to evaluate."""
    pad = model.pad_token_id

    def token(i):
        return 5 + i % 50

    def head(logits, mask):
        if mask:
            logits[:, pad] = -mx.inf
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return [mx.argmax(logprobs, axis=-1), logprobs]

    def base_step(bc, pc, i):
        return head(base(mx.array([[token(i)]]), cache=bc)[:, -1, :], False)

    pad_id = mx.array([pad], dtype=mx.int32)

    def pipo_step(bc, pc, i):
        h = model.hidden(mx.array([[token(i), pad]]), pc)
        token1, logprobs = head(model.lm_logits(h[:, -1]), True)
        return bookkeeping_of(token1.astype(mx.int32)) + [logprobs]

    def bookkeeping_of(token1):  # a step that does not draft: the next pair is (token1, PAD)
        return [token1, mx.concatenate([token1, pad_id])[None]]

    h = mx.random.normal((1, model.args.hidden_size))
    return {
        "mlx-lm step": base_step,
        "PIPO step": pipo_step,
        "mlx-lm backbone": lambda bc, pc, i: [base.model(mx.array([[token(i)]]), cache=bc)],
        "PIPO backbone": lambda bc, pc, i: [model.model(None, cache=pc, input_embeddings=h[:, None] + 0)],
        "mlx-lm input": lambda bc, pc, i: [model.embed(mx.array([[token(i)]]))],
        "PIPO input": lambda bc, pc, i: [model.compress(mx.array([[token(i), pad]]))],
        "mlx-lm head": lambda bc, pc, i: head(model.lm_logits(h + i), False),
        "PIPO head": lambda bc, pc, i: head(model.lm_logits(h + i), True),
        "PIPO bookkeeping": lambda bc, pc, i: bookkeeping_of(mx.array([token(i)], dtype=mx.int32)),
    }


def fresh_caches(model, base, prompt):
    bc = base.make_cache()
    base(mx.array([prompt]), cache=bc)
    mx.eval([c.state for c in bc])
    cache = make_prompt_cache(model)
    prefill(model, cache, prompt, len(prompt), False)
    return bc, model.split_cache(cache.layers)[0]


def attribute(model, base, prompt, steps: int, repeats: int) -> Dict[str, Dict[str, float]]:
    fns = parts(model, base)
    runs: Dict[str, Dict[str, List[float]]] = {k: {"eval": [], "build": []} for k in fns}
    for r in range(repeats):
        names = list(fns)[r % len(fns):] + list(fns)[: r % len(fns)]  # rotate the order
        for name in names:
            bc, pc = fresh_caches(model, base, prompt)
            build = run = 0.0
            for i in range(steps):
                t0 = time.perf_counter()
                arrays = fns[name](bc, pc, i)
                t1 = time.perf_counter()
                mx.eval(arrays)
                t2 = time.perf_counter()
                build, run = build + t1 - t0, run + t2 - t1
            runs[name]["eval"].append(1e3 * run / steps)
            runs[name]["build"].append(1e3 * build / steps)
    return {k: {"eval_ms": statistics.median(v["eval"]), "build_ms": statistics.median(v["build"]),
                "eval_ms_runs": v["eval"]} for k, v in runs.items()}


def per_token(tokens) -> float:
    stamps = [time.perf_counter() for _ in tokens]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def loops(model, base, prompt, n: int, repeats: int) -> Dict[str, Any]:
    sides = {
        "mlx-lm": lambda: (t for t, _ in mlx_generate_step(mx.array(prompt), base, max_tokens=n)),
        "keep-none": lambda: generate_step(prompt, model, max_tokens=n, conf_threshold=1.0),
    }
    for make in sides.values():
        per_token(make())  # warm-up
    times: Dict[str, List[float]] = {k: [] for k in sides}
    for r in range(repeats):
        for name in list(sides)[r % 2:] + list(sides)[: r % 2]:
            times[name].append(per_token(sides[name]()))
    ratios = [b / p for b, p in zip(times["mlx-lm"], times["keep-none"])]
    return {"mlx_lm_ms": 1e3 * statistics.median(times["mlx-lm"]),
            "keep_none_ms": 1e3 * statistics.median(times["keep-none"]),
            "ratio": statistics.median(ratios), "ratio_runs": ratios}


def measure(name: str, model, args) -> Dict[str, Any]:
    if name == "4B":
        args = argparse.Namespace(**{**vars(args), **FOUR_B})
    base = baseline_of(model)
    w = weight_bytes(model)
    prompt = random_prompt(model.args.vocab_size, PROMPT, 0)
    out = {"model": name, "weight_bytes": w, "steps": args.steps, "repeats": args.repeats,
           "tokens": args.tokens, "loop_repeats": args.loop_repeats,
           "compressor_bound": (w["B"] + w["E"]) / (w["B"] + w["E"] + w["C"])}
    out["parts"] = attribute(model, base, prompt, args.steps, args.repeats)
    out["loop"] = loops(model, base, prompt, args.tokens, args.loop_repeats)
    p = out["parts"]
    out["step_ratio"] = p["mlx-lm step"]["eval_ms"] / p["PIPO step"]["eval_ms"]
    print(f"\n{name}: compressor bound {out['compressor_bound']:.3f}")
    for part, v in p.items():
        print(f"  {part:18s} {v['eval_ms']:9.3f} ms   build {v['build_ms']:7.3f} ms")
    loop = out["loop"]
    print(f"  step (evaluated alone): {out['step_ratio']:.3f}x mlx-lm;  pipelined loop: "
          f"{loop['mlx_lm_ms']:.2f} vs {loop['keep_none_ms']:.2f} ms/token = {loop['ratio']:.3f}x", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,80M,4B", help="comma-separated: demo, 80M, 4B")
    p.add_argument("--layers-4b", type=int, default=32, help="layers of the 4B geometry (default 32)")
    p.add_argument("--steps", type=int, default=32, help="steps per part and repeat (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of the part timings (default 5)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per pipelined loop (default 128)")
    p.add_argument("--loop-repeats", type=int, default=7, help="repeats of the loops (default 7)")
    p.add_argument("--quick", action="store_true", help="a smoke run on a tiny config")
    p.add_argument("--out", help="where to write the JSON (default: see above)")
    args = p.parse_args()
    full = not args.quick and all(
        getattr(args, k) == p.get_default(k) for k in ("models", "layers_4b", "steps", "repeats", "tokens", "loop_repeats")
    )
    print(f"load average {os.getloadavg()}", flush=True)
    results = {"machine": machine(), "settings": vars(args), "models": []}
    names = ["quick"] if args.quick else args.models.split(",")
    if args.quick:
        args.steps, args.repeats, args.tokens, args.loop_repeats = 4, 1, 8, 1
    for name in names:
        if name == "demo":
            model, _ = load(str(REPO / "models" / "pipo-stdlib"))
        elif name == "4B":
            model = model_4b(args.layers_4b)
        elif name == "quick":
            model = random_model(Size("quick", 64, 4, (), ()))
        else:
            model = random_model(FULL_SIZES[name])
        results["models"].append(measure(name, model, args))
        del model
        mx.clear_cache()
    results["load_average_end"] = os.getloadavg()
    out = Path(args.out) if args.out else RESULTS if full else SCRATCH
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
