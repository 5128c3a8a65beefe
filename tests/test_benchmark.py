"""pipo_mlx.benchmark and benchmarks/bench_policy.py on tiny models: both sides measured,
every field written, only where told; the compressor bound; the base record that
conversion and training write for them."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from hf_reference import RefPIPO, hf_config_dict, tiny_config, write_checkpoint
from test_bench import RESULTS, SCRATCH, committed, load_script  # noqa: F401 (a fixture)
from test_train import cyclic_records, write_data
from test_train_cli import cli_args, run

from pipo_mlx import convert, load
from pipo_mlx.cli.benchmark import main as benchmark
from pipo_mlx.model_io import base_source, recorded_base
from pipo_mlx.drafting import weight_bytes
from pipo_mlx.speed import compressor_bound

ROOT = Path(__file__).resolve().parents[1]
H, V = 64, 320  # tiny_config's hidden size and vocabulary


@pytest.fixture(scope="module")
def base_and_pipo(tmp_path_factory):
    """A plain Qwen3.5 that mlx_lm.load reads (nested config; mlx-lm places full
    attention by the interval alone), and its PIPO conversion with fresh heads."""
    config = tiny_config()
    ref = RefPIPO(config, "mlp", seed=40)
    plain = {k: v for k, v in ref.hf_state_dict().items()
             if not k.startswith(("compressor.", "confidence_head."))}
    root = tmp_path_factory.mktemp("bench")
    base = write_checkpoint(root / "base", plain,
                            hf_config_dict(config, nested=True, full_attention_interval=2))
    return base, convert(str(base), str(root / "pipo"), dtype="float32")


def refused(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as e:
        benchmark(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err


# -- the benchmark CLI


def test_cli_measures_both_sides_and_writes_only_where_told(
    base_and_pipo, tmp_path, monkeypatch, capsys, committed  # noqa: F811
):
    base, pipo = base_and_pipo
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    small = ["--model", str(pipo), "-p", "8,16", "-g", "6", "-n", "1", "--thresholds=-1,1"]
    benchmark(small)  # the base comes from the model's record
    table = capsys.readouterr().out
    assert list(cwd.iterdir()) == [] and committed.changed() == []
    for fragment in ("mlx-lm", "default (τ=0.95, draft=auto)", "τ=-1, draft=always",
                     "τ=1 (keep none)", "compressor bound", "8 prompt tokens", "16 prompt tokens"):
        assert fragment in table, table

    out = tmp_path / "deep" / "bench.json"
    benchmark(small + ["--json", str(out)])
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temporary left
    r = json.loads(out.read_text())
    assert r["base"] == str(base.resolve()) and r["model"] == str(pipo)
    assert {"load_average_start", "load_average_end", "cores", "mlx", "mlx_lm"} <= r["machine"].keys()
    assert r["settings"]["prompt_tokens"] == [8, 16] and r["settings"]["thresholds"] == [-1.0, 1.0]
    rows = {row["setting"]: row for row in r["decode"]}
    assert list(rows) == ["mlx-lm", "default (τ=0.95, draft=auto)", "τ=-1, draft=always",
                          "τ=-1, draft=auto", "τ=1 (keep none)"]
    for row in rows.values():
        assert row["tokens"] == 6  # no early stop on either side
        assert row["tokens_per_s"] > 0 and row["peak_memory_gb"] > 0
        assert row["ratio_to_mlx_lm"] == pytest.approx(row["tokens_per_s"] / rows["mlx-lm"]["tokens_per_s"])
    assert rows["mlx-lm"]["ratio_to_mlx_lm"] == 1.0 and rows["mlx-lm"]["side"] == "mlx-lm"
    assert rows["τ=-1, draft=always"]["tokens_per_step"] == 2.0
    assert rows["τ=-1, draft=always"]["keep_rate"] == 1.0
    assert rows["τ=-1, draft=auto"]["tokens_per_step"] == 2.0  # every draft kept: it never stops
    assert rows["τ=1 (keep none)"]["tokens_per_step"] == 1.0
    assert rows["default (τ=0.95, draft=auto)"]["draft"] == "auto"
    assert [t["prompt_tokens"] for t in r["ttft"]] == [8, 16]
    for t in r["ttft"]:
        assert t["mlx_lm_s"] > 0 and t["pipo_s"] > 0 and t["ratio"] == t["mlx_lm_s"] / t["pipo_s"]


def test_compressor_bound_from_the_parameter_shapes(base_and_pipo, tmp_path, capsys):
    """B + E against B + E + C, the bytes counted from the checkpoint's tensor shapes
    (float32), the compressor's written out from its two layers."""
    _, pipo = base_and_pipo
    bytes_of = {"B": 0, "E": 0, "M": 0, "C": 0}
    for key, value in mx.load(str(pipo / "model.safetensors")).items():
        group = ("E" if key.startswith("model.embed_tokens.") else "C" if key.startswith("compressor.")
                 else "M" if key.startswith(("mtp.", "confidence_head.")) else "B")
        bytes_of[group] += 4 * math.prod(value.shape)
    assert bytes_of["E"] == 4 * V * H  # tied: the embedding table is the LM head
    assert bytes_of["C"] == 4 * ((2 * H * 2 * H + 2 * H) + (2 * H * H + H))  # mlp.0, mlp.2
    expected = (bytes_of["B"] + bytes_of["E"]) / (bytes_of["B"] + bytes_of["E"] + bytes_of["C"])
    model, _ = load(str(pipo))
    assert weight_bytes(model) == bytes_of
    assert compressor_bound(weight_bytes(model)) == pytest.approx(expected)
    out = tmp_path / "b.json"
    benchmark(["--model", str(pipo), "-p", "4", "-g", "3", "-n", "1", "--thresholds", "1",
               "--json", str(out)])
    assert f"compressor bound {expected:.2f}x" in capsys.readouterr().out
    assert json.loads(out.read_text())["weights"]["compressor_bound"] == pytest.approx(expected)


