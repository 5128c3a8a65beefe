"""generate.py: figures, chat, model resolution and every bad input, mostly in-process."""

import io
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pipo_mlx.chat
import pipo_mlx.cli.generate as gen
from pipo_mlx import generate, load
ROOT = Path(__file__).resolve().parents[1]


def cli(monkeypatch, capsys, *argv, stdin=None):
    """Run generate.py in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["generate.py", *argv])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        runpy.run_path(str(ROOT / "generate.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_a_run_prints_text_and_figures_by_default(mlx_pipo, monkeypatch, capsys):
    code, out, err = cli(
        monkeypatch,
        capsys,
        "--model",
        str(mlx_pipo),
        "--prompt",
        "hi",
        "--max-tokens",
        "12",
        "--conf-threshold",
        "0.5",
    )
    assert code == 0, err
    model, tokenizer = load(str(mlx_pipo))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    text = generate(model, tokenizer, prompt, max_tokens=12, conf_threshold=0.5)
    assert out.startswith("=" * 10 + "\n" + text + "\n" + "=" * 10 + "\n")
    for figure in (
        "time to first token",
        "tokens-per-sec",
        "tokens per step",
        "token2 kept",
        "Peak memory",
    ):
        assert figure in out
    assert "Generation: 12 tokens" in out


def test_prompt_from_stdin_and_raw_text(mlx_pipo, monkeypatch, capsys):
    code, out, err = cli(
        monkeypatch,
        capsys,
        "--model",
        str(mlx_pipo),
        "--prompt",
        "-",
        "--ignore-chat-template",
        "--max-tokens",
        "6",
        "--quiet",
        stdin="def add(a, b):",
    )
    assert code == 0, err
    model, tokenizer = load(str(mlx_pipo))
    assert out == generate(model, tokenizer, "def add(a, b):", max_tokens=6) + "\n"


def test_quiet_and_the_draft_modes(mlx_pipo, monkeypatch, capsys):
    common = ["--model", str(mlx_pipo), "--prompt", "def f(x):", "--max-tokens", "16"]
    outs = {}
    for name, extra in {
        "never": ["--draft", "never", "--quiet"],
        "threshold 1": ["--conf-threshold", "1", "--verbose", "False"],
        "always": ["--draft", "always", "--conf-threshold", "-1", "-q"],
    }.items():
        code, outs[name], err = cli(monkeypatch, capsys, *common, *extra)
        assert code == 0, err
        assert "=" * 10 not in outs[name] and "tokens-per-sec" not in outs[name]
    assert outs["never"] == outs["threshold 1"]
    model, tokenizer = load(str(mlx_pipo))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "def f(x):"}], add_generation_prompt=True
    )
    assert outs["always"] == generate(model, tokenizer, prompt, max_tokens=16, conf_threshold=-1.0,
                                      draft="always") + "\n"
    code, _, err = cli(monkeypatch, capsys, *common, "--draft", "sometimes")
    assert code == 2 and "invalid choice" in err


def test_chat_loop(mlx_pipo, monkeypatch, capsys):
    code, out, err = cli(
        monkeypatch,
        capsys,
        "--model",
        str(mlx_pipo),
        "--chat",
        "--max-tokens",
        "5",
        stdin="def add(a, b):\n\nprint(i)\nr\nimport os\nq\n",
    )
    assert code == 0, err
    assert out.count(">> ") == 6  # three turns, an empty line, 'r' and 'q'
    assert "error" not in err
    # Ctrl-D ends the chat as well.
    code, _, err = cli(monkeypatch, capsys, "--model", str(mlx_pipo), "--chat", stdin="hello\n")
    assert code == 0, err


def test_ctrl_c_prints_what_was_produced(mlx_pipo, monkeypatch, capsys):
    real = pipo_mlx.chat.stream_generate
    shown = []

    def interrupted(*args, **kwargs):
        for i, response in enumerate(real(*args, **kwargs)):
            if i == 4:
                raise KeyboardInterrupt
            shown.append(response.text)
            yield response

    monkeypatch.setattr(pipo_mlx.chat, "stream_generate", interrupted)
    code, out, err = cli(
        monkeypatch, capsys, "--model", str(mlx_pipo), "--prompt", "hi", "--max-tokens", "50", "-q"
    )
    assert code == 130
    assert out.startswith("".join(shown)) and out.endswith("\n")
    assert "interrupted" in err and "Traceback" not in err


def test_sigint_during_generation_exits_cleanly(mlx_pipo):
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "generate.py"),
            "--model",
            str(mlx_pipo),
            "--prompt",
            "hi",
            "--max-tokens",
            "-1",
            "--conf-threshold",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        first = proc.stdout.read(1)  # text is streaming: generation is under way
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # never leave an endless generation behind to starve the suite
    assert first
    assert proc.returncode == 130
    assert b"interrupted" in err and b"Traceback" not in err


def test_hub_repo_is_converted_once(mlx_pipo, monkeypatch, tmp_path):
    calls = []

    def fake_convert(src, dst, **options):  # stands in for the download and conversion
        calls.append(src)
        shutil.copytree(mlx_pipo, dst)

    monkeypatch.setenv("PIPO_MLX_CACHE", str(tmp_path))
    monkeypatch.setattr(gen, "convert", fake_convert)
    for _ in range(2):
        model, _ = gen.load_model("someone/pipo-tiny")
    assert calls == ["someone/pipo-tiny"]
    assert (tmp_path / "someone--pipo-tiny" / "config.json").is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--prompt", "hi"], "no --model given and the demo model"),
        (["--model", "{missing}", "--prompt", "hi"], "does not exist"),
        (["--model", "{hf}", "--prompt", "hi"], "is not a PIPO conversion"),
        (["--model", "{mlx}", "--prompt", ""], "the prompt is empty"),
        (["--model", "{mlx}", "--prompt", "  \n"], "the prompt is empty"),
        (["--model", "{mlx}"], "no prompt"),
        (["--model", "{mlx}", "--prompt", "hi", "--conf-threshold", "high"], "is not a number"),
        (
            ["--model", "{mlx}", "--prompt", "hi", "--max-tokens", "0"],
            "--max-tokens must be positive",
        ),
        (
            ["--model", "{mlx}", "--prompt", "a " * 5000, "--ignore-chat-template"],
            "more than the model's context",
        ),
        (["--model", "{mlx}", "--prompt", "hi", "--temp", "-0.5"], "--temp must be 0"),
        (["--model", "{mlx}", "--prompt", "hi", "--top-p", "0"], "--top-p must lie in (0, 1]"),
        (["--model", "{mlx}", "--prompt", "hi", "--top-p", "1.5"], "--top-p must lie in (0, 1]"),
        (
            ["--model", "{mlx}", "--prompt", "hi", "--prefill-step-size", "1"],
            "--prefill-step-size must be at least 2",
        ),
        (
            ["--model", "{mlx}", "--prompt", "hi", "--system-prompt", "be brief",
             "--ignore-chat-template"],
            "a system prompt needs a chat template",
        ),
    ],
)
def test_bad_input(hf_pipo, mlx_pipo, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(gen, "DEMO_PLACES", (tmp_path / "no-demo",))
    paths = {
        "{missing}": str(tmp_path / "nothing"),
        "{hf}": str(hf_pipo[1]),
        "{mlx}": str(mlx_pipo),
    }
    code, out, err = cli(monkeypatch, capsys, *[paths.get(a, a) for a in argv])
    assert code == 2
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    if "PIPO conversion" in message:
        assert "convert.py" in err


def test_no_model_uses_the_shipped_demo(monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "--prompt", "def fib(n):", "--max-tokens", "8")
    assert code == 0, err
    assert "using the shipped demo model" in err and "pipo-stdlib" in err
    assert out.strip()


def test_chat_reports_an_overlong_turn_and_goes_on(mlx_pipo, monkeypatch, capsys):
    code, out, err = cli(
        monkeypatch,
        capsys,
        "--model",
        str(mlx_pipo),
        "--chat",
        "--max-tokens",
        "3",
        stdin="a " * 5000 + "\nhi\n",
    )
    assert code == 0
    assert "more than the model's context" in err
    assert out.count(">> ") == 3


def test_a_system_prompt_without_a_chat_template_is_refused(monkeypatch, capsys):
    # The shipped demo tokenizer has no chat template.
    code, out, err = cli(monkeypatch, capsys, "--prompt", "x = 1", "--system-prompt", "be brief")
    assert code == 2 and not out
    assert err.splitlines()[-1].startswith("error: a system prompt needs a chat template")
    assert "no chat template: prompts are sent as raw text" in err


@pytest.fixture(scope="module")
def plain_qwen(tmp_path_factory):
    """An HF Qwen3.5 folder without PIPO heads (its native mtp.* weights kept)."""
    from hf_reference import RefPIPO, hf_config_dict, tiny_config, write_checkpoint

    config = tiny_config()
    plain = {
        k: v
        for k, v in RefPIPO(config, "mlp", seed=3).hf_state_dict().items()
        if not k.startswith(("compressor.", "confidence_head."))
    }
    return write_checkpoint(tmp_path_factory.mktemp("plain") / "qwen", plain, hf_config_dict(config))


def test_a_plain_qwen_is_refused_locally_and_from_the_hub_with_one_message(
    plain_qwen, tmp_path, monkeypatch, capsys
):
    import pipo_mlx.conversion

    monkeypatch.setenv("PIPO_MLX_CACHE", str(tmp_path / "cache"))
    real_resolve = pipo_mlx.conversion.resolve
    monkeypatch.setattr(  # the hub repo "qwen/plain" is the local plain folder
        pipo_mlx.conversion,
        "resolve",
        lambda spec, patterns: plain_qwen if spec == "qwen/plain" else real_resolve(spec, patterns),
    )
    messages = []
    for spec in (str(plain_qwen), "qwen/plain"):
        code, out, err = cli(monkeypatch, capsys, "--model", spec, "--prompt", "hi")
        assert code == 2, err
        last = err.splitlines()[-1]
        assert last.startswith("error: ") and "not a PIPO conversion with trained heads" in last
        assert "train_heads.py" in last and "convert.py" in last
        messages.append(last.replace(spec, "SPEC"))
    assert messages[0] == messages[1]
    assert not (tmp_path / "cache" / "qwen--plain").exists()  # nothing half-converted

    code, out, err = cli(
        monkeypatch, capsys, "--model", "qwen/plain", "--allow-fresh-heads", "--prompt", "hi",
        "--max-tokens", "4",
    )
    assert code == 0, err
    assert (tmp_path / "cache" / "qwen--plain" / "config.json").is_file()


def test_an_overlong_prompt_shows_only_our_message(mlx_pipo):
    """The tokenizer's own 'Token indices sequence length' warning used to come first."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--model", str(mlx_pipo),
         "--prompt", "a " * 5000, "--ignore-chat-template"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        line for line in result.stderr.splitlines() if line.startswith("error: ")
    ], result.stderr
    assert "more than the model's context" in result.stderr


def test_without_the_demo_generate_says_what_to_pass(tmp_path):
    """As from a wheel install: run outside the checkout, the package elsewhere."""
    import shutil as sh

    sh.copytree(ROOT / "pipo_mlx", tmp_path / "site" / "pipo_mlx")
    result = subprocess.run(
        [sys.executable, "-m", "pipo_mlx.generate", "--prompt", "hi"],
        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: no --model given and the demo model")
    assert "pass --model" in result.stderr and result.stderr.count("\n") == 1
