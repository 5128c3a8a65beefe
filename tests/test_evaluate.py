"""pipo_mlx.evaluate: lm-evaluation-harness tasks on the tiny PIPO checkpoint, checked against
loops over the torch reference model (tests/hf_reference.py) written here, independently of
pipo_mlx.likelihood and pipo_mlx.harness: the pairing, the slots and the decoding are redone."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlx_lm.tokenizer_utils import load as load_tokenizer
from transformers import AutoTokenizer

from pipo_mlx.cli.evaluate import main

DATA = Path(__file__).parent / "data" / "eval" / "snippets.jsonl"
DOCS = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
ROOT = Path(__file__).resolve().parents[1]

TASKS = {
    "snippets_choice": """output_type: multiple_choice
doc_to_text: "{{context}}"
target_delimiter: ""
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
""",
    "snippets_gen": """output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{choices[answer]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
metric_list:
  - metric: exact_match
""",
    "snippets_ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
""",
}


def write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in TASKS.items():
        head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {DATA}\ntest_split: test\n")
        (folder / f"{name}.yaml").write_text(head + body)
    return folder


class Reference:
    """The torch model scored and decoded by plain loops over its teacher-forced pass."""

    def __init__(self, model, folder: Path):
        self.model = model
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.folder = folder
        self.pad, self.eos = self.tok.pad_token_id, self.tok.eos_token_id

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False)

    def request(self, context: str, continuation: str):
        # lm-eval's reference convention: trailing spaces of the context belong to the
        # continuation; an empty context is the EOS token (this tokenizer has no BOS).
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped):] + continuation
        if not context:
            return [self.eos], self.encode(continuation)
        ctx = self.encode(context)
        return ctx, self.encode(context + continuation)[len(ctx):]

    def forward(self, row):
        out = self.model(torch.tensor([row]))
        return out["logits"][0].astype(np.float64), out["mtp_logits"][0].astype(np.float64)

    def loglikelihood(self, ctx, cont, layout: str):
        row = ctx + [self.pad] * (len(ctx) % 2)
        slots = []
        for t in cont:
            slots.append(len(row))
            row += [t] if layout == "pairs" else [t, self.pad]
        row += [self.pad] * (len(row) % 2)
        logits, mtp = self.forward(row)
        total, greedy = 0.0, True
        for p in slots:
            # Pair i's backbone output predicts slot 2i + 2; its MTP output slot 2i + 3.
            z = logits[p // 2 - 1] if p % 2 == 0 else mtp[(p - 3) // 2]
            total += z[row[p]] - np.log(np.exp(z - z.max()).sum()) - z.max()
            greedy &= int(z.argmax()) == row[p]
        return total, greedy

    def generate(self, context: str, stop: str, budget: int, keep_all: bool) -> str:
        """Greedy PIPO decoding: token1 from the last pair's backbone output, token2 (kept
        every step, or never) from the MTP output for that token1; PAD never sampled. The text
        is mlx-lm's streaming detokenizer's, cut at the first stop string."""
        row = self.encode(context)
        row += [self.pad] * (len(row) % 2)
        detokenizer = load_tokenizer(self.folder).detokenizer  # mlx-lm's, as the decoder streams text
        text, n = "", 0

        def pick(z):
            z = z.copy()
            z[self.pad] = -np.inf
            return int(z.argmax())

        def emit(t):
            nonlocal text, n
            n += 1
            if t == self.eos:
                return True
            detokenizer.add_token(t)
            text += detokenizer.last_segment
            return stop in text

        while n < budget:
            # A dummy pair after the row gives a one-pair row an MTP position; causal, it
            # changes nothing before it.
            t1 = pick(self.forward(row + [self.pad, self.pad])[0][-2])
            if emit(t1):
                break
            t2 = self.pad
            if keep_all and n < budget:
                t2 = pick(self.forward(row + [t1, self.pad])[1][-1])
                if emit(t2):
                    break
            row += [t1, t2]
        if stop not in text:
            detokenizer.finalize()
            text += detokenizer.last_segment
        return text.split(stop)[0]


@pytest.fixture(scope="module")
def reference(hf_pipo, mlx_pipo):
    return Reference(hf_pipo[0], mlx_pipo)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def evaluate(mlx_pipo, tasks, names, **options):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pipo_mlx import load
    from pipo_mlx.harness import PipoLM

    model, tokenizer = load(str(mlx_pipo))
    lm = PipoLM(model, tokenizer, batch_size=4, log=lambda _: None, **options)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
    )
    return lm, results


def by_doc(samples):
    return {s["doc_id"]: s for s in samples}


