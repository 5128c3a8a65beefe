"""QLoRA: LoRA over a quantized backbone with the heads trained in float; fusing
keeps the quantization (or drops it with dequantize); a checkpoint loads unfused.

References are MLX's own quantize/dequantize and quantized matmul applied to the
files on disk, and LoRA's update written out here, never the code under test.
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from pipo_mlx import convert, load
from pipo_mlx import adapters
from pipo_mlx import trainer as T
from pipo_mlx.adapters import dequantized_reads, setup_trainable
from pipo_mlx.errors import PipoError
from pipo_mlx.stages import make_stage
from pipo_mlx.train_state import find_checkpoint, fuse
from test_train import config, cyclic_records, write_data

GROUP, BITS = 32, 4
HEAD_LAYERS = ("compressor.mlp.0", "compressor.mlp.2", "mtp.fc", "confidence_head.fc1")


@pytest.fixture(scope="module")
def quantized(hf_pipo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "q4"
    return convert(str(hf_pipo[1]), str(out), quantize=True, q_group_size=GROUP, q_bits=BITS)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("qdata"), cyclic_records(16, 0), cyclic_records(4, 1))


@pytest.fixture(scope="module")
def qrun(quantized, small_data, tmp_path_factory) -> Path:
    """A short QLoRA run on the quantized model, fused at the end."""
    out = tmp_path_factory.mktemp("qrun") / "run"
    T.train(config(quantized, small_data, out, iters=3, learning_rate=1e-2, fuse=True))
    return out


def stored(folder: Path) -> dict:
    return mx.load(str(folder / "model.safetensors"))


def dequantized(weights: dict, layer: str) -> mx.array:
    return mx.dequantize(
        weights[f"{layer}.weight"], weights[f"{layer}.scales"], weights[f"{layer}.biases"],
        GROUP, BITS,
    )


def checkpoint(run: Path) -> dict:
    return mx.load(str(find_checkpoint(str(run))[1] / "adapters.safetensors"))


def test_lora_wraps_the_quantized_backbone_and_the_heads_train_in_float(quantized, tmp_path):
    model, _ = load(str(quantized))
    setup_trainable(model, config(quantized, tmp_path, tmp_path))
    gate = model.layers[0].mlp.gate_proj
    assert isinstance(gate, LoRALinear) and isinstance(gate.linear, nn.QuantizedLinear)

    files = stored(quantized)
    modules = dict(model.named_modules())
    for layer in HEAD_LAYERS:
        assert f"{layer}.scales" in files, f"{layer} was not quantized in the fixture"
        m = modules[layer]
        assert type(m) is nn.Linear and m.weight.dtype == mx.float32, layer
        assert mx.array_equal(m.weight, dequantized(files, layer)), layer
    # The MTP layer's projections carry LoRA over float (dequantized) weights.
    q = model.mtp.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and type(q.linear) is nn.Linear

    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert all(k.startswith(("compressor.", "mtp.", "confidence_head.")) or "lora_" in k
               for k in trainable)
    assert not any(k.endswith((".scales", ".biases")) for k in trainable)
    assert "mtp.fc.weight" in trainable and "compressor.mlp.0.bias" in trainable


def test_training_moves_lora_and_heads_and_never_the_quantized_weights(quantized, qrun):
    files = stored(quantized)
    trained = checkpoint(qrun)
    assert mx.abs(trained["compressor.mlp.0.weight"] - dequantized(files, "compressor.mlp.0")).max() > 1e-4
    assert mx.abs(trained["model.layers.1.mlp.down_proj.lora_b"]).max() > 0  # starts at zero

    model, _ = load(str(quantized), adapter_path=str(qrun))
    for key, value in tree_flatten(model.parameters()):
        if key.endswith((".scales", ".biases")) or value.dtype == mx.uint32:
            stored_key = key.replace(".linear.", ".")
            assert mx.array_equal(value, files[stored_key]), key


def test_cpu_training_reads_dequantized_weights_with_the_kernels_numbers(
    quantized, small_data, monkeypatch
):
    """On the CPU the training step multiplies by dequantized weights (MLX's
    quantized matmul is ~100x slower there); its loss and gradients equal those
    of the quantized kernels."""
    model, tokenizer = load(str(quantized))
    cfg = config(quantized, small_data, small_data)
    setup_trainable(model, cfg)
    stage = make_stage(cfg, model, tokenizer, None)
    loss_and_grad = nn.value_and_grad(model, stage.loss)

    def loss_and_grads():
        prepared, _ = stage.evaluate(stage.batch(0))
        value, grads = loss_and_grad(prepared)
        mx.eval(value, grads)
        return value, dict(tree_flatten(grads))

    kernel_loss, kernel_grads = loss_and_grads()

    def refuse(*args, **kwargs):
        raise AssertionError("the quantized matmul ran inside dequantized_reads")

    with dequantized_reads(model):
        # The CE chunks of this toy batch are short; every call takes the route.
        monkeypatch.setattr(adapters, "DEQUANTIZE_FROM_ROWS", 1)
        monkeypatch.setattr(mx, "quantized_matmul", refuse)
        loss, grads = loss_and_grads()
        monkeypatch.undo()
        # A decoding step's few rows keep the quantized kernel, which is faster there.
        gate, x = model.layers[0].mlp.gate_proj.linear, mx.ones((1, 3, 64))
        kernel = mx.quantized_matmul(x, gate.weight, gate.scales, gate.biases, True, GROUP, BITS)
        assert mx.array_equal(gate(x), kernel)
    assert type(model.layers[0].mlp.gate_proj.linear) is nn.QuantizedLinear  # restored
    assert mx.allclose(loss, kernel_loss, rtol=1e-5)
    assert grads.keys() == kernel_grads.keys()
    for k, g in grads.items():
        assert mx.allclose(g, kernel_grads[k], rtol=1e-3, atol=1e-5), k


def lora_reference(files: dict, trained: dict, layer: str, scale: float) -> mx.array:
    """The adapted weight of one backbone layer: dequantized base + scale * (A B)^T."""
    a, b = trained[f"{layer}.lora_a"], trained[f"{layer}.lora_b"]
    return dequantized(files, layer) + scale * (a @ b).T


def test_fuse_keeps_the_quantization(quantized, qrun):
    src_config = json.loads((quantized / "config.json").read_text())
    fused_config = json.loads((qrun / "fused" / "config.json").read_text())
    assert fused_config["quantization"] == src_config["quantization"]

    files, fused, trained = stored(quantized), stored(qrun / "fused"), checkpoint(qrun)
    assert {k: v.shape for k, v in fused.items()} == {k: v.shape for k, v in files.items()}
    assert {k: v.dtype for k, v in fused.items()} == {k: v.dtype for k, v in files.items()}

    layer = "model.layers.1.mlp.down_proj"
    expected = lora_reference(files, trained, layer, 8.0 / 4)
    w, s, b = mx.quantize(expected, GROUP, BITS)
    assert mx.allclose(dequantized(fused, layer), mx.dequantize(w, s, b, GROUP, BITS), atol=1e-6)
    # A head: its trained float weight, quantized again as it was.
    head = "confidence_head.fc1"
    w, s, b = mx.quantize(trained[f"{head}.weight"], GROUP, BITS)
    assert mx.allclose(dequantized(fused, head), mx.dequantize(w, s, b, GROUP, BITS), atol=1e-6)

    model, tokenizer = load(str(qrun / "fused"))
    modules = dict(model.named_modules())
    assert all(isinstance(modules[layer], nn.QuantizedLinear) for layer in HEAD_LAYERS)
    from pipo_mlx import generate

    assert isinstance(generate(model, tokenizer, "def add", max_tokens=6), str)


def test_fuse_can_dequantize(quantized, qrun, tmp_path):
    out = fuse(str(quantized), str(qrun), str(tmp_path / "f16"), dequantize=True)
    fused_config = json.loads((out / "config.json").read_text())
    assert "quantization" not in fused_config and "quantization_config" not in fused_config
    files, fused, trained = stored(quantized), stored(out), checkpoint(qrun)
    assert not any(k.endswith((".scales", ".biases")) for k in fused)
    assert {v.dtype for v in fused.values()} == {mx.float32}

    layer = "model.layers.1.mlp.down_proj"
    assert mx.allclose(fused[f"{layer}.weight"], lora_reference(files, trained, layer, 2.0),
                       atol=1e-6)
    assert mx.array_equal(fused["confidence_head.fc1.weight"], trained["confidence_head.fc1.weight"])
    assert mx.allclose(fused["model.embed_tokens.weight"], dequantized(files, "model.embed_tokens"))

    # The unfused model computes the same function with the quantized kernels.
    unfused, tokenizer = load(str(quantized), adapter_path=str(qrun))
    dense, _ = load(str(out))
    ids = mx.array([tokenizer.encode("def add return print for range class Point")[:8]])
    a, b = unfused(ids), dense(ids)
    for name in ("logits", "mtp_logits", "confidence"):
        assert mx.allclose(getattr(a, name), getattr(b, name), rtol=1e-3, atol=1e-3), name


def test_a_step_folder_loads_as_its_run_does(quantized, qrun):
    _, folder = find_checkpoint(str(qrun))
    a, tokenizer = load(str(quantized), adapter_path=str(qrun))
    b, _ = load(str(quantized), adapter_path=str(folder))
    ids = mx.array([tokenizer.encode("def add return print")[:4]])
    assert mx.array_equal(a(ids).logits, b(ids).logits)


def test_adapters_that_do_not_fit_are_refused(quantized, qrun, tmp_path):
    with pytest.raises(PipoError, match="holds no train_heads.py checkpoint"):
        load(str(quantized), adapter_path=str(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    for name in ("train_config.json", "checkpoint.json"):
        (other / name).write_text((qrun / name).read_text())
    settings = json.loads((other / "train_config.json").read_text())
    (other / "train_config.json").write_text(json.dumps({**settings, "lora_rank": 8}))
    _, folder = find_checkpoint(str(qrun))
    (other / folder.name).mkdir()
    (other / folder.name / "adapters.safetensors").write_bytes(
        (folder / "adapters.safetensors").read_bytes()
    )
    with pytest.raises(PipoError, match="does not fit this model"):
        load(str(quantized), adapter_path=str(other))
