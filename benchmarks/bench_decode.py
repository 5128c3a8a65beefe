"""PIPO decoding against mlx-lm's regular decoding, measured side by side.

    python benchmarks/bench_decode.py                   # about 20 minutes on 2 CPU cores
    python benchmarks/bench_decode.py --quick           # smoke run, under a minute
    python benchmarks/bench_decode.py --model FOLDER --sizes ""   # a converted PIPO model

Only a full run (no --quick; --repeats, --tokens, --prompts and
--quality-windows at their defaults) writes to benchmarks/results/, the files
the docs quote; any other run writes to build/bench/ unless --out says
where.

Models are random-weight Qwen3.5 configs built in memory with Qwen3.5-4B-like
proportions (24+ hybrid layers, a full-attention layer every 4, tied embeddings,
an LM head about 1/8 of the backbone), and/or a folder written by convert.py.
The baseline is mlx-lm's own Qwen3.5 `TextModel` whose backbone *is* the PIPO
model's (the same arrays), decoded by mlx-lm's `generate_step`.

Every figure is a median over --repeats runs, and within a repeat the baseline
and the PIPO variants run one after the other, so a change in machine load
hits both sides. Both sides generate exactly N tokens: no EOS is passed to
either `generate_step`. Timings are at the `generate_step` level (token ids,
no detokenizing) unless a row says `stream_generate`, where both sides
detokenize every token with mlx-lm's streaming detokenizer.

* time to first token (TTFT): from the call to the first token, prompts of
  256, 1024 and 4096 tokens, PIPO at the paper's threshold 0.95 (so its MTP
  head runs over the prompt, as docs/design.md §5 describes);
* per-token latency over N generated tokens after a 64-token prompt, from the
  first token to the last, divided by the tokens that arrived after the first
  step; thresholds -1 (keep every token2), 0.95 and 1 (keep none, no MTP);
* tokens per step and token2 keep rate; peak memory (weights included);
* cache bytes after the longest prompt: the backbone's full-attention KV cache
  (PIPO reads one position per pair: half), the linear-attention state (the
  same on both sides) and PIPO's own MTP KV cache;
* an unfused PIPO step (evaluate and read token1 on the host, then build and
  run the MTP half; no pipelining), to show what the fused step buys;
* cheaper token2 heads (`--token2-head` of generate.py): the first V/8 ids
  (`top:K`) and a 4-bit copy of the LM head (`q4`); for a converted folder also
  their token2 accuracy and keep rate on held-out text;
* float16 and 4-bit (mlx-lm quantization) copies of the smallest config.

Decoding reads every weight once per step. With B the backbone (embedding
lookup aside), E the LM head, M the MTP head plus the confidence head and C
the compressor, a keep-all PIPO step reads B + 2E + M + C for two tokens, so
where reading weights bounds the speed the keep-all speedup is at most
(B + E) / ((B + 2E + M + C) / 2); a top:K token2 head replaces the second E by
E * K / V. The table prints the bound next to the measured ratio.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step as mlx_generate_step
from mlx_lm.generate import generation_stream
from mlx_lm.generate import stream_generate as mlx_stream_generate
from mlx_lm.models.cache import KVCache
from mlx_lm.models.qwen3_5 import TextModel
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from mlx_lm.utils import quantize_model

from pipo_mlx import load, make_prompt_cache, make_token2_head, stream_generate
from pipo_mlx.backbones.qwen3_5 import Model, ModelArgs
from pipo_mlx.decode import generate_step
from pipo_mlx.drafting import weight_bytes
from pipo_mlx.model_io import cast
from pipo_mlx.speed import keep_all_bound as bound

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"  # committed: docs/ quote these files
SCRATCH = REPO / "build" / "bench"  # git-ignored: smoke and partial runs
DECODE_PROMPT = 64
# The paper's 0.95, and lower gates for a small demo model that is rarely that sure.
QUALITY_THRESHOLDS = (0.5, 0.8, 0.95)
Tokens = Iterator[Tuple[int, bool]]  # (token id, is it a kept token2)


# -- models


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    prompts: Tuple[int, ...]  # TTFT prompt lengths
    variants: Tuple[str, ...]  # decode variants, keys of VARIANTS
    dtypes: Tuple[str, ...] = ()  # extra copies measured with DTYPE_VARIANTS


def qwen35_args(hidden: int, layers: int, vocab: int) -> ModelArgs:
    """Qwen3.5-4B's proportions at another width (4B: hidden 2560, 16 query
    heads of 256, 4 KV heads, 16 + 32 linear-attention heads of 128, MLP 3.6x)."""
    heads = max(2, round(1.6 * hidden / 128))
    key_heads = max(1, round(0.8 * hidden / 128))
    return ModelArgs.from_dict(
        {
            "model_type": "qwen3_5_text",
            "hidden_size": hidden,
            "intermediate_size": 64 * round(3.6 * hidden / 64),
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 4),
            "head_dim": 128,
            "linear_num_key_heads": key_heads,
            "linear_num_value_heads": 2 * key_heads,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "full_attention_interval": 4,
            "tie_word_embeddings": True,
            "vocab_size": vocab,
            "max_position_embeddings": 16384,
            "pipo": {"pad_token_id": vocab - 1},
        }
    )


def count(module: nn.Module) -> int:
    """Parameters, a quantized matrix counted by its logical size.

    Not mlx-lm's get_total_parameters: that counts leaf modules only and misses
    the Gated-DeltaNet's own A_log and dt_bias.
    """
    quantized = {name: m for name, m in module.named_modules() if "scales" in m}
    n = 0
    for key, v in tree_flatten(module.parameters()):
        owner, _, leaf = key.rpartition(".")
        if owner not in quantized:
            n += v.size
        elif leaf == "scales":
            n += v.size * quantized[owner].group_size
        elif leaf not in ("weight", "biases"):
            n += v.size
    return n


def random_model(size: Size, seed: int = 0) -> Model:
    """Random weights; the vocabulary is chosen so that the LM head is 1/8 of the backbone."""
    probe = Model(qwen35_args(size.hidden, size.layers, 64))  # lazy: never evaluated
    backbone = count(probe.model) - probe.model.embed_tokens.weight.size
    vocab = 64 * max(1, round(backbone / 8 / size.hidden / 64))
    mx.random.seed(seed)
    model = Model(qwen35_args(size.hidden, size.layers, vocab))
    mx.eval(model.parameters())
    return model


def with_dtype(model: Model, dtype: str) -> Model:
    """The model cast to float16 or quantized to 4 bits the way mlx-lm does it."""
    if dtype == "4bit":
        return quantize_model(model, {}, 64, 4)[0]
    cast(model, getattr(mx, dtype))
    mx.eval(model.parameters())
    return model


def baseline_of(model: Model) -> TextModel:
    """mlx-lm's Qwen3.5 text model on the PIPO model's own backbone arrays."""
    base = TextModel(model.args)  # its fresh weights are lazy and never evaluated
    base.model = model.model
    if not model.args.tie_word_embeddings:
        base.lm_head = model.lm_head
    return base


def model_dtype(model: Model) -> str:
    embed = model.model.embed_tokens
    if "scales" in embed:
        return f"{embed.bits}bit"
    return str(embed.weight.dtype).replace("mlx.core.", "")


def weights(model: Model) -> Dict[str, int]:
    """Bytes each decode step reads (B, E, M, C: drafting.weight_bytes); parameter counts."""
    return {
        **weight_bytes(model),
        "backbone_params": count(model.model)
        + (0 if model.args.tie_word_embeddings else count(model.lm_head)),
        "pipo_head_params": count(model.mtp) + count(model.confidence_head) + count(model.compressor),
    }


def synthetic_tokenizer(vocab_size: int) -> TokenizerWrapper:
    """A byte-level BPE vocabulary without EOS, so stream_generate detokenizes as
    for a real model and never stops early: 256 byte tokens, then byte pairs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = alphabet + [a + b for a in alphabet for b in alphabet]
    vocab = {piece: i for i, piece in enumerate(pieces[:vocab_size])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.ByteLevel()
    return TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=tok), BPEStreamingDetokenizer)