@pytest.mark.parametrize("layout", ["pairs", "token1"])
def test_choice_and_rolling_loglikelihoods_match_a_loop_over_the_reference(mlx_pipo, tasks, reference, layout):
    _, results = evaluate(mlx_pipo, tasks, ["snippets_choice", "snippets_ppl"], layout=layout)
    choice = by_doc(results["samples"]["snippets_choice"])
    assert len(choice) == len(DOCS)
    for i, doc in enumerate(DOCS):
        got = [r[0] for r in choice[i]["resps"]]
        for (logprob, greedy), option in zip(got, doc["choices"]):
            want, want_greedy = reference.loglikelihood(*reference.request(doc["context"], option), layout)
            assert logprob == pytest.approx(want, abs=2e-3), (doc["context"], option)
            assert bool(greedy) == want_greedy
    rolling = by_doc(results["samples"]["snippets_ppl"])
    for i, doc in enumerate(DOCS):
        want, _ = reference.loglikelihood([reference.eos], reference.encode(doc["text"]), layout)
        assert rolling[i]["resps"][0][0] == pytest.approx(want, abs=2e-3)


def test_the_two_layouts_score_differently(mlx_pipo, tasks):
    # The token2 slots come from another head: if the layout were ignored, they would agree.
    scores = [[s["resps"][0][0][0] for s in evaluate(mlx_pipo, tasks, ["snippets_choice"], layout=x)[1]
               ["samples"]["snippets_choice"]] for x in ("pairs", "token1")]
    assert not np.allclose(scores[0], scores[1], atol=1e-2)


@pytest.mark.parametrize("threshold", [-1.0, 1.0])
def test_generate_until_decodes_as_pipo_and_reports_the_keep_rate(mlx_pipo, tasks, reference, threshold):
    lm, results = evaluate(mlx_pipo, tasks, ["snippets_gen"], conf_threshold=threshold, draft="always")
    gen = by_doc(results["samples"]["snippets_gen"])
    for i, doc in enumerate(DOCS):
        want = reference.generate(doc["context"] or reference.tok.eos_token, "\n", 12, keep_all=threshold < 0)
        assert gen[i]["resps"][0][0] == want, doc["context"]
    figures = lm.figures()
    assert figures["generations"] == len(DOCS) and figures["conf_threshold"] == threshold
    assert figures["tokens"] == figures["steps"] + figures["token2_kept"]
    if threshold < 0:  # every step keeps its draft, except one that ends on token1
        assert figures["token2_kept"] >= figures["steps"] - len(DOCS) and figures["keep_rate"] > 0.5
    else:
        assert figures["token2_kept"] == 0 and figures["keep_rate"] == 0.0


def test_a_long_context_is_cut_from_the_left(mlx_pipo, reference):
    from lm_eval.api.instance import Instance

    from pipo_mlx import load
    from pipo_mlx.harness import PipoLM

    model, tokenizer = load(str(mlx_pipo))
    lm = PipoLM(model, tokenizer, log=lambda _: None)
    lm.context = 16
    context, continuation = DOCS[3]["text"], " return self"
    request = Instance("loglikelihood", {}, (context, continuation), 0)
    ctx, cont = reference.request(context, continuation)
    [(got, _)] = lm.loglikelihood([request])
    # The newest context that leaves a 16-slot row: paired context + continuation ≤ 16.
    keep = 16 - len(cont) - len(cont) % 2
    want, _ = reference.loglikelihood(ctx[-keep:], cont, "pairs")
    assert got == pytest.approx(want, abs=2e-3)
    [(too_long, greedy)] = lm.loglikelihood([Instance("loglikelihood", {}, ("x", " y" * 40), 0)])
    assert too_long == float("-inf") and not greedy


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipo_mlx.evaluate", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_scores_and_keep_rate_and_writes_results(mlx_pipo, tasks, tmp_path):
    done = run_cli("--model", str(mlx_pipo), "--tasks", "snippets_choice", "snippets_gen",
                   "--include-path", str(tasks), "--output-dir", str(tmp_path), "--limit", "3",
                   "--conf-threshold", "-1", "--no-apply-chat-template")
    assert done.returncode == 0, done.stderr
    assert "snippets_choice" in done.stdout and "acc" in done.stdout
    assert "keep rate 1.000" in done.stdout or "keep rate 0.9" in done.stdout
    [written] = list(tmp_path.iterdir())  # no temporary file left beside it
    record = json.loads(written.read_text())
    assert set(record["results"]) == {"snippets_choice", "snippets_gen"}
    assert record["pipo"]["generations"] == 3 and record["pipo"]["conf_threshold"] == -1


def refused(main, argv, capsys):
    """(exit code, stderr) of a CLI run in this process, for the runs that stop early."""
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "no_such_task", "--include-path", "TASKS"], "unknown task no_such_task"),
    (["--tasks", "snippets_choice", "--include-path", "NOWHERE"], "no such folder"),
    (["--tasks", "snippets_choice", "--include-path", "TASKS", "--batch-size", "0"], "--batch-size"),
])
def test_cli_user_mistakes_are_one_line_and_exit_2(mlx_pipo, tasks, tmp_path, argv, message, capsys):
    argv = [str(tasks) if a == "TASKS" else str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in argv]
    code, err = refused(main, ["--model", mlx_pipo, *argv], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
