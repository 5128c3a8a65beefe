"""The Qwen3.5-4B path at its true geometry, from random weights: what a user runs.

    python benchmarks/real_size.py             # 50 minutes on 2 CPU cores, 24 GB, 40 GB of disk
    python benchmarks/real_size.py --tiny      # every stage at a toy geometry: the CI run

Nothing can be downloaded here, so the script writes a checkpoint with exactly
the published model's text geometry (GEOMETRY, cited there) and the hub's
layout, plus a PEFT LoRA adapter shaped like the authors' (docs/design.md §3),
and walks the user's path with them:

1. fixture: the base model (bf16, sharded safetensors with an index, the
   multimodal `model.language_model.*` key layout, native `mtp.*` weights, tied
   embeddings; the vision tower's weights are left out: conversion drops them
   unread) and the adapter (r 64, alpha 128, the seven projections of every
   layer and of the MTP layer, the saved small modules). Key names and shapes
   come from transformers' own Qwen3.5 model, built on the meta device.
2. convert: convert.py merges base and adapter to bfloat16, then to 4-bit;
   wall time, peak resident memory, and the ratio of the peak to what it wrote.
3. decode: load time of both outputs; time to first token for a 1024-token
   prompt and decode speed at keep-all and at τ = 1 against mlx-lm on the same
   backbone arrays, next to the weight-read bound (bench_decode.py explains it).
   MLX's CPU backend multiplies bfloat16 and 4-bit matrices far slower than
   float32 (a 1024-token prefill would take a quarter of an hour), so this
   stage casts the bfloat16 output to float32 in memory; a float32 decode step
   reads its weights at memory bandwidth, as a Mac's GPU does.
4. train: train_heads.py at V = 248,320 on the full 32 layers at 2048 tokens
   (--grad-checkpoint), with bfloat16 weights and with the 4-bit conversion
   (QLoRA: LoRA over the quantized backbone, the heads in float), and on a
   4-layer copy at 512 tokens beside `mlx_lm.lora` (rank 64 on the same seven
   projections) in the same run, in float32 on both sides, and with bfloat16
   and 4-bit weights; then OPD on the 4-layer copy with its base as teacher.

Each measured command runs as its own process, and its peak resident memory
is the kernel's count for that process. Stages are resumable: results go to
WORK/results.json after each one, and a stage already there is skipped.
Only a full run writes benchmarks/results/real_size.json (docs/benchmarks.md quotes it).
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (  # noqa: E402
    Bench, bound, decode_rows, log, machine, random_prompt, settle, ttft_rows, weights,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "real_size.json"

# Qwen/Qwen3.5-4B's text model. Sizes as https://apxml.com/models/qwen35-4b lists
# them (hidden 2,560, 32 layers as 8 x (3 Gated-DeltaNet + 1 attention), FFN 9,216,
# 16 query / 4 key-value heads of 256, vocabulary 248,320, one MTP layer) and the
# model's config.json on the hub (Gated-DeltaNet 16 key / 32 value heads of 128,
# convolution 4, rope 1e7 on a quarter of each head, tied embeddings).
GEOMETRY = dict(
    hidden_size=2560,
    intermediate_size=9216,
    num_hidden_layers=32,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_conv_kernel_dim=4,
    vocab_size=248320,
)
TINY = dict(GEOMETRY, hidden_size=64, intermediate_size=96, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
            linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
            vocab_size=4096)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # PAD, then the chat markers
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARD_BYTES = 2 << 30


def text_config(geometry: Dict[str, int], layers: int) -> Dict[str, Any]:
    first_special = min(248044, geometry["vocab_size"] - len(SPECIALS))
    return dict(
        geometry,
        num_hidden_layers=layers,
        model_type="qwen3_5_text",
        layer_types=(["linear_attention"] * 3 + ["full_attention"]) * (layers // 4),
        full_attention_interval=4,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000,
                         "partial_rotary_factor": 0.25},
        attn_output_gate=True,
        tie_word_embeddings=True,
        mtp_num_hidden_layers=1,
        eos_token_id=first_special + 2,
        pad_token_id=first_special,
        dtype="bfloat16",
    )


# -- 1. the fixture


def hf_shapes(text: Dict[str, Any]) -> Dict[str, tuple]:
    """Every tensor of the hub checkpoint: transformers' text model, renamed to the
    multimodal layout, plus the native MTP head (docs/design.md §2)."""
    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    fields = {k: v for k, v in text.items() if k not in ("model_type", "dtype")}
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**fields))
    shapes = {
        k.replace("model.", "model.language_model.", 1): tuple(v.shape)
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"  # tied
    }
    h = text["hidden_size"]
    attention = f"model.language_model.layers.{text['layer_types'].index('full_attention')}."
    mtp = {"mtp.layers.0." + k[len(attention):]: s for k, s in shapes.items() if k.startswith(attention)}
    mtp.update({"mtp.fc.weight": (h, 2 * h), "mtp.norm.weight": (h,),
                "mtp.pre_fc_norm_embedding.weight": (h,), "mtp.pre_fc_norm_hidden.weight": (h,)})
    return {**shapes, **mtp}


def initial(key: str, shape: tuple) -> mx.array:
    """Values a trained model could have: unit-mean norms, small matrices."""
    if key.endswith("A_log"):
        return mx.log(mx.random.uniform(1, 16, shape))
    if key.endswith("dt_bias") or key.endswith("linear_attn.norm.weight"):
        return mx.ones(shape)
    if "norm" in key:
        return mx.zeros(shape)  # HF stores Qwen3.5's (1 + w) norms as w
    return 0.02 * mx.random.normal(shape)


def write_shards(folder: Path, shapes: Dict[str, tuple], make: Callable[[str, tuple], mx.array],
                 prefix: str = "model") -> None:
    """Shards of at most SHARD_BYTES, written one at a time, and their index."""
    groups: List[List[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        n = 2 * math.prod(shape)
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += n
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {k: make(k, shapes[k]).astype(mx.bfloat16) for k in keys}
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del shard
    total = sum(2 * math.prod(s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tokenizer(folder: Path, text: Dict[str, Any]) -> None:
    """A byte-level BPE with the special tokens at the ids config.json names."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {piece: i for i, piece in enumerate(alphabet)}
    vocab.update({s: text["pad_token_id"] + i for i, s in enumerate(SPECIALS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[0], eos_token=SPECIALS[2])
    wrapped.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    wrapped.save_pretrained(folder)


def adapter_shapes(text: Dict[str, Any], shapes: Dict[str, tuple], rank: int) -> Dict[str, tuple]:
    """The authors' adapter on the base's `shapes`: LoRA pairs on the seven projections
    wherever they exist (Gated-DeltaNet layers have only the MLP's), and the saved modules."""
    h = text["hidden_size"]
    out: Dict[str, tuple] = {}
    for key, shape in shapes.items():
        parts = key.split(".")
        if parts[-1] == "weight" and parts[-2] in LORA_TARGETS:
            name = "base_model.model." + key.replace("model.language_model.", "model.")[: -len(".weight")]
            out[f"{name}.lora_A.weight"] = (rank, shape[1])
            out[f"{name}.lora_B.weight"] = (shape[0], rank)
    saved = {
        "compressor.mlp.0.weight": (2 * h, 2 * h), "compressor.mlp.0.bias": (2 * h,),
        "compressor.mlp.2.weight": (h, 2 * h), "compressor.mlp.2.bias": (h,),
        "confidence_head.norm.weight": (2 * h,), "confidence_head.fc1.weight": (h, 2 * h),
        "confidence_head.fc2.weight": (1, h),
    }
    saved.update({k: s for k, s in shapes.items() if k.startswith("mtp.") and (
        "norm" in k or k == "mtp.fc.weight")})
    out.update({"base_model.model." + k: s for k, s in saved.items()})
    return out


def write_fixture(folder: Path, geometry: Dict[str, int], layers: int, seed: int = 0) -> Dict[str, Any]:
    mx.random.seed(seed)
    text = text_config(geometry, layers)
    base, adapter = folder / "base", folder / "adapter"
    for f in (base, adapter):
        shutil.rmtree(f, ignore_errors=True)
        f.mkdir(parents=True)
    config = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
              "text_config": text, "tie_word_embeddings": True, "dtype": "bfloat16"}
    (base / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(base, text)
    shapes = hf_shapes(text)
    write_shards(base, shapes, initial)

    rank = 64
    lora = adapter_shapes(text, shapes, rank)
    tensors = {k: (0.01 * mx.random.normal(s)).astype(mx.bfloat16) for k, s in lora.items()}
    mx.save_safetensors(str(adapter / "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    modules = ["compressor", "confidence_head", "mtp.fc", "mtp.pre_fc_norm_hidden",
               "mtp.pre_fc_norm_embedding", "mtp.norm"] + [
        f"mtp.layers.0.{n}" for n in ("input_layernorm", "post_attention_layernorm",
                                      "self_attn.q_norm", "self_attn.k_norm")]
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "Qwen/Qwen3.5-4B",
        "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "use_rslora": False,
        "use_dora": False, "target_modules": list(LORA_TARGETS), "modules_to_save": modules,
    }, indent=2))
    return {
        "layers": layers,
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "base_bytes": folder_bytes(base),
        "adapter_bytes": folder_bytes(adapter),
        "adapter_tensors": len(lora),
    }


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


