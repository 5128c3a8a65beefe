"""Problems for pass@k runs, and the rules that score answers to them.

A problem is the PIPO authors' `src_item`: {"dataset", "prompt", "final_answer",
"micro_index", "metadata"}, `micro_index` its position within its dataset. Ours
come from a user's JSONL file or from the paper's rule-scored benchmarks on the
Hugging Face hub (AIME 2025, GPQA Diamond, LongBench-v2 "short"), built with the
authors' prompt wording and answer-letter shuffle, so that a run scores like
theirs (docs/evaluation.md).

Scoring follows the authors' rule scorer: GPQA Diamond and LongBench-v2 take the
last `\\boxed{X}` letter in the answer's last three lines; every other dataset is
math, the reference parsed as an expression and the answer by math-verify from
its last `\\boxed{}` (LaTeX first, then a plain expression), then verified.
"""

import random
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .data import read_jsonl
from .errors import PipoError

MATH_PROMPT = "Please reason step by step, and put your final answer within \\boxed{{}}.\n\n{question}"
MCQ_PROMPT = ("Please show your final answer within \\boxed{{}} with only the choice letter, "
              "e.g., \\boxed{{A}}.\n\n{question}")
MCQ_DATASETS = ("gpqa_diamond", "lb2")
HUB_DATASETS = ("aime2025", "gpqa_diamond", "lb2")
LETTERS = "ABCD"


def problem(dataset: str, prompt: str, answer: str, index: int, metadata: Optional[dict] = None) -> dict:
    return {"dataset": dataset, "prompt": prompt, "final_answer": answer, "micro_index": index,
            "metadata": metadata or {}}


def read_problems(path: Path, dataset: Optional[str] = None) -> List[dict]:
    """A JSONL file of {"prompt", "final_answer"} records (optionally "dataset", "micro_index",
    "metadata", as the authors' src_items); the dataset defaults to `dataset`, else the file's
    name without its suffix, and the index to the record's place in its dataset."""
    items: List[dict] = []
    counts: Dict[str, int] = {}
    for _, where, record in read_jsonl(path, "problems"):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise PipoError(f"{where}: a problem needs a non-empty 'prompt' string")
        answer = record.get("final_answer", record.get("answer"))
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            raise PipoError(f"{where}: a problem needs its 'final_answer' (a string or number)")
        name = record.get("dataset") or dataset or path.stem
        index = record.get("micro_index", counts.get(name, 0))
        if not isinstance(index, int):
            raise PipoError(f"{where}: 'micro_index' must be an integer")
        counts[name] = max(counts.get(name, 0), index + 1)
        items.append(problem(name, record["prompt"], str(answer), index, record.get("metadata")))
    if not items:
        raise PipoError(f"{path} holds no problems; write one {{\"prompt\", \"final_answer\"}} object per line")
    seen = set()
    for item in items:
        key = (item["dataset"], item["micro_index"])
        if key in seen:
            raise PipoError(f"{path}: two problems of {key[0]} have micro_index {key[1]}; each needs its own")
        seen.add(key)
    return items


def choice_question(question: str, choices: Sequence[str], correct: int, seed: int) -> Tuple[str, str]:
    """The authors' multiple-choice layout: the four choices in an order drawn from
    random.Random(seed), lettered A-D; returns (question text, the correct letter)."""
    order = random.Random(seed).sample(range(4), 4)
    lines = [question.strip(), ""] + [f"{LETTERS[k]}) {choices[i]}" for k, i in enumerate(order)]
    return "\n".join(lines), LETTERS[order.index(correct)]


def aime_problems(rows: Iterable[dict]) -> List[dict]:
    """math-ai/aime25's test rows (problem, answer, id)."""
    return [problem("aime2025", MATH_PROMPT.format(question=r["problem"]), str(r["answer"]), i, {"id": r["id"]})
            for i, r in enumerate(rows)]


