"""Conversion and parity: pipo_mlx against transformers / PEFT and the spec-written heads."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from hf_reference import (
    RefPIPO,
    hf_config_dict,
    max_abs,
    random_ids,
    tiny_config,
    to_numpy,
    write_checkpoint,
)
from safetensors.torch import load_file

from pipo_mlx import PipoError, convert, load

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _outputs(model, ids: np.ndarray) -> dict:
    out = model(mx.array(ids))
    return {k: to_numpy(getattr(out, k)) for k in ("logits", "mtp_logits", "confidence")}


def _assert_parity(ref: RefPIPO, folder: Path, ids: np.ndarray, tol: float = TOL) -> dict:
    expected = ref(torch.tensor(ids))
    model, _ = load(str(folder))
    got = _outputs(model, ids)
    diffs = {k: max_abs(got[k], expected[k]) for k in got}
    for k, d in diffs.items():
        assert d < tol, f"{k}: max abs diff {d:.2e} >= {tol}"
    return diffs


def test_backbone_matches_transformers(hf_pipo, mlx_pipo):
    ref, _ = hf_pipo
    ids = random_ids(2, 11, seed=1)
    expected = ref.backbone_logits(torch.tensor(ids))
    model, _ = load(str(mlx_pipo))
    full = to_numpy(model.lm_logits(model.model(mx.array(ids))))
    print(f"backbone vs transformers: max abs diff {max_abs(full, expected):.2e}")
    assert max_abs(full, expected) < TOL
    # Token by token with mlx-lm's caches: the incremental path agrees too.
    cache = model.make_cache()[: len(model.layers)]
    steps = [model.lm_logits(model.model(mx.array(ids[:, t : t + 1]), cache=cache)) for t in range(ids.shape[1])]
    assert max_abs(to_numpy(mx.concatenate(steps, axis=1)), expected) < TOL


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_heads_match_reference(kind, tmp_path):
    config = tiny_config()
    ref = RefPIPO(config, kind, seed=3)
    src = write_checkpoint(tmp_path / "hf", ref.hf_state_dict(), hf_config_dict(config, compressor_type=kind))
    dst = convert(str(src), str(tmp_path / "mlx"), dtype="float32")
    diffs = _assert_parity(ref, dst, random_ids(3, 14, seed=4))
    print(f"{kind}: max abs diffs {diffs}")


def test_incremental_heads_match_teacher_forced(mlx_pipo):
    """Prefill then one pair at a time through both caches equals the full pass."""
    model, _ = load(str(mlx_pipo))
    ids = mx.array(random_ids(1, 12, seed=5))
    full = model(ids)
    cache = model.make_cache()
    backbone, mtp = model.split_cache(cache)
    h = [model.hidden(ids[:, :6], backbone)]
    for t in range(6, 12, 2):
        h.append(model.hidden(ids[:, t : t + 2], backbone))
    h = mx.concatenate(h, axis=1)
    m = [model.draft(ids[:, 2:6:2], h[:, :2], mtp)]
    for i in range(2, 5):
        m.append(model.draft(ids[:, 2 * i + 2 : 2 * i + 3], h[:, i : i + 1], mtp))
    m = mx.concatenate(m, axis=1)
    assert max_abs(to_numpy(h), to_numpy(full.hidden)) < 1e-5
    assert max_abs(to_numpy(m), to_numpy(full.mtp_hidden)) < 1e-5


@pytest.mark.parametrize("layout,nested,shards", [("multimodal", True, 3), ("multimodal", False, 1), ("text", True, 2)])
def test_key_layouts_and_config_shapes(hf_pipo, layout, nested, shards, tmp_path):
    ref, _ = hf_pipo
    config = hf_config_dict(ref.hf_config, nested=nested, compressor_type="mlp")
    src = write_checkpoint(tmp_path / "hf", ref.hf_state_dict(layout), config, shards=shards)
    dst = convert(str(src), str(tmp_path / "mlx"), dtype="float32")
    _assert_parity(ref, dst, random_ids(2, 10, seed=6))


def test_layer_types_override_interval(tmp_path):
    config = tiny_config(layer_types=["linear_attention"] * 3 + ["full_attention"])
    ref = RefPIPO(config, "mlp", seed=7)
    cfg = hf_config_dict(config, compressor_type="mlp")
    cfg["full_attention_interval"] = 2  # stale field: layer_types must win
    src = write_checkpoint(tmp_path / "hf", ref.hf_state_dict(), cfg)
    dst = convert(str(src), str(tmp_path / "mlx"), dtype="float32")
    assert json.loads((dst / "config.json").read_text())["full_attention_interval"] == 4
    _assert_parity(ref, dst, random_ids(1, 10, seed=8))


def test_untied_lm_head(tmp_path):
    config = tiny_config(tie_word_embeddings=False)
    ref = RefPIPO(config, "linear", seed=9)
    src = write_checkpoint(tmp_path / "hf", ref.hf_state_dict(), hf_config_dict(config))
    _assert_parity(ref, convert(str(src), str(tmp_path / "mlx"), dtype="float32"), random_ids(2, 8, seed=9))


def _lora_config(rank: int = 4, alpha: int = 16):
    from peft import LoraConfig

    norms = ["input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=["compressor", "confidence_head", "mtp.fc", "mtp.pre_fc_norm_hidden",
                         "mtp.pre_fc_norm_embedding", "mtp.norm"] + [f"mtp.layers.0.{n}" for n in norms],
    )


def _peft_adapter(base: RefPIPO, trained: RefPIPO, folder: Path) -> RefPIPO:
    """A real PEFT adapter over `base`, its saved modules and LoRA made non-trivial.

    Returns the PEFT-merged torch model, the reference for base + adapter."""
    from peft import get_peft_model

    peft_model = get_peft_model(base, _lora_config())
    with torch.no_grad():
        g = torch.Generator().manual_seed(11)
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        # Saved-whole modules take the "trained" values.
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                src_name = name.replace("base_model.model.", "").replace(".modules_to_save.default", "")
                p.copy_(dict(trained.named_parameters())[src_name])
    peft_model.save_pretrained(str(folder))
    return peft_model.merge_and_unload()


def test_peft_adapter_equals_torch_merge(tmp_path):
    config = tiny_config()
    base = RefPIPO(config, "mlp", seed=20)
    base_sd = {k: v for k, v in base.hf_state_dict().items()
               if not k.startswith(("compressor.", "confidence_head."))}
    base_dir = write_checkpoint(tmp_path / "base", base_sd, hf_config_dict(config))
    trained = RefPIPO(config, "mlp", seed=21)
    merged = _peft_adapter(base, trained, tmp_path / "adapter")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()
    assert any(k.startswith("base_model.model.mtp.layers.0.self_attn.q_proj.lora_A") for k in keys)
    assert any(k.startswith("base_model.model.model.layers.1.self_attn.q_proj.lora_B") for k in keys)
    assert "base_model.model.compressor.mlp.0.weight" in keys

    merged_dir = write_checkpoint(tmp_path / "merged", merged.hf_state_dict(), hf_config_dict(config))
    via_adapter = convert(str(base_dir), str(tmp_path / "a"), adapter_path=str(tmp_path / "adapter"), dtype="float32")
    via_merged = convert(str(merged_dir), str(tmp_path / "m"), dtype="float32")
    wa, wm = mx.load(str(via_adapter / "model.safetensors")), mx.load(str(via_merged / "model.safetensors"))
    assert wa.keys() == wm.keys()
    assert max(max_abs(to_numpy(wa[k]), to_numpy(wm[k])) for k in wa) < 1e-5
    diffs = _assert_parity(merged, via_adapter, random_ids(2, 12, seed=22))
    print(f"base+adapter vs torch merge: {diffs}")


def test_plain_qwen_gets_fresh_heads(tmp_path):
    config = tiny_config()
    ref = RefPIPO(config, "mlp", seed=30)
    plain = {k: v for k, v in ref.hf_state_dict().items() if not k.startswith(("compressor.", "confidence_head."))}
    src = write_checkpoint(tmp_path / "hf", plain, hf_config_dict(config))
    dst = convert(str(src), str(tmp_path / "mlx"), dtype="float32", compressor_type="linear")
    model, _ = load(str(dst))
    ids = random_ids(1, 8, seed=31)
    emb = to_numpy(model.embed(mx.array(ids)))
    # Fresh compressor: the sum of the pair's embeddings.
    assert max_abs(to_numpy(model.compress(mx.array(ids))), emb[:, 0::2] + emb[:, 1::2]) < 1e-6
    # The native MTP weights are kept: drafting from the same h matches the reference MTP.
    h = torch.randn(1, 3, config.hidden_size)
    with torch.no_grad():
        expected = ref.mtp(ref.embed(torch.tensor(ids[:, 2::2])), h).numpy()
    got = to_numpy(model.draft(mx.array(ids[:, 2::2]), mx.array(h.numpy())))
    assert max_abs(got, expected) < TOL
    conf = to_numpy(model(mx.array(ids)).confidence)
    assert np.all(np.abs(conf) < 0.5)  # a fresh gate starts undecided


@pytest.mark.parametrize("bits,tol", [(8, 0.05), (4, 0.5)])
def test_quantized_output_loads(hf_pipo, mlx_pipo, bits, tol, tmp_path):
    dst = convert(str(hf_pipo[1]), str(tmp_path / "q"), dtype="float32", quantize=True, q_bits=bits, q_group_size=32)
    qmodel, _ = load(str(dst))
    assert isinstance(qmodel.model.layers[1].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(qmodel.mtp.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert isinstance(qmodel.compressor.mlp[0], nn.QuantizedLinear)
    assert json.loads((dst / "config.json").read_text())["quantization"]["bits"] == bits
    model, _ = load(str(mlx_pipo))
    ids = random_ids(2, 12, seed=40)
    full, quant = _outputs(model, ids), _outputs(qmodel, ids)
    # Stated tolerance: RMS error relative to the float32 outputs' RMS. Random
    # tiny weights quantize worse than trained ones, so this is a loose bound.
    rel = {k: float(np.sqrt(np.mean((full[k] - quant[k]) ** 2) / np.mean(full[k] ** 2))) for k in full}
    print(f"{bits}-bit vs float32: relative RMS {rel}, max abs {({k: max_abs(full[k], quant[k]) for k in full})}")
    assert all(r < tol for r in rel.values()), rel


def test_dtype_and_force(hf_pipo, tmp_path):
    dst = convert(str(hf_pipo[1]), str(tmp_path / "out"), dtype="bfloat16")
    model, _ = load(str(dst))
    assert model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    assert model.model.layers[0].linear_attn.A_log.dtype == mx.float32  # kept precise as in mlx-lm
    convert(str(hf_pipo[1]), str(dst), dtype="float16", force=True)
    model, _ = load(str(dst))
    assert model.compressor.mlp[0].weight.dtype == mx.float16
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# -- bad input: one line naming the file, exit code 2, nothing left behind


def _run_convert(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "convert.py"), *args], capture_output=True, text=True, env=env, cwd=ROOT)


def _corrupt(case: str, src: Path, tmp_path: Path) -> list:
    """Make `src` bad in the way `case` names; returns the extra CLI arguments."""
    config = json.loads((src / "config.json").read_text())
    if case == "missing folder":
        shutil.rmtree(src)
    elif case == "missing config":
        (src / "config.json").unlink()
    elif case == "unreadable config":
        (src / "config.json").write_text('{"model_type": "qwen3_5_text",')
    elif case == "shapes disagree":
        config["intermediate_size"] = 128
        (src / "config.json").write_text(json.dumps(config))
    elif case == "unknown compressor":
        config["compressor_type"] = "conv"
        (src / "config.json").write_text(json.dumps(config))
    elif case == "truncated safetensors":
        f = src / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif case == "adapter for another base":
        other = tiny_config(intermediate_size=80)
        _peft_adapter(RefPIPO(other, seed=50), RefPIPO(other, seed=51), tmp_path / "adapter")
        return ["--adapter-path", str(tmp_path / "adapter")]
    elif case == "output exists":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    return []


BAD_INPUTS = {
    "missing folder": "does not exist",
    "missing config": "config.json not found",
    "unreadable config": "config.json is unreadable",
    "shapes disagree": "config.json implies",
    "unknown compressor": "unknown compressor type 'conv'",
    "truncated safetensors": "model.safetensors is not a readable safetensors file",
    "adapter for another base": "trained for another base model",
    "output exists": "already exists; choose another --mlx-path or pass --force",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case, hf_pipo, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_pipo[1], src)
    extra = _corrupt(case, src, tmp_path)
    result = _run_convert("--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert BAD_INPUTS[case] in lines[0]
    assert "Traceback" not in result.stderr
    if case == "output exists":
        assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    else:
        assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_unknown_compressor_option_and_conflict(hf_pipo, tmp_path):
    result = _run_convert("--hf-path", str(hf_pipo[1]), "--mlx-path", str(tmp_path / "o"), "--compressor-type", "conv")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    with pytest.raises(PipoError, match="holds a 'mlp' compressor"):
        convert(str(hf_pipo[1]), str(tmp_path / "o"), compressor_type="linear")
    assert not (tmp_path / "o").exists()


def test_load_refuses_plain_folder(hf_pipo):
    with pytest.raises(PipoError, match="not a PIPO conversion"):
        load(str(hf_pipo[1]))


def test_hub_repo_with_subfolder_downloads_only_that_folder(hf_pipo, tmp_path, monkeypatch):
    """`owner/name/sub/dir` fetches only sub/dir's needed files, then converts from there."""
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    shutil.copytree(hf_pipo[1], snapshot / "outputs" / "run" / "checkpoint-1")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    dst = convert("someone/PIPO/outputs/run/checkpoint-1", str(tmp_path / "mlx"), dtype="float32")
    assert calls[0][0] == "someone/PIPO"
    assert "outputs/run/checkpoint-1/*.safetensors" in calls[0][1]
    assert all(p.startswith("outputs/run/checkpoint-1/") for p in calls[0][1])
    _assert_parity(hf_pipo[0], dst, random_ids(1, 6, seed=60))


