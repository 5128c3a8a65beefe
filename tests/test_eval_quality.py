"""benchmarks/eval_quality.py: a reduced run writes to build/bench, never to the committed
benchmarks/results, and the log names only the files actually written (no plot without matplotlib);
its figures (compile-trim rule, ECE, agreement, acceptance α, threshold choice) on hand-made inputs
and against direct computations; one tiny end-to-end run.

The runs use the shipped demo models with a few windows and a few generated tokens (seconds)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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


# -- the figures, on hand-made inputs


@pytest.fixture(scope="module")
def eq():
    return load_script("eval_quality")


PROMPT = '    def area(self, r):\n        """Area of a circle of radius r."""'


@pytest.mark.parametrize(
    "generation, truncated, source, complete, ok",
    [
        # Ends at the first line back at the def's column; the rest (the next method) is dropped.
        ("\n        return 3.14 * r * r\n\n    def next(self):\n        pass", True,
         'def area(self, r):\n    """Area of a circle of radius r."""\n    return 3.14 * r * r\n\n', True, True),
        # A comment or blank line at column 0 does not end the function.
        ("\n# note\n\n        return r\n", False,
         'def area(self, r):\n    """Area of a circle of radius r."""\n# note\n\n    return r\n\n', True, True),
        # A line deeper than the def continues it, one at the def's column ends it.
        ("\n        x = r\n      \n    y = 1", True,
         'def area(self, r):\n    """Area of a circle of radius r."""\n    x = r\n  \n', True, True),
        # Cut by the budget: the unfinished last line is dropped and an open block is fine.
        ("\n        if r < 0:\n            raise ValueErr", True,
         'def area(self, r):\n    """Area of a circle of radius r."""\n    if r < 0:\n', False, True),
        # ... an open bracket too.
        ("\n        return max(r,\n                   0", True,
         'def area(self, r):\n    """Area of a circle of radius r."""\n    return max(r,\n', False, True),
        # The same text ended by EOS is complete, and then must compile.
        ("\n        if r < 0:\n            raise ValueErr", False,
         'def area(self, r):\n    """Area of a circle of radius r."""\n    if r < 0:\n        raise ValueErr\n',
         True, True),
        ("\n        if r < 0:\n", False,
         'def area(self, r):\n    """Area of a circle of radius r."""\n    if r < 0:\n\n', True, False),
        # A syntax error on a finished line fails, truncated or not.
        ("\n        x = = r\n        return", True,
         'def area(self, r):\n    """Area of a circle of radius r."""\n    x = = r\n', False, False),
        ("\n        return r +\n        pass", True,
         'def area(self, r):\n    """Area of a circle of radius r."""\n    return r +\n', False, False),
        # No newline and cut by the budget: back to the prompt, which is a valid beginning.
        (" + 1", True, 'def area(self, r):\n    """Area of a circle of radius r."""\n', False, True),
        (" + 1", False, 'def area(self, r):\n    """Area of a circle of radius r.""" + 1\n', True, True),
    ],
)
def test_compile_trim_rule(eq, generation, truncated, source, complete, ok):
    assert eq.function_source(PROMPT, generation, truncated) == (source, complete)
    assert eq.compiles(PROMPT, generation, truncated) is ok


def test_a_top_level_function_and_tabs(eq):
    prompt = "def f(x):\n\t'''Doc.'''"
    assert eq.function_source(prompt, "\n\treturn x\nprint(f(1))\n", False) == (
        "def f(x):\n\t'''Doc.'''\n\treturn x\n", True)
    assert eq.compiles(prompt, "\n\treturn x\nprint(f(1))\n", False)
    assert not eq.compiles(prompt, "\n\treturn x)\n", False)


def test_ece_on_a_hand_computed_example(eq):
    conf = np.array([0.05, 0.15, 0.12, 0.95, 0.1, 1.0])
    observed = np.array([0.0, 1.0, 0.0, 1.0, 0.4, 0.7])
    # Bins [0, 0.1): 0.05 -> 0; [0.1, 0.2): 0.15, 0.12, 0.1 -> 1, 0, 0.4; [0.9, 1]: 0.95, 1.0 -> 1, 0.7.
    want = (1 / 6) * abs(0.05 - 0) + (3 / 6) * abs(0.37 / 3 - 1.4 / 3) + (2 / 6) * abs(0.975 - 0.85)
    ece, bins = eq.calibration(conf, observed)
    assert ece == pytest.approx(want)
    assert [(b["lo"], b["n"]) for b in bins] == [(0.0, 1), (0.1, 3), (pytest.approx(0.9), 2)]
    assert bins[1]["confidence"] == pytest.approx(0.37 / 3) and bins[1]["observed"] == pytest.approx(1.4 / 3)
    assert eq.calibration(np.array([0.3, 0.3]), np.array([0.3, 0.3]))[0] == pytest.approx(0.0)


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_agreement_and_acceptance_against_numpy(eq):
    import mlx.core as mx

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7, 11)) * 3, rng.normal(size=(5, 7, 11)) * 3
    pa, pb = np_softmax(a), np_softmax(b)
    tv = 0.5 * np.abs(pa - pb).sum(-1)
    np.testing.assert_allclose(eq.overlap(mx.array(a), mx.array(b)), 1 - tv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eq.overlap(mx.array(a), mx.array(a)), 1.0, atol=1e-6)

    y = rng.integers(0, 11, size=(5, 7))
    draft = np.take_along_axis(pa, y[..., None], -1)[..., 0]
    target = np.take_along_axis(pb, y[..., None], -1)[..., 0]
    want = np.minimum(1.0, target / draft)
    got = eq.acceptance(mx.array(a), mx.array(b), mx.array(y))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (got < 1).any() and (got == 1).any()
    # Averaged over y ~ p_draft, the acceptance is the overlap (speculative sampling's identity).
    expected = (pa * np.minimum(1.0, pb / pa)).sum(-1)
    np.testing.assert_allclose(expected, 1 - tv, rtol=1e-9)


def test_threshold_choice_on_a_hand_made_curve(eq):
    base = {"compile_rate": 0.5, "nll": 2.0}
    rows = {
        "-1.0": {"speedup": 1.6, "compile_rate": 0.5, "nll": 2.2},  # NLL 10% over: out
        "0.5": {"speedup": 1.3, "compile_rate": 0.4, "nll": 2.0},  # 10 points below: out
        "0.8": {"speedup": 1.1, "compile_rate": 0.47, "nll": 2.1},  # exactly at both margins: in
        "0.9": {"speedup": 1.05, "compile_rate": 0.6, "nll": 1.8},  # better than the base: in, slower
        "0.95": {"speedup": 1.0, "compile_rate": 0.5, "nll": 2.0},
    }
    r = eq.choose_threshold(rows, base)
    assert r["threshold"] == 0.8 and r["faster_than_base"]
    passes = {c["threshold"]: c["passes"] for c in r["candidates"]}
    assert passes == {-1.0: False, 0.5: False, 0.8: True, 0.9: True, 0.95: True}
    fails = {c["threshold"]: c["fails"] for c in r["candidates"]}
    assert "NLL" in fails[-1.0][0] and "compile rate 10.0 points" in fails[0.5][0]
    assert "1.10x" in r["reason"]

    rows["0.8"]["nll"] = 2.2
    rows["0.9"]["compile_rate"] = 0.46
    rows["0.95"]["speedup"] = 0.9
    r = eq.choose_threshold(rows, base)
    assert r["threshold"] == 0.95 and not r["faster_than_base"] and "slower than the base" in r["reason"]
    rows["0.95"]["compile_rate"] = 0.3
    assert eq.choose_threshold(rows, base)["threshold"] is None
    tie = {"0.5": {"speedup": 1.2, "compile_rate": 0.5, "nll": 2.0},
           "0.9": {"speedup": 1.2, "compile_rate": 0.5, "nll": 2.0}}
    assert eq.choose_threshold(tie, base)["threshold"] == 0.9  # a tie goes to the safer τ
    assert eq.COMPILE_MARGIN == 0.03 and eq.NLL_MARGIN == 0.05


def test_a_choice_is_carried_from_valid_to_test(eq, tmp_path):
    rows = {"0.5": {"speedup": 1.2, "compile_rate": 0.5, "nll": 2.0},
            "0.9": {"speedup": 1.1, "compile_rate": 0.5, "nll": 2.0}}
    results = {"sampled": {"base": {"compile_rate": 0.5, "nll": 2.0}, "by_threshold": rows}}
    valid = eq.recommendation(eq.parse_args(["--split", "valid"]), results)
    assert valid["threshold"] == 0.5 and valid["chosen_on"] == "valid" and "note" not in valid
    assert "for information only" in eq.recommendation(eq.parse_args([]), results)["note"]
    path = tmp_path / "valid.json"
    path.write_text(json.dumps({"split": "valid", "recommended": {**valid, "threshold": 0.9}}))
    test = eq.recommendation(eq.parse_args(["--choice-from", str(path)]), results)
    assert test["threshold"] == 0.9 and test["chosen_on"] == "valid"
    assert test["figures_here"] == rows["0.9"] and test["would_choose_on_test"]["threshold"] == 0.5
    with pytest.raises(SystemExit):
        eq.recommendation(eq.parse_args(["--split", "valid", "--choice-from", str(path)]), results)
    assert eq.parse_args(["--split", "valid"]).out == str(SCRATCH)  # a valid run never writes the results


def test_prompts_are_function_starts(eq):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(ROOT / "models" / "base-stdlib")
    prompts = eq.function_prompts(tokenizer, "valid", 6)
    assert len(prompts) == 6 and len({p.file for p in prompts}) == 6  # round-robin over files
    for p in prompts:
        assert p.text.lstrip().startswith(("def ", "async def ")) and not p.text.endswith("\n")
        assert tokenizer.decode(p.ids) == p.text and len(p.ids) <= eq.MAX_PROMPT_TOKENS
        assert eq.compiles(p.text, "", True)  # the prompt alone is a valid beginning


# -- the generated-text figures against a direct computation, on the shipped demo models


def test_acceptance_uses_the_exact_contexts(eq):
    """score() recomputes, teacher-forced, what the decoder saw: its α must equal the one from
    the decoder's own token2 log-probabilities and the base run on each PAD-free prefix."""
    import mlx.core as mx
    from mlx_lm import load as load_base

    from pipo_mlx import load as load_pipo, make_prompt_cache, stream_generate

    base, tokenizer = load_base(str(ROOT / "models" / "base-stdlib"))
    pipo, _ = load_pipo(str(ROOT / "models" / "pipo-stdlib"))
    prompt = eq.function_prompts(tokenizer, "valid", 1)[0]
    models, pad = {"base": base, "pipo": pipo}, pipo.pad_token_id
    for ids in (prompt.ids, prompt.ids[:-1]):  # an even and an odd prompt (a pairing PAD)
        cache, tokens, drafts = make_prompt_cache(pipo), [], []
        for r in stream_generate(pipo, tokenizer, ids, max_tokens=12, conf_threshold=-1.0, prompt_cache=cache):
            tokens.append(r.token)
            if r.from_draft:
                drafts.append((len(tokens) - 1, float(r.logprobs[r.token])))
        s = eq.Sample(tokens, 1.0, False, row=np.array(cache.tokens))
        eq.score(models, eq.Prompt("x", "", list(ids)), s, pad)
        assert len(drafts) == len(s.scores["alpha"]) > 0
        want_alpha, want_nll = [], []
        for k, t in enumerate(tokens):
            logits = base(mx.array(list(ids) + tokens[:k])[None])[0, -1].astype(mx.float32)
            lp = float(logits[t] - mx.logsumexp(logits))
            want_nll.append(-lp)
            for j, draft_lp in drafts:
                if j == k:  # the decoder masks PAD; its mass is negligible here
                    want_alpha.append(min(1.0, math.exp(lp - draft_lp)))
        np.testing.assert_allclose(s.scores["alpha"], want_alpha, atol=2e-3)
        np.testing.assert_allclose(s.scores["nll"], want_nll, atol=2e-3)
        assert ((0 <= s.scores["conf"]) & (s.scores["conf"] <= 1)).all()