def gpqa_problems(rows: Iterable[dict]) -> List[dict]:
    """Idavidrein/gpqa's gpqa_diamond rows; each row's choices shuffled with its index as seed."""
    keys = ["Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
    items = []
    for i, r in enumerate(rows):
        text, letter = choice_question(r["Question"], [r[k] for k in keys], 0, i)
        items.append(problem("gpqa_diamond", MCQ_PROMPT.format(question=text), letter, i, {"index": i}))
    return items


def lb2_problems(rows: Iterable[dict]) -> List[dict]:
    """zai-org/LongBench-v2's "short" rows, the text before the question."""
    items = []
    for i, r in enumerate(rows):
        if r["length"] != "short":
            continue
        choices = [r[f"choice_{k}"] for k in LETTERS]
        text, letter = choice_question(r["question"], choices, LETTERS.index(r["answer"]), i)
        text = f"Read the following text and answer the question below.\n{r['context']}\n{text}"
        items.append(problem("lb2", MCQ_PROMPT.format(question=text), letter, len(items),
                             {"question_id": r["_id"], "length": r["length"],
                              "difficulty": r["difficulty"], "index": i}))
    return items


def hub_problems(name: str) -> List[dict]:
    """One of the paper's rule-scored benchmarks, downloaded by `datasets` (pip install 'pipo_mlx[eval]')."""
    sources = {"aime2025": (aime_problems, ("math-ai/aime25",), "test"),
               "gpqa_diamond": (gpqa_problems, ("Idavidrein/gpqa", "gpqa_diamond"), "train"),
               "lb2": (lb2_problems, ("zai-org/LongBench-v2",), "train")}
    if name not in sources:
        raise PipoError(f"unknown benchmark {name!r}; the hub ones are {', '.join(HUB_DATASETS)} "
                        "(your own problems: --problems FILE.jsonl)")
    try:
        from datasets import load_dataset
    except ImportError:
        raise PipoError("the hub benchmarks need `datasets`: pip install 'pipo_mlx[eval]'") from None
    build, args, split = sources[name]
    try:
        rows = load_dataset(*args, split=split)
    except Exception as e:  # the hub and datasets raise many kinds (offline, gated, renamed)
        raise PipoError(f"cannot load {name} from the hub ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0]})") from None
    return build(rows)


# -- scoring


def answer_kind(dataset: str) -> str:
    return "mcq" if dataset in MCQ_DATASETS else "math"


def _boxed_letter(text: str) -> Optional[str]:
    tail = "\n".join(text.strip().split("\n")[-3:])  # an early \boxed in the reasoning does not count
    found = re.findall(r"\\boxed{([A-Z])}", tail)
    return found[-1] if found else None


def _math_answer(text: str, reference: str) -> Tuple[bool, str]:
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold = parse(reference, extraction_config=[ExprExtractionConfig()])
    latex = LatexExtractionConfig(
        normalization_config=NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True,
                                                 boxed="last", units=True),
        boxed_match_priority=0, try_extract_without_anchor=False,
    )
    found = parse(text, extraction_config=[latex, ExprExtractionConfig()], extraction_mode="first_match")
    if not found:
        return False, "No extracted answer"
    return bool(verify(gold, found)), str(found)


def score(kind: str, text: str, reference: str) -> Tuple[bool, str]:
    """(correct, what was extracted) for one answer; a scorer error counts as wrong."""
    try:
        if kind == "mcq":
            letter = _boxed_letter(text)
            return (letter == reference, letter) if letter else (False, "No extracted answer")
        return _math_answer(text, reference)
    except Exception as e:  # math-verify's parsers may raise on odd text; the answer is then wrong
        return False, f"[eval-error] {type(e).__name__}: {e}"


def pass_rates(records: Sequence[Dict[str, Any]], kind: Optional[str] = None) -> Dict[str, float]:
    """pass@1 (mean over all samples) and pass@k (share of problems with a correct sample),
    as the authors' statistics define them, from results records."""
    samples, solved = [], []
    for r in records:
        item = r["src_item"]
        hits = [score(kind or answer_kind(item["dataset"]), t, item["final_answer"])[0]
                for t in r["completion_texts"]]
        samples += hits
        solved.append(any(hits))
    return {"pass@1": sum(samples) / max(len(samples), 1), "pass@k": sum(solved) / max(len(solved), 1)}
