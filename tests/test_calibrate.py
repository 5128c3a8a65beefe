"""pipo_mlx.calibrate: its figures against NumPy from first principles, the atomic write into
the model folder, the refusals (one line, exit 2), and a dry run that writes nothing.

Tiny random models: the PIPO conversion from conftest, and a base in mlx-lm's Qwen3.5 layout
made of the same checkpoint's backbone (same tokenizer), so each run takes seconds."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import stream_generate as mlx_stream_generate

import pipo_mlx.calibration as calibration
from pipo_mlx import PipoError, load, stream_generate
from pipo_mlx.calibration import Generation, choose, read_prompts
from pipo_mlx.cli.calibrate import main
from pipo_mlx.quality import acceptance, overlap, teacher_forced
from pipo_mlx.speed import Run
from test_bench import committed  # noqa: F401 (fixture)

PROMPTS = "def add(a, b):\n    return a + b\n\n\nfor i in range(10):\n    print(i * i)\n"
SMALL = ["--max-tokens", "8", "--thresholds", "0.5", "--json"]


@pytest.fixture(scope="module")
def base_folder(hf_pipo, tmp_path_factory) -> Path:
    """The PIPO checkpoint's backbone as a plain mlx-lm Qwen3.5 folder."""
    from mlx_lm.models.qwen3_5 import Model, ModelArgs
    from mlx_lm.utils import load_tokenizer

    from pipo_mlx.model_io import save_folder

    hf = hf_pipo[1]
    config = {**json.loads((hf / "config.json").read_text()), "model_type": "qwen3_5",
              "full_attention_interval": 2}  # the tiny config's layer_types: every second layer
    base = Model(ModelArgs.from_dict(config))
    heads = ("compressor.", "mtp.", "confidence_head.")
    weights = {k: v for k, v in mx.load(str(hf / "model.safetensors")).items() if not k.startswith(heads)}
    base.load_weights(list(base.sanitize(weights).items()))
    dst = tmp_path_factory.mktemp("base") / "base"
    save_folder(dst, base, config, load_tokenizer(hf))
    return dst


@pytest.fixture
def model(mlx_pipo, base_folder, tmp_path) -> Path:
    """A writable copy of the PIPO model that records its base by a relative path."""
    folder = tmp_path / "models" / "pipo"
    shutil.copytree(mlx_pipo, folder)
    shutil.copytree(base_folder, tmp_path / "models" / "base")
    edit_config(folder, lambda c: c["pipo"].update(base_model="../base"))
    return folder


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config, indent=4))


def cli(capsys, *argv):
    """(exit code, stdout, stderr) of `python -m pipo_mlx.calibrate ARGV`, in this process."""
    code = 0
    try:
        main(list(map(str, argv)))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, match: str, *argv) -> None:
    code, out, err = cli(capsys, *argv)
    assert code == 2, err
    lines = [line for line in err.splitlines() if not line.startswith("[calibrate]")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert "Traceback" not in err


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_agreement(p, q):
    """1 - TV(p, q) = 1 - 1/2 sum_v |p(v) - q(v)|."""
    return 1 - 0.5 * np.abs(p - q).sum(-1)


# -- the figures


def test_agreement_and_acceptance_formulas():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 9, 13)) * 2, rng.normal(size=(4, 9, 13)) * 2
    np.testing.assert_allclose(overlap(mx.array(a), mx.array(b)), np_agreement(np_softmax(a), np_softmax(b)),
                               rtol=1e-5, atol=1e-6)
    y = rng.integers(0, 13, size=(4, 9))
    p_draft = np.take_along_axis(np_softmax(a), y[..., None], -1)[..., 0]
    p_target = np.take_along_axis(np_softmax(b), y[..., None], -1)[..., 0]
    np.testing.assert_allclose(acceptance(mx.array(a), mx.array(b), mx.array(y)),
                               np.minimum(1, p_target / p_draft), rtol=1e-5)


