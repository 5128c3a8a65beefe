"""train.py: pairing, losses against an independent computation, learning, resume, fuse.

Reference values come from the PyTorch model in hf_reference.py (RefPIPO) or
from straightforward MLX/NumPy code written here, never from train.py itself.
"""

import json
import os
import random
import signal
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map_with_path

from pipo_mlx import load, stages
from pipo_mlx import trainer as T
from pipo_mlx.adapters import grad_checkpointing, setup_trainable
from pipo_mlx.backbones.qwen3_5 import LORA_KEYS
from pipo_mlx.data import (
    IGNORE,
    Example,
    _epoch_order,
    load_data,
    load_dataset,
    pair_layout,
    train_batch,
)
from pipo_mlx.losses import chunked_cross_entropy, sft_pass, sft_terms, with_grad
from pipo_mlx.train_config import TrainConfig
from pipo_mlx.train_state import restore_checkpoint

PAD = 0
WORDS = (
    "def add return print for range class Point self import os path join quick brown fox".split()
)


def cyclic_records(n, seed, kind="text"):
    """Runs of WORDS in cyclic order from a random start: learnable, and token2
    is predictable once the phase is known."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        s, k = r.randrange(len(WORDS)), r.randint(8, 24)
        run = [WORDS[(s + i) % len(WORDS)] for i in range(k)]
        if kind == "text":
            out.append({"text": " ".join(run)})
        else:
            out.append({"prompt": " ".join(run[:3]), "completion": " ".join(run[3:])})
    return out


def write_data(folder: Path, train, valid=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("valid", valid)):
        if records is not None:
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    return write_data(
        folder, cyclic_records(160, 0) + cyclic_records(40, 2, "chat"), cyclic_records(16, 1)
    )


def config(model, data, out, **kw) -> TrainConfig:
    base = dict(
        iters=4,
        batch_size=4,
        lora_rank=4,
        lora_alpha=8.0,
        learning_rate=3e-3,
        warmup=2,
        ce_chunk_size=16,
        steps_per_report=100,
        val_every=1000,
        save_every=1000,
    )
    base.update(kw)
    return TrainConfig(str(model), str(data), str(out), **base)


def adapters(out: Path) -> dict:
    pointer = json.loads((out / "checkpoint.json").read_text())
    return mx.load(str(out / pointer["dir"] / "adapters.safetensors")), pointer["step"]


def interrupt_at(monkeypatch, micro_step: int) -> None:
    """Press Ctrl-C while micro-batch `micro_step` is being built."""
    real = stages.train_batch

    def batch(examples, k, *rest):
        if k == micro_step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(examples, k, *rest)

    monkeypatch.setattr(stages, "train_batch", batch)


# -- pairing and PAD augmentation ---------------------------------------------


def test_pairing_puts_prompt_and_completion_on_pair_boundaries():
    ex = Example(np.array([5, 6, 7, 10, 11, 12, 13, 14], np.int32), prompt_len=3)
    ids, labels = pair_layout(ex, PAD)
    # odd prompt -> PAD after it; odd completion (5 tokens) -> final PAD
    assert ids.tolist() == [5, 6, 7, PAD, 10, 11, 12, 13, 14, PAD]
    assert labels.tolist() == [IGNORE] * 4 + [10, 11, 12, 13, 14, IGNORE]

    even = Example(np.array([5, 6, 10, 11], np.int32), prompt_len=2)
    ids, labels = pair_layout(even, PAD)
    assert ids.tolist() == [5, 6, 10, 11] and labels.tolist() == [IGNORE, IGNORE, 10, 11]


def test_pad_augmentation_splits_completion_pairs_only():
    tokens = np.arange(3, 3 + 41, dtype=np.int32)  # prompt 5 tokens, completion 36
    ex = Example(tokens, prompt_len=5)
    ids, labels = pair_layout(ex, PAD, 1.0, np.random.default_rng(0))
    prompt = [3, 4, 5, 6, 7, PAD]
    assert ids[:6].tolist() == prompt  # the prompt is never split
    completion = ids[6:].reshape(-1, 2)
    # every full pair (a, b) became (a, PAD), (b, PAD): PAD only second in a pair
    assert (completion[:, 1] == PAD).all() and (completion[:, 0] != PAD).all()
    assert completion[:, 0].tolist() == tokens[5:].tolist()
    assert (ids[0::2] != PAD).all()
    assert ((labels == IGNORE) == ((ids == PAD) | (np.arange(len(ids)) < 6))).all()
    assert (labels[labels != IGNORE] == ids[labels != IGNORE]).all()

    # a fraction r of the pairs, measured over many pairs
    long = Example(np.arange(3, 3 + 4000, dtype=np.int32) % 300 + 3, prompt_len=0)
    ids, _ = pair_layout(long, PAD, 0.3, np.random.default_rng(1))
    split = (len(ids) - 4000) / 2
    assert abs(split / 2000 - 0.3) < 0.04


def test_batches_are_a_function_of_seed_and_step(data, mlx_pipo):
    _, tok = load(str(mlx_pipo))
    cfg = config(mlx_pipo, data, "unused", max_pad_ratio=0.5)
    examples, _ = load_data(str(data), tok, PAD, cfg)
    a, b = train_batch(examples, 7, cfg, PAD), train_batch(examples, 7, cfg, PAD)
    assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(a[:2], b[:2]))
    c = train_batch(examples, 8, cfg, PAD)
    assert not np.array_equal(np.array(a[0])[:, :8], np.array(c[0])[:, :8])
    # one epoch of micro-batches visits every example once
    n = len(examples) // cfg.batch_size
    seen = []
    for k in range(n):
        for p in range(k * cfg.batch_size, (k + 1) * cfg.batch_size):
            seen.append(
                int(_epoch_order(cfg.seed, p // len(examples), len(examples))[p % len(examples)])
            )
    assert sorted(seen) == list(range(n * cfg.batch_size))
    # within a row, PAD is only ever a pair's second token and its label is ignored
    ids, labels, _ = train_batch(examples, 3, cfg, PAD)
    ids, labels = np.array(ids), np.array(labels)
    for row, lab in zip(ids, labels):
        real = row[: np.flatnonzero(row != PAD).max() + 1]
        assert (real[0::2] != PAD).all()
        assert (lab[row == PAD] == IGNORE).all()


def test_record_formats_and_completion_only_labels(tmp_path, mlx_pipo):
    _, tok = load(str(mlx_pipo))
    path = tmp_path / "train.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"text": "def add(a, b):"},
                {"prompt": "def add", "completion": "return a + b"},
                {
                    "messages": [
                        {"role": "user", "content": "def add"},
                        {"role": "assistant", "content": "return a + b"},
                    ]
                },
            ]
        )
        + "\n\n"
    )
    text, pc, chat = load_dataset(path, tok, PAD, 256, "refuse")
    assert text.prompt_len == 0 and text.tokens[-1] == tok.eos_token_id
    assert tok.decode(text.tokens[:-1].tolist()) == "def add(a, b):"
    for ex in (pc, chat):
        assert (
            tok.decode(ex.tokens[: ex.prompt_len].tolist())
            == "<|im_start|>user\ndef add<|im_end|>\n<|im_start|>assistant\n"
        )
        assert tok.decode(ex.tokens[ex.prompt_len :].tolist()) == "return a + b<|im_end|>\n"
    ids, labels = pair_layout(pc, PAD)
    start = pc.prompt_len + pc.prompt_len % 2
    assert (labels[:start] == IGNORE).all() and start % 2 == 0
    assert (labels[start:][ids[start:] != PAD] == ids[start:][ids[start:] != PAD]).all()


# -- losses ---------------------------------------------------------------------


def _batch(tok):
    rng = np.random.default_rng(3)
    rows = [
        pair_layout(
            Example(np.array(tok.encode("def add(a, b):\n    return a + b\n"), np.int32), 5),
            PAD,
            0.5,
            rng,
        ),
        pair_layout(
            Example(np.array(tok.encode("for i in range(10):\n    print(i)"), np.int32), 0),
            PAD,
            0.5,
            rng,
        ),
    ]
    T_ = max(len(i) for i, _ in rows)
    ids = np.full((2, T_), PAD, np.int32)
    labels = np.full((2, T_), IGNORE, np.int32)
    for r, (i, l) in enumerate(rows):
        ids[r, : len(i)], labels[r, : len(l)] = i, l
    assert (ids == PAD).sum() > 4  # the batch exercises PADs and padding
    return ids, labels


def _log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_losses_equal_an_independent_computation(hf_pipo, mlx_pipo):
    ref, _ = hf_pipo
    model, tok = load(str(mlx_pipo))
    ids, labels = _batch(tok)
    out = ref(torch.tensor(ids, dtype=torch.long))

    def ce(logits, targets):
        valid = targets != IGNORE
        lp = _log_softmax(logits)[valid]
        return -lp[np.arange(len(lp)), targets[valid]]

    l1, l2 = labels[:, 2::2], labels[:, 3::2]
    want_lm = ce(out["logits"][:, :-1], l1).mean()
    ce2 = ce(out["mtp_logits"], l2)
    want_mtp = ce2.mean()
    target = np.exp(-ce2)  # the MTP's probability of the true token2
    z = out["confidence"][l2 != IGNORE].astype(np.float64)
    want_conf = (np.logaddexp(0, z) - target * z).mean()

    prepared, stats = sft_pass(model, mx.array(ids), mx.array(labels), chunk_size=3)
    terms = sft_terms(model, mx.array(ids), prepared)
    assert stats["n1"] == (l1 != IGNORE).sum() and stats["n2"] == (l2 != IGNORE).sum()
    assert terms["lm"].item() == pytest.approx(want_lm, rel=1e-4)
    assert terms["mtp"].item() == pytest.approx(want_mtp, rel=1e-4)
    assert terms["conf"].item() == pytest.approx(want_conf, rel=1e-4)
    assert stats["target"] / stats["n2"] == pytest.approx(target.mean(), rel=1e-4, abs=1e-7)
    p = 1 / (1 + np.exp(-z))
    assert stats["pred"] / stats["n2"] == pytest.approx(p.mean(), rel=1e-4)
    assert stats["keep0.5"] == (p >= 0.5).sum()


def _naive_loss(model, ids, labels):
    """The spec's loss with whole logits and plain autodiff."""
    h = model.hidden(ids)[:, :-1]
    m = model.draft(ids[:, 2::2], h)

    def ce(x, t):
        valid = t != IGNORE
        c = nn.losses.cross_entropy(model.lm_logits(x), mx.where(valid, t, 0), reduction="none")
        return (c * valid).sum() / valid.sum(), c

    lm, _ = ce(h, labels[:, 2::2])
    mtp, c2 = ce(m, labels[:, 3::2])
    z = model.confidence(mx.stop_gradient(h), mx.stop_gradient(m))
    t = mx.stop_gradient(mx.exp(-c2))
    valid = labels[:, 3::2] != IGNORE
    conf = (nn.losses.binary_cross_entropy(z, t, reduction="none") * valid).sum() / valid.sum()
    return lm + 0.5 * mtp + 2.0 * conf


