"""Training data: records -> tokens -> PIPO's pair layout -> batches (docs/design.md §6).

Batches are pure functions of (seed, micro-step), so a resumed run sees exactly
the batches an uninterrupted one would have.
"""

import json
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset, TextDataset
from mlx_lm.utils import common_prefix_len

from .errors import PipoError
from .train_config import TrainConfig

IGNORE = -100  # label of a position that has no loss: prompt, PAD, batch padding


@dataclass
class Example:
    tokens: np.ndarray  # the record's tokens, prompt first
    prompt_len: int  # tokens without loss at the start


def _rendered(make: Callable[[], Any], where: str) -> List[int]:
    """Tokens from a chat-template call; a template's own error names the record."""
    try:
        return list(make())
    except Exception as e:  # jinja templates raise their own errors on odd conversations
        raise PipoError(
            f"{where}: the chat template rejects this record ({type(e).__name__}: {e})"
        ) from None


def render_chat(
    tokenizer: TokenizerWrapper, messages: list, tools: Any, generation_prompt: bool, where: str
) -> List[int]:
    """A conversation through the chat template, as token ids."""
    return _rendered(
        lambda: tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=generation_prompt, return_dict=False
        ),
        where,
    )


def check_messages(messages: Any, where: str) -> None:
    """A non-empty list of {role, content} objects, else one line naming the record."""
    if not (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
            for m in messages
        )
    ):
        raise PipoError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects"
        )


class EmptyRecord(PipoError):
    """A record with nothing to train on (a teacher may answer with EOS alone)."""


def _no_text(where: str) -> PipoError:
    return EmptyRecord(
        f"{where}: the record has no text to train on (empty completion); fill or remove it"
    )


def encode_record(record: Any, tokenizer: TokenizerWrapper, where: str) -> Example:
    """mlx-lm's record formats: {"text"}, {"prompt", "completion"}, {"messages"}.

    The full sequence is what mlx-lm's dataset classes make of the record; ours
    adds checks that name the line, and prompt/completion without a chat template
    (mlx-lm requires one; the demo tokenizer has none).
    """
    if not isinstance(record, dict):
        raise PipoError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    tools = record.get("tools")
    if "messages" in record:
        messages = record["messages"]
        check_messages(messages, where)
        if not tokenizer.has_chat_template:
            raise PipoError(
                f"{where}: 'messages' records need a chat template, and this tokenizer "
                "has none; use 'text' or 'prompt'/'completion' records"
            )
        if not messages[-1]["content"].strip():
            raise _no_text(where)
        # The last message is the completion; everything before it is prompt.
        full = _rendered(lambda: ChatDataset([], tokenizer).process(record)[0], where)
        last_is_answer = messages[-1]["role"] == "assistant"
        prompt = (
            render_chat(tokenizer, messages[:-1], tools, last_is_answer, where)
            if len(messages) > 1
            else []
        )
    elif "prompt" in record or "completion" in record:
        p, c = record.get("prompt"), record.get("completion")
        if not (isinstance(p, str) and isinstance(c, str)):
            raise PipoError(f"{where}: 'prompt' and 'completion' must both be strings")
        if not c.strip():
            raise _no_text(where)
        if tokenizer.has_chat_template:
            completions = CompletionsDataset([], tokenizer, "prompt", "completion", False)
            full = _rendered(lambda: completions.process(record)[0], where)
            user = [{"role": "user", "content": p}]
            prompt = render_chat(tokenizer, user, tools, True, where)
        else:
            prompt = tokenizer.encode(p)
            full = prompt + tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id]
    elif "text" in record:
        if not isinstance(record["text"], str):
            raise PipoError(f"{where}: 'text' must be a string")
        if not record["text"].strip():
            raise _no_text(where)
        full, prompt = TextDataset([], tokenizer).process(record)[0], []
    else:
        raise PipoError(
            f"{where}: the record has none of the fields 'text', 'prompt'+'completion' "
            f"or 'messages' (it has {', '.join(map(repr, record)) or 'none'})"
        )
    # mlx-lm starts the loss after the prompt's own rendering; chat templates may
    # render a prompt differently once an answer follows it, so ours starts
    # where the two renderings part.
    return Example(np.asarray(full, dtype=np.int32), common_prefix_len(prompt, full))


