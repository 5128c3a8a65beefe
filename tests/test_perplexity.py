"""pipo_mlx.perplexity: per-slot perplexities of the tiny PIPO checkpoint and its base, checked
against loops over the torch reference model (tests/hf_reference.py) written here; the CLI's
refusals (one line, exit 2)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from hf_reference import CORPUS
from pipo_mlx.cli.perplexity import main
from test_calibrate import base_folder  # noqa: F401 (fixture: the checkpoint's backbone as a plain model)

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(CORPUS[:5])


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    return z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))


def reference_nll(ref, ids, length):
    """NLL per slot kind over rows of `length` tokens (a shorter even last row kept): PIPO's
    slot p from its backbone (p even) or MTP head (p odd) output for pair p // 2 - 1; the base's
    (the same backbone, read token by token) from position p - 1; slots 2 onward."""
    rows = [ids[s : s + length] for s in range(0, len(ids), length)]
    rows[-1] = rows[-1][: len(rows[-1]) // 2 * 2]
    nll = {k: [] for k in ("pipo1", "pipo2", "base1", "base2")}
    for row in rows:
        out = ref(torch.tensor([row]))
        lm, mtp = log_softmax(out["logits"][0]), log_softmax(out["mtp_logits"][0])
        base = log_softmax(ref.backbone_logits(torch.tensor([row]))[0])
        for p in range(2, len(row)):
            pipo = lm[p // 2 - 1] if p % 2 == 0 else mtp[(p - 3) // 2]
            kind = "1" if p % 2 == 0 else "2"
            nll["pipo" + kind].append(-pipo[row[p]])
            nll["base" + kind].append(-base[p - 1][row[p]])
    return {k: np.array(v) for k, v in nll.items()}


def cli(*argv):
    return subprocess.run([sys.executable, "-m", "pipo_mlx.perplexity", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_perplexities_match_a_loop_over_the_reference(hf_pipo, mlx_pipo, base_folder, tmp_path):  # noqa: F811
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "ppl.json"
    done = cli("--model", mlx_pipo, "--data", data, "--base", base_folder, "--sequence-length", 40,
               "--batch-size", 2, "--output", out)
    assert done.returncode == 0, done.stderr
    got = json.loads(out.read_text())
    ids = AutoTokenizer.from_pretrained(mlx_pipo).encode(TEXT)
    assert len(ids) % 40 not in (0, 1, 2, 3)  # a shorter last row is scored too
    want = reference_nll(hf_pipo[0], ids, 40)
    for side in ("pipo", "base"):
        one, two = want[side + "1"], want[side + "2"]
        every = np.concatenate([one, two])
        for kind, nll in (("token1", one), ("token2", two), ("all", every)):
            figure = got[side][kind]
            assert figure["tokens"] == len(nll)
            assert figure["nll"] == pytest.approx(nll.mean(), abs=1e-4)
            assert figure["perplexity"] == pytest.approx(math.exp(nll.mean()), rel=1e-4)
            se = math.exp(nll.mean()) * nll.std(ddof=1) / math.sqrt(len(nll))
            assert figure["stderr"] == pytest.approx(se, rel=1e-3)
    assert "token2" in done.stdout and "base" in done.stdout


def test_jsonl_records_are_scored_whole(hf_pipo, mlx_pipo, tmp_path):
    data = tmp_path / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in CORPUS[:5]) + "\n")
    done = cli("--model", mlx_pipo, "--data", data, "--sequence-length", 64, "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert set(got) == {"pipo"}
    tok = AutoTokenizer.from_pretrained(mlx_pipo)
    # mlx-lm's text records end with EOS; the records are joined before they are cut.
    ids = [t for text in CORPUS[:5] for t in tok.encode(text) + [tok.eos_token_id]]
    want = reference_nll(hf_pipo[0], ids, 64)
    assert got["pipo"]["token2"]["nll"] == pytest.approx(want["pipo2"].mean(), abs=1e-4)
    assert got["pipo"]["token1"]["tokens"] == len(want["pipo1"])


def refused(main, argv, capsys):
    """(exit code, stderr) of a CLI run in this process, for the runs that stop early."""
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--data", "MISSING"], "not found"),
    (["--data", "TEXT", "--base"], "records no base model"),
    (["--data", "TEXT", "--sequence-length", "8192"], "longer than the model's context"),
    (["--data", "TEXT", "--sequence-length", "7"], "must be even"),
    (["--data", "EMPTY"], "is empty"),
])
def test_user_mistakes_are_one_line_and_exit_2(mlx_pipo, tmp_path, argv, message, capsys):
    (tmp_path / "text.txt").write_text(TEXT)
    (tmp_path / "empty.txt").write_text("\n")
    files = {"MISSING": tmp_path / "nothing.txt", "TEXT": tmp_path / "text.txt", "EMPTY": tmp_path / "empty.txt"}
    code, err = refused(main, ["--model", mlx_pipo, *[files.get(a, a) for a in argv]], capsys)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
