"""benchmarks/bench_decode.py --quick runs and writes every field, to build/bench and never to
the committed benchmarks/results; timings are not judged here."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"  # committed: docs/ quote these files
SCRATCH = ROOT / "build" / "bench"  # where smoke runs go


class Committed:
    """The bytes and mtimes of benchmarks/results/ when the test began."""

    def __init__(self) -> None:
        self.before = self.snapshot()

    @staticmethod
    def snapshot() -> Dict[Path, Tuple[bytes, int]]:
        files = sorted(RESULTS.iterdir()) if RESULTS.is_dir() else []
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files if p.is_file()}

    def changed(self) -> List[str]:
        after = self.snapshot()
        return sorted(p.name for p in self.before.keys() | after.keys() if self.before.get(p) != after.get(p))

    def restore(self) -> None:
        """Put back whatever a failing run overwrote, so a regression cannot cost the committed files."""
        after = self.snapshot()
        for p, (data, mtime) in self.before.items():
            if after.get(p) != (data, mtime):
                p.write_bytes(data)
                os.utime(p, ns=(mtime, mtime))


@pytest.fixture
def committed():
    c = Committed()
    yield c
    c.restore()


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

MACHINE = {"platform", "cpu", "cores", "device", "mlx", "mlx_lm", "blas_preloaded",
           "load_average_start", "load_average_end"}
SETTINGS = {"repeats", "tokens", "decode_prompt_tokens", "quick", "detokenization", "eos", "wall_s"}
MODEL = {"name", "dtype", "layers", "hidden_size", "vocab_size", "params", "backbone_params",
         "weight_bytes", "head_to_backbone", "bound_keep_all", "bound_keep_all_top",
         "token2_heads", "ttft", "cache", "decode"}
DECODE = {"variant", "api", "threshold", "token2_head", "fused", "baseline", "ms_per_token",
          "ms_per_token_runs", "baseline_ms_per_token", "speedup", "tokens", "tokens_per_step",
          "keep_rate", "peak_memory_gb"}
TTFT = {"prompt_tokens", "mlx_lm_s", "pipo_s", "mlx_lm_s_runs", "pipo_s_runs", "speedup",
        "mlx_lm_peak_memory_gb", "pipo_peak_memory_gb"}
CACHE = {"prompt_tokens", "mlx_lm_positions", "pipo_positions", "mlx_lm_full_attention_kv_bytes",
         "pipo_full_attention_kv_bytes", "full_attention_kv_ratio",
         "mlx_lm_linear_attention_state_bytes", "pipo_linear_attention_state_bytes",
         "pipo_mtp_kv_bytes"}
VARIANTS = {"mlx-lm", "keep-all", "τ=0.95", "keep-none", "keep-all unfused", "keep-all top:V/8",
            "keep-all q4 head", "τ=0.95 top:V/8", "τ=0.95 q4 head", "mlx-lm stream_generate",
            "keep-all stream_generate"}
FOLDER_VARIANTS = VARIANTS | {"τ=0.5", "τ=0.5 top:V/8", "τ=0.5 q4 head"}
THRESHOLDS = {"0.5", "0.8", "0.95"}
HEAD_SPECS = {"full", "q4", "q8", "top:160", "top:80", "top:40"}  # the test model: V = 320


def test_quick_run_writes_every_field(mlx_pipo, committed):
    # No --out: a smoke run must land in build/bench and leave benchmarks/results alone.
    for stale in ("decode.json", "decode.png"):
        (SCRATCH / stale).unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"), "--quick",
         "--model", str(mlx_pipo)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert committed.changed() == [], "a --quick run rewrote the committed results"
    assert "weight-reading bound" in done.stdout
    out = SCRATCH
    wrote = [line for line in done.stdout.splitlines() if "] wrote " in line]
    assert len(wrote) == 1 and str(out / "decode.json") in wrote[0], done.stdout[-2000:]
    r = json.loads((out / "decode.json").read_text())
    assert MACHINE <= r["machine"].keys() and SETTINGS <= r["settings"].keys()
    assert r["settings"]["quick"]
    assert [(m["name"], m["dtype"]) for m in r["models"]] == [
        ("quick", "float32"), ("quick", "float16"), ("quick", "4bit"), ("pipo", "float32")
    ]
    for m in r["models"]:
        assert MODEL <= m.keys()
        assert set(m["weight_bytes"]) == {"B", "E", "M", "C"}
        for row in m["decode"]:
            assert DECODE <= row.keys()
            assert row["tokens"] == r["settings"]["tokens"]  # no early stop on either side
    assert {row["variant"] for row in r["models"][0]["decode"]} == VARIANTS
    assert {row["variant"] for row in r["models"][-1]["decode"]} == FOLDER_VARIANTS
    for m in (r["models"][0], r["models"][-1]):  # full float32 runs
        unfused = next(row for row in m["decode"] if row["variant"] == "keep-all unfused")
        assert unfused["same_tokens_as_fused"]
        assert [t["prompt_tokens"] for t in m["ttft"]] == [64, 128]
        for t in m["ttft"]:
            assert TTFT <= t.keys()
        assert CACHE <= m["cache"].keys()
        assert m["cache"]["pipo_positions"] < m["cache"]["mlx_lm_positions"]
    q = r["token2_head_quality"]
    assert {"positions", "keep_rate"} | HEAD_SPECS <= q.keys()
    assert set(q["keep_rate"]) == THRESHOLDS
    for spec in HEAD_SPECS:
        assert {"token2_accuracy", "kept_token2_accuracy", "agreement_with_full_head"} <= q[spec].keys()
        assert set(q[spec]["kept_token2_accuracy"]) == THRESHOLDS
    if r["chart"] is not None:  # matplotlib is an optional extra
        assert (out / "decode.png").stat().st_size > 0
        assert str(out / "decode.png") in wrote[0]
    else:
        assert not (out / "decode.png").exists() and "decode.png" not in wrote[0]


def test_output_folder_follows_the_kind_of_run(tmp_path):
    """Only a full run defaults to the committed folder; --out always wins."""
    bench = load_script("bench_decode")

    def out(*argv: str) -> Path:
        return Path(bench.parse_args(list(argv)).out)

    assert out() == RESULTS
    assert out("--repeats", "3", "--tokens", "256") == RESULTS  # the defaults, spelled out
    assert out("--model", "m", "--sizes", "", "--name", "decode_demo") == RESULTS  # decode_demo.json
    assert out("--quick") == SCRATCH
    for reduced in (["--repeats", "1"], ["--tokens", "32"], ["--prompts", "64"], ["--quality-windows", "2"]):
        assert out(*reduced) == SCRATCH, reduced
    assert out("--quick", "--out", str(tmp_path)) == tmp_path
    assert out("--out", str(tmp_path)) == tmp_path


def quick_run(script: str, result: str, model: Path, committed: Committed) -> dict:
    """`benchmarks/<script>.py --quick --model <model>`: its JSON in build/bench, the committed files untouched."""
    (SCRATCH / result).unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--model", str(model)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert committed.changed() == [], "a --quick run rewrote the committed results"
    return json.loads((SCRATCH / result).read_text())


def test_server_bench_quick_run_measures_both_sides(mlx_pipo, committed):
    """benchmarks/bench_server.py --quick: both servers, every turn, the overhead; never the committed file."""
    r = quick_run("bench_server", "server.json", mlx_pipo, committed)
    assert set(r["ttft_by_turn"]) == {"2", "4", "8"}
    for row in r["ttft_by_turn"].values():
        assert row["ttft_cached_s"] > 0 and row["ttft_uncached_s"] > 0
        assert row["prefilled_with_cache"] < row["prompt_tokens"]  # the earlier turns came from the cache
    assert r["overhead"]["server_tok_s"] > 0 and r["overhead"]["library_tok_s"] > 0
    bench = load_script("bench_server")
    assert bench.parse_args([]).out == RESULTS and bench.parse_args(["--repeats", "1"]).out == SCRATCH


def test_batch_bench_quick_run_measures_every_side(mlx_pipo, committed):
    """benchmarks/bench_batch.py --quick: mlx-lm, keep-all and default at each batch size; never the committed file."""
    r = quick_run("bench_batch", "batch.json", mlx_pipo, committed)
    assert [len(m["rows"]) for m in r["models"]] == [2, 2]
    for m in r["models"]:
        for row in m["rows"]:
            assert row["mlx-lm"] > 0 and row["keep-all"] > 0 and row["default"] > 0
    bench = load_script("bench_batch")
    assert bench.parse_args([]).out == RESULTS and bench.parse_args(["--tokens", "8"]).out == SCRATCH
