"""pass@k runs: PIPO and its base answer each problem n times, side by side, and each side's
answers are written as the PIPO authors' results records (docs/evaluation.md).

`OUT/{side}/{dataset}-results.jsonl` holds one record per problem, with the fields
and types the authors' evaluation writes: `question_idx` (int), `src_item` (the
problem), `completion_texts` (n strings), `extracted_answers`, `accuracies` and
`pass@k` (null: their scorer fills them), `n_tokens` and `n_pads` (n ints),
`finished` (n bools: the answer ended on an end-of-sequence token) and
`meta_infos` (n objects in their server's shape: `finish_reason` {"type": "stop",
"matched": id} or {"type": "length", "length": budget}, `prompt_tokens`,
`completion_tokens`, `n_pad`, `e2e_latency`; PIPO's also `steps`, `token2_kept`).

As in their PIPO runs, PIPO's `n_tokens` counts the slots it wrote, PADs included
(two per step: token1 and token2 or PAD), and `n_pads` the dropped drafts; the
base writes no PADs. The budget `max_tokens` counts real tokens on both sides.
"""

import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import stream_generate as mlx_stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .data import read_jsonl, seed_of
from .decode import stream_generate
from .errors import PipoError
from .model import PipoModel
from .problems import answer_kind, pass_rates
from .prompt_cache import pair_up
from .quality import Progress

THINK = "<think>\n"


@dataclass
class Settings:
    """The paper's evaluation settings by default (4 samples, 32768 tokens, temperature 1,
    top-p 0.95, top-k 20, presence penalty 1.5, thinking on)."""

    num_samples: int = 4
    max_tokens: int = 32768
    temp: float = 1.0
    top_p: float = 0.95
    top_k: int = 20
    presence_penalty: float = 1.5
    seed: int = 0
    conf_threshold: Optional[float] = None
    draft: Optional[str] = None
    enable_thinking: bool = True


class Answer(NamedTuple):
    text: str
    meta: Dict[str, Any]


class Side(NamedTuple):
    name: str  # "pipo" or "base": the output subfolder
    answer: Callable[[List[int], int], Answer]  # (prompt ids, token budget) -> one sampled answer


def render(tokenizer: TokenizerWrapper, prompt: str, enable_thinking: bool) -> Tuple[List[int], bool]:
    """The prompt's ids as the authors' runs render it (one user turn through the chat template,
    thinking on), or as raw text without a template; and whether the rendered prompt opens a
    thinking block, whose `<think>` line then starts the record's text, as in theirs."""
    if not tokenizer.has_chat_template:
        return list(tokenizer.encode(prompt)), False
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=enable_thinking)
    return list(tokenizer.encode(text, add_special_tokens=False)), text.endswith(THINK)


def _meta(last: Any, prompt_tokens: int, budget: int, pads: int, seconds: float) -> Dict[str, Any]:
    stopped = last.finish_reason == "stop"
    finish = {"type": "stop", "matched": int(last.token)} if stopped else {"type": "length", "length": budget}
    return {"finish_reason": finish, "prompt_tokens": prompt_tokens,
            "completion_tokens": last.generation_tokens + pads, "n_pad": pads, "e2e_latency": seconds}


def _sampling(s: Settings) -> Dict[str, Any]:
    return {"sampler": make_sampler(s.temp, s.top_p, top_k=s.top_k),
            "logits_processors": make_logits_processors(presence_penalty=s.presence_penalty or None)}


def pipo_side(model: PipoModel, tokenizer: TokenizerWrapper, s: Settings) -> Side:
    def answer(ids: List[int], budget: int) -> Answer:
        text, last, tic = "", None, time.perf_counter()
        for last in stream_generate(model, tokenizer, ids, max_tokens=budget, conf_threshold=s.conf_threshold,
                                    draft=s.draft, **_sampling(s)):
            text += last.text
        pads = last.steps - last.token2_kept  # every step writes a pair: token1, then token2 or PAD
        meta = _meta(last, len(ids), budget, pads, time.perf_counter() - tic)
        return Answer(text, {**meta, "steps": last.steps, "token2_kept": last.token2_kept})

    return Side("pipo", answer)


def base_side(model: nn.Module, tokenizer: TokenizerWrapper, s: Settings) -> Side:
    def answer(ids: List[int], budget: int) -> Answer:
        text, last, tic = "", None, time.perf_counter()
        for last in mlx_stream_generate(model, tokenizer, mx.array(ids), max_tokens=budget, **_sampling(s)):
            text += last.text
        return Answer(text, _meta(last, len(ids), budget, 0, time.perf_counter() - tic))

    return Side("base", answer)