def test_cli_refusals_are_one_line(base_and_pipo, mlx_pipo, capsys):
    base, pipo = base_and_pipo
    small = ["-p", "4", "-g", "3", "-n", "1"]
    refused(capsys, ["--model", str(mlx_pipo)] + small, "does not record its base", "--base")
    refused(capsys, ["--model", str(pipo), "--base", str(base / "missing")] + small, "does not exist")
    refused(capsys, ["--model", str(pipo), "--base", str(pipo)] + small, "mlx_lm.load cannot load")
    refused(capsys, ["--model", str(pipo), "--base", str(ROOT / "models" / "base-stdlib")] + small,
            "another tokenizer vocabulary")
    for bad in (["-g", "x"], ["-p", "0"], ["-n", "1.5"], ["--thresholds", "nan"], ["-p", ""]):
        refused(capsys, ["--model", str(pipo)] + small + bad, bad[0])
    refused(capsys, ["--model", str(pipo), "-p", "4096", "-g", "8", "-n", "1"], "context")


# -- bench_demo_policy.py


def test_demo_policy_quick_run(committed, tmp_path):  # noqa: F811
    out = tmp_path / "policy_demo.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_demo_policy.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert committed.changed() == []
    r = json.loads(out.read_text())
    for mode in ("always", "auto"):
        paired = [a / b for a, b in zip(r["tokens_per_s_runs"][mode], r["tokens_per_s_runs"]["never"])]
        assert r["over_never_runs"][mode] == pytest.approx(paired)
        assert r["over_never"][mode] == pytest.approx(sorted(paired)[0] / 2 + sorted(paired)[1] / 2)


# -- bench_policy.py