# -- measured processes


def measure(cmd: List[str], log_path: Path) -> Dict[str, Any]:
    """Run `cmd`, its output to log_path; wall time and the process's own peak RSS."""
    log(f"  $ {' '.join(cmd)}")
    tic = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - tic
    rc = os.waitstatus_to_exitcode(status)
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    text = log_path.read_text()
    if rc != 0:
        raise SystemExit(f"failed (exit {rc}); the end of {log_path}:\n{text[-3000:]}")
    return {"wall_s": wall, "peak_rss_gb": peak / 1e9, "log": text}


def python(*args: str) -> List[str]:
    return [sys.executable, *args]


# -- 3. decoding, in a process of its own (see `worker`)


def decode_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    from pipo_mlx import load
    from pipo_mlx.model_io import cast

    out: Dict[str, Any] = {}
    for name in ("bf16", "4bit"):
        settle()
        tic = time.perf_counter()
        model, _ = load(spec[name])
        mx.eval(model.parameters())
        out[f"load_{name}_s"] = time.perf_counter() - tic
        del model
    settle()
    model, tokenizer = load(spec["bf16"], lazy=True)
    if mx.default_device().type == mx.cpu:
        cast(model, mx.float32)
        for layer in model.layers:  # one layer at a time: bf16 and float32 never both whole
            mx.eval(layer.parameters())
    mx.eval(model.parameters())
    out["dtype"] = str(model.model.embed_tokens.weight.dtype).split(".")[-1]
    bench = Bench.of(model, tokenizer)
    w = weights(model)
    vocab = model.args.vocab_size
    out["weight_bytes_float32"] = {k: w[k] for k in "BEMC"}
    out["head_to_backbone"] = w["E"] / w["B"]
    out["bound_keep_all"] = bound(w)
    ttft, cache = ttft_rows(bench, {spec["prompt"]: random_prompt(vocab, spec["prompt"], 0)}, 1)
    out["ttft"], out["cache"] = ttft, cache
    out["decode"] = decode_rows(bench, ("mlx-lm", "keep-all", "keep-none"),
                                random_prompt(vocab, 64, 1), spec["tokens"], spec["repeats"])
    return out