def test_teacher_forced_agreement_slots(mlx_pipo, base_folder):
    """Slot 2i+2 is PIPO's token1 after reading pairs 0..i, slot 2i+3 its token2; the base
    predicts slot p from the text up to p - 1."""
    import mlx_lm

    pipo, tokenizer = load(str(mlx_pipo))
    base, _ = mlx_lm.load(str(base_folder))
    ids = tokenizer.encode("class Point:\n    def __init__(self, x, y):\n        self.x = x\n")[:20]
    got = teacher_forced(base, pipo, mx.array([ids]))
    out = pipo(mx.array([ids]))
    b = np.array(base(mx.array([ids]))[0])  # b[j]: the base's distribution of t[j + 1]
    n = len(ids) // 2
    want1 = [np_agreement(np_softmax(np.array(out.logits[0, i])), np_softmax(b[2 * i + 1]))
             for i in range(n - 1)]
    want2 = [np_agreement(np_softmax(np.array(out.mtp_logits[0, i])), np_softmax(b[2 * i + 2]))
             for i in range(n - 1)]
    np.testing.assert_allclose(got["agree1"][0], want1, atol=1e-5)
    np.testing.assert_allclose(got["agree2"][0], want2, atol=1e-5)


def test_calibration_figures_from_first_principles(mlx_pipo, base_folder, prompts, capsys):
    """α of the kept drafts (keep-all) from the decoder's own draft probabilities and the base
    run on each prefix; the base's NLL of PIPO's text; agreement over prompt + base's text."""
    import mlx_lm

    code, out, err = cli(capsys, "--model", mlx_pipo, "--base", base_folder, "--prompts", prompts,
                         "--dry-run", *SMALL)
    assert code == 0, err
    r = json.loads(out)
    pipo, tokenizer = load(str(mlx_pipo))
    base, base_tokenizer = mlx_lm.load(str(base_folder))
    texts = [b.rstrip() for b in PROMPTS.split("\n\n\n")]

    def base_logprobs(ids):  # row j: log p_base(. | ids[: j + 1])
        x = np.array(base(mx.array([ids]))[0], np.float64)
        return np.log(np_softmax(x))

    alphas, nll, agree1, agree2 = [], [], [], []
    for text in texts:
        ids = tokenizer.encode(text)
        tokens, drafts = [], []
        for resp in stream_generate(pipo, tokenizer, ids, max_tokens=8, conf_threshold=-1.0, draft="always"):
            tokens.append(resp.token)
            if resp.from_draft:
                drafts.append((len(tokens) - 1, float(resp.logprobs[resp.token])))
        lp = base_logprobs(ids + tokens)
        nll += [-lp[len(ids) + k - 1, t] for k, t in enumerate(tokens)]
        alphas += [min(1.0, np.exp(lp[len(ids) + k - 1, tokens[k]] - draft_lp)) for k, draft_lp in drafts]

        cont = [resp.token for resp in mlx_stream_generate(base, base_tokenizer, ids, max_tokens=8)]
        seq = (ids + cont)[: len(ids + cont) // 2 * 2]
        o, b = pipo(mx.array([seq])), np.exp(base_logprobs(seq))
        for i in range(len(seq) // 2 - 1):
            agree1.append(np_agreement(np_softmax(np.array(o.logits[0, i])), b[2 * i + 1]))
            agree2.append(np_agreement(np_softmax(np.array(o.mtp_logits[0, i])), b[2 * i + 2]))

    keep_all = r["by_threshold"]["-1.0"]
    assert keep_all["kept"] == len(alphas) > 0
    # The decoder masks PAD out of its draft distribution; the figure uses the raw one.
    assert keep_all["alpha"] == pytest.approx(np.mean(alphas), abs=5e-3)
    assert keep_all["nll"] == pytest.approx(np.mean(nll), rel=1e-3)
    assert r["agreement"]["token1"] == pytest.approx(np.mean(agree1), abs=1e-4)
    assert r["agreement"]["token2"] == pytest.approx(np.mean(agree2), abs=1e-4)
    assert r["agreement"]["slots"] == len(agree1) + len(agree2)
    assert set(r["by_threshold"]) == {"-1.0", "0.5", "1.0"}
    assert r["by_threshold"]["1.0"]["nll_increase"] == 0 and r["by_threshold"]["1.0"]["keep_rate"] == 0


def test_seconds_per_step_count_steps_not_tokens():
    # 9 tokens in 5 steps, the first step yielding 2: 7 tokens in the 4 steps after it.
    g = Generation(Run(ttft_s=0.5, s_per_token=0.01, tokens=9, steps=5, kept=4, peak_bytes=0), [],
                   first_step=2)
    assert g.s_per_step == pytest.approx(0.07 / 4)
    assert Generation(Run(0.5, None, 2, 1, 1, 0), [], first_step=2).s_per_step is None


def test_choice_is_the_fastest_within_the_margins():
    def row(speedup, nll_increase, alpha):
        return {"speedup": speedup, "nll_increase": nll_increase, "alpha": alpha}

    rows = {"-1.0": row(1.5, 0.20, 0.6), "0.5": row(1.3, 0.05, 0.8), "0.8": row(1.3, 0.01, 0.9),
            "0.9": row(1.1, 0.0, 0.95), "1.0": row(0.95, 0.0, None)}
    r = choose(rows, max_nll_increase=0.05, min_alpha=0.0)
    assert r["threshold"] == 0.8 and r["faster_than_base"]  # the tie with 0.5 goes to the higher τ
    assert {c["threshold"]: c["passes"] for c in r["candidates"]}[-1.0] is False
    assert choose(rows, max_nll_increase=0.05, min_alpha=0.92)["threshold"] == 0.9
    r = choose(rows, max_nll_increase=0.0, min_alpha=0.99)
    assert r["threshold"] == 1.0 and not r["faster_than_base"] and "slower than the base" in r["reason"]


def test_prompt_files(mlx_pipo, tmp_path):
    _, tokenizer = load(str(mlx_pipo))
    text = tmp_path / "p.txt"
    text.write_text("a = 1\n\n  \n\n    b = 2\nc = 3\n\n")  # blank lines part; indentation stays
    assert [p.ids for p in read_prompts([text], tokenizer, 4096, 8)] == [
        tokenizer.encode("a = 1"), tokenizer.encode("    b = 2\nc = 3")]
    folder = tmp_path / "each"
    folder.mkdir()
    (folder / "one.py").write_text("x = 1\n\ny = 2\n")
    (folder / ".hidden").write_text("skipped")
    assert [p.ids for p in read_prompts([folder], tokenizer, 4096, 8)] == [tokenizer.encode("x = 1\n\ny = 2")]
    records = tmp_path / "p.jsonl"
    records.write_text(json.dumps({"text": "import os\n"}) + "\n\n" + json.dumps({"prompt": "hi"}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "an old answer"}]}) + "\n")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    got = read_prompts([records, text], tokenizer, 4096, 8)
    assert [p.ids for p in got] == [tokenizer.encode("import os"), chat, chat, tokenizer.encode("a = 1"),
                                    tokenizer.encode("    b = 2\nc = 3")]
    assert got[1].where == f"{records} line 3"
    assert len(read_prompts([records, text], tokenizer, 4096, 8, limit=2)) == 2


