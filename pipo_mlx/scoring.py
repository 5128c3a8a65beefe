"""Per-token perplexity of a text file under PIPO's teacher-forced pass, and its base's.

The texts are tokenized, joined and cut into rows of `sequence_length` tokens
(as mlx_lm.perplexity does); a PIPO row is read as pairs (`likelihood.py`), so
its slots 2, 4, ... are token1 slots, scored by the backbone, and 3, 5, ... token2
slots, scored by the MTP head. The base scores every slot from the one before;
its figures are taken over the same slots as PIPO's (2 onward), and split the
same way, so each PIPO figure has the base's beside it.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import mlx.nn as nn
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .data import EmptyRecord, encode_record, read_jsonl
from .errors import PipoError
from .likelihood import base_slot_scores, pipo_slot_scores
from .model import PipoModel
from .quality import Progress

MIN_ROW = 4  # the first pair is context only; a row needs a second to score anything


def read_texts(path: Path, tokenizer: TokenizerWrapper) -> List[List[int]]:
    """Token ids of each text: a .jsonl file's records in mlx-lm's formats ({"text"},
    {"prompt", "completion"}, {"messages"}, whole records scored), else the whole file."""
    if not path.is_file():
        raise PipoError(f"{path} not found; give a text file or a .jsonl file of records")
    if path.suffix != ".jsonl":
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PipoError(f"{path} is unreadable ({e}); it must be UTF-8 text") from None
        if not text.strip():
            raise PipoError(f"{path} is empty")
        return [list(tokenizer.encode(text))]
    texts = []
    for _, where, record in read_jsonl(path, "records"):
        try:
            texts.append([int(t) for t in encode_record(record, tokenizer, where).tokens])
        except EmptyRecord:
            continue
    if not texts:
        raise PipoError(f"{path} holds no text; write one {{\"text\": ...}} object per line")
    return texts


def cut_rows(texts: Sequence[Sequence[int]], length: int, limit: int = -1) -> List[List[int]]:
    """The texts joined and cut into rows of `length` tokens (even); a shorter last row is kept
    when it has a pair to score (cut to even length). At most `limit` rows (-1: all)."""
    if length < MIN_ROW or length % 2:
        raise PipoError(f"the sequence length must be even and at least {MIN_ROW}, got {length}")
    joined = [t for text in texts for t in text]
    rows = [joined[s : s + length] for s in range(0, len(joined), length)]
    if rows and len(rows[-1]) < length:
        rows[-1] = rows[-1][: len(rows[-1]) // 2 * 2]
        if len(rows[-1]) < MIN_ROW:
            rows.pop()
    if not rows:
        raise PipoError(f"the text has {len(joined)} tokens; perplexity needs at least {MIN_ROW}")
    return rows if limit < 0 else rows[:limit]


@dataclass
class Figure:
    """Perplexity over a set of slots: exp(mean NLL), with the delta-method standard error."""

    tokens: int
    nll: float
    perplexity: float
    stderr: float

    @classmethod
    def of(cls, nll: np.ndarray) -> "Figure":
        mean = float(nll.mean())
        sd = float(nll.std(ddof=1)) if nll.size > 1 else 0.0
        ppl = math.exp(mean)
        return cls(int(nll.size), mean, ppl, ppl * sd / math.sqrt(nll.size))


def _slot_nll(scores) -> Dict[str, np.ndarray]:
    """NLL per slot kind from per-row log-probabilities, over slots 2 onward."""
    token1 = -np.concatenate([lp[2::2] for lp, _ in scores])
    token2 = -np.concatenate([lp[3::2] for lp, _ in scores])
    return {"token1": token1, "token2": token2, "all": np.concatenate([token1, token2])}


def perplexity(
    model: PipoModel,
    rows: Sequence[Sequence[int]],
    base: Optional[nn.Module] = None,
    batch_size: int = 8,
    log: Callable[[str], Any] = print,
) -> Dict[str, Dict[str, Figure]]:
    """{"pipo": {...}, "base": {...} (with a base)}, each {"token1", "token2", "all"} Figures;
    the base's "token1" and "token2" are its figures on the slots PIPO gives each head."""
    pad = model.pad_token_id
    nll: Dict[str, List[Dict[str, np.ndarray]]] = {"pipo": [], "base": []}
    progress = Progress("perplexity", sum(len(r) for r in rows), "tokens", log=log)
    for s in range(0, len(rows), batch_size):
        batch = rows[s : s + batch_size]
        nll["pipo"].append(_slot_nll(pipo_slot_scores(model, batch)))
        if base is not None:
            nll["base"].append(_slot_nll(base_slot_scores(base, batch, pad)))
        progress.step(sum(len(r) for r in batch))
    return {side: {k: Figure.of(np.concatenate([p[k] for p in parts])) for k in ("token1", "token2", "all")}
            for side, parts in nll.items() if parts}
