"""The distillation stage end to end: it learns, resumes exactly, takes a teacher's
rollouts for supervised data (with the teacher's distributions as soft targets,
too), and refuses bad input in one line."""

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from hf_reference import RefPIPO, hf_config_dict, tiny_config, write_checkpoint
from pipo_mlx import stages
from pipo_mlx import trainer as T
from test_train import adapters, config, cyclic_records, write_data
from test_train_cli import refused, run

OPD = dict(stage="opd", kl="full", max_new_tokens=12, batch_size=4, learning_rate=3e-3)


def plain_teacher(folder: Path, seed: int) -> Path:
    """A tiny ordinary Qwen3.5 causal LM that mlx-lm loads, sharing the test tokenizer."""
    config = tiny_config()
    weights = {
        k: v
        for k, v in RefPIPO(config, "mlp", seed=seed).hf_state_dict().items()
        if not k.startswith(("compressor.", "confidence_head.", "mtp."))
    }
    # mlx-lm builds Qwen3.5 from "qwen3_5" and the interval, not from layer_types.
    hf = {**hf_config_dict(config), "model_type": "qwen3_5", "full_attention_interval": 2}
    return write_checkpoint(folder, weights, hf)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return plain_teacher(tmp_path_factory.mktemp("teacher") / "base", seed=7)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prompts")
    return write_data(folder, cyclic_records(32, 0, "pc"), cyclic_records(8, 1, "pc"))


def val_figures(stdout: str) -> list:
    """(step, KL of token1, KL of token2, mean α) from each [val] line."""
    pattern = r"\[val\] step (\d+): .*kl tok1 ([\d.]+), kl tok2 ([\d.]+).*\| α ([\d.]+)"
    return [tuple(map(float, m)) for m in re.findall(pattern, stdout)]


def test_distillation_raises_agreement_with_the_teacher(mlx_pipo, teacher, prompts, tmp_path, capsys):
    cfg = config(
        mlx_pipo, prompts, tmp_path / "run", teacher=str(teacher), iters=12, val_every=12,
        val_batches=2, **OPD,
    )
    T.train(cfg)
    figures = val_figures(capsys.readouterr().out)
    assert [f[0] for f in figures] == [0, 12]
    (_, kl1_0, kl2_0, alpha_0), (_, kl1, kl2, alpha) = figures
    # Held-out prompts, fresh rollouts: both KLs fall and the acceptance rises.
    assert kl1 < 0.85 * kl1_0 and kl2 < 0.85 * kl2_0, figures
    assert alpha > alpha_0 + 0.03, figures


@pytest.mark.parametrize("kl", ["topk", "sampled"])
def test_other_kl_modes_train(kl, mlx_pipo, teacher, prompts, tmp_path):
    T.train(config(mlx_pipo, prompts, tmp_path / kl, teacher=str(teacher), iters=3, **{**OPD, "kl": kl}))
    assert adapters(tmp_path / kl)[1] == 3


SOFT = dict(soft_targets=True, kl="full", max_new_tokens=12, batch_size=4, learning_rate=3e-3)


def test_soft_targets_raise_agreement_with_the_teacher(mlx_pipo, teacher, prompts, tmp_path, capsys):
    cfg = config(
        mlx_pipo, prompts, tmp_path / "run", teacher=str(teacher), iters=12, val_every=12,
        val_batches=2, **SOFT,
    )
    T.train(cfg)
    out = capsys.readouterr().out
    figures = val_figures(out)
    assert [f[0] for f in figures] == [0, 12]
    (_, kl1_0, kl2_0, alpha_0), (_, kl1, kl2, alpha) = figures
    # The teacher's held-out answers, teacher-forced: both KLs fall and the overlap rises.
    assert kl1 < 0.85 * kl1_0 and kl2 < 0.85 * kl2_0, figures
    assert alpha > alpha_0 + 0.03, figures
    assert "rollouts keep" not in out  # no student rollouts in this stage


@pytest.mark.parametrize("stage,kw", [("opd", OPD), ("soft", SOFT)])
def test_distillation_resumes_exactly(stage, kw, mlx_pipo, teacher, prompts, tmp_path, monkeypatch):
    import os
    import signal

    kw = dict(teacher=str(teacher), iters=5, save_every=3, **kw)
    T.train(config(mlx_pipo, prompts, tmp_path / "whole", **kw))

    cls = stages.DistillationStage if stage == "opd" else stages.SoftTargetStage
    real = cls.batch

    def batch(self, k):
        if k == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, k)

    monkeypatch.setattr(cls, "batch", batch)
    with pytest.raises(KeyboardInterrupt):
        T.train(config(mlx_pipo, prompts, tmp_path / "split", **kw))
    assert adapters(tmp_path / "split")[1] == 4
    monkeypatch.setattr(cls, "batch", real)
    T.train(config(mlx_pipo, prompts, tmp_path / "split", resume=True, **kw))
    whole, step = adapters(tmp_path / "whole")
    split, step2 = adapters(tmp_path / "split")
    assert step == step2 == 5
    for key in whole:
        assert mx.array_equal(whole[key], split[key]), key


def test_supervised_stage_learns_the_teachers_answers(mlx_pipo, teacher, prompts, tmp_path, capsys):
    out = tmp_path / "sft"
    T.train(config(mlx_pipo, prompts, out, teacher=str(teacher), iters=3, max_new_tokens=8))
    records = [json.loads(line) for line in (out / "rollouts" / "train.jsonl").read_text().splitlines()]
    given = [json.loads(line) for line in (prompts / "train.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [g["prompt"] for g in given]
    assert [r["completion"] for r in records] != [g["completion"] for g in given]
    assert (out / "rollouts" / "valid.jsonl").is_file() and adapters(out)[1] == 3


def test_bad_input(mlx_pipo, teacher, prompts, tmp_path, monkeypatch, capsys):
    from test_train_cli import cli_args

    def attempt(out, **kw):
        result = run(monkeypatch, capsys, *cli_args(mlx_pipo, prompts, out, **kw))
        assert not out.exists(), "nothing may be written"
        return result

    out = tmp_path / "o"
    refused(attempt(out, stage="opd"), "--stage opd distills toward a teacher", "--teacher")
    refused(attempt(out, soft_targets=True), "--soft-targets is for --stage sft with a --teacher")
    refused(
        attempt(out, soft_targets=True, stage="opd", teacher=str(teacher)),
        "--soft-targets is for --stage sft",
    )
    refused(
        attempt(out, soft_targets=True, teacher=str(teacher), kl="sampled"),
        "--kl full or topk",
    )
    refused(attempt(out, stage="opd", teacher=str(tmp_path / "none")), "teacher folder", "not found")
    refused(
        attempt(out, stage="opd", teacher=str(mlx_pipo)), "is a PIPO model", "ordinary causal LM"
    )

    other = tmp_path / "other-vocab"
    shutil.copytree(teacher, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    last = max(vocab, key=vocab.get)
    vocab["zz-not-in-the-student"] = vocab.pop(last)  # one token differs
    (other / "tokenizer.json").write_text(json.dumps(spec))
    code, _, err = attempt(out, stage="opd", teacher=str(other))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "vocabulary" in err, err

    long_prompts = write_data(tmp_path / "long", [{"prompt": "def add " * 40, "completion": "x"}])
    result = run(
        monkeypatch, capsys,
        *cli_args(mlx_pipo, long_prompts, out, stage="opd", teacher=str(teacher), max_seq_length=32),
    )
    refused(result, "line 1", "no room for a completion", "--max-seq-length 32")
    assert not out.exists()
