"""Choosing a PIPO model's confidence threshold τ on the user's own prompts (docs/design.md §5).

Each prompt is decoded by the base model (mlx-lm) and by PIPO at every τ of the
sweep, one after the other with the order rotated per prompt, so that a change
in machine load hits every side alike; PIPO always drafts (`draft="always"`),
so that τ alone decides what is kept. Then, teacher-forced: the base's NLL of
every generated text, the acceptance α of every kept draft, and the agreement
(1 - TV) of PIPO's token1 / token2 distributions with the base's over each
prompt followed by the base's continuation (`quality.py`).

The recommended τ is the fastest whose text the base scores at most
`max_nll_increase` worse than PIPO's text at τ = 1: keep-none is PIPO's own
quality floor, since dropping a draft can never make the text worse than
never drafting. τ < 0 (keep all) and τ = 1 are always measured: besides being
candidates, they give the relative extra cost of a drafting step, which the
adaptive drafting policy (`drafting.py`) reads as `pipo.draft_cost`.
"""

import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import stream_generate as mlx_stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import dequantize_model, load as mlx_lm_load

from .data import read_jsonl
from .decode import check_threshold, stream_generate
from .errors import PipoError
from .hf_io import is_hub_id, read_json
from .model_io import recorded_base, write_json_atomic
from .prompt_cache import make_prompt_cache, pair_up
from .quality import Progress, calibration, fastest_passing, score_generation, teacher_forced
# A prompt or messages record gives what a model is to continue, as for teacher rollouts.
from .rollouts import encode_prompt
from .speed import Run, measure

KEEP_ALL, KEEP_NONE = -1.0, 1.0
DEFAULT_THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0)
RESULTS_FILE = "calibration.json"


@dataclass
class Prompt:
    where: str  # "FILE line N", "FILE block N" or FILE, for error messages
    ids: List[int]


@dataclass
class Settings:
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS
    max_tokens: int = 64
    max_nll_increase: float = 0.05  # relative, against PIPO's text at τ = 1
    min_alpha: float = 0.0  # mean acceptance of kept drafts; 0: no criterion
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0


def sweep(thresholds: Sequence[float]) -> List[float]:
    """The thresholds measured, ascending: those given (every τ < 0 is keep-all, every τ ≥ 1
    keep-none, so each pair collapses to one) plus keep-all and keep-none."""
    given = {KEEP_ALL if t < 0 else KEEP_NONE if t >= 1 else t for t in map(check_threshold, thresholds)}
    return sorted(given | {KEEP_ALL, KEEP_NONE})


# -- the inputs


def _text_prompts(path: Path, tokenizer: TokenizerWrapper) -> List[Prompt]:
    """A folder: one prompt per file. A file: one prompt per blank-line-separated block."""
    whole = path.is_dir()
    files = [path]
    if whole:
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise PipoError(f"{path} holds no prompt files")
    prompts = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PipoError(f"{f} is unreadable ({e}); prompt files must be UTF-8 text") from None
        blocks = {f"{f}": text} if whole else {
            f"{f} block {k}": b for k, b in enumerate(re.split(r"\n(?:[ \t]*\n)+", text), 1)}
        # No final newline: the tokenizer merges a newline with the next line's
        # indentation, so a bare one would tell the model the next line is not indented.
        found = [Prompt(where, list(tokenizer.encode(b.rstrip())))
                 for where, b in blocks.items() if b.strip()]
        if not found:
            raise PipoError(f"{f} holds no prompt text; write prompts separated by blank lines")
        prompts += found
    return prompts


def _jsonl_prompts(path: Path, tokenizer: TokenizerWrapper) -> List[Prompt]:
    """mlx-lm's record formats: "text" is raw text, "prompt" and "messages" go through the
    chat template when the tokenizer has one (a trailing assistant turn is dropped)."""
    prompts = []
    for _, where, record in read_jsonl(path, "prompts"):
        if isinstance(record, dict) and "text" in record and not {"prompt", "messages"} & set(record):
            if not isinstance(record["text"], str) or not record["text"].strip():
                raise PipoError(f"{where}: 'text' must be a non-empty string; fill or remove it")
            prompts.append(Prompt(where, list(tokenizer.encode(record["text"].rstrip()))))
        else:
            prompts.append(Prompt(where, encode_prompt(record, tokenizer, where)))
    if not prompts:
        raise PipoError(f"{path} holds no prompts; write one {{\"prompt\": ...}} object per line")
    return prompts


