"""Every Python block of the README and of the docs/ pages runs as written, against the shipped demo model."""

import re
import socket
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXTS = {p.relative_to(ROOT).as_posix(): p.read_text() for p in PAGES}
BLOCKS = [
    (page, i, block)
    for page, text in TEXTS.items()
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, re.S))
]
# A page's server command; that page's blocks that talk to it run while it serves.
SERVE = {page: re.search(r"^python -m pipo_mlx.server .*--port (\d+)$", text, re.M) for page, text in TEXTS.items()}


@contextmanager
def page_server(serve: re.Match):
    port = int(serve.group(1))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is taken: the page's server needs it"
    proc = subprocess.Popen([sys.executable, *serve.group(0).split()[1:]], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # the server logs where it serves once it listens
            if "serving" in line:
                break
        assert proc.poll() is None, "the page's server command failed"
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_readme_has_python_blocks():
    assert sum(page == "README.md" for page, _, _ in BLOCKS) >= 2


def test_the_readme_links_only_to_pages_that_exist():
    for page, text in TEXTS.items():
        for target in re.findall(r"\]\(([^)#:]+)\)", text):
            assert ((ROOT / page).parent / target).exists(), f"{page} links to missing {target}"


@pytest.mark.parametrize("page,index,block", BLOCKS, ids=[f"{p}-{i}" for p, i, _ in BLOCKS])
def test_python_block_runs(page, index, block):
    # A fresh interpreter per block, in the repository root, as a reader would run it.
    serve = SERVE[page]
    needs_server = serve is not None and f"127.0.0.1:{serve.group(1)}" in block
    with page_server(serve) if needs_server else nullcontext():
        result = subprocess.run(
            [sys.executable, "-c", block],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 0, f"{page} block {index}:\n{block}\n{result.stderr}"
    assert result.stdout.strip(), "each block prints what it shows"