def worker(kind: str, spec_json: str) -> None:
    result = {"decode": decode_worker}[kind](json.loads(spec_json))
    print("RESULT " + json.dumps(result), flush=True)


def worker_result(run: Dict[str, Any]) -> Dict[str, Any]:
    line = next(l for l in run["log"].splitlines()[::-1] if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# -- 4. training


def write_data(folder: Path, records: int, chars: int, prompts: bool = False) -> Path:
    """Python-like lines of about `chars` byte-level tokens per record."""
    folder.mkdir(parents=True, exist_ok=True)
    words = "def return self for in range if else import print class while yield lambda".split()
    rng = random.Random(0)
    with open(folder / "train.jsonl", "w") as f:
        for _ in range(records):
            body = ""
            while len(body) < chars:
                body += " ".join(rng.choice(words) for _ in range(6)) + "\n"
            record = {"prompt": body[:chars]} if prompts else {"text": body[:chars]}
            f.write(json.dumps(record) + "\n")
    return folder


def trainer_figures(log_text: str, tokens: int) -> Dict[str, Any]:
    """Rate, step time and peak of the last report of train_heads.py or mlx_lm.lora
    (which prints no step time: `tokens` per step over its rate)."""
    ours = re.findall(r"\| (\d+) tok/s, ([\d.]+) s/step \| peak ([\d.]+) GB", log_text)
    if ours:
        rate, step, peak = map(float, ours[-1])
        return {"tokens_per_s": rate, "s_per_step": step, "mlx_peak_gb": peak}
    # mlx_lm.lora's table: iter, train loss and its trend arrow, tok/s, tokens.
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log_text)
    theirs = re.findall(r"^\s*\d+\s+[\d.]+\s+\S+\s+([\d.]+)\s+[\d.]+k\s*$", plain, re.M)
    return {"tokens_per_s": float(theirs[-1]), "s_per_step": tokens / float(theirs[-1]),
            "mlx_peak_gb": None}