def test_unreachable_hub_repo_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipoError, match="neither a local folder nor a downloadable Hugging Face repo"):
        convert("nobody/no-such-model", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _without_tokenizer_pad(folder: Path, rename: bool) -> None:
    """Drop the tokenizer config's pad token; with `rename`, also rename the
    token Qwen3.5 uses as PAD, so the vocabulary no longer has it."""
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    if rename:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            f = folder / name
            f.write_text(f.read_text().replace("<|endoftext|>", "<|not-a-pad|>"))


def test_the_pad_id_comes_from_the_checkpoint_or_tokenizer(hf_pipo, tmp_path):
    from mlx_lm.utils import load_tokenizer

    src = tmp_path / "src"
    shutil.copytree(hf_pipo[1], src)
    pad_id = load_tokenizer(src).pad_token_id
    assert json.loads((src / "config.json").read_text()).get("pad_token_id") is None

    # The tokenizer names no pad token: Qwen3.5's PAD is found by its text.
    _without_tokenizer_pad(src, rename=False)
    model, _ = load(str(convert(str(src), str(tmp_path / "a"))))
    assert model.args.pad_token_id == pad_id

    # A config that names one wins over the tokenizer.
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "pad_token_id": 7}))
    model, _ = load(str(convert(str(src), str(tmp_path / "b"))))
    assert model.args.pad_token_id == 7

    # Neither names one, and the vocabulary lacks Qwen3.5's: refused, never a constant.
    (src / "config.json").write_text(json.dumps(config))
    _without_tokenizer_pad(src, rename=True)
    with pytest.raises(PipoError, match="neither config.json nor the tokenizer defines a pad token"):
        convert(str(src), str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()

    # A converted folder whose config lost the id gets it from its tokenizer on load.
    dst = tmp_path / "a"
    config = json.loads((dst / "config.json").read_text())
    del config["pipo"]["pad_token_id"]
    (dst / "config.json").write_text(json.dumps(config))
    model, _ = load(str(dst))
    assert model.args.pad_token_id == pad_id

    # A model built by hand without one says so when it is needed.
    model.args.pad_token_id = None
    from pipo_mlx import generate

    with pytest.raises(PipoError, match="no PAD token id"):
        generate(model, load_tokenizer(dst), "hi", max_tokens=2)