def test_chunked_gradients_equal_whole_logits_gradients(mlx_pipo, tmp_path):
    model, tok = load(str(mlx_pipo))
    setup_trainable(model, config(mlx_pipo, tmp_path, tmp_path))
    # make LoRA B non-zero so every adapter has a gradient path
    model.update(
        tree_map_with_path(
            lambda k, v: v + 0.05 if k.endswith("lora_b") else v, model.trainable_parameters()
        )
    )
    ids, labels = map(mx.array, _batch(tok))

    # As the trainer does: the evaluation pass outside autodiff, then the terms.
    prepared, _ = sft_pass(model, ids, labels, chunk_size=5)

    def chunked(ids, labels):
        t = sft_terms(model, ids, prepared)
        return t["lm"] + 0.5 * t["mtp"] + 2.0 * t["conf"]

    v1, g1 = nn.value_and_grad(model, chunked)(ids, labels)
    v2, g2 = nn.value_and_grad(model, lambda i, l: _naive_loss(model, i, l))(ids, labels)
    assert v1.item() == pytest.approx(v2.item(), rel=1e-5)
    g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert g1.keys() == g2.keys()
    for k in g1:
        scale = float(mx.abs(g2[k]).max()) + 1e-6
        assert float(mx.abs(g1[k] - g2[k]).max()) <= 1e-4 * scale + 1e-7, k