def test_policy_bench_quick_run(mlx_pipo, committed):  # noqa: F811
    """--quick: every rate and mode, the forced gate honoured, the keep-none rows; the
    results in build/bench, never in the committed folder."""
    (SCRATCH / "policy.json").unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_policy.py"), "--quick",
         "--model", str(mlx_pipo)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert committed.changed() == [], "a --quick run rewrote the committed results"
    assert "auto/best" in done.stdout and "bound" in done.stdout
    r = json.loads((SCRATCH / "policy.json").read_text())
    rows = r["policy"]["rows"]
    assert [row["forced_keep_rate"] for row in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for row in rows:
        for mode in ("always", "never", "auto"):
            assert row[mode]["tokens"] == r["settings"]["tokens"] and row[mode]["tokens_per_s"] > 0
        assert row["never"]["keep_rate"] == 0.0
        best = max(row["always"]["tokens_per_s"], row["never"]["tokens_per_s"])
        assert row["auto_over_best"] == pytest.approx(row["auto"]["tokens_per_s"] / best)
    assert rows[0]["always"]["keep_rate"] == 0.0  # the forced gate: nothing kept at 0
    assert rows[-1]["always"]["tokens_per_step"] == 2.0  # everything kept at 1
    assert [k["model"] for k in r["keep_none"]] == ["random quick float32", mlx_pipo.name]
    for k in r["keep_none"]:
        assert k["keep_none"]["tokens_per_step"] == 1.0 and 0 < k["compressor_bound"] < 1
        assert k["ratio"] == k["keep_none"]["tokens_per_s"] / k["mlx_lm"]["tokens_per_s"]

    bench = load_script("bench_policy")
    assert bench.parse_args([]).out == RESULTS
    assert bench.parse_args(["--repeats", "1"]).out == SCRATCH
    assert bench.parse_args(["--quick", "--out", "x"]).out == Path("x")


# -- the base record


def test_conversion_records_the_base(base_and_pipo, mlx_pipo, tmp_path, monkeypatch):
    base, pipo = base_and_pipo
    record = lambda folder: json.loads((folder / "config.json").read_text())["pipo"].get("base_model")  # noqa: E731
    assert record(pipo) == str(base.resolve())  # fresh heads: the source is the base
    assert load(str(pipo))[0].args.base_model == str(base.resolve())
    assert record(mlx_pipo) is None  # a merged PIPO checkpoint does not say
    # Base + adapter: a rank-1 LoRA on one projection, given by a relative path.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 1}))
    target = "base_model.model.model.layers.1.mlp.up_proj"
    mx.save_safetensors(str(adapter / "adapter_model.safetensors"), {
        f"{target}.lora_A.weight": mx.zeros((1, H)), f"{target}.lora_B.weight": mx.zeros((96, 1)),
    })
    monkeypatch.chdir(base.parent)
    merged = convert(base.name, str(tmp_path / "merged"), adapter_path=str(adapter))
    assert record(merged) == str(base.resolve())
    assert base_source("Qwen/Qwen3.5-4B") == "Qwen/Qwen3.5-4B"  # a hub id as given
    assert recorded_base(tmp_path, "Qwen/Qwen3.5-4B") == "Qwen/Qwen3.5-4B"
    assert recorded_base(pipo, "../base") == str(base.resolve())


def test_training_names_the_base_in_the_fused_model(base_and_pipo, tmp_path, monkeypatch, capsys):
    """A record relative to --model is made absolute in ADAPTER/fused/."""
    base, pipo = base_and_pipo
    relative = tmp_path / "model"
    relative.mkdir()
    for f in pipo.iterdir():
        if f.name != "config.json":
            (relative / f.name).symlink_to(f)
    config = json.loads((pipo / "config.json").read_text())
    config["pipo"]["base_model"] = os.path.relpath(base, relative)
    (relative / "config.json").write_text(json.dumps(config))
    data = write_data(tmp_path / "data", cyclic_records(12, 0))
    out = tmp_path / "run"
    code, _, err = run(monkeypatch, capsys, *cli_args(relative, data, out, fuse=True))
    assert code == 0, err
    fused = json.loads((out / "fused" / "config.json").read_text())
    assert fused["pipo"]["base_model"] == str(base.resolve())
    assert load(str(out / "fused"))[0].args.base_model == fused["pipo"]["base_model"]