# -- writing into the model folder


def test_a_run_writes_threshold_and_draft_cost_atomically(model, prompts, capsys, monkeypatch, tmp_path):
    before = json.loads((model / "config.json").read_text())
    monkeypatch.chdir(tmp_path)  # the recorded ../base is relative to the model folder, not to here
    code, out, err = cli(capsys, "--model", model, "--prompts", prompts, *SMALL)
    assert code == 0, err
    r = json.loads(out)
    config = json.loads((model / "config.json").read_text())
    assert config["pipo"]["conf_threshold"] == r["recommended"]["threshold"]
    assert r["recommended"]["threshold"] in (-1.0, 0.5, 1.0)
    cost = config["pipo"]["draft_cost"]
    assert isinstance(cost, float) and cost >= 0 and cost == r["draft_cost"]
    config["pipo"] = {k: v for k, v in config["pipo"].items() if k not in ("conf_threshold", "draft_cost")}
    before["pipo"].pop("conf_threshold", None)
    assert config == before  # nothing else changed
    assert json.loads((model / "calibration.json").read_text()) == r
    assert not [p.name for p in model.iterdir() if ".tmp" in p.name]
    assert "wrote" in err and "Traceback" not in err
    assert load(str(model))[0].args.conf_threshold == r["recommended"]["threshold"]