def test_grad_checkpoint_gives_the_same_gradients(mlx_pipo, tmp_path):
    model, tok = load(str(mlx_pipo))
    setup_trainable(model, config(mlx_pipo, tmp_path, tmp_path))
    ids, labels = map(mx.array, _batch(tok))
    model.train()
    prepared, _ = sft_pass(model, ids, labels, 8)
    fn = nn.value_and_grad(model, lambda i, l: sum(sft_terms(model, i, prepared).values()))
    v1, g1 = fn(ids, labels)
    original = type(model.layers[0]).__call__
    with grad_checkpointing(model, True):
        assert type(model.layers[0]).__call__ is not original
        v2, g2 = fn(ids, labels)
    assert type(model.layers[0]).__call__ is original
    assert v1.item() == pytest.approx(v2.item(), rel=1e-6)
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        assert mx.allclose(a, b, rtol=1e-4, atol=1e-6), k


def test_cross_entropy_never_holds_the_whole_logits():
    V, H, N, chunk = 16384, 64, 2048, 64
    mx.random.seed(0)
    W = mx.random.normal((V, H)) * 0.05
    P = mx.random.normal((H, H)) * 0.1
    x0 = mx.random.normal((N, H))
    t = mx.random.randint(0, V, (N,))
    mx.eval(W, P, x0, t)

    def loss(P):
        x = x0 @ P
        mean, grad, *_ = chunked_cross_entropy(lambda a: a @ W.T, x, t, chunk)
        return with_grad(mean, x, grad)

    mx.reset_peak_memory()
    base = mx.get_active_memory()
    value, g = mx.value_and_grad(loss)(P)
    mx.eval(value, g)
    peak = mx.get_peak_memory() - base
    whole = N * V * 4
    assert peak < whole / 3, f"peak {peak / 1e6:.0f} MB vs whole logits {whole / 1e6:.0f} MB"
    # and it is still the cross-entropy and its gradient
    want, want_g = mx.value_and_grad(
        lambda P: nn.losses.cross_entropy((x0 @ P) @ W.T, t, reduction="mean")
    )(P)
    assert value.item() == pytest.approx(want.item(), rel=1e-5)
    assert mx.allclose(g, want_g, rtol=1e-3, atol=1e-6)


