"""pipo_mlx.pass_at_k: the PIPO authors' results records from runs on the tiny checkpoint and its
base, checked against greedy loops written here (the torch reference for PIPO, mlx-lm's own
generate_step for the base); the authors' scoring rules on answers whose verdict is known; the
paper's benchmark builders on local rows; resuming; the refusals (one line, exit 2)."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm import load as mlx_load
from mlx_lm.generate import generate_step
from transformers import AutoTokenizer

from pipo_mlx.cli.pass_at_k import main
from pipo_mlx.passk import summary
from pipo_mlx.problems import aime_problems, gpqa_problems, lb2_problems, score
from test_calibrate import base_folder  # noqa: F401 (fixture: the checkpoint's backbone as a plain model)

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = Path(__file__).parent / "data" / "pass_at_k" / "problems.jsonl"
FIELDS = ["question_idx", "src_item", "completion_texts", "extracted_answers", "accuracies", "pass@k",
          "n_tokens", "n_pads", "finished", "meta_infos"]
BUDGET = 8


def cli(*argv):
    return subprocess.run([sys.executable, "-m", "pipo_mlx.pass_at_k", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def read(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def prompt_ids(tok, prompt):
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)


def streamed(tokenizer, tokens):
    """The text mlx-lm's streaming detokenizer makes of `tokens`, as both sides' generators do
    (the tiny model also samples ids the tokenizer has no text for)."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for t in tokens:
        detokenizer.add_token(t)
    detokenizer.finalize()
    return detokenizer.text


def pipo_greedy(ref, ids, pad, eos, budget, keep_all):
    """(tokens, steps, kept): token1 from the last pair's backbone output, token2 from the MTP
    output for it, kept every step or never; PAD never sampled; EOS as token1 ends the answer."""
    row, tokens, steps, kept = ids + [pad] * (len(ids) % 2), [], 0, 0

    def pick(z):
        z = z.astype(np.float64).copy()
        z[pad] = -np.inf
        return int(z.argmax())

    while len(tokens) < budget:
        t1 = pick(ref(torch.tensor([row + [pad, pad]]))["logits"][0][-2])
        tokens.append(t1)
        steps += 1
        t2 = pad
        if keep_all and t1 != eos and len(tokens) < budget:
            t2 = pick(ref(torch.tensor([row + [t1, pad]]))["mtp_logits"][0][-1])
            tokens.append(t2)
            kept += 1
        row += [t1, t2]
        if eos in (t1, t2):
            break
    return tokens, steps, kept


@pytest.mark.parametrize("threshold", [-1.0, 1.0])
def test_records_are_the_authors_and_hold_what_was_generated(hf_pipo, mlx_pipo, base_folder, tmp_path, threshold):  # noqa: F811
    out = tmp_path / "out"
    done = cli("--model", mlx_pipo, "--base", base_folder, "--problems", PROBLEMS, "--output-dir", out,
               "-k", 2, "-m", BUDGET, "--temp", 0, "--presence-penalty", 0, "--conf-threshold", threshold,
               "--draft", "always")
    assert done.returncode == 0, done.stderr
    problems = read(PROBLEMS)
    tok = AutoTokenizer.from_pretrained(mlx_pipo)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    base, base_tok = mlx_load(str(base_folder))
    for side in ("pipo", "base"):
        records = read(out / side / "aime2025-results.jsonl") + read(out / side / "gpqa_diamond-results.jsonl")
        assert [r["question_idx"] for r in records] == [0, 1, 2]
        for r, problem in zip(records, problems):
            assert list(r) == FIELDS
            assert r["src_item"] == problem
            assert r["extracted_answers"] is None and r["accuracies"] is None and r["pass@k"] is None
            ids = prompt_ids(tok, problem["prompt"])
            if side == "pipo":
                tokens, steps, kept = pipo_greedy(hf_pipo[0], ids, pad, eos, BUDGET, threshold < 0)
                slots, pads = 2 * steps, steps - kept
            else:
                tokens = []
                for t, _ in generate_step(mx.array(ids), base, max_tokens=BUDGET):
                    tokens.append(int(t))
                    if t == eos:
                        break
                slots, pads = len(tokens), 0
            text = streamed(base_tok, [t for t in tokens if t != eos])
            assert r["completion_texts"] == [text, text]  # greedy: both samples alike
            assert r["n_tokens"] == [slots, slots] and r["n_pads"] == [pads, pads]
            stopped = tokens[-1] == eos
            assert r["finished"] == [stopped, stopped]
            for m in r["meta_infos"]:
                want = {"type": "stop", "matched": eos} if stopped else {"type": "length", "length": BUDGET}
                assert m["finish_reason"] == want
                assert m["prompt_tokens"] == len(ids) and m["completion_tokens"] == slots and m["n_pad"] == pads
    table = json.loads((out / "summary.json").read_text())["results"]
    assert table["aime2025"]["pipo"]["problems"] == 2 and table["gpqa_diamond"]["base"]["answers"] == 2
    assert "keep_rate" in table["aime2025"]["pipo"] and "keep_rate" not in table["aime2025"]["base"]
    assert not [p for p in out.rglob(".*")]  # no temporary file left