def test_a_failure_midway_leaves_the_old_config(model, prompts, capsys, monkeypatch):
    config = (model / "config.json").read_bytes()
    real = calibration.score_generation
    calls = []

    def fails_on_the_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash while scoring")
        return real(*args, **kw)

    monkeypatch.setattr(calibration, "score_generation", fails_on_the_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["--model", str(model), "--prompts", str(prompts), *SMALL])
    assert (model / "config.json").read_bytes() == config
    assert not (model / "calibration.json").exists()

    # A failure while the new config is being written: the old one stays whole, no temporary file.
    monkeypatch.setattr(calibration, "score_generation", real)
    real_fsync = calibration.os.fsync

    def disk_full(fd):
        if Path(f"/proc/self/fd/{fd}").resolve().name.startswith(".config.json.tmp"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(calibration.os, "fsync", disk_full)
    code, _, err = cli(capsys, "--model", model, "--prompts", prompts, *SMALL)
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert (model / "config.json").read_bytes() == config
    assert not [p.name for p in model.iterdir() if ".tmp" in p.name]


def test_a_dry_run_writes_nothing(model, prompts, capsys, committed, tmp_path):  # noqa: F811 (fixture)
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    plot = tmp_path / "curve.png"
    code, out, err = cli(capsys, "--model", model, "--prompts", prompts, "--max-tokens", "6", "--thresholds",
                         "0.9", "--dry-run", "--plot", plot)
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files
    assert plot.read_bytes().startswith(b"\x89PNG")  # only the plot asked for
    assert committed.changed() == [], "a calibration run wrote into benchmarks/results"
    assert "| keep all" in out and "recommended τ" in out and "dry run: nothing written" in err
    assert "generation: " in err and "/s" in err  # progress with its rate


# -- refusals: one line on stderr, exit 2


def test_refuses_a_base_with_another_tokenizer(model, prompts, capsys, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "models" / "base", other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(k for k, v in vocab.items() if v in (100, 101))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    refused(capsys, "uses another tokenizer than the PIPO model", "--model", model, "--base", other,
            "--prompts", prompts)
    refused(capsys, "is a PIPO model", "--model", model, "--base", model, "--prompts", prompts)


def test_refuses_a_missing_base(model, prompts, capsys, tmp_path):
    refused(capsys, "base model folder", "--model", model, "--base", tmp_path / "nowhere",
            "--prompts", prompts)
    edit_config(model, lambda c: c["pipo"].update(base_model="../gone"))
    refused(capsys, "(recorded in", "--model", model, "--prompts", prompts)
    edit_config(model, lambda c: c["pipo"].pop("base_model"))
    refused(capsys, "records no base model", "--model", model, "--prompts", prompts)


def test_refuses_prompts_longer_than_the_context(model, capsys, tmp_path):
    edit_config(model, lambda c: c.update(max_position_embeddings=32))
    long = tmp_path / "long.txt"
    long.write_text("def add(a, b):\n    return a + b\n" * 8)
    refused(capsys, "passes the model's context of 32", "--model", model, "--prompts", long)
    short = tmp_path / "short.txt"
    short.write_text("def add(a, b):")
    refused(capsys, "or generate fewer tokens", "--model", model, "--prompts", short, "--max-tokens", "40")


@pytest.mark.parametrize("content, match", [
    ("", "holds no prompt text"),
    ("\n  \n\n", "holds no prompt text"),
])
def test_refuses_empty_text_files(model, capsys, tmp_path, content, match):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    refused(capsys, match, "--model", model, "--prompts", path)


@pytest.mark.parametrize("content, match", [
    ("", "holds no prompts"),
    ("{not json\n", "line 1: not valid JSON"),
    ('{"completion": "x"}\n', "neither 'prompt' nor 'messages'"),
    ('{"text": ""}\n', "'text' must be a non-empty string"),
    ('["a list"]\n', "must be a JSON object"),
])
def test_refuses_invalid_jsonl(model, capsys, tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    refused(capsys, match, "--model", model, "--prompts", path)


def test_refuses_bad_options(model, prompts, capsys, tmp_path):
    refused(capsys, "not found", "--model", model, "--prompts", tmp_path / "none.txt")
    refused(capsys, "not numbers", "--model", model, "--prompts", prompts, "--thresholds", "0.5,high")
    refused(capsys, "not a number", "--model", model, "--prompts", prompts, "--thresholds", "nan")
    refused(capsys, "--max-nll-increase", "--model", model, "--prompts", prompts, "--max-nll-increase", "-1")
    refused(capsys, "does not exist", "--model", tmp_path / "no-model", "--prompts", prompts)


def test_the_library_stands_without_the_cli(mlx_pipo):
    _, tokenizer = load(str(mlx_pipo))
    with pytest.raises(PipoError, match="no prompts"):
        calibration.calibrate(None, None, tokenizer, tokenizer, [])
    code = ("import sys, pipo_mlx.calibration, pipo_mlx.quality\n"
            "assert not [m for m in sys.modules if m.startswith('pipo_mlx.cli')]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