# -- the token streams compared


def base_tokens(base: TextModel, prompt: List[int], n: int) -> Tokens:
    for token, _ in mlx_generate_step(mx.array(prompt), base, max_tokens=n):
        yield token, False


def pipo_tokens(model: Model, prompt: List[int], n: int, threshold: float, head: Any) -> Tokens:
    for token, _, is_token2 in generate_step(
        prompt, model, max_tokens=n, conf_threshold=threshold, token2_head=head
    ):
        yield token, is_token2


def base_stream_tokens(base: TextModel, tokenizer: TokenizerWrapper, prompt: List[int], n: int) -> Tokens:
    for r in mlx_stream_generate(base, tokenizer, prompt, max_tokens=n):
        yield r.token, False


def pipo_stream_tokens(
    model: Model, tokenizer: TokenizerWrapper, prompt: List[int], n: int, threshold: float
) -> Tokens:
    for r in stream_generate(model, tokenizer, prompt, max_tokens=n, conf_threshold=threshold):
        yield r.token, r.from_draft


def _greedy(model: Model, logits: mx.array) -> Tuple[mx.array, mx.array]:
    """The fused step's sampling, greedy: PAD masked, log-probabilities kept."""
    logits[:, model.args.pad_token_id] = -mx.inf
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.argmax(logprobs, axis=-1), logprobs