# -- what trains ----------------------------------------------------------------


def _grads_by_term(model, ids, labels):
    out = {}
    prepared, _ = sft_pass(model, ids, labels, 8)
    for term in ("lm", "mtp", "conf"):
        _, g = nn.value_and_grad(model, lambda i, l: sft_terms(model, i, prepared)[term])(
            ids, labels
        )
        out[term] = {k: float(mx.abs(v).max()) for k, v in tree_flatten(g)}
    return out


def test_gradients_reach_exactly_the_trainable_set(mlx_pipo, tmp_path):
    model, tok = load(str(mlx_pipo))
    setup_trainable(model, config(mlx_pipo, tmp_path, tmp_path))
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert {k.split(".")[0] for k in trainable} == {"model", "compressor", "mtp", "confidence_head"}
    assert not any("embed_tokens" in k or "lm_head" in k for k in trainable)
    backbone = {k for k in trainable if k.startswith("model.")}
    assert backbone and all(k.endswith(("lora_a", "lora_b")) for k in backbone)
    # LoRA exactly on the published target names: MLPs everywhere, q/k/v/o where they exist
    wrapped = {k.rsplit(".", 1)[0].split(".", 3)[-1] for k in backbone}
    assert wrapped == set(LORA_KEYS)
    assert not any("linear_attn" in k for k in trainable)
    mtp_layer = {k for k in trainable if k.startswith("mtp.layers.0.")}
    assert all(k.endswith(("lora_a", "lora_b")) or "norm" in k for k in mtp_layer)

    ids, labels = map(mx.array, _batch(tok))
    g = _grads_by_term(model, ids, labels)
    assert set(g["lm"]) == trainable
    # the confidence loss reaches only its head (stop-gradient inputs and target) ...
    assert {k for k, v in g["conf"].items() if v > 0} == {
        k for k in trainable if k.startswith("confidence_head.")
    }
    # ... and the cross-entropies never reach it
    assert all(v == 0 for k, v in g["lm"].items() if k.startswith(("confidence_head.", "mtp.")))
    assert all(v == 0 for k, v in g["mtp"].items() if k.startswith("confidence_head."))
    assert any(v > 0 for k, v in g["lm"].items() if k.startswith("compressor."))
    assert any(v > 0 for k, v in g["lm"].items() if k.endswith("lora_b"))
    assert all(
        v > 0 for k, v in g["mtp"].items() if k.startswith("mtp.") and not k.endswith("lora_a")
    )