def test_a_stopped_run_resumes_with_the_problems_it_lacks(mlx_pipo, tmp_path):
    out, first = tmp_path / "out", tmp_path / "first.jsonl"
    lines = PROBLEMS.read_text().splitlines()
    first.write_text("\n".join(lines[:1]) + "\n")
    args = ["--model", mlx_pipo, "--no-base", "--output-dir", out, "-k", 1, "-m", 4, "--seed", 3]
    assert cli(*args, "--problems", first).returncode == 0
    written = (out / "pipo" / "aime2025-results.jsonl").read_text()
    first.write_text("\n".join(lines[:2]) + "\n")
    done = cli(*args, "--problems", first)
    assert done.returncode == 0 and "resuming" in done.stderr
    again = (out / "pipo" / "aime2025-results.jsonl").read_text().splitlines()
    assert again[0] == written.strip() and len(again) == 2


@pytest.mark.parametrize("kind, text, answer, correct", [
    ("math", "so the total is \\boxed{42}", "42", True),
    ("math", "so the total is \\boxed{41}", "42", False),
    ("math", "\\boxed{\\frac{1}{2}}", "1/2", True),  # math-verify compares values
    ("math", "\\boxed{0.5}", "1/2", True),
    ("math", "<think>\nhmm</think>\nso \\boxed{1/2}", "0.5", True),
    ("math", "no number in sight", "42", False),
    ("mcq", "maybe \\boxed{B}\nno:\n\\boxed{C}", "C", True),  # the last boxed letter counts
    ("mcq", "\\boxed{C}\none\ntwo\nthree", "C", False),  # only the last three lines are read
    ("mcq", "\\boxed{c}", "C", False),  # capital letters only
    ("mcq", "The answer is C", "C", False),  # boxed only
])
def test_answers_are_scored_by_the_authors_rules(kind, text, answer, correct):
    assert score(kind, text, answer)[0] is correct


def test_pass_rates_are_the_authors_definitions():
    def rec(dataset, answer, texts):
        return {"src_item": {"dataset": dataset, "final_answer": answer}, "completion_texts": texts,
                "meta_infos": [{"completion_tokens": 10, "n_pad": 2, "steps": 6, "token2_kept": 4}] * len(texts)}

    table = summary({("pipo", "aime2025"): [rec("aime2025", "42", ["\\boxed{42}", "\\boxed{41}"]),
                                            rec("aime2025", "7", ["\\boxed{8}", "\\boxed{9}"])],
                     ("base", "gpqa_diamond"): [rec("gpqa_diamond", "A", ["\\boxed{A}", "\\boxed{A}"])]})
    pipo = table["aime2025"]["pipo"]
    # pass@1: correct answers over all answers; pass@k: problems with any correct answer.
    assert pipo["pass@1"] == 0.25 and pipo["pass@k"] == 0.5
    assert pipo["keep_rate"] == pytest.approx(4 / 6) and pipo["mean_pads"] == 2
    assert table["gpqa_diamond"]["base"]["pass@1"] == 1.0


def test_the_papers_benchmarks_are_built_from_their_rows():
    gpqa = [{"Question": f"Q{i}?", "Correct Answer": f"right{i}", "Incorrect Answer 1": f"w{i}a",
             "Incorrect Answer 2": f"w{i}b", "Incorrect Answer 3": f"w{i}c"} for i in range(8)]
    items = gpqa_problems(gpqa)
    for i, item in enumerate(items):
        assert item["dataset"] == "gpqa_diamond" and item["micro_index"] == i
        assert f"\n{item['final_answer']}) right{i}" in item["prompt"]  # the letter points at the answer
        assert item["prompt"].startswith("Please show your final answer within \\boxed{}")
    assert len({item["final_answer"] for item in items}) > 1  # shuffled per problem
    assert items == gpqa_problems(gpqa)  # the same shuffle every run
    [aime] = aime_problems([{"problem": "Find x.", "answer": "12", "id": "2025-I-1"}])
    assert aime["final_answer"] == "12" and aime["prompt"].endswith("\\boxed{}.\n\nFind x.")
    long = [{"_id": f"id{i}", "length": length, "difficulty": "easy", "question": "Which?", "context": "CTX",
             "answer": "B", **{f"choice_{k}": f"{k}{i}" for k in "ABCD"}}
            for i, length in enumerate(["short", "long", "short"])]
    lb2 = lb2_problems(long)
    assert [p["micro_index"] for p in lb2] == [0, 1] and [p["metadata"]["index"] for p in lb2] == [0, 2]
    assert all("CTX\nWhich?" in p["prompt"] and f") B{p['metadata']['index']}" in p["prompt"] for p in lb2)


def refused(main, argv, capsys):
    """(exit code, stderr) of a CLI run in this process, for the runs that stop early."""
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--problems", "MISSING", "--no-base"], "not found"),
    (["--problems", "PROBLEMS"], "records no base model"),
    (["--problems", "LONG", "--no-base"], "at least the model's context"),
    (["--no-base"], "no problems"),
    (["--problems", "BAD", "--no-base"], "final_answer"),
])
def test_user_mistakes_are_one_line_and_exit_2(mlx_pipo, tmp_path, argv, message, capsys):
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "x " * 5000, "final_answer": "1"}) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "2 + 2?"}) + "\n")
    files = {"MISSING": tmp_path / "none.jsonl", "PROBLEMS": PROBLEMS, "LONG": tmp_path / "long.jsonl",
             "BAD": tmp_path / "bad.jsonl"}
    code, err = refused(main, ["--model", mlx_pipo, "--output-dir", tmp_path / "out",
                               *[files.get(a, a) for a in argv]], capsys)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