def unfused_tokens(model: Model, prompt: List[int], n: int, threshold: float) -> Tokens:
    """PIPO decoding as two graphs per step: the backbone half is evaluated and
    token1 read on the host before the MTP half is built, and nothing is queued
    ahead. Same arithmetic as the fused step, so the same greedy tokens."""
    pad = model.args.pad_token_id
    ids = prompt + [pad] * (len(prompt) % 2)
    backbone, mtp = model.split_cache(model.make_cache())
    x = mx.array([ids])
    with mx.stream(generation_stream):
        if len(ids) > 2:  # teacher-forced MTP over the prompt, as the fused prefill
            model.draft(x[:, 2::2], model.hidden(x[:, :-2], backbone), mtp)
        pair, produced = x[:, -2:], 0
        while True:
            h = model.hidden(pair, backbone)
            token1, logprobs1 = _greedy(model, model.lm_logits(h[:, -1]))
            mx.eval(token1, logprobs1)
            t1 = token1.item()
            produced += 1
            yield t1, False
            if produced == n:
                return
            m = model.draft(token1[:, None], h, mtp)
            token2, logprobs2 = _greedy(model, model.lm_logits(m[:, -1]))
            keep = threshold < 0 or mx.sigmoid(model.confidence(h, m)[0, -1]).item() >= threshold
            mx.eval(token2, logprobs2)
            t2 = token2.item()
            if keep:
                produced += 1
                yield t2, True
                if produced == n:
                    return
            pair = mx.array([[t1, t2 if keep else pad]])


@dataclass(frozen=True)
class Variant:
    label: str
    threshold: Optional[float]  # None: mlx-lm's own decoding
    head: str = "full"
    fused: bool = True
    stream: bool = False

    @property
    def baseline(self) -> str:
        return "mlx-lm stream_generate" if self.stream else "mlx-lm"


VARIANTS = {
    v.label: v
    for v in (
        Variant("mlx-lm", None),
        Variant("keep-all", -1.0),
        Variant("τ=0.95", 0.95),
        Variant("keep-none", 1.0),
        Variant("keep-all unfused", -1.0, fused=False),
        Variant("keep-all top:V/8", -1.0, head="top"),
        Variant("keep-all q4 head", -1.0, head="q4"),
        Variant("τ=0.95 top:V/8", 0.95, head="top"),
        Variant("τ=0.95 q4 head", 0.95, head="q4"),
        Variant("τ=0.5", 0.5),
        Variant("τ=0.5 top:V/8", 0.5, head="top"),
        Variant("τ=0.5 q4 head", 0.5, head="q4"),
        Variant("mlx-lm stream_generate", None, stream=True),
        Variant("keep-all stream_generate", -1.0, stream=True),
    )
}
DTYPE_VARIANTS = ("mlx-lm", "keep-all", "keep-none")
FOLDER_VARIANTS = tuple(VARIANTS)  # a trained model makes the gated rows meaningful
RANDOM_VARIANTS = tuple(v for v in VARIANTS if not v.startswith("τ=0.5"))


@dataclass
class Bench:
    """One model ready to measure: the PIPO model, its baseline and helpers."""

    model: Model
    base: TextModel
    tokenizer: TokenizerWrapper
    heads: Dict[str, Any]  # "top" / "q4" -> prebuilt token2 heads
    head_specs: Dict[str, str]

    @classmethod
    def of(cls, model: Model, tokenizer: Optional[TokenizerWrapper] = None) -> "Bench":
        vocab = model.args.vocab_size
        specs = {"top": f"top:{max(64, 64 * (vocab // 8 // 64))}", "q4": "q4"}
        if tokenizer is None:
            tokenizer = synthetic_tokenizer(vocab)
        tokenizer.eos_token_ids = set()  # both sides generate exactly N tokens
        heads = {k: make_token2_head(model, s) for k, s in specs.items()}
        return cls(model, baseline_of(model), tokenizer, heads, specs)

    def tokens(self, v: Variant, prompt: List[int], n: int) -> Tokens:
        if v.threshold is None:
            if v.stream:
                return base_stream_tokens(self.base, self.tokenizer, prompt, n)
            return base_tokens(self.base, prompt, n)
        if v.stream:
            return pipo_stream_tokens(self.model, self.tokenizer, prompt, n, v.threshold)
        if not v.fused:
            return unfused_tokens(self.model, prompt, n, v.threshold)
        head = self.heads.get(v.head, "full")
        return pipo_tokens(self.model, prompt, n, v.threshold, head)


