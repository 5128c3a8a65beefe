"""benchmarks/real_size.py at a toy geometry: CI's guard that the real-size path
(fixture, conversion, decoding, training beside mlx-lm, OPD) keeps working, and
that its fixture is laid out as the hub's checkpoint and PEFT's adapter are."""

import json
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

from pipo_mlx import load
from pipo_mlx.conversion import convert
from pipo_mlx.model_io import cast, save_folder
from pipo_mlx.train_config import TrainConfig
from pipo_mlx.trainer import train

from test_bench import ROOT, committed, load_script  # noqa: F401  (committed: a fixture)


def test_tiny_run_walks_every_stage(tmp_path, committed):  # noqa: F811
    work = tmp_path / "work"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "real_size.py"), "--tiny", "--work", str(work)],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert committed.changed() == [], "a --tiny run rewrote the committed results"
    r = json.loads((work / "real_size.json").read_text())

    assert (r["fixture"]["full"]["layers"], r["fixture"]["short"]["layers"]) == (8, 4)
    for name in ("bf16", "4bit"):
        c = r["convert"][name]
        assert c["written_gb"] > 0 and c["peak_rss_gb"] > 0 and c["wall_s"] > 0
    assert r["convert"]["4bit"]["written_gb"] < r["convert"]["bf16"]["written_gb"]

    d = r["decode"]
    assert d["load_bf16_s"] > 0 and d["load_4bit_s"] > 0 and 1 < d["bound_keep_all"] < 2
    assert [row["prompt_tokens"] for row in d["ttft"]] == [64]
    rows = {row["variant"]: row for row in d["decode"]}
    assert rows["keep-all"]["tokens_per_step"] == 2.0 and rows["keep-none"]["tokens_per_step"] == 1.0
    assert all(row["ms_per_token"] > 0 for row in rows.values())

    runs = [row["run"] for row in r["train"]["rows"]]
    assert runs == ["pipo 8-layer bf16, grad checkpoint", "pipo 8-layer 4-bit QLoRA, grad checkpoint",
                    "pipo 4-layer f32", "mlx_lm.lora 4-layer f32", "pipo 4-layer bf16",
                    "pipo 4-layer 4-bit QLoRA", "pipo 4-layer bf16 OPD"]
    for row in r["train"]["rows"]:
        assert row["s_per_step"] > 0 and row["tokens_per_s"] > 0 and row["peak_rss_gb"] > 0


def test_fixture_has_the_hub_layout_and_peft_adapter_keys(tmp_path):
    """The base's keys are transformers' own (multimodal prefix, MTP added, tied head
    left out); the adapter's LoRA pairs are the ones PEFT writes for the seven
    projections of a real Qwen3.5, plus the MTP layer's and the saved modules."""
    bench = load_script("real_size")
    geometry = dict(bench.TINY)
    info = bench.write_fixture(tmp_path, geometry, layers=4)
    base, adapter = tmp_path / "base", tmp_path / "adapter"

    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        tensors.update(mx.load(str(base / shard)))
    assert set(tensors) == set(index)
    assert {v.dtype for v in tensors.values()} == {mx.bfloat16}
    assert info["parameters"] == sum(v.size for v in tensors.values())

    text = bench.text_config(geometry, 4)
    config = Qwen3_5TextConfig(**{k: v for k, v in text.items() if k not in ("model_type", "dtype")})
    reference = Qwen3_5ForCausalLM(config)
    expected = {k.replace("model.", "model.language_model.", 1): tuple(v.shape)
                for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    ours = {k: tuple(v.shape) for k, v in tensors.items()}
    assert {k: s for k, s in ours.items() if not k.startswith("mtp.")} == expected
    mtp_layer = {k.split("mtp.layers.0.")[1] for k in ours if k.startswith("mtp.layers.0.")}
    assert mtp_layer == {k.split("layers.3.")[1] for k in expected if ".layers.3." in k}

    peft = get_peft_model(reference, LoraConfig(r=64, lora_alpha=128, target_modules=list(bench.LORA_TARGETS)))
    peft_keys = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft).items()}
    lora = {k: tuple(v.shape) for k, v in mx.load(str(adapter / "adapter_model.safetensors")).items()}
    assert {k: s for k, s in lora.items() if "lora_" in k and ".mtp." not in k} == peft_keys
    assert sum(".mtp.layers.0." in k and "lora_" in k for k in lora) == 2 * 7
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (64, 128)


