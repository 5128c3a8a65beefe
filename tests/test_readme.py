"""Every Python block of the README runs as written, against the shipped demo model."""

import re
import socket
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
# The README's server command; blocks that talk to it run while it serves.
SERVE = re.search(r"^python -m pipo_mlx.server .*--port (\d+)$", README, re.M)


@contextmanager
def readme_server():
    port = int(SERVE.group(1))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is taken: the README's server needs it"
    proc = subprocess.Popen([sys.executable, *SERVE.group(0).split()[1:]], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # the server logs where it serves once it listens
            if "serving" in line:
                break
        assert proc.poll() is None, "the README's server command failed"
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    # A fresh interpreter per block, in the repository root, as a reader would run it.
    needs_server = SERVE is not None and f"127.0.0.1:{SERVE.group(1)}" in BLOCKS[index]
    with readme_server() if needs_server else nullcontext():
        result = subprocess.run(
            [sys.executable, "-c", BLOCKS[index]],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 0, f"README block {index}:\n{BLOCKS[index]}\n{result.stderr}"
    assert result.stdout.strip(), "each block prints what it shows"