# -- measurements


def settle() -> None:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


def measure_decode(tokens: Tokens) -> Dict[str, Any]:
    """Seconds per token from the first token to the last, over the tokens after the first step."""
    settle()
    stamps, flags, ids = [], [], []
    for token, is_token2 in tokens:
        stamps.append(time.perf_counter())
        flags.append(is_token2)
        ids.append(token)
    first_step = 2 if len(flags) > 1 and flags[1] else 1
    kept = sum(flags)
    return {
        "s_per_token": (stamps[-1] - stamps[0]) / (len(stamps) - first_step),
        "tokens": len(ids),
        "steps": len(ids) - kept,
        "kept": kept,
        "peak": mx.get_peak_memory(),
        "ids": ids,
    }


def measure_ttft(tokens: Tokens) -> Dict[str, float]:
    settle()
    tic = time.perf_counter()
    next(tokens)
    seconds = time.perf_counter() - tic
    tokens.close()
    return {"s": seconds, "peak": mx.get_peak_memory()}


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def decode_rows(
    bench: Bench, variants: Sequence[str], prompt: List[int], n: int, repeats: int
) -> List[Dict[str, Any]]:
    chosen = [VARIANTS[name] for name in variants]
    for v in chosen:  # warm-up: first-call allocations stay out of the figures
        list(bench.tokens(v, prompt, 4))
    runs: Dict[str, List[Dict[str, Any]]] = {v.label: [] for v in chosen}
    for r in range(repeats):
        for v in chosen:
            runs[v.label].append(measure_decode(bench.tokens(v, prompt, n)))
        log(f"    repeat {r + 1}/{repeats}: " + ", ".join(
            f"{k} {1e3 * rs[-1]['s_per_token']:.1f}" for k, rs in runs.items()
        ) + " ms/token")
    rows = []
    for v in chosen:
        rs = runs[v.label]
        ms = [1e3 * x["s_per_token"] for x in rs]
        base_ms = median([1e3 * x["s_per_token"] for x in runs[v.baseline]])
        steps, kept = rs[0]["steps"], rs[0]["kept"]
        rows.append(
            {
                "variant": v.label,
                "api": "stream_generate" if v.stream else "generate_step",
                "threshold": v.threshold,
                "token2_head": bench.head_specs.get(v.head, "full") if v.threshold is not None else None,
                "fused": v.fused,
                "baseline": v.baseline,
                "ms_per_token": median(ms),
                "ms_per_token_runs": ms,
                "baseline_ms_per_token": base_ms,
                "speedup": base_ms / median(ms),
                "tokens": rs[0]["tokens"],
                "tokens_per_step": rs[0]["tokens"] / steps,
                "keep_rate": kept / steps,
                "peak_memory_gb": max(x["peak"] for x in rs) / 1e9,
            }
        )
    if "keep-all" in runs and "keep-all unfused" in runs:
        same = runs["keep-all"][0]["ids"] == runs["keep-all unfused"][0]["ids"]
        next(r for r in rows if r["variant"] == "keep-all unfused")["same_tokens_as_fused"] = same
    return rows


def cache_bytes(caches: List[Any]) -> Tuple[int, int, int]:
    """(full-attention KV bytes in use, positions they hold, linear-attention state bytes)."""
    kv = positions = state = 0
    for c in caches:
        if isinstance(c, KVCache):
            if c.keys is not None:  # the filled part, not the allocation
                kv += sum(a.nbytes for a in c.keys_and_values())
            positions = c.offset
        else:  # mlx-lm's ArraysCache: conv and recurrent state
            state += sum(a.nbytes for a in c.cache if a is not None)
    return kv, positions, state