@pytest.mark.parametrize("quantize", [False, True], ids=["bf16", "4bit"])
def test_conversion_holds_no_whole_copy_besides_its_output(tmp_path, quantize):
    """MLX's peak while converting base + adapter stays within 1.5x of what it writes.
    At the real geometry a merged model kept whole while its 4-bit copy was written
    peaked at 4.8x; the fix (the model holds the only references to the sources,
    and tensors are evaluated one at a time) must hold at any size."""
    bench = load_script("real_size")
    geometry = dict(bench.TINY, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, linear_key_head_dim=64,
                    linear_value_head_dim=64, vocab_size=4096)
    bench.write_fixture(tmp_path / "fixture", geometry, layers=8)
    mx.clear_cache()
    mx.reset_peak_memory()
    held = mx.get_active_memory()  # arrays other tests' fixtures still hold
    out = convert(str(tmp_path / "fixture" / "base"), str(tmp_path / "out"),
                  adapter_path=str(tmp_path / "fixture" / "adapter"), quantize=quantize)
    peak = mx.get_peak_memory() - held
    written = bench.folder_bytes(out)
    assert peak <= 1.5 * written, f"peak {peak / 1e6:.1f} MB for {written / 1e6:.1f} MB written"


def test_grad_checkpoint_bounds_the_training_step(tmp_path):
    """A training step's peak shrinks with --grad-checkpoint. It did not while the
    losses were evaluated inside the differentiated function: MLX then kept every
    layer's activations, and at the real size 32 layers x 2048 tokens ran out of
    24 GB. Also checks that half-precision weights train in float32 on the CPU
    with the same numbers as a float32 copy of the same weights."""
    bench = load_script("real_size")
    geometry = dict(bench.TINY, hidden_size=128, intermediate_size=512, vocab_size=2048)
    bench.write_fixture(tmp_path / "fixture", geometry, layers=8)
    convert(str(tmp_path / "fixture" / "base"), str(tmp_path / "bf16"),
            adapter_path=str(tmp_path / "fixture" / "adapter"))
    model, tokenizer = load(str(tmp_path / "bf16"))  # the same values, upcast
    cast(model, mx.float32)
    save_folder(tmp_path / "f32", model, json.loads((tmp_path / "bf16" / "config.json").read_text()),
                tokenizer)
    data = bench.write_data(tmp_path / "data", 2, 1024)

    def step(model: str, **kw) -> tuple:
        cfg = TrainConfig(str(tmp_path / model), str(data), str(tmp_path / f"run-{len(kw)}-{model}"),
                          iters=1, warmup=0, batch_size=1, max_seq_length=1024,
                          steps_per_report=1, save_every=1000, **kw)
        mx.clear_cache()
        mx.reset_peak_memory()
        trained = train(cfg)
        params = dict(tree_flatten(trained.trainable_parameters()))
        return mx.get_peak_memory(), trained.compute_dtype, params

    plain, dtype, after_bf16 = step("bf16")
    checkpointed, _, _ = step("bf16", grad_checkpoint=True)
    assert dtype == mx.float32  # auto: float32 on the CPU over bfloat16 weights
    assert checkpointed < 0.8 * plain, f"{checkpointed / 1e6:.0f} MB vs {plain / 1e6:.0f} MB"

    _, _, after_f32 = step("f32")
    for key, value in after_f32.items():
        assert mx.allclose(after_bf16[key], value, atol=1e-5), key
