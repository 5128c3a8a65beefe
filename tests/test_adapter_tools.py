"""A training checkpoint at generation (--adapter-path) and as a fused folder
(pipo_mlx.fuse); generate.py's banner after the prompt's checks."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from pipo_mlx import generate, load
from pipo_mlx import trainer as T
from pipo_mlx.cli import fuse as fuse_cli
from test_train import config, cyclic_records, write_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_folder(mlx_pipo, tmp_path_factory) -> Path:
    data = write_data(tmp_path_factory.mktemp("adata"), cyclic_records(16, 0))
    out = tmp_path_factory.mktemp("arun") / "run"
    T.train(config(mlx_pipo, data, out, iters=3, learning_rate=1e-2, fuse=True))
    return out


def cli(monkeypatch, capsys, script, *argv, stdin=None):
    monkeypatch.setattr(sys, "argv", [script, *argv])
    if stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err


def test_generate_puts_the_checkpoint_on_the_model(mlx_pipo, run_folder, monkeypatch, capsys):
    args = ("--model", str(mlx_pipo), "--prompt", "def add", "--max-tokens", "10",
            "--ignore-chat-template", "--conf-threshold", "0.5", "--quiet")
    code, out, err = cli(monkeypatch, capsys, "generate.py", *args,
                         "--adapter-path", str(run_folder))
    assert code == 0, err
    # The fused folder computes the same function (to float rounding), so it
    # writes the same greedy text.
    fused, tokenizer = load(str(run_folder / "fused"))
    expected = generate(fused, tokenizer, "def add", max_tokens=10, conf_threshold=0.5)
    assert out == expected + "\n"

    code, _, err = cli(monkeypatch, capsys, "generate.py", *args, "--adapter-path",
                       str(run_folder / "missing"))
    one_line_error(code, err, "holds no train_heads.py checkpoint")


def test_unfused_and_fused_compute_the_same_function(mlx_pipo, run_folder):
    unfused, tokenizer = load(str(mlx_pipo), adapter_path=str(run_folder))
    fused, _ = load(str(run_folder / "fused"))
    base, _ = load(str(mlx_pipo))
    ids = mx.array([tokenizer.encode("def add return print for range class Point")[:8]])
    a, b, c = unfused(ids), fused(ids), base(ids)
    for name in ("logits", "mtp_logits", "confidence"):
        assert mx.allclose(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-4), name
        assert not mx.allclose(getattr(a, name), getattr(c, name), atol=1e-3), name


def test_the_fuse_tool_writes_what_train_fuse_writes(mlx_pipo, run_folder, tmp_path,
                                                     monkeypatch, capsys):
    out = tmp_path / "fused"
    args = ["--model", str(mlx_pipo), "--adapter-path", str(run_folder), "--save-path", str(out)]
    fuse_cli.main(args)
    assert "fused model in" in capsys.readouterr().err
    ours, trained = mx.load(str(out / "model.safetensors")), mx.load(
        str(run_folder / "fused" / "model.safetensors"))
    assert ours.keys() == trained.keys()
    for k in ours:
        assert mx.array_equal(ours[k], trained[k]), k
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (run_folder / "fused" / "config.json").read_text())
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left

    for argv, fragment in (
        (args, "already exists"),
        (args[:3] + [str(tmp_path / "nothing"), "--save-path", str(tmp_path / "x")],
         "holds no train_heads.py checkpoint"),
    ):
        with pytest.raises(SystemExit) as done:
            fuse_cli.main(argv)
        one_line_error(done.value.code, capsys.readouterr().err, fragment)


def test_python_m_pipo_mlx_fuse_runs():
    done = subprocess.run([sys.executable, "-m", "pipo_mlx.fuse", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--model", "--adapter-path", "--save-path", "--dequantize"):
        assert flag in done.stdout


def test_the_banner_follows_the_context_check(mlx_pipo, monkeypatch, capsys):
    """A prompt longer than the context is refused with nothing on stdout: the
    banner came before the refusal."""
    _, tokenizer = load(str(mlx_pipo))
    context = json.loads((mlx_pipo / "config.json").read_text())["max_position_embeddings"]
    words = ["def", "add", "return", "print"]
    prompt = " ".join(words * context)
    assert len(tokenizer.encode(prompt)) > context
    code, out, err = cli(monkeypatch, capsys, "generate.py", "--model", str(mlx_pipo),
                         "--prompt", "-", "--ignore-chat-template", "--max-tokens", "4",
                         stdin=prompt)
    assert code == 2, err
    assert err.splitlines()[-1].startswith("error: ") and "context" in err.splitlines()[-1], err
    assert out == ""