def ttft_rows(
    bench: Bench, prompts: Dict[int, List[int]], repeats: int
) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """TTFT per prompt length, and the caches and peaks after the longest prompt."""
    model, base = bench.model, bench.base
    rows, caches = [], {}
    for length, prompt in prompts.items():
        times = {"mlx-lm": [], "pipo": []}
        peaks = {"mlx-lm": [], "pipo": []}
        for _ in range(repeats):
            caches = {"mlx-lm": base.make_cache(), "pipo": make_prompt_cache(model)}
            tokens = {
                "mlx-lm": (
                    t for t, _ in mlx_generate_step(
                        mx.array(prompt), base, max_tokens=1, prompt_cache=caches["mlx-lm"]
                    )
                ),
                "pipo": generate_step(
                    prompt, model, max_tokens=1, conf_threshold=0.95, prompt_cache=caches["pipo"]
                ),
            }
            for side, gen in tokens.items():
                m = measure_ttft(gen)
                times[side].append(m["s"])
                peaks[side].append(m["peak"])
        base_s, pipo_s = median(times["mlx-lm"]), median(times["pipo"])
        rows.append(
            {
                "prompt_tokens": length,
                "mlx_lm_s": base_s,
                "pipo_s": pipo_s,
                "mlx_lm_s_runs": times["mlx-lm"],
                "pipo_s_runs": times["pipo"],
                "speedup": base_s / pipo_s,
                "mlx_lm_peak_memory_gb": max(peaks["mlx-lm"]) / 1e9,
                "pipo_peak_memory_gb": max(peaks["pipo"]) / 1e9,
            }
        )
        log(f"    TTFT {length}: mlx-lm {base_s:.2f} s, PIPO {pipo_s:.2f} s ({base_s / pipo_s:.2f}x)")
    backbone, mtp = model.split_cache(caches["pipo"].layers)
    base_kv, base_pos, base_state = cache_bytes(caches["mlx-lm"])
    pipo_kv, pipo_pos, pipo_state = cache_bytes(backbone)
    cache = {
        "prompt_tokens": max(prompts),
        "mlx_lm_positions": base_pos,
        "pipo_positions": pipo_pos,
        "mlx_lm_full_attention_kv_bytes": base_kv,
        "pipo_full_attention_kv_bytes": pipo_kv,
        "full_attention_kv_ratio": pipo_kv / base_kv,
        "mlx_lm_linear_attention_state_bytes": base_state,
        "pipo_linear_attention_state_bytes": pipo_state,
        "pipo_mtp_kv_bytes": cache_bytes(mtp)[0],
    }
    return rows, cache


# -- prompts


def random_prompt(vocab: int, length: int, seed: int) -> List[int]:
    """Token ids below vocab - 1 (the random configs' PAD)."""
    return np.random.default_rng(seed).integers(0, vocab - 1, size=length).tolist()


def text_ids(tokenizer: TokenizerWrapper, length: int) -> List[int]:
    """Held-out text (the corpus test split): a trained model's keep rate needs real text."""
    from pipo_mlx.corpus import read_split

    ids: List[int] = []
    for _, text in read_split("test"):
        ids += tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= length:
            break
    return ids[:length]


# -- token2 heads on a trained model


