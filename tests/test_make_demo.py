"""scripts/make_demo.py stopped with SIGTERM takes the tool it runs down with it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's wait would remove it.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_sigterm_stops_the_running_tool_and_exits_non_zero(tmp_path):
    pid_file = tmp_path / "child.pid"
    tool = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    recipe = (
        "import sys; sys.path.insert(0, 'scripts'); import make_demo; "
        f"make_demo.run_tool(['-c', {tool!r}])"
    )
    parent = subprocess.Popen([sys.executable, "-c", recipe], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child = None
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()):
            assert parent.poll() is None, parent.communicate()
            assert time.monotonic() < deadline, "the tool never started"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGTERM)
        code = parent.wait(timeout=60)
        assert code != 0
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the tool outlived the recipe"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
