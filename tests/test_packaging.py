"""A non-editable install gives the entry points mlx-lm users expect."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("generate", "convert", "train", "fuse", "benchmark", "calibrate", "cache_prompt", "evaluate", "perplexity", "pass_at_k")


def test_pip_install_gives_modules_and_console_scripts(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    env = {"PYTHONPATH": str(target), "PATH": str(Path(sys.executable).parent)}
    for tool in TOOLS:
        script = target / "bin" / f"pipo_mlx.{tool}"
        assert script.is_file(), f"no console script pipo_mlx.{tool}"
        for command in ([sys.executable, "-m", f"pipo_mlx.{tool}", "--help"],
                        [sys.executable, str(script), "--help"]):
            # Outside the checkout, so only the installed copy can be imported.
            result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True,
                                    text=True, timeout=300)
            assert result.returncode == 0, result.stderr
            assert result.stdout.startswith("usage:") and "docs/design.md" in result.stdout
    installed = (target / "pipo_mlx").resolve()
    assert (installed / "backbones" / "qwen3_5.py").is_file()
    assert (installed / "cli" / "generate.py").is_file()