def head_quality(bench: Bench, specs: Sequence[str], windows: int, seq_len: int = 256) -> Dict[str, Any]:
    """Teacher-forced on held-out text: token2 accuracy of each head, overall and
    where the confidence head keeps it, and its agreement with the full head.
    The keep decision itself never sees the head, so one keep rate per threshold."""
    model = bench.model
    ids = np.array(text_ids(bench.tokenizer, windows * seq_len))
    ids = ids[: len(ids) // seq_len * seq_len].reshape(-1, seq_len)
    heads = {spec: make_token2_head(model, spec) for spec in specs}
    preds: Dict[str, List[np.ndarray]] = {spec: [] for spec in specs}
    confidence, targets = [], []
    for window in ids:
        o = model(mx.array(window)[None])
        confidence.append(np.array(mx.sigmoid(o.confidence[0].astype(mx.float32))))
        targets.append(window[3::2])
        for spec, head in heads.items():
            logits = head(o.mtp_hidden[0]).astype(mx.float32)
            logits[:, model.args.pad_token_id] = -mx.inf
            preds[spec].append(np.array(mx.argmax(logits, axis=-1)))
    c, truth = np.concatenate(confidence), np.concatenate(targets)
    keeps = {str(t): c >= t for t in QUALITY_THRESHOLDS}
    full = np.concatenate(preds["full"])
    result: Dict[str, Any] = {
        "positions": int(truth.size),
        "keep_rate": {t: float(keep.mean()) for t, keep in keeps.items()},
    }
    for spec in specs:
        pred = np.concatenate(preds[spec])
        right = pred == truth
        result[spec] = {
            "token2_accuracy": float(right.mean()),
            "kept_token2_accuracy": {
                t: float(right[keep].mean()) if keep.any() else None for t, keep in keeps.items()
            },
            "agreement_with_full_head": float((pred == full).mean()),
        }
    return result


# -- one model


def run_model(
    name: str,
    bench: Bench,
    size_variants: Sequence[str],
    prompts: Dict[int, List[int]],
    decode_prompt: List[int],
    args: argparse.Namespace,
) -> Dict[str, Any]:
    model = bench.model
    w = weights(model)
    top_fraction = int(bench.head_specs["top"].split(":")[1]) / model.args.vocab_size
    entry: Dict[str, Any] = {
        "name": name,
        "dtype": model_dtype(model),
        "layers": model.args.num_hidden_layers,
        "hidden_size": model.args.hidden_size,
        "vocab_size": model.args.vocab_size,
        "params": w["backbone_params"] + w["pipo_head_params"],
        "backbone_params": w["backbone_params"],
        "weight_bytes": {k: w[k] for k in "BEMC"},
        "head_to_backbone": w["E"] / w["B"],
        "bound_keep_all": bound(w),
        "bound_keep_all_top": bound(w, top_fraction),
        "token2_heads": dict(bench.head_specs),
    }
    log(f"{name} {entry['dtype']}: {entry['params'] / 1e6:.1f}M parameters, bound {bound(w):.2f}x")
    entry["ttft"], entry["cache"] = ttft_rows(bench, prompts, args.repeats) if prompts else ([], None)
    entry["decode"] = decode_rows(bench, size_variants, decode_prompt, args.tokens, args.repeats)
    return entry


def run_random(size: Size, args: argparse.Namespace) -> List[Dict[str, Any]]:
    entries = []
    for dtype in ("float32",) + size.dtypes:
        model = random_model(size)
        if dtype != "float32":
            model = with_dtype(model, dtype)
        vocab = model.args.vocab_size
        prompts = {} if dtype != "float32" else {
            n: random_prompt(vocab, n, seed=n) for n in size.prompts
        }
        variants = size.variants if dtype == "float32" else DTYPE_VARIANTS
        decode_prompt = random_prompt(vocab, DECODE_PROMPT, seed=1)
        entries.append(run_model(size.name, Bench.of(model), variants, prompts, decode_prompt, args))
        del model
        settle()
    return entries


def run_folder(path: str, args: argparse.Namespace) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    model, tokenizer = load(path)
    bench = Bench.of(model, tokenizer)
    limit = model.args.max_position_embeddings
    text = text_ids(tokenizer, max(args.prompts))
    prompts = {n: text[:n] for n in args.prompts if n <= min(len(text), limit)}
    decode_prompt = text_ids(tokenizer, DECODE_PROMPT)
    entry = run_model(Path(path).name, bench, FOLDER_VARIANTS, prompts, decode_prompt, args)
    vocab = model.args.vocab_size
    specs = ["full", "q4", "q8"] + [f"top:{vocab // d}" for d in (2, 4, 8)]
    quality = head_quality(bench, specs, args.quality_windows)
    return entry, quality


# -- output


def machine() -> Dict[str, Any]:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        cpu = names[0] if names else cpu
    import mlx_lm

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "blas_preloaded": os.environ.get("LD_PRELOAD", ""),
        "load_average_start": os.getloadavg(),
    }