def read_prompts(paths: Sequence[Path], tokenizer: TokenizerWrapper, context: int, max_tokens: int,
                 limit: Optional[int] = None) -> List[Prompt]:
    """The prompts of `paths` (.jsonl records, else text), the first `limit` of them, each
    checked to fit the model's `context` with `max_tokens` generated after it."""
    prompts: List[Prompt] = []
    for path in map(Path, paths):
        if not path.exists():
            raise PipoError(f"prompt file {path} not found")
        read = _jsonl_prompts if path.suffix == ".jsonl" else _text_prompts
        prompts += read(path, tokenizer)
    for p in prompts:
        # PIPO reads pairs, so an odd prompt takes a PAD.
        n = len(pair_up(p.ids, -1))
        if n + max_tokens > context:
            raise PipoError(f"{p.where}: the prompt has {len(p.ids)} tokens; with {max_tokens} more to "
                            f"generate that passes the model's context of {context}; shorten it"
                            + (" or generate fewer tokens" if n < context else ""))
    return prompts[:limit] if limit else prompts


def base_spec(model_folder: Path, given: Optional[str], record: Optional[str]) -> str:
    """The base model: `given` (a path or hub id), else the one recorded with the model."""
    spec = given if given is not None else recorded_base(model_folder, record)
    if spec is None:
        raise PipoError(f"{model_folder} records no base model (config.json: pipo.base_model); "
                        "name the model it was made from with --base")
    if not is_hub_id(spec) and not Path(spec).expanduser().is_dir():
        whence = "" if given is not None else f" (recorded in {model_folder / 'config.json'})"
        raise PipoError(f"base model folder {spec}{whence} not found; pass --base with the base "
                        "model's folder or Hugging Face repo id")
    return spec


def load_base(
    spec: str, tokenizer: TokenizerWrapper, logit_width: int
) -> Tuple[nn.Module, TokenizerWrapper]:
    """The base model and its tokenizer, loaded by mlx-lm; refused unless it shares
    `tokenizer`'s vocabulary and scores `logit_width` tokens, as the figures compare ids."""
    local = not is_hub_id(spec)
    if local:
        spec = str(Path(spec).expanduser())
        if "pipo" in read_json(Path(spec) / "config.json", "a model folder"):
            raise PipoError(f"{spec} is a PIPO model; the base must be an ordinary mlx-lm model")
    try:
        model, base_tokenizer = mlx_lm_load(spec)
    except Exception as e:  # mlx-lm and the hub raise many kinds for unusable folders
        raise PipoError(f"{spec}: mlx-lm cannot load the base model ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0]})") from None
    theirs, ours = base_tokenizer.get_vocab(), tokenizer.get_vocab()
    if theirs != ours:
        token = next((k for k in sorted(ours) if theirs.get(k) != ours[k]), None)
        what = (f"{len(theirs)} tokens, the PIPO model's {len(ours)}" if token is None else
                f"token {token!r} is id {theirs.get(token)} there, {ours[token]} in the PIPO model's")
        raise PipoError(f"{spec} uses another tokenizer than the PIPO model ({what}); calibrate "
                        "against the base model the PIPO model was made from")
    width = model(mx.array([[0]])).shape[-1]
    if width != logit_width:
        raise PipoError(f"{spec} scores {width} token ids, the PIPO model {logit_width}; calibrate "
                        "against the base model the PIPO model was made from")
    return model, base_tokenizer


# -- the measurements


@dataclass
class Generation:
    run: Run
    tokens: List[int]
    first_step: int  # tokens the first step yielded (it also holds the prefill)
    row: Optional[np.ndarray] = None  # PIPO: its prompt cache's tokens, PADs where drafts were dropped
    scores: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def s_per_step(self) -> Optional[float]:
        """Seconds per decode step after the first."""
        r = self.run
        if r.s_per_token is None or r.steps < 2:
            return None
        return r.s_per_token * (r.tokens - self.first_step) / (r.steps - 1)


