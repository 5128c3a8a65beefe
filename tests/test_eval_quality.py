"""benchmarks/eval_quality.py: a reduced run writes to build/bench, never to the committed
benchmarks/results, and the log names only the files actually written (no plot without matplotlib).

The runs use the shipped demo models with a few windows and a few generated tokens (seconds)."""

import json
import subprocess
import sys
from pathlib import Path

from test_bench import RESULTS, ROOT, SCRATCH, committed, load_script  # noqa: F401 (fixture)

SCRIPT = ROOT / "benchmarks" / "eval_quality.py"
SMALL = ["--max-windows", "2", "--prompts", "1", "--gen-tokens", "4", "--gen-thresholds", "1.0"]


def run(argv, without_matplotlib: bool = False) -> subprocess.CompletedProcess:
    """The script as `python benchmarks/eval_quality.py ARGV`, optionally with matplotlib unimportable."""
    code = (
        "import runpy, sys\n"
        + ("sys.modules['matplotlib'] = None  # import matplotlib raises ImportError\n" if without_matplotlib else "")
        + f"sys.argv = [{str(SCRIPT)!r}] + {list(argv)!r}\n"
        + f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def wrote_lines(stdout: str):
    return [line for line in stdout.splitlines() if "] wrote " in line]


def test_reduced_run_writes_to_scratch_not_to_the_committed_results(committed):
    (SCRATCH / "eval_quality.json").unlink(missing_ok=True)
    done = run(SMALL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert committed.changed() == [], "a reduced run rewrote the committed results"
    r = json.loads((SCRATCH / "eval_quality.json").read_text())
    assert r["test_tokens"] == 2 * 256 and r["greedy"]["tokens"] == 4
    wrote = wrote_lines(done.stdout)
    assert len(wrote) == 1 and str(SCRATCH / "eval_quality.json") in wrote[0], done.stdout[-2000:]
    assert str(RESULTS) not in done.stdout


def test_without_matplotlib_no_plot_is_written_or_claimed(tmp_path, committed):
    done = run(SMALL + ["--out", str(tmp_path)], without_matplotlib=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no reliability plot" in done.stdout
    assert (tmp_path / "eval_quality.json").is_file()
    assert not (tmp_path / "reliability.png").exists()
    assert not any(p.suffix == ".png" for p in tmp_path.iterdir())
    wrote = wrote_lines(done.stdout)
    assert len(wrote) == 1 and str(tmp_path / "eval_quality.json") in wrote[0], done.stdout[-2000:]
    assert "reliability.png" not in done.stdout
    assert committed.changed() == []


def test_a_stale_plot_is_not_claimed(tmp_path, monkeypatch, capsys):
    eq = load_script("eval_quality")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    stale = tmp_path / "reliability.png"
    stale.write_bytes(b"an earlier run's plot")
    written = eq.write_results(tmp_path, {"test_tokens": 0}, [], [], 0.0)
    assert written == [tmp_path / "eval_quality.json"]
    assert stale.read_bytes() == b"an earlier run's plot"
    lines = capsys.readouterr().out.splitlines()
    wrote = wrote_lines("\n".join(lines))
    assert len(wrote) == 1 and "reliability.png" not in wrote[0]
    assert any("left from an earlier run" in line and str(stale) in line for line in lines)


def test_output_folder_follows_the_kind_of_run(tmp_path):
    """Only a run at the settings behind the committed figures defaults to benchmarks/results."""
    eq = load_script("eval_quality")

    def out(*argv: str) -> Path:
        return Path(eq.parse_args(list(argv)).out)

    assert out() == RESULTS
    assert out("--batch-size", "4") == RESULTS  # batching does not change the figures
    assert out("--pipo", str(ROOT / "models" / "pipo-stdlib"), "--max-windows", "256") == RESULTS
    reduced = (["--max-windows", "2"], ["--seq-len", "128"], ["--prompts", "1"], ["--gen-tokens", "4"],
               ["--gen-thresholds", "1.0"], ["--pipo", str(tmp_path)], ["--base", str(tmp_path)])
    for argv in reduced:
        assert out(*argv) == SCRATCH, argv
    assert out(*SMALL, "--out", str(tmp_path)) == tmp_path
    assert out("--out", str(tmp_path)) == tmp_path