def print_table(results: Dict[str, Any]) -> None:
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, {m['device']}, mlx {m['mlx']}, mlx-lm {m['mlx_lm']}")
    print(f"load average {m['load_average_start']} at start, {m['load_average_end']} at end")
    s = results["settings"]
    print(
        f"median of {s['repeats']}; {s['tokens']} generated tokens after a {DECODE_PROMPT}-token "
        f"prompt; {s['detokenization']}"
    )
    for e in results["models"]:
        print(
            f"\n## {e['name']} {e['dtype']}: {e['params'] / 1e6:.1f}M parameters, "
            f"{e['layers']} layers, hidden {e['hidden_size']}, vocab {e['vocab_size']}, "
            f"E/B {e['head_to_backbone']:.3f}; weight-reading bound keep-all "
            f"{e['bound_keep_all']:.2f}x ({e['token2_heads']['top']} token2 head: "
            f"{e['bound_keep_all_top']:.2f}x)"
        )
        print(f"{'variant':<26}{'ms/token':>10}{'baseline':>10}{'speedup':>9}{'tok/step':>10}"
              f"{'keep':>7}{'peak GB':>9}")
        for r in e["decode"]:
            print(
                f"{r['variant']:<26}{r['ms_per_token']:>10.2f}{r['baseline_ms_per_token']:>10.2f}"
                f"{r['speedup']:>8.2f}x{r['tokens_per_step']:>10.2f}{r['keep_rate']:>7.2f}"
                f"{r['peak_memory_gb']:>9.3f}"
            )
        keep_all = next((r for r in e["decode"] if r["variant"] == "keep-all"), None)
        if keep_all:
            print(
                f"keep-all speedup {keep_all['speedup']:.2f}x measured, "
                f"{e['bound_keep_all']:.2f}x weight-reading bound"
            )
        for r in e["ttft"]:
            print(
                f"TTFT {r['prompt_tokens']:>5} tokens: mlx-lm {r['mlx_lm_s']:.3f} s, "
                f"PIPO {r['pipo_s']:.3f} s, {r['speedup']:.2f}x; peak {r['mlx_lm_peak_memory_gb']:.3f}"
                f" vs {r['pipo_peak_memory_gb']:.3f} GB"
            )
        c = e["cache"]
        if c:
            print(
                f"cache after {c['prompt_tokens']} prompt tokens: full-attention KV "
                f"{c['mlx_lm_full_attention_kv_bytes'] / 1e6:.2f} MB ({c['mlx_lm_positions']} "
                f"positions) vs {c['pipo_full_attention_kv_bytes'] / 1e6:.2f} MB "
                f"({c['pipo_positions']}): {c['full_attention_kv_ratio']:.3f}; linear-attention "
                f"state {c['mlx_lm_linear_attention_state_bytes'] / 1e6:.2f} MB on both sides; "
                f"PIPO's MTP KV {c['pipo_mtp_kv_bytes'] / 1e6:.2f} MB"
            )
    q = results.get("token2_head_quality")
    if q:
        print(f"\ntoken2 heads, teacher-forced on {q['positions']} held-out positions")
        print("keep rate " + ", ".join(f"τ={t}: {r:.3f}" for t, r in q["keep_rate"].items()))
        for spec, r in q.items():
            if isinstance(r, dict) and "token2_accuracy" in r:
                kept = ", ".join(
                    f"τ={t}: {'-' if a is None else f'{a:.3f}'}"
                    for t, a in r["kept_token2_accuracy"].items()
                )
                print(
                    f"  {spec:<10} token2 accuracy {r['token2_accuracy']:.3f}, agrees with full "
                    f"head {r['agreement_with_full_head']:.3f}; kept token2 accuracy {kept}"
                )