def _generate(stream: Callable[[int], Iterator[Any]], n: int, seed: int) -> Generation:
    """One timed generation (`speed.measure`) of at most `n` tokens, its tokens recorded."""
    tokens: List[int] = []
    flags: List[bool] = []

    def side(n: int) -> Iterator[Tuple[int, bool]]:
        mx.random.seed(seed)
        for r in stream(n):  # mlx-lm's responses and PIPO's both say `from_draft`
            tokens.append(r.token)
            flags.append(r.from_draft)
            yield r.token, r.from_draft

    run = measure(side, n)
    return Generation(run, tokens, 2 if len(flags) > 1 and flags[1] else 1)


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _summary(gens: List[Generation], base: Optional[List[Generation]] = None) -> Dict[str, Any]:
    """The figures of one side over all prompts; for PIPO, `base` gives the paired speedups."""
    steps = sum(g.run.steps for g in gens)
    nll = np.concatenate([g.scores["nll"] for g in gens])
    speed = [1 / g.run.s_per_token if g.run.s_per_token else None for g in gens]
    row: Dict[str, Any] = {"tokens": sum(g.run.tokens for g in gens), "nll": float(nll.mean()),
                           "decode_tokens_per_s": _median(speed)}
    if base is None:
        return row
    alpha = np.concatenate([g.scores["alpha"] for g in gens])
    kept = sum(g.run.kept for g in gens)
    row.update({
        "steps": steps, "kept": kept, "keep_rate": kept / steps, "tokens_per_step": row["tokens"] / steps,
        "alpha": float(alpha.mean()) if alpha.size else None,
        "s_per_step": _median([g.s_per_step for g in gens]),
        # Paired per prompt, so that the prompts' lengths and the machine's load cancel.
        "speedup": _median([s * b.run.s_per_token if s and b.run.s_per_token else None
                            for s, b in zip(speed, base)]),
    })
    return row


def choose(rows: Dict[str, dict], max_nll_increase: float, min_alpha: float) -> dict:
    """The fastest τ (by median speedup over the base; a tie goes to the higher τ) whose base NLL
    is at most `max_nll_increase` above keep-none's, and whose kept drafts' mean α is at least
    `min_alpha`."""
    candidates = []
    for tau, r in rows.items():
        fails = []
        if r["speedup"] is None:
            fails.append("no decode step to time: every generation ended in its first step")
        if r["nll_increase"] > max_nll_increase + 1e-9:
            fails.append(f"base NLL of its text {100 * r['nll_increase']:.1f}% above keep-none's")
        if r["alpha"] is not None and r["alpha"] < min_alpha - 1e-9:
            fails.append(f"mean α of kept drafts {r['alpha']:.3f} below {min_alpha}")
        candidates.append({"threshold": float(tau), "speedup": r["speedup"], "alpha": r["alpha"],
                           "nll_increase": r["nll_increase"], "passes": not fails, "fails": fails})
    best = fastest_passing(candidates)
    if best is None:  # keep-none passes the NLL margin by definition, so it was not timed
        fails = "; ".join(c for cand in candidates for c in cand["fails"] if cand["threshold"] == KEEP_NONE)
        raise PipoError(f"no threshold qualifies, not even keep-none ({fails}); generate more tokens, "
                        "or use other prompts")
    reason = (f"fastest of {sum(c['passes'] for c in candidates)} threshold(s) within the margins: "
              f"{best['speedup']:.2f}x the base's decoding speed, "
              f"base NLL {100 * best['nll_increase']:+.1f}% against keep-none")
    if best["speedup"] < 1:
        reason += "; slower than the base itself"
    return {"threshold": best["threshold"], "faster_than_base": best["speedup"] >= 1, "reason": reason,
            "candidates": candidates}