TINY = ["--max-windows", "2", "--prompts", "2", "--gen-tokens", "8", "--thresholds", "-1", "0.9"]


def test_tiny_end_to_end_run(tmp_path, committed):
    done = run(TINY + ["--out", str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert committed.changed() == []
    r = json.loads((tmp_path / "eval_quality.json").read_text())
    assert set(r) >= {"models", "split", "settings", "machine", "test_tokens", "base", "pipo", "sampled",
                      "greedy", "calibration", "recommended"}
    assert r["split"] == "test" and r["settings"]["sampling"]["top_k"] == 20
    assert 0 < r["pipo"]["token1_agreement"] <= 1 and 0 < r["pipo"]["token2_agreement"] <= 1
    for mode in ("sampled", "greedy"):
        m = r[mode]
        assert m["prompts"] == 2 and m["tokens"] == 8 and set(m["by_threshold"]) == {"-1.0", "0.9"}
        assert 0 <= m["base"]["compile_rate"] <= 1 and m["base"]["nll"] > 0 and m["base"]["tokens_per_s"] > 0
        keep_all = m["by_threshold"]["-1.0"]
        assert keep_all["keep_rate"] > 0.5 and keep_all["tokens_per_step"] > 1.5 and 0 < keep_all["alpha"] <= 1
        for x in [*m["by_threshold"].values(), m["default"]]:
            assert x["speedup"] > 0 and x["nll_ratio"] == pytest.approx(x["nll"] / m["base"]["nll"])
    assert "agreement" in r["greedy"]["by_threshold"]["0.9"]
    cal = r["calibration"]
    assert cal["drafts"] == r["sampled"]["by_threshold"]["-1.0"]["kept"] and 0 <= cal["ece"] <= 1
    assert sum(b["n"] for b in cal["bins"]) == cal["drafts"]
    rec = r["recommended"]
    assert rec["chosen_on"] == "test" and {c["threshold"] for c in rec["candidates"]} == {-1.0, 0.9}
    # progress: count, rate, time; base, two thresholds and the default settings, two prompts
    assert "sampled generation: 8/8 generations" in done.stdout
    pngs = {p.name for p in tmp_path.iterdir() if p.suffix == ".png"}
    try:
        import matplotlib  # noqa: F401

        assert pngs == {"reliability.png", "speed_quality.png"}
    except ImportError:
        assert pngs == set()