def test_training_changes_trainable_weights_only(mlx_pipo, data, tmp_path):
    base = dict(tree_flatten(load(str(mlx_pipo))[0].parameters()))
    for lora in (True, False):
        out = tmp_path / f"run-{lora}"
        model = T.train(config(mlx_pipo, data, out, iters=3, lora=lora))
        trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
        after = dict(tree_flatten(model.parameters()))
        for k, v in after.items():
            if k.endswith(("lora_a", "lora_b")):
                assert k in trainable and (k.endswith("lora_a") or float(mx.abs(v).max()) > 0), k
            elif k in trainable:
                assert not mx.array_equal(v, base[k]), f"{k} did not train"
            else:  # a LoRA layer keeps its frozen base weight under `.linear`
                assert mx.array_equal(v, base[k.replace(".linear.", ".")]), f"frozen {k} changed"
        if not lora:
            assert not any(k.startswith("model.") for k in trainable)
            assert "mtp.layers.0.self_attn.q_proj.weight" in trainable


# -- learning ---------------------------------------------------------------------


def _measure(model, tok, records):
    """Losses and token2 accuracy from the model's own forward pass (PipoOutput)."""
    sums = dict(lm=0.0, mtp=0.0, conf=0.0, excess=0.0, hit2=0.0, n1=0, n2=0)
    for r in records:
        ids, labels = pair_layout(
            Example(np.array(tok.encode(r["text"]) + [tok.eos_token_id], np.int32), 0), PAD
        )
        out = model(mx.array(ids)[None])
        l1, l2 = labels[2::2], labels[3::2]
        v1, v2 = l1 != IGNORE, l2 != IGNORE
        lp1 = _log_softmax(np.array(out.logits[0, :-1]))[v1]
        lp2 = _log_softmax(np.array(out.mtp_logits[0]))[v2]
        ce2 = -lp2[np.arange(v2.sum()), l2[v2]]
        t = np.exp(-ce2)
        z = np.array(out.confidence[0])[v2].astype(np.float64)
        bce = np.logaddexp(0, z) - t * z
        entropy = -(t * np.log(t + 1e-12) + (1 - t) * np.log(1 - t + 1e-12))
        sums["lm"] += -lp1[np.arange(v1.sum()), l1[v1]].sum()
        sums["mtp"] += ce2.sum()
        sums["conf"] += bce.sum()
        sums["excess"] += (bce - entropy).sum()  # BCE above its floor for this target
        sums["hit2"] += (lp2.argmax(-1) == l2[v2]).sum()
        sums["n1"] += v1.sum()
        sums["n2"] += v2.sum()
    n1, n2 = sums.pop("n1"), sums.pop("n2")
    return {k: v / (n1 if k == "lm" else n2) for k, v in sums.items()}


def test_a_short_run_learns_the_corpus(mlx_pipo, data, tmp_path):
    model, tok = load(str(mlx_pipo))
    held_out = cyclic_records(24, 7)
    before = _measure(model, tok, held_out)
    trained = T.train(
        config(
            mlx_pipo,
            data,
            tmp_path / "run",
            iters=50,
            batch_size=8,
            lora_rank=8,
            lora_alpha=16.0,
            warmup=5,
            val_every=50,
            ce_chunk_size=64,
        )
    )
    trained.eval()
    after = _measure(trained, tok, held_out)
    assert after["lm"] < 0.6 * before["lm"]
    assert after["mtp"] < 0.6 * before["mtp"]
    assert after["conf"] < before["conf"]
    assert after["excess"] < 0.5 * before["excess"]
    assert after["hit2"] > before["hit2"] + 0.5