def pair_layout(
    example: Example, pad: int, pad_ratio: float = 0.0, rng: Optional[np.random.Generator] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Token ids and labels in PIPO's pair layout (docs/design.md §6).

    An odd prompt gets a PAD so the completion starts a pair; an odd total gets a
    final PAD. With `pad_ratio` > 0, each full completion pair (a, b) is split
    into (a, PAD), (b, PAD) with that probability, teaching the (token, PAD)
    pairs that the confidence gate produces at inference. Labels are IGNORE on
    the prompt and on every PAD.
    """
    prompt, completion = example.tokens[: example.prompt_len], example.tokens[example.prompt_len :]
    if len(prompt) % 2:
        prompt = np.append(prompt, pad)
    if len(completion) % 2:
        completion = np.append(completion, pad)
    pairs = completion.reshape(-1, 2)
    if pad_ratio > 0:
        split = (rng.random(len(pairs)) < pad_ratio) & (pairs[:, 1] != pad)
        # A split pair (a, b) is written twice, then rewritten as (a, PAD), (b, PAD).
        copies = 1 + split
        pairs = np.repeat(pairs, copies, axis=0)
        first = (np.cumsum(copies) - copies)[split]
        pairs[first + 1, 0] = pairs[first, 1]
        pairs[first, 1] = pairs[first + 1, 1] = pad
    ids = np.concatenate([prompt, pairs.reshape(-1)]).astype(np.int32)
    labels = ids.copy()
    labels[: len(prompt)] = IGNORE
    labels[ids == pad] = IGNORE
    return ids, labels


def _has_target(labels: np.ndarray) -> bool:
    # Position 0 and 1 form the first pair, which nothing predicts.
    return bool((labels[2:] != IGNORE).any())


def read_jsonl(
    path: Path, what: str, text: Optional[str] = None
) -> Iterator[Tuple[int, str, Any]]:
    """(line number, "FILE line N", record) for each non-blank line of a JSON Lines
    file; `text`, when given, is the file's content (read on another host)."""
    if text is None and not path.is_file():
        raise PipoError(f"{path} not found; put {what} there, one JSON object per line")
    try:
        # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends.
        lines = (path.read_text(encoding="utf-8") if text is None else text).split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise PipoError(f"{path} is unreadable ({e}); it must be UTF-8 JSON Lines") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipoError(
                f"{where}: not valid JSON ({e.msg}, column {e.colno}); fix or remove the line"
            ) from None
        yield lineno, where, record


def load_dataset(
    path: Path,
    tokenizer: TokenizerWrapper,
    pad: int,
    max_len: int,
    too_long: str,
    skip_empty: bool = False,
    text: Optional[str] = None,
) -> List[Example]:
    """Read and tokenize a JSONL file (or its `text`); every problem names the file and line.

    `skip_empty` drops (and counts) records with nothing to train on instead of
    refusing them: a teacher's rollouts may hold answers that are EOS alone.
    """
    examples, truncated, dropped, empty = [], 0, 0, 0
    for _, where, record in read_jsonl(path, "training records", text):
        try:
            ex = encode_record(record, tokenizer, where)
        except EmptyRecord:
            if not skip_empty:
                raise
            empty += 1
            continue
        ids, labels = pair_layout(ex, pad)
        if not _has_target(labels):
            raise PipoError(
                f"{where}: the record is too short to train on (PIPO needs a completion "
                "token after the first pair); lengthen or remove it"
            )
        if len(ids) > max_len:
            if too_long == "refuse":
                raise PipoError(
                    f"{where}: {len(ids)} tokens after pairing, more than --max-seq-length "
                    f"{max_len}; raise --max-seq-length, shorten the record, or pass "
                    "--too-long truncate"
                )
            truncated += 1
            if not _has_target(labels[:max_len]):
                dropped += 1  # its prompt alone fills the window
                continue
        examples.append(ex)
    if not examples:
        raise PipoError(f"{path} holds no usable records")
    if truncated:
        print(
            f"[INFO] {path}: {truncated} record(s) longer than --max-seq-length {max_len} "
            f"truncated ({dropped} dropped: no completion left)",
            file=sys.stderr,
            flush=True,
        )
    if empty:
        print(f"[INFO] {path}: {empty} record(s) with an empty completion left out",
              file=sys.stderr, flush=True)
    return examples


def load_data(
    data: str, tokenizer: TokenizerWrapper, pad: int, cfg: TrainConfig, skip_empty: bool = False
) -> Tuple[List[Example], List[Example]]:
    folder = Path(data).expanduser()
    if not folder.is_dir():
        raise PipoError(
            f"data folder {folder} not found; it should hold train.jsonl and, "
            "optionally, valid.jsonl"
        )
    limits = (cfg.max_seq_length, cfg.too_long, skip_empty)
    train = load_dataset(folder / "train.jsonl", tokenizer, pad, *limits)
    valid = []
    if (folder / "valid.jsonl").exists():
        valid = load_dataset(folder / "valid.jsonl", tokenizer, pad, *limits)
    else:
        print(f"[INFO] no {folder / 'valid.jsonl'}: training without validation",
              file=sys.stderr, flush=True)
    return train, valid


def _collate(
    rows: List[Tuple[np.ndarray, np.ndarray]], pad: int, max_len: int
) -> Tuple[mx.array, mx.array, int]:
    """Right-pad to a common even length; causal attention keeps padding out of real positions."""
    rows = [(i[:max_len], l[:max_len]) for i, l in rows]
    T = max(len(i) for i, _ in rows)
    ids = np.full((len(rows), T), pad, np.int32)
    labels = np.full((len(rows), T), IGNORE, np.int32)
    for r, (i, l) in enumerate(rows):
        ids[r, : len(i)], labels[r, : len(l)] = i, l
    return mx.array(ids), mx.array(labels), sum(len(i) for i, _ in rows)


def train_batch(
    examples: List[Example], micro_step: int, cfg: TrainConfig, pad: int, share: slice = slice(None)
) -> Tuple[mx.array, mx.array, int]:
    """Micro-batch number `micro_step` (0-based): a pure function of the seed and the
    step; `share`, one rank's rows of it (pipo_mlx/distributed.py)."""
    rng = np.random.default_rng([cfg.seed, 0, micro_step])
    ratio = rng.uniform(0.0, cfg.max_pad_ratio)
    # Every row is laid out, the others' too: the random splits are drawn in row order.
    rows = [
        pair_layout(examples[i], pad, ratio, rng)
        for i in batch_indices(len(examples), micro_step, cfg.batch_size, cfg.seed)
    ]
    return _collate(rows[share], pad, cfg.max_seq_length)


def batch_indices(n: int, micro_step: int, batch_size: int, seed: int) -> List[int]:
    """Which of n records micro-batch `micro_step` holds: epoch e visits them in
    permutation(seed, e), and sequence position p = micro_step * batch_size + j
    falls in epoch p // n."""
    positions = range(micro_step * batch_size, (micro_step + 1) * batch_size)
    return [int(_epoch_order(seed, p // n, n)[p % n]) for p in positions]


def seed_of(*parts: int) -> int:
    """A seed drawn from `parts`, e.g. (seed, purpose, step): a separate random
    stream for each purpose and step, the same on every run and every resume."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


@lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 1, epoch]).permutation(n)


def valid_chunks(items: Sequence[Any], cfg: TrainConfig) -> Iterator[Sequence[Any]]:
    """The validation items in file order, `batch_size` at a time, at most
    `val_batches` chunks (-1: all)."""
    count = math.ceil(len(items) / cfg.batch_size)
    if cfg.val_batches != -1:
        count = min(count, cfg.val_batches)
    for b in range(count):
        yield items[b * cfg.batch_size : (b + 1) * cfg.batch_size]


def valid_batches(
    examples: List[Example], cfg: TrainConfig, pad: int, rank: int = 0, ranks: int = 1
) -> Iterator[Tuple[mx.array, mx.array, int]]:
    """The validation set in file order, without PAD augmentation; of several
    ranks, each takes every `ranks`-th batch from its `rank` on."""
    for b, chunk in enumerate(valid_chunks(examples, cfg)):
        if b % ranks == rank:
            yield _collate([pair_layout(e, pad) for e in chunk], pad, cfg.max_seq_length)