def calibrate(pipo: nn.Module, base: nn.Module, tokenizer: TokenizerWrapper, base_tokenizer: TokenizerWrapper,
              prompts: List[Prompt], settings: Settings = Settings(),
              log: Callable[[str], Any] = print) -> Dict[str, Any]:
    """Decode every prompt with the base and with PIPO at each τ of `sweep(settings.thresholds)`,
    score the texts against the base and recommend τ; returns the figures (JSON-able).

    On the CPU, the models are dequantized in place once the timings are taken.
    """
    if not prompts:
        raise PipoError("no prompts to calibrate on")
    start, s = time.time(), settings
    taus = sweep(s.thresholds)
    sampler = make_sampler(s.temp, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k)
    caches: Dict[str, Any] = {}

    def stream(side: str, ids: List[int]) -> Callable[[int], Iterator[Any]]:
        if side == "base":
            return lambda n: mlx_stream_generate(base, base_tokenizer, ids, max_tokens=n, sampler=sampler)
        caches[side] = make_prompt_cache(pipo)
        # draft="always": τ alone decides what is kept, not the adaptive policy.
        return lambda n: stream_generate(pipo, tokenizer, ids, max_tokens=n, sampler=sampler, draft="always",
                                         conf_threshold=float(side), prompt_cache=caches[side])

    sides = ["base"] + [str(t) for t in taus]
    for side in sides:  # warm-up: first-call allocations stay out of the timings
        _generate(stream(side, prompts[0].ids), 4, s.seed)
    gens: Dict[str, List[Generation]] = {k: [] for k in sides}
    progress = Progress("generation", len(prompts) * len(sides), "generations", log=log)
    for k, p in enumerate(prompts):
        for side in sides[k % len(sides):] + sides[: k % len(sides)]:
            g = _generate(stream(side, p.ids), s.max_tokens, s.seed + k)
            if side != "base":
                g.row = np.array(caches[side].tokens)
            gens[side].append(g)
            progress.step()

    if mx.default_device() == mx.cpu:
        # MLX's CPU backend multiplies quantized weights about 10x slower than float32
        # ones; the timings are taken, and the scores need the same values, not the speed.
        base, pipo = dequantize_model(base), dequantize_model(pipo)
    progress = Progress("scoring", len(prompts) * (len(sides) + 1), "texts", log=log)
    agree1, agree2 = [], []
    for k, p in enumerate(prompts):
        for side in sides:
            g = gens[side][k]
            g.scores = score_generation(base, pipo, p.ids, g.tokens, g.row, pipo.pad_token_id)
            progress.step()
        # Agreement on the prompt and the base's continuation of it, whole pairs only.
        text = p.ids + gens["base"][k].tokens
        if len(text) >= 4:
            q = teacher_forced(base, pipo, mx.array([text[: len(text) // 2 * 2]]))
            agree1.append(q["agree1"].ravel())
            agree2.append(q["agree2"].ravel())
        progress.step()

    base_row = _summary(gens["base"])
    rows = {str(t): _summary(gens[str(t)], gens["base"]) for t in taus}
    floor = rows[str(KEEP_NONE)]["nll"]
    for r in rows.values():
        r["nll_increase"] = r["nll"] / floor - 1
        r["nll_vs_base"] = r["nll"] / base_row["nll"]
    # Per step, not per token: a keep-all step yields two tokens for one step's time.
    costs = [a.s_per_step / b.s_per_step - 1 for a, b in zip(gens[str(KEEP_ALL)], gens[str(KEEP_NONE)])
             if a.s_per_step and b.s_per_step]
    drafts = gens[str(KEEP_ALL)]
    conf = np.concatenate([g.scores["conf"] for g in drafts])
    alpha = np.concatenate([g.scores["alpha"] for g in drafts])
    return {
        "settings": {**asdict(s), "thresholds": taus, "prompts": len(prompts)},
        "agreement": {"token1": float(np.concatenate(agree1).mean()) if agree1 else None,
                      "token2": float(np.concatenate(agree2).mean()) if agree2 else None,
                      "slots": int(sum(map(len, agree1)) + sum(map(len, agree2))),
                      "text": "each prompt followed by the base's continuation, teacher-forced"},
        "base": base_row,
        "by_threshold": rows,
        "draft_cost": max(0.0, statistics.median(costs)) if costs else None,
        "confidence_ece_vs_alpha": calibration(conf, alpha)[0] if conf.size else None,
        "recommended": choose(rows, s.max_nll_increase, s.min_alpha),
        "machine": {"device": str(mx.default_device()), "cores": os.cpu_count(), "mlx": mx.__version__,
                    "wall_s": time.time() - start},
    }


# -- the outputs


def check_writable(folder: Path) -> None:
    """Refuse before the long run, not after it, a model folder the results cannot go to."""
    if not os.access(folder, os.W_OK) or not os.access(folder / "config.json", os.W_OK):
        raise PipoError(f"{folder} is not writable; use a writable copy of the model folder")


def write_results(folder: Path, results: dict) -> List[Path]:
    """The measurements to `folder/calibration.json`, then the recommended τ and the
    measured draft cost into `folder/config.json`'s pipo section; both atomically."""
    config_path = folder / "config.json"
    config = read_json(config_path, "a model folder")
    pipo = config.setdefault("pipo", {})
    pipo["conf_threshold"] = results["recommended"]["threshold"]
    if results["draft_cost"] is not None:
        pipo["draft_cost"] = results["draft_cost"]
    write_json_atomic(folder / RESULTS_FILE, results, indent=1)
    write_json_atomic(config_path, config, indent=4)  # mlx-lm's layout of config.json
    return [folder / RESULTS_FILE, config_path]