# -- checkpoints, resume, fuse ----------------------------------------------------


def test_interrupt_and_resume_equals_an_uninterrupted_run(
    mlx_pipo, data, tmp_path, monkeypatch, capsys
):
    kw = dict(iters=6, grad_accumulation=2, save_every=4, max_pad_ratio=0.5)
    T.train(config(mlx_pipo, data, tmp_path / "whole", **kw))
    whole, step = adapters(tmp_path / "whole")
    assert step == 6

    interrupt_at(monkeypatch, micro_step=5)  # during step 3 (micro-steps 4 and 5)
    with pytest.raises(KeyboardInterrupt):
        T.train(config(mlx_pipo, data, tmp_path / "split", **kw))
    assert "continue with --resume" in capsys.readouterr().err
    _, step = adapters(tmp_path / "split")
    assert step == 3
    monkeypatch.undo()
    T.train(config(mlx_pipo, data, tmp_path / "split", resume=True, **kw))
    split, step = adapters(tmp_path / "split")
    assert step == 6 and whole.keys() == split.keys()
    for k in whole:
        assert mx.array_equal(whole[k], split[k]), k


def test_a_crash_while_saving_keeps_the_previous_checkpoint(mlx_pipo, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = mx.save_safetensors
    calls = []

    def flaky(path, arrays):
        calls.append(path)
        if len(calls) == 4:  # the second checkpoint's optimizer file
            raise OSError("disk full")
        real(path, arrays)

    monkeypatch.setattr(T.mx, "save_safetensors", flaky)
    with pytest.raises(OSError):
        T.train(config(mlx_pipo, data, out, iters=6, save_every=2))
    monkeypatch.undo()
    saved, step = adapters(out)
    assert step == 2 and sorted(p.name for p in out.glob("step-*")) == ["step-0000002"]
    model, _ = load(str(mlx_pipo))
    setup_trainable(model, config(mlx_pipo, data, out))
    assert restore_checkpoint(out, model, T.make_optimizer(config(mlx_pipo, data, out))) == 2


def test_fuse_writes_a_model_that_loads_and_generates(mlx_pipo, data, tmp_path):
    out = tmp_path / "run"
    T.train(config(mlx_pipo, data, out, iters=3, learning_rate=1e-2, fuse=True))
    fused, tok = load(str(out / "fused"))
    config_json = json.loads((out / "fused" / "config.json").read_text())
    assert config_json["pipo"] == json.loads((mlx_pipo / "config.json").read_text())["pipo"]

    # the unfused path: base model + LoRA + the checkpoint's weights
    unfused, _ = load(str(mlx_pipo))
    setup_trainable(unfused, config(mlx_pipo, data, out))
    restore_checkpoint(out, unfused, T.make_optimizer(config(mlx_pipo, data, out)))
    unfused.eval()
    base, _ = load(str(mlx_pipo))
    ids = mx.array(_batch(tok)[0])
    a, b, c = fused(ids), unfused(ids), base(ids)
    for name in ("logits", "mtp_logits", "confidence"):
        assert mx.allclose(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-4), name
        assert not mx.allclose(
            getattr(a, name), getattr(c, name), atol=1e-3
        ), f"{name}: nothing trained"

    from pipo_mlx import generate

    text = generate(fused, tok, "def add", max_tokens=8)
    assert isinstance(text, str)


def test_bfloat16_models_train_float32_heads_and_fuse_back(hf_pipo, tmp_path):
    from pipo_mlx import convert

    src = convert(str(hf_pipo[1]), str(tmp_path / "bf16"), dtype="bfloat16")
    data = write_data(
        tmp_path / "data", cyclic_records(8, 0)
    )  # no valid.jsonl: bf16 is slow on CPU
    T.train(config(src, data, tmp_path / "run", iters=2, warmup=1, batch_size=2, fuse=True))
    fused, _ = load(str(tmp_path / "run" / "fused"))
    assert {v.dtype for _, v in tree_flatten(fused.compressor.parameters())} == {mx.bfloat16}
    assert fused.model.layers[0].mlp.gate_proj.weight.dtype == mx.bfloat16
    saved, _ = adapters(tmp_path / "run")
    assert {v.dtype for v in saved.values()} == {mx.float32}