def train_run(label: str, cmd: List[str], work: Path, tokens: int) -> Dict[str, Any]:
    slug = re.sub(r"[^\w.]+", "-", label)
    run = measure(cmd, work / f"train-{slug}.log")
    figures = trainer_figures(run["log"], tokens)
    row = {"run": label, "wall_s": run["wall_s"], "peak_rss_gb": run["peak_rss_gb"], **figures}
    log(f"  {label}: {row['s_per_step']:.1f} s/step, peak RSS {row['peak_rss_gb']:.2f} GB")
    return row


def ours(model: Path, data: Path, out: Path, seq: int, iters: int, *extra: str) -> List[str]:
    return python("train_heads.py", "--model", str(model), "--data", str(data),
                  "--adapter-path", str(out), "--force", "--batch-size", "1",
                  "--max-seq-length", str(seq), "--iters", str(iters), "--warmup", "0",
                  "--steps-per-report", "1", "--save-every", "1000", *extra)


def mlx_lm_lora(model: Path, data: Path, out: Path, seq: int, iters: int, work: Path) -> List[str]:
    config = work / "lora.yaml"
    config.write_text(json.dumps({  # YAML reads JSON
        "lora_parameters": {"rank": 64, "scale": 2.0, "dropout": 0.0,
                            "keys": [f"self_attn.{p}" for p in LORA_TARGETS[:4]]
                            + [f"mlp.{p}" for p in LORA_TARGETS[4:]]},
    }))
    return python("-m", "mlx_lm", "lora", "--model", str(model), "--train", "--data", str(data),
                  "--adapter-path", str(out), "--batch-size", "1", "--max-seq-length", str(seq),
                  "--iters", str(iters), "--num-layers", "-1", "--steps-per-report", "1",
                  "--steps-per-eval", "1000", "--val-batches", "1", "--save-every", "1000",
                  "-c", str(config))


# -- the stages


def stage_fixture(a: argparse.Namespace, work: Path) -> Dict[str, Any]:
    out = {}
    for name, layers in (("full", a.layers), ("short", a.short_layers)):
        tic = time.perf_counter()
        out[name] = write_fixture(work / f"fixture-{name}", a.geometry, layers)
        out[name]["write_s"] = time.perf_counter() - tic
        log(f"  fixture {name}: {out[name]['parameters'] / 1e9:.2f}B parameters, "
            f"{out[name]['base_bytes'] / 1e9:.2f} GB in {out[name]['write_s']:.0f} s")
    return out


def stage_convert(a: argparse.Namespace, work: Path) -> Dict[str, Any]:
    fixture = work / "fixture-full"
    out = {}
    for name, extra in (("bf16", ["--dtype", "bfloat16"]), ("4bit", ["-q"])):
        dst = work / f"pipo-{name}"
        run = measure(python("convert.py", "--hf-path", str(fixture / "base"), "--adapter-path",
                             str(fixture / "adapter"), "--mlx-path", str(dst), "--force", *extra),
                      work / f"convert-{name}.log")
        written = folder_bytes(dst)
        out[name] = {"wall_s": run["wall_s"], "peak_rss_gb": run["peak_rss_gb"],
                     "written_gb": written / 1e9, "peak_to_written": run["peak_rss_gb"] * 1e9 / written}
        log(f"  convert {name}: {run['wall_s']:.0f} s, peak {run['peak_rss_gb']:.2f} GB for "
            f"{written / 1e9:.2f} GB written ({out[name]['peak_to_written']:.2f}x)")
    return out


def stage_decode(a: argparse.Namespace, work: Path) -> Dict[str, Any]:
    spec = {"bf16": str(work / "pipo-bf16"), "4bit": str(work / "pipo-4bit"),
            "prompt": a.prompt_tokens, "tokens": a.tokens, "repeats": a.repeats}
    run = measure(python(__file__, "--worker", "decode", json.dumps(spec)), work / "decode.log")
    out = worker_result(run)
    out["peak_rss_gb"] = run["peak_rss_gb"]
    return out


