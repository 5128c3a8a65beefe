"""KV-cache options at long context: cache memory and decode speed, PIPO beside mlx-lm.

    python benchmarks/bench_kv.py            # the full run: benchmarks/results/kv_cache.json
    python benchmarks/bench_kv.py --quick    # a smoke run at small contexts, into build/

Model: bench_decode.py's 80M fixture (random float32 weights at Qwen3.5-4B's
proportions: 28 layers, 7 of them full attention, 1 KV head of 128), its
baseline mlx-lm's Qwen3.5 text model on the same backbone arrays.

For each context (8k and 32k tokens) and cache option (none, --kv-bits 8,
--kv-bits 4, --max-kv-size 4096) three sides decode the same number of tokens
from a cache holding the context, in interleaved rounds (pipo_mlx.speed): mlx-lm
(its stream_generate on the base, with the same option), PIPO at keep-none
(τ = 1: one token per step, so only the cache differs from mlx-lm) and PIPO at
keep-all (two tokens per step).

The caches are filled to the context directly, with random keys and values of
the right shapes and the Gated-DeltaNet state of a short real prefill: a 32k
prefill of this model takes longer than this whole run on 2 CPU cores, and a
decode step reads the same bytes either way (a random model's keys are random
anyway). So time to first token and the prefill's own peak are not measured.
Quantized caches are converted before decoding (mlx-lm's to_quantized), as they
are once the context passes --quantized-kv-start. mlx-lm's rotating cache is
the one its make_prompt_cache builds for models without their own (keep 4):
for Qwen3.5 mlx-lm itself ignores --max-kv-size (docs/memory.md).

Memory, which does not depend on the machine's load: the bytes each side's
attention caches hold (the filled part), its fixed recurrent state, and the
peak of a decode run above what was in use when it started (step temporaries).
A formula for the cache bytes is checked against the measured bytes here, then
applied to Qwen3.5-4B's geometry (real_size.GEOMETRY) in bfloat16, which gives
the context a 16 GB Mac holds for each option (assumptions in `mac_table`).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate as mlx_stream_generate
from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache, RotatingKVCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import FULL_SIZES, Size, baseline_of, log, machine, random_model, synthetic_tokenizer  # noqa: E402
from real_size import GEOMETRY  # noqa: E402

from pipo_mlx.backbones.qwen3_5 import Model, ModelArgs  # noqa: E402
from pipo_mlx.model import HEAD_PREFIXES  # noqa: E402
from pipo_mlx.prompt_cache import make_prompt_cache, prefill  # noqa: E402
from pipo_mlx.speed import interleave, pipo_side, summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "kv_cache.json"
SMOKE = ROOT / "build" / "bench_kv" / "kv_cache.json"
WINDOW = 4096  # --max-kv-size of the rotating rows, in tokens (--quick: 256)


def options(window: int) -> Dict[str, Dict[str, Any]]:
    """Name -> KV options as stream_generate takes them (both libraries)."""
    return {
        "default": {},
        "kv-bits 8": {"kv_bits": 8, "kv_group_size": 64, "quantized_kv_start": 0},
        "kv-bits 4": {"kv_bits": 4, "kv_group_size": 64, "quantized_kv_start": 0},
        f"max-kv-size {window}": {"max_kv_size": window},
    }


MLX_LM_KEEP = 4  # the first tokens mlx-lm's make_prompt_cache keeps in a rotating cache
# 16 GB Mac: macOS lets the GPU wire about 2/3 of the memory of a Mac with up to
# 36 GB by default (sysctl iogpu.wired_limit_mb raises it); 1 GB of that is left
# to activations, the prefill's chunk and the rest of the process.
MAC_BYTES = 16 * 2**30
GPU_SHARE = 2 / 3
HEADROOM = 2**30
MAX_CONTEXT = 262144  # Qwen3.5-4B's


# -- caches filled to a context


def filled_bytes(c: Any) -> int:
    """Bytes of the entries an attention cache holds (not its spare allocation)."""
    if isinstance(c, QuantizedKVCache):
        return sum(a[..., : c.offset, :].nbytes for a in (*c.keys, *c.values))
    if isinstance(c, RotatingKVCache):
        return c.keys.nbytes + c.values.nbytes
    return sum(a[..., : c.offset, :].nbytes for a in (c.keys, c.values))


def cache_figures(caches: List[Any]) -> Dict[str, int]:
    kv = sum(filled_bytes(c) for c in caches if not isinstance(c, ArraysCache) and not c.empty())
    state = sum(a.nbytes for c in caches if isinstance(c, ArraysCache) for a in c.cache if a is not None)
    return {"kv_bytes": kv, "state_bytes": state}


def fill(caches: List[Any], positions: int, option: Dict[str, Any], window: Optional[int], keep: int) -> None:
    """Each attention cache in `caches` (in place) holding `positions` entries of random
    keys and values, as a prefill would leave it, then converted as the option says."""
    for i, c in enumerate(caches):
        if isinstance(c, ArraysCache) or c.keys is None:
            continue
        B, H, _, D = c.keys.shape
        if window is None:
            size = -(-positions // KVCache.step) * KVCache.step
            new = KVCache()
        else:
            size, new = window, RotatingKVCache(max_size=window, keep=keep)
            new._idx = window  # full, as after `positions` writes: the next one rotates
        new.keys = (0.1 * mx.random.normal((B, H, size, D))).astype(c.keys.dtype)
        new.values = (0.1 * mx.random.normal((B, H, size, D))).astype(c.values.dtype)
        new.offset = positions
        if "kv_bits" in option:
            new = new.to_quantized(group_size=option["kv_group_size"], bits=option["kv_bits"])
        mx.eval(new.state[:2])
        caches[i] = new


def pipo_cache(model: Model, context: int, option: Dict[str, Any], seed: int) -> Any:
    """A PIPO prompt cache over `context` tokens: a real prefill of 8 pairs for the
    recurrent state and the MTP entry still owed, then attention caches filled to
    context/2 pairs (the MTP's one entry short, as after a real prefill)."""
    window = option.get("max_kv_size")
    cache = make_prompt_cache(model, window)
    ids = random_ids(model.args.vocab_size, 16, seed)
    prefill(model, cache, ids, 16, True)
    backbone, mtp = model.split_cache(cache.layers)
    pairs = window // 2 if window else None
    fill(backbone, context // 2, option, pairs, 2)
    fill(mtp, context // 2 - 1, option, pairs, 2)
    cache.layers = backbone + mtp
    cache.tokens = random_ids(model.args.vocab_size, context, seed)
    return cache


def base_cache(base: Any, context: int, option: Dict[str, Any], seed: int) -> List[Any]:
    caches = base.make_cache()
    base(mx.array([random_ids(base.args.vocab_size, 16, seed)]), cache=caches)
    mx.eval([c.state for c in caches])
    fill(caches, context, option, option.get("max_kv_size"), MLX_LM_KEEP)
    return caches


def random_ids(vocab: int, n: int, seed: int) -> List[int]:
    return mx.random.randint(3, vocab - 1, (n,), key=mx.random.key(seed)).tolist()


# -- one context and option, three sides


def measure_option(bench: Dict[str, Any], context: int, option: Dict[str, Any], n: int, repeats: int) -> Dict[str, Any]:
    model, base, tokenizer = bench["model"], bench["base"], bench["tokenizer"]
    caches = {
        "mlx-lm": base_cache(base, context, option, 1),
        "pipo keep-none": pipo_cache(model, context, option, 2),
        "pipo keep-all": pipo_cache(model, context, option, 3),
    }
    figures = {k: cache_figures(c if isinstance(c, list) else c.layers) for k, c in caches.items()}
    mlx_options = {k: v for k, v in option.items() if k != "max_kv_size"}  # mlx-lm: for new caches only
    prompt = random_ids(model.args.vocab_size, 2, 4)
    sides = {
        "mlx-lm": lambda m: (
            (r.token, False)
            for r in mlx_stream_generate(base, tokenizer, prompt[:1], max_tokens=m,
                                         prompt_cache=caches["mlx-lm"], **mlx_options)
        ),
        "pipo keep-none": pipo_side(model, tokenizer, prompt, conf_threshold=1.0,
                                    prompt_cache=caches["pipo keep-none"], **option),
        "pipo keep-all": pipo_side(model, tokenizer, prompt, conf_threshold=-1.0, draft="always",
                                   prompt_cache=caches["pipo keep-all"], **option),
    }
    before: Dict[str, List[int]] = {k: [] for k in sides}

    def noted(name: str):
        def tokens(m: int):
            before[name].append(mx.get_active_memory())
            yield from sides[name](m)
        return tokens

    runs = interleave({k: noted(k) for k in sides}, n, repeats, warmup_tokens=4)
    rows = {}
    for k, rs in runs.items():
        temp = max(r.peak_bytes - b for r, b in zip(rs, before[k][-len(rs):]))
        rows[k] = {**summary(rs), **figures[k], "decode_temporaries_bytes": temp}
    base_speed = rows["mlx-lm"]["tokens_per_s"]
    for k, row in rows.items():
        row["speed_vs_mlx_lm"] = row["tokens_per_s"] / base_speed
    return rows


# -- cache bytes from the geometry, checked here and applied to Qwen3.5-4B


def geometry_of(args: Any) -> Dict[str, int]:
    return {k: getattr(args, k) for k in GEOMETRY} | {"full_attention_interval": args.full_attention_interval}


def predicted(g: Dict[str, int], side: str, context: int, option: Dict[str, Any], act: int) -> Dict[str, int]:
    """Attention-cache and state bytes for `context` tokens (act: bytes per activation).

    A position holds keys and values of every KV head in each attention layer;
    quantized, each element takes bits/8 bytes plus a scale and a bias per group.
    mlx-lm holds a position per token; PIPO one per pair in the backbone's
    attention layers and in the MTP layer (one entry short: the owed one).
    """
    attention = g["num_hidden_layers"] // g["full_attention_interval"]
    per_element = option["kv_bits"] / 8 + 2 * act / option["kv_group_size"] if "kv_bits" in option else act
    per_position = 2 * g["num_key_value_heads"] * g["head_dim"] * per_element
    window = option.get("max_kv_size")
    if side == "mlx-lm":
        positions = attention * (min(context, window) if window else context)
    else:
        pairs = context // 2
        positions = attention * pairs + (pairs - 1)
        if window:
            positions = (attention + 1) * (window // 2)
    linear = g["num_hidden_layers"] - attention
    conv = g["linear_num_key_heads"] * g["linear_key_head_dim"] * 2 + g["linear_num_value_heads"] * g["linear_value_head_dim"]
    recurrent = g["linear_num_value_heads"] * g["linear_value_head_dim"] * g["linear_key_head_dim"] * 4  # float32
    state = linear * ((g["linear_conv_kernel_dim"] - 1) * conv * act + recurrent)
    return {"kv_bytes": round(positions * per_position), "state_bytes": state}


def weight_bytes_4bit(g: Dict[str, int]) -> Dict[str, int]:
    """Qwen3.5-4B quantized as mlx-lm's default (4 bits, groups of 64 with a bfloat16
    scale and bias: 4.5 bits a weight); norms and small vectors left in bfloat16."""
    args = ModelArgs.from_dict({**g, "model_type": "qwen3_5_text", "tie_word_embeddings": True,
                                "full_attention_interval": 4, "pipo": {"pad_token_id": 0}})
    model = Model(args)  # lazy: nothing is allocated
    sides = {"pipo": 0.0, "mlx-lm": 0.0}
    for name, v in tree_flatten(model.parameters()):
        nbytes = v.size * 4.5 / 8 if v.ndim == 2 and v.shape[-1] % 64 == 0 else v.size * 2
        sides["pipo"] += nbytes
        if not name.startswith(HEAD_PREFIXES):
            sides["mlx-lm"] += nbytes
    return {k: round(v) for k, v in sides.items()}


def mac_table(act: int = 2) -> Dict[str, Any]:
    g = dict(GEOMETRY, full_attention_interval=4)
    weights = weight_bytes_4bit(GEOMETRY)
    budget = MAC_BYTES * GPU_SHARE - HEADROOM
    rows = {}
    for name, option in options(WINDOW).items():
        for side in ("mlx-lm", "pipo"):
            per_token = predicted(g, side, 2 * 65536, {k: v for k, v in option.items() if k != "max_kv_size"}, act)
            bytes_per_token = per_token["kv_bytes"] / (2 * 65536)
            room = budget - weights[side] - per_token["state_bytes"]
            fits = int(room / bytes_per_token)
            row = {"weights_bytes": weights[side], "state_bytes": per_token["state_bytes"],
                   "kv_bytes_per_token": bytes_per_token, "cache_room_bytes": room,
                   "kv_bytes_at_max_context": round(bytes_per_token * MAX_CONTEXT),
                   "context_tokens": min(fits, MAX_CONTEXT), "context_tokens_uncapped": fits}
            if "max_kv_size" in option:
                window = predicted(g, side, MAX_CONTEXT, option, act)["kv_bytes"]
                row.update(context_tokens=None, window_kv_bytes=window,
                           note=f"any context: the window of {WINDOW} tokens holds {window / 2**20:.0f} MiB")
            rows[f"{side} {name}"] = row
    return {
        "geometry": "Qwen3.5-4B (benchmarks/real_size.py GEOMETRY), KV cache in bfloat16",
        "assumptions": {
            "mac_bytes": MAC_BYTES, "gpu_share": GPU_SHARE, "headroom_bytes": HEADROOM,
            "budget_bytes": budget, "weights": "4-bit, group 64 (mlx-lm's default quantization)",
            "max_context": MAX_CONTEXT,
        },
        "rows": rows,
    }


# -- output


def tables(results: Dict[str, Any]) -> str:
    """The two tables of docs/memory.md, in Markdown."""
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    lines = ["| context | option | KV cache, mlx-lm | KV cache, PIPO | PIPO / mlx-lm | step temporaries, "
             "mlx-lm / PIPO | mlx-lm tokens/s | PIPO keep-none | PIPO keep-all |", "|---" * 9 + "|"]
    for key, rows in results["measured"].items():
        context, option = key.split(" ", 1)
        b, n, a = rows["mlx-lm"], rows["pipo keep-none"], rows["pipo keep-all"]
        lines.append(
            f"| {int(context) // 1024}k | {option} | {mib(b['kv_bytes'])} | {mib(n['kv_bytes'])} | "
            f"{n['kv_bytes'] / b['kv_bytes']:.2f} | {mib(b['decode_temporaries_bytes'])} / "
            f"{mib(n['decode_temporaries_bytes'])} | {b['tokens_per_s']:.1f} | "
            f"{n['speed_vs_mlx_lm']:.2f}x | {a['speed_vs_mlx_lm']:.2f}x |")
    mac = results["mac_16gb"]["rows"]
    lines += ["", "| option | KV per 1k tokens, mlx-lm | KV per 1k tokens, PIPO | KV at 262,144 tokens, "
              "mlx-lm / PIPO | context that fits, mlx-lm | context that fits, PIPO |", "|---" * 6 + "|"]
    for option in {k.split(" ", 1)[1]: None for k in mac}:
        b, p = mac[f"mlx-lm {option}"], mac[f"pipo {option}"]
        if "window_kv_bytes" in b:
            fits = [f"any (the window holds {r['window_kv_bytes'] / 2**20:.0f} MiB)" for r in (b, p)]
            at_max = f"{b['window_kv_bytes'] / 2**20:.0f} / {p['window_kv_bytes'] / 2**20:.0f} MiB"
        else:
            fits = [f"{r['context_tokens_uncapped']:,}" for r in (b, p)]
            at_max = f"{b['kv_bytes_at_max_context'] / 1e9:.2f} / {p['kv_bytes_at_max_context'] / 1e9:.2f} GB"
        lines.append(f"| {option} | {b['kv_bytes_per_token'] * 1024 / 2**20:.1f} MiB | "
                     f"{p['kv_bytes_per_token'] * 1024 / 2**20:.1f} MiB | {at_max} | {fits[0]} | {fits[1]} |")
    return "\n".join(lines)


# -- the run


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small contexts, few tokens; writes under build/")
    p.add_argument("--out", type=Path, help="where the JSON goes (default: the committed results for "
                   "a full run, build/ for --quick)")
    args = p.parse_args(argv)
    contexts, n, repeats, window = ((512, 2048), 8, 1, 256) if args.quick else ((8192, 32768), 24, 3, WINDOW)
    out = args.out or (SMOKE if args.quick else RESULTS)
    if out.resolve() == RESULTS and args.quick:
        raise SystemExit("a --quick run never writes over the committed results")
    results: Dict[str, Any] = {"machine": machine(), "settings": {
        "model": "80M fixture (bench_decode.py)", "contexts": contexts, "tokens": n, "repeats": repeats,
        "window_tokens": window, "caches": "filled to the context with random keys (see the docstring)"}}
    size: Size = FULL_SIZES["80M"]
    model = random_model(size)
    model.args.max_position_embeddings = 1 << 20  # the fixture's 16k is no limit of the geometry
    bench = {"model": model, "base": baseline_of(model), "tokenizer": synthetic_tokenizer(model.args.vocab_size)}
    bench["tokenizer"].eos_token_ids = set()  # both sides generate exactly n tokens
    results["weights_bytes"] = {
        "mlx-lm": sum(v.nbytes for _, v in tree_flatten(bench["base"].parameters())),
        "pipo": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
    }
    g, act = geometry_of(model.args), 4
    results["measured"], checks = {}, []
    for context in contexts:
        for name, option in options(window).items():
            log(f"context {context}, {name}")
            rows = measure_option(bench, context, option, n, repeats)
            results["measured"][f"{context} {name}"] = rows
            for side, row in rows.items():
                want = predicted(g, "mlx-lm" if side == "mlx-lm" else "pipo", context, option, act)
                checks.append(want == {k: row[k] for k in want})
                log(f"  {side}: {row['tokens_per_s']:.1f} tokens/s ({row['speed_vs_mlx_lm']:.2f}x), "
                    f"cache {row['kv_bytes'] / 2**20:.1f} MiB, state {row['state_bytes'] / 2**20:.1f} MiB, "
                    f"temporaries {row['decode_temporaries_bytes'] / 2**20:.1f} MiB")
    results["formula_matches_measured"] = all(checks)
    results["mac_16gb"] = mac_table()
    results["machine"]["load_average_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    log(f"wrote {out}; formula matches the measured bytes: {results['formula_matches_measured']}")
    print(tables(results))
    return results


if __name__ == "__main__":
    started = time.time()
    main()
    log(f"{time.time() - started:.0f} s")