def record(question_idx: int, item: dict, answers: Sequence[Answer], think: bool) -> Dict[str, Any]:
    """One results record, its fields in the authors' order."""
    texts = [THINK + a.text.removeprefix(THINK) if think else a.text for a in answers]
    metas = [a.meta for a in answers]
    return {"question_idx": question_idx, "src_item": item, "completion_texts": texts,
            "extracted_answers": None, "accuracies": None, "pass@k": None,
            "n_tokens": [m["completion_tokens"] for m in metas], "n_pads": [m["n_pad"] for m in metas],
            "finished": [m["finish_reason"]["type"] == "stop" for m in metas], "meta_infos": metas}


def write_jsonl_atomic(path: Path, records: Sequence[dict]) -> None:
    """The whole file under a temporary name, then renamed over `path`: an interrupted run
    leaves the last complete file, never a torn line."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def results_path(out: Path, side: str, dataset: str) -> Path:
    return out / side / f"{dataset}-results.jsonl"


def budgets(problems: Sequence[dict], tokenizer: TokenizerWrapper, context: int, s: Settings) -> List[Tuple[List[int], bool, int]]:
    """Each problem's (prompt ids, thinking, token budget): the budget is cut to the model's
    context; a prompt that leaves no room is refused."""
    out = []
    for item in problems:
        ids, think = render(tokenizer, item["prompt"], s.enable_thinking)
        room = context - len(pair_up(ids, -1))
        if room < 1:
            raise PipoError(f"{item['dataset']} problem {item['micro_index']}: the prompt has {len(ids)} "
                            f"tokens, at least the model's context of {context}")
        out.append((ids, think, min(s.max_tokens, room)))
    return out


def run(problems: Sequence[dict], prompts: Sequence[Tuple[List[int], bool, int]], sides: Sequence[Side],
        out: Path, s: Settings, log: Callable[[str], Any] = print) -> Dict[str, Dict[str, dict]]:
    """Answer every problem (its prompt from `budgets`) on every side, writing after each problem;
    problems already in a side's results file (same dataset and micro_index) are kept and
    skipped, so a stopped run resumes. Returns summary(...) of all records."""
    records: Dict[Tuple[str, str], List[dict]] = {}
    for side in sides:
        (out / side.name).mkdir(parents=True, exist_ok=True)
        for name in {p["dataset"] for p in problems}:
            path = results_path(out, side.name, name)
            records[side.name, name] = [r for _, _, r in read_jsonl(path, "results")] if path.exists() else []
    done = {(side, r["src_item"]["dataset"], r["src_item"]["micro_index"])
            for (side, _), rs in records.items() for r in rs}
    todo = [(q, side) for q, p in enumerate(problems) for side in sides
            if (side.name, p["dataset"], p["micro_index"]) not in done]
    if len(todo) < len(problems) * len(sides):
        log(f"resuming: {len(problems) * len(sides) - len(todo)} answered problem-sides kept")
    progress = Progress("pass@k", len(todo) * s.num_samples, "answers", log=log)
    for q, side in todo:
        item = problems[q]
        ids, think, budget = prompts[q]
        answers = []
        for j in range(s.num_samples):
            # The same seed for both sides: sample j of a problem is reproducible on each.
            mx.random.seed(seed_of(s.seed, zlib.crc32(item["dataset"].encode()), item["micro_index"], j))
            answers.append(side.answer(ids, budget))
            progress.step()
        rs = records[side.name, item["dataset"]]
        rs.append(record(q, item, answers, think))
        write_jsonl_atomic(results_path(out, side.name, item["dataset"]), rs)
    return summary(records)


def summary(records: Dict[Tuple[str, str], List[dict]], kind: Optional[str] = None) -> Dict[str, Dict[str, dict]]:
    """{dataset: {side: figures}}: problems, answers, pass@1, pass@k (scored by the authors'
    rules, `problems.score`), mean tokens and PADs per answer, and PIPO's keep rate."""
    table: Dict[str, Dict[str, dict]] = {}
    for (side, name), rs in sorted(records.items()):
        if not rs:
            continue
        metas = [m for r in rs for m in r["meta_infos"]]
        figures = {"problems": len(rs), "answers": len(metas), **pass_rates(rs, kind or answer_kind(name)),
                   "mean_tokens": sum(m["completion_tokens"] for m in metas) / len(metas),
                   "mean_pads": sum(m["n_pad"] for m in metas) / len(metas)}
        steps = sum(m.get("steps", 0) for m in metas)
        if steps:
            figures["keep_rate"] = sum(m["token2_kept"] for m in metas) / steps
        table.setdefault(name, {})[side] = figures
    return table
