"""train_heads.py: every bad input is one line and exit status 2; a killed run resumes."""

import json
import runpy
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from pipo_mlx import load
from pipo_mlx import trainer as T
from pipo_mlx.adapters import setup_trainable
from pipo_mlx.train_state import restore_checkpoint
from test_train import adapters, config, cyclic_records, interrupt_at, write_data

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(
    iters=2,
    batch_size=2,
    lora_rank=4,
    lora_alpha=8.0,
    warmup=1,
    ce_chunk_size=16,
    val_every=1000,
    save_every=1000,
)


def cli_args(model, data, out, **kw):
    args = ["--model", str(model), "--data", str(data), "--adapter-path", str(out)]
    for k, v in {**SMALL, **kw}.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            args.append(flag)
        elif v is not False:
            args += [flag, str(v)]
    return args


def run(monkeypatch, capsys, *args):
    """Run the CLI in this process; returns (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train_heads.py", *args])
    code = 0
    try:
        runpy.run_path(str(ROOT / "train_heads.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(result, *fragments):
    code, _, err = result
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err
    return err


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "data", cyclic_records(12, 0))


def test_missing_data(mlx_pipo, tmp_path, monkeypatch, capsys):
    refused(
        run(monkeypatch, capsys, *cli_args(mlx_pipo, tmp_path / "nowhere", tmp_path / "o")),
        "nowhere",
        "not found",
        "train.jsonl",
    )
    only_valid = write_data(tmp_path / "d", None, cyclic_records(4, 0))
    refused(
        run(monkeypatch, capsys, *cli_args(mlx_pipo, only_valid, tmp_path / "o")),
        str(only_valid / "train.jsonl"),
        "not found",
    )
    assert not (tmp_path / "o").exists()  # nothing written before the input checks out


def test_malformed_json_names_file_and_line(mlx_pipo, tmp_path, monkeypatch, capsys):
    d = write_data(tmp_path / "d", cyclic_records(3, 0))
    with open(d / "train.jsonl", "a") as f:
        f.write('{"text": "def add",}\n')
    refused(
        run(monkeypatch, capsys, *cli_args(mlx_pipo, d, tmp_path / "o")),
        f"{d / 'train.jsonl'} line 4",
        "not valid JSON",
        "fix or remove",
    )


@pytest.mark.parametrize(
    "record, fragment",
    [
        ({"text": "   "}, "no text to train on"),
        ({"prompt": "def add", "completion": ""}, "no text to train on"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
            "no text to train on",
        ),
        ({"text": "a"}, "too short"),
        ({"txt": "def add"}, "none of the fields"),
        ({"prompt": "def add", "completion": 3}, "must both be strings"),
        (["def add"], "must be a JSON object"),
    ],
)
def test_records_without_usable_text(record, fragment, mlx_pipo, tmp_path, monkeypatch, capsys):
    d = write_data(tmp_path / "d", cyclic_records(2, 0) + [record])
    refused(
        run(monkeypatch, capsys, *cli_args(mlx_pipo, d, tmp_path / "o")),
        f"{d / 'train.jsonl'} line 3",
        fragment,
    )


def test_too_long_records_are_refused_or_truncated_as_asked(
    mlx_pipo, tmp_path, monkeypatch, capsys
):
    long = {"text": " ".join(["def add"] * 100)}
    d = write_data(tmp_path / "d", cyclic_records(4, 0) + [long])
    refused(
        run(
            monkeypatch,
            capsys,
            *cli_args(mlx_pipo, d, tmp_path / "o", max_seq_length=160, too_long="refuse"),
        ),
        f"{d / 'train.jsonl'} line 5",
        "more than --max-seq-length 160",
        "--too-long truncate",
    )
    code, out, err = run(
        monkeypatch, capsys, *cli_args(mlx_pipo, d, tmp_path / "o", max_seq_length=160)
    )
    assert code == 0, err
    assert "1 record(s) longer than --max-seq-length 160 truncated" in err


def test_a_model_that_is_not_a_pipo_conversion(hf_pipo, data, tmp_path, monkeypatch, capsys):
    refused(
        run(monkeypatch, capsys, *cli_args(hf_pipo[1], data, tmp_path / "o")),
        str(hf_pipo[1]),
        "not a PIPO conversion",
        "convert.py",
    )
    refused(
        run(monkeypatch, capsys, *cli_args(tmp_path / "missing", data, tmp_path / "o")),
        "does not exist",
    )


def test_a_quantized_model_trains_and_fuses_quantized_or_not(
    hf_pipo, data, tmp_path, monkeypatch, capsys
):
    from pipo_mlx import convert

    q = convert(str(hf_pipo[1]), str(tmp_path / "q"), quantize=True, q_group_size=32)
    quantization = json.loads((q / "config.json").read_text())["quantization"]
    for out, extra, expected in (
        (tmp_path / "kept", {}, quantization),
        (tmp_path / "float", {"dequantize": True}, None),
    ):
        code, _, err = run(monkeypatch, capsys, *cli_args(q, data, out, fuse=True, **extra))
        assert code == 0, err
        assert "over quantized weights" in err
        fused = json.loads((out / "fused" / "config.json").read_text())
        assert fused.get("quantization") == expected
    refused(run(monkeypatch, capsys, *cli_args(q, data, tmp_path / "o", dequantize=True)),
            "--dequantize", "--fuse")


def test_notes_go_to_stderr_and_figures_to_stdout(mlx_pipo, tmp_path, monkeypatch, capsys):
    """As the other tools do: [INFO] and [WARN] lines on stderr, the training and
    validation figures on stdout."""
    no_valid = write_data(tmp_path / "data", cyclic_records(8, 0))
    out = tmp_path / "o"
    code, stdout, stderr = run(monkeypatch, capsys, *cli_args(mlx_pipo, no_valid, out,
                                                              steps_per_report=1))
    assert code == 0, stderr
    code, more_out, more_err = run(monkeypatch, capsys, *cli_args(
        mlx_pipo, no_valid, out, steps_per_report=1, iters=3, resume=True))
    assert code == 0, more_err
    stdout, stderr = stdout + more_out, stderr + more_err
    assert "[train] step 2/2" in stdout and "[train] step 3/3" in stdout
    for note in ("[INFO] no ", "[INFO] sft:", "[INFO] step 2: checkpoint", "[WARN] --resume",
                 "[INFO] resumed from step 2"):
        assert note in stderr, note
    assert "[INFO]" not in stdout and "[WARN]" not in stdout, stdout


def test_an_output_folder_holding_another_run(mlx_pipo, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    assert run(monkeypatch, capsys, *cli_args(mlx_pipo, data, out))[0] == 0
    first, _ = adapters(out)
    refused(
        run(monkeypatch, capsys, *cli_args(mlx_pipo, data, out)),
        str(out),
        "already holds a training run",
        "--resume",
        "--force",
    )
    refused(
        run(monkeypatch, capsys, *cli_args(mlx_pipo, data, out, lora_rank=8, resume=True)),
        "lora_rank=4, not 8",
    )
    refused(
        run(monkeypatch, capsys, *cli_args(mlx_pipo, data, out, resume=True, force=True)),
        "only one",
    )

    code, _, err = run(
        monkeypatch, capsys, *cli_args(mlx_pipo, data, out, iters=3, resume=True)
    )
    assert code == 0 and "resumed from step 2" in err, err
    assert adapters(out)[1] == 3
    assert "[WARN] --resume: the run was started with --iters 2, now 3" in err

    code, _, err = run(monkeypatch, capsys, *cli_args(mlx_pipo, data, out, seed=1, force=True))
    assert code == 0, err
    again, step = adapters(out)
    assert step == 2 and not all(mx.array_equal(first[k], again[k]) for k in first)

    other = tmp_path / "other"
    other.mkdir()
    (other / "adapters.safetensors").write_text("from another tool")
    refused(run(monkeypatch, capsys, *cli_args(mlx_pipo, data, other)), "already holds other files")
    refused(
        run(monkeypatch, capsys, *cli_args(mlx_pipo, data, other, resume=True)),
        "holds no training run",
    )


def test_a_run_that_would_be_all_warmup_is_refused(mlx_pipo, data, tmp_path, monkeypatch, capsys):
    for iters in (3, 5):
        refused(
            run(monkeypatch, capsys, *cli_args(mlx_pipo, data, tmp_path / "o", iters=iters, warmup=5)),
            f"--iters {iters} is not above --warmup 5",
            "never decay",
        )
    assert not (tmp_path / "o").exists()


def test_a_killed_run_loses_only_the_steps_since_its_checkpoint(
    mlx_pipo, data, tmp_path, monkeypatch
):
    kw = dict(SMALL, iters=100000, save_every=3, learning_rate=3e-3)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train_heads.py"), *cli_args(mlx_pipo, data, out, **kw)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pointer = out / "checkpoint.json"
    deadline = time.monotonic() + 180
    try:
        while not (pointer.exists() and json.loads(pointer.read_text())["step"] >= 6):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint at step 6 in time"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.communicate()
    killed, step = adapters(out)
    assert step % 3 == 0 and step >= 6

    # The same run in this process, stopped with Ctrl-C right after that step.
    interrupt_at(monkeypatch, micro_step=step - 1)
    with pytest.raises(KeyboardInterrupt):
        T.train(config(mlx_pipo, data, tmp_path / "reference", **kw))
    reference, ref_step = adapters(tmp_path / "reference")
    assert ref_step == step and reference.keys() == killed.keys()
    for k in killed:
        assert mx.allclose(killed[k], reference[k], rtol=1e-6, atol=1e-7), k

    # and the killed folder resumes from that checkpoint
    model, _ = load(str(mlx_pipo))
    setup_trainable(model, config(mlx_pipo, data, out, **kw))
    assert (
        restore_checkpoint(out, model, T.make_optimizer(config(mlx_pipo, data, out, **kw)))
        == step
    )