def plot(results: Dict[str, Any], path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install matplotlib): no chart")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    models = [e for e in results["models"] if e["decode"]]
    names = [f"{e['name']}\n{e['dtype']}" for e in models]
    labels = [v for v in VARIANTS if VARIANTS[v].threshold is not None]
    labels = [v for v in labels if any(r["variant"] == v for e in models for r in e["decode"])]
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        xs, ys = [], []
        for j, e in enumerate(models):
            row = next((r for r in e["decode"] if r["variant"] == label), None)
            if row:
                xs.append(j + (i - (len(labels) - 1) / 2) * width)
                ys.append(row["speedup"])
        ax1.bar(xs, ys, width, label=label)
    ax1.scatter(range(len(models)), [e["bound_keep_all"] for e in models], marker="_", s=600,
                color="black", zorder=3, label="weight-reading bound (keep-all)")
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set_xticks(range(len(models)), names, fontsize=8)
    ax1.set_ylabel("per-token speedup over mlx-lm")
    ax1.set_title("Decoding")
    ax1.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    ttft = [e for e in results["models"] if e["ttft"]]
    lengths = sorted({r["prompt_tokens"] for e in ttft for r in e["ttft"]})
    width = 0.8 / max(len(ttft), 1)
    for i, e in enumerate(ttft):
        by_len = {r["prompt_tokens"]: r["speedup"] for r in e["ttft"]}
        xs = [j + (i - (len(ttft) - 1) / 2) * width for j, n in enumerate(lengths) if n in by_len]
        ax2.bar(xs, [by_len[n] for n in lengths if n in by_len], width, label=e["name"])
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax2.set_xlabel("prompt tokens")
    ax2.set_ylabel("time-to-first-token speedup")
    ax2.set_title("Prefill")
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(ttft))
    m = results["machine"]
    fig.suptitle(f"PIPO vs mlx-lm, {m['cpu']} ({m['cores']} cores, {m['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name  # beside the JSON; a relative name keeps results portable


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


FULL_SIZES = {
    s.name: s
    for s in (
        Size(
            "20M", 192, 24, (256, 1024),
            ("mlx-lm", "keep-all", "τ=0.95", "keep-none", "keep-all unfused", "keep-all top:V/8",
             "keep-all q4 head", "mlx-lm stream_generate", "keep-all stream_generate"),
            dtypes=("float16", "4bit"),
        ),
        Size(
            "80M", 384, 28, (256, 1024, 4096),
            ("mlx-lm", "keep-all", "τ=0.95", "keep-none", "keep-all unfused", "keep-all top:V/8"),
        ),
        Size(
            "190M", 640, 24, (256, 1024),
            ("mlx-lm", "keep-all", "keep-all top:V/8", "keep-all q4 head"),
        ),
    )
}
QUICK_SIZE = Size("quick", 128, 8, (64, 128), RANDOM_VARIANTS, dtypes=("float16", "4bit"))


FULL_RUN_SETTINGS = ("repeats", "tokens", "prompts", "quality_windows")


def is_full_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bool:
    """A run whose results may replace the committed ones: not --quick, and every
    measurement setting at its default (--sizes, --model and --name pick what is
    measured and where, not how carefully)."""
    return not args.quick and all(
        getattr(args, k) == parser.get_default(k) for k in FULL_RUN_SETTINGS
    )


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model, few tokens, one repeat")
    p.add_argument("--model", help="also measure this converted PIPO folder (and its token2 heads' quality)")
    p.add_argument("--sizes", default=",".join(FULL_SIZES), help="random configs to run, comma-separated ('' for none)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=256, help="generated tokens per decode run")
    p.add_argument("--prompts", default="256,1024,4096", help="TTFT prompt lengths for --model")
    p.add_argument("--quality-windows", type=int, default=32, help="256-token windows for the token2-head quality")
    p.add_argument(
        "--out",
        help="output folder (default: benchmarks/results for a full run, build/bench for "
        "--quick or a run with any of --repeats, --tokens, --prompts, --quality-windows off its "
        "default)",
    )
    p.add_argument("--name", default="decode", help="file stem of the JSON and PNG")
    args = p.parse_args(argv)
    args.full = is_full_run(args, p)
    if args.out is None:
        args.out = str(RESULTS if args.full else SCRATCH)
    args.prompts = [int(n) for n in args.prompts.split(",") if n]
    if args.quick:
        args.repeats, args.tokens, args.quality_windows, args.prompts = 1, 16, 2, [64, 128]
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    sizes = [QUICK_SIZE] if args.quick else [FULL_SIZES[s] for s in args.sizes.split(",") if s]
    results: Dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "repeats": args.repeats,
            "tokens": args.tokens,
            "decode_prompt_tokens": DECODE_PROMPT,
            "quick": args.quick,
            "detokenization": "not included (generate_step level) except in stream_generate rows",
            "eos": "none passed: both sides generate exactly the requested tokens",
        },
        "models": [],
        "token2_head_quality": None,
    }
    out = Path(args.out)
    if not args.full and out.resolve() == RESULTS.resolve():
        log(f"not a full run, but --out names {out}: the committed results will be replaced")
    else:
        log(f"results go to {out}" + ("" if args.full else " (not a full run)"))
    tic = time.perf_counter()
    for size in sizes:
        results["models"] += run_random(size, args)
    if args.model:
        entry, results["token2_head_quality"] = run_folder(args.model, args)
        results["models"].append(entry)
    results["machine"]["load_average_end"] = os.getloadavg()
    results["settings"]["wall_s"] = time.perf_counter() - tic
    out.mkdir(parents=True, exist_ok=True)
    results["chart"] = plot(results, out / f"{args.name}.png")
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print_table(results)
    written = [out / f"{args.name}.json"] + ([out / results["chart"]] if results["chart"] else [])
    log(f"wrote {' and '.join(map(str, written))} in {results['settings']['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