def stage_train(a: argparse.Namespace, work: Path) -> Dict[str, Any]:
    short = work / "fixture-short"
    seq_full, seq_short = a.train_tokens, a.short_tokens
    data_full = write_data(work / "data-full", 4, seq_full)
    data_short = write_data(work / "data-short", 4, seq_short)
    prompts = write_data(work / "data-prompts", 4, 24, prompts=True)
    models = {}
    for name, cmd in (
        ("pipo-short-f32", python("convert.py", "--hf-path", str(short / "base"), "--adapter-path",
                                  str(short / "adapter"), "--dtype", "float32")),
        ("mlx-lm-short-f32", python("-m", "mlx_lm", "convert", "--hf-path", str(short / "base"),
                                    "--dtype", "float32")),
        ("pipo-short-bf16", python("convert.py", "--hf-path", str(short / "base"),
                                   "--adapter-path", str(short / "adapter"))),
        ("pipo-short-4bit", python("convert.py", "--hf-path", str(short / "base"),
                                   "--adapter-path", str(short / "adapter"), "-q")),
    ):
        models[name] = work / name
        if not models[name].is_dir():
            shutil.rmtree(models[name], ignore_errors=True)
            measure(cmd + ["--mlx-path", str(models[name])], work / f"convert-{name}.log")
    runs = {  # key: (label, command, tokens per step)
        "full-bf16": (f"pipo {a.layers}-layer bf16, grad checkpoint", ours(
            work / "pipo-bf16", data_full, work / "adapter-full", seq_full, a.train_iters,
            "--grad-checkpoint"), seq_full),
        "full-4bit": (f"pipo {a.layers}-layer 4-bit QLoRA, grad checkpoint", ours(
            work / "pipo-4bit", data_full, work / "adapter-full-4bit", seq_full, a.train_iters,
            "--grad-checkpoint"), seq_full),
        "short-f32": (f"pipo {a.short_layers}-layer f32", ours(
            models["pipo-short-f32"], data_short, work / "adapter-short", seq_short,
            a.train_iters), seq_short),
        "mlx-lm": (f"mlx_lm.lora {a.short_layers}-layer f32", mlx_lm_lora(
            models["mlx-lm-short-f32"], data_short, work / "adapter-mlx-lm", seq_short,
            a.train_iters, work), seq_short),
        "short-bf16": (f"pipo {a.short_layers}-layer bf16", ours(
            models["pipo-short-bf16"], data_short, work / "adapter-short-bf16", seq_short,
            a.train_iters), seq_short),
        "short-4bit": (f"pipo {a.short_layers}-layer 4-bit QLoRA", ours(
            models["pipo-short-4bit"], data_short, work / "adapter-short-4bit", seq_short,
            a.train_iters), seq_short),
        "opd": (f"pipo {a.short_layers}-layer bf16 OPD", ours(
            models["pipo-short-bf16"], prompts, work / "adapter-opd", max(seq_short, 128),
            a.train_iters, "--stage", "opd", "--teacher", str(short / "base"),
            "--max-new-tokens", str(a.opd_tokens)), seq_short),
    }
    rows = [train_run(label, cmd, work, tokens) for key, (label, cmd, tokens) in runs.items()
            if key in a.train_runs]
    return {"train_tokens": seq_full, "short_tokens": seq_short, "short_layers": a.short_layers,
            "rows": rows}


def summary(state: Dict[str, Any]) -> str:
    """The results as the tables of docs/benchmarks.md."""
    lines = ["| conversion | wall | peak RSS | written | peak / written |", "|---|---:|---:|---:|---:|"]
    for name, c in state.get("convert", {}).items():
        if isinstance(c, dict):
            lines.append(f"| base + adapter -> {name} | {c['wall_s']:.0f} s | {c['peak_rss_gb']:.2f} GB | "
                         f"{c['written_gb']:.2f} GB | {c['peak_to_written']:.2f}x |")
    d = state.get("decode")
    if d:
        lines += ["", f"load: bf16 {d['load_bf16_s']:.1f} s, 4-bit {d['load_4bit_s']:.1f} s; "
                      f"speed in {d.get('dtype', 'float32')}, bound {d['bound_keep_all']:.2f}x", "",
                  "| measure | mlx-lm | PIPO | ratio |", "|---|---:|---:|---:|"]
        for t in d["ttft"]:
            lines.append(f"| time to first token, {t['prompt_tokens']}-token prompt | {t['mlx_lm_s']:.1f} s "
                         f"| {t['pipo_s']:.1f} s | {t['speedup']:.2f}x |")
        for row in d["decode"]:
            if row["threshold"] is not None:
                lines.append(f"| decode, {row['variant']} ({row['tokens_per_step']:.1f} tok/step) | "
                             f"{row['baseline_ms_per_token']:.0f} ms/token | {row['ms_per_token']:.0f} ms/token "
                             f"| {row['speedup']:.2f}x |")
    t = state.get("train")
    if t:
        lines += ["", "| training run | s/step | tokens/s | peak RSS | MLX peak |", "|---|---:|---:|---:|---:|"]
        for row in t["rows"]:
            mlx_peak = f"{row['mlx_peak_gb']:.2f} GB" if row["mlx_peak_gb"] else "-"
            lines.append(f"| {row['run']} | {row['s_per_step']:.1f} | {row['tokens_per_s']:.0f} | "
                         f"{row['peak_rss_gb']:.2f} GB | {mlx_peak} |")
    return "\n".join(lines)


TRAIN_RUNS = ("full-bf16", "full-4bit", "short-f32", "mlx-lm", "short-bf16", "short-4bit", "opd")
STAGES = {"fixture": stage_fixture, "convert": stage_convert, "decode": stage_decode,
          "train": stage_train}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a toy geometry, for a quick check of every stage")
    p.add_argument("--work", help="scratch folder, several GB (default build/real_size[_tiny])")
    p.add_argument("--stages", default=",".join(STAGES), help="stages to run, comma-separated")
    p.add_argument("--redo", action="store_true", help="run the stages again even if results exist")
    p.add_argument("--out", help=f"results JSON (default {RESULTS.relative_to(ROOT)} for a full "
                                 "run, WORK/real_size.json for --tiny)")
    p.add_argument("--train-runs", default=",".join(TRAIN_RUNS),
                   help="the training runs of stage train, comma-separated (default all: "
                   f"{', '.join(TRAIN_RUNS)})")
    p.add_argument("--train-iters", type=int, default=2,
                   help="steps per training run; the figures are the last step's (default 2)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.train_runs = a.train_runs.split(",")
    if set(a.train_runs) - set(TRAIN_RUNS):
        p.error(f"--train-runs: choose from {', '.join(TRAIN_RUNS)}")
    a.geometry = TINY if a.tiny else GEOMETRY
    a.layers = a.geometry["num_hidden_layers"]
    a.short_layers = 4
    a.train_tokens, a.short_tokens = (64, 32) if a.tiny else (2048, 512)
    a.prompt_tokens, a.tokens, a.repeats = (64, 8, 1) if a.tiny else (1024, 16, 2)
    a.opd_tokens = 8 if a.tiny else 32
    a.work = Path(a.work or ROOT / "build" / ("real_size_tiny" if a.tiny else "real_size"))
    a.out = Path(a.out) if a.out else (a.work / "real_size.json" if a.tiny else RESULTS)
    return a


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    a = parse_args(argv)
    if a.worker:
        worker(*a.worker)
        return {}
    unknown = set(a.stages.split(",")) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stage {sorted(unknown)[0]!r}; choose from {', '.join(STAGES)}")
    a.work.mkdir(parents=True, exist_ok=True)
    state_path = a.work / "results.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    state.setdefault("machine", machine())
    state["geometry"] = text_config(a.geometry, a.layers)
    for name in STAGES:
        if name not in a.stages.split(",") or (name in state and not a.redo):
            continue
        log(f"stage {name}")
        tic = time.perf_counter()
        state[name] = STAGES[name](a, a.work)
        state[name]["stage_s"] = time.perf_counter() - tic
        state_path.write_text(json.dumps(state, indent=2))
    state["machine"]["load_average_end"] = os.getloadavg()
    print(summary(state), flush=True)
    if all(name in state for name in STAGES) and len(state["train"]["rows"]) == len(TRAIN_RUNS):
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_name(f".{a.out.name}.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, a.out)
        log(f"wrote {a.out}")
    return state


if __name__ == "__main__":
    main()
