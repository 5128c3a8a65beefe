"""Teacher rollouts: a causal LM answers the training prompts (docs/design.md §6, Data).

The authors' supervised data is a teacher's answers, not raw text, so PIPO learns a
model's output distribution. Generation is mlx-lm's own batched generation. The
output is assembled from per-batch shards, each seeded from (seed, batch index), so
an interrupted run resumes and ends with exactly the file an uninterrupted one writes.
"""

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Callable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import batch_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load

from .data import check_messages, read_jsonl, render_chat, seed_of
from .distributed import World
from .errors import PipoError
from .hf_io import is_hub_id, read_json


@dataclass
class Prompt:
    record: dict  # the input record, written back with the teacher's answer
    tokens: List[int]  # what the teacher continues
    line: int  # 1-based line in the input file


def _conversation(record: dict, where: str) -> list:
    """The messages the teacher continues; a trailing assistant turn is an old answer."""
    messages = record["messages"]
    check_messages(messages, where)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not any(m["content"].strip() for m in messages):
        raise PipoError(f"{where}: the conversation has no prompt before its answer; "
                        "add a user message")
    return messages


def encode_prompt(record: Any, tokenizer: TokenizerWrapper, where: str) -> List[int]:
    if not isinstance(record, dict):
        raise PipoError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    tools = record.get("tools")
    if "messages" in record:
        messages = _conversation(record, where)
        if not tokenizer.has_chat_template:
            raise PipoError(f"{where}: 'messages' records need a chat template and this tokenizer "
                            "has none; write {\"prompt\": ...} records instead")
        return render_chat(tokenizer, messages, tools, True, where)
    if "prompt" in record:
        text = record["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise PipoError(f"{where}: 'prompt' must be a non-empty string; fill or remove it")
        if tokenizer.has_chat_template:
            return render_chat(tokenizer, [{"role": "user", "content": text}], tools, True, where)
        return list(tokenizer.encode(text))
    if "text" in record:
        raise PipoError(f"{where}: a 'text' record has no prompt for the teacher to answer; "
                        "write {\"prompt\": ...} records")
    raise PipoError(f"{where}: the record has neither 'prompt' nor 'messages' "
                    f"(it has {', '.join(map(repr, record)) or 'no fields'})")


def read_prompts(path: Path, tokenizer: TokenizerWrapper) -> List[Prompt]:
    """The prompts of a JSONL file in `pipo_mlx.data`'s formats; any answer is dropped."""
    prompts = [
        Prompt(record, encode_prompt(record, tokenizer, where), lineno)
        for lineno, where, record in read_jsonl(Path(path), "prompts")
    ]
    if not prompts:
        raise PipoError(f"{path} holds no prompts; write one {{\"prompt\": ...}} object per line")
    return prompts


def _answered(record: dict, text: str) -> dict:
    if "messages" in record:
        messages = _conversation(record, "") + [{"role": "assistant", "content": text}]
        return {**record, "messages": messages}
    return {**record, "completion": text}


def _atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write under a hidden temporary name, then rename: `path` is complete or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: leave no half-written file behind
        tmp.unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode("utf-8")))


def _write_shard(path: Path, records: List[dict]) -> None:
    _write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _open_parts(parts: Path, settings: dict) -> None:
    """Create the shard folder, or check that its shards were made with these settings."""
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob(".*.tmp"):  # a write cut short by a kill
        stale.unlink()
    path = parts / "settings.json"
    if not path.exists():
        return _write_text(path, json.dumps(settings, indent=1) + "\n")
    old = read_json(path, "a rollouts parts folder")
    changed = [
        "other prompts" if k == "prompts" else f"{k} {old.get(k)!r} there, {settings[k]!r} now"
        for k in settings if old.get(k) != settings[k]
    ]
    if changed:
        raise PipoError(f"{parts} holds rollouts made with other settings "
                        f"({'; '.join(changed)}); re-run with those settings, or delete {parts} "
                        "to start over")


def teacher_rollouts(
    teacher: nn.Module, tokenizer: TokenizerWrapper, prompts: List[Prompt], out_file: Path, *,
    max_tokens: int, temp: float = 1.0, top_p: float = 0.95, top_k: int = 20,
    presence_penalty: float = 1.5, seed: int = 0, batch_size: int = 16,
    identity: Optional[dict] = None, log: Callable[[str], Any] = print,
    world: Optional[World] = None,
) -> Path:
    """Write `out_file`: every prompt's record with the teacher's answer, in prompt order.

    `identity` (JSON-able, e.g. the teacher's path) joins the settings a resumed run
    must share with the shards already written. An existing `out_file` holding one
    record per prompt counts as done. Of several ranks (`world`), each answers its
    share of the batches and only rank 0, which keeps the folder, writes and logs.
    """
    world = world or World.alone()
    if not world.main:
        log = _silent
    out_file = Path(out_file)
    if not prompts:
        raise PipoError("teacher_rollouts: no prompts given; read some with read_prompts")
    if max_tokens < 1 or batch_size < 1 or seed < 0:
        raise PipoError(f"teacher_rollouts: max_tokens ({max_tokens}) and batch_size "
                        f"({batch_size}) must be ≥ 1 and seed ({seed}) ≥ 0")
    parts = out_file.parent / f".{out_file.name}.parts"
    if not world.main:
        _answer_share(teacher, tokenizer, prompts, max_tokens, temp, top_p, top_k,
                      presence_penalty, seed, batch_size, world)
        return out_file
    out_file.with_name(f".{out_file.name}.tmp").unlink(missing_ok=True)
    if out_file.exists():
        count = sum(1 for line in out_file.open(encoding="utf-8") if line.strip())
        if count != len(prompts):
            raise PipoError(f"{out_file} already exists with {count} records for {len(prompts)} "
                            "prompts; delete it or choose another output file")
        shutil.rmtree(parts, ignore_errors=True)  # left by a run stopped right after its rename
        log(f"[rollouts] {out_file} already holds all {count} records; nothing to do")
        world.bytes_from_main(b"[]")  # nothing for the other ranks to answer
        return out_file

    # A digest, not the prompts: settings.json stays small for large prompt sets.
    digest = hashlib.sha256(json.dumps([[p.record, p.tokens] for p in prompts]).encode())
    settings = json.loads(json.dumps(dict(
        prompts=digest.hexdigest(), max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
        presence_penalty=presence_penalty, seed=seed, batch_size=batch_size, identity=identity)))
    _open_parts(parts, settings)
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    shards = [parts / f"part-{b:05d}.jsonl" for b in range(len(batches))]
    todo = [b for b, shard in enumerate(shards) if not shard.exists()]
    world.bytes_from_main(json.dumps(todo).encode())  # rank 0's disk says what is left
    done = len(prompts) - sum(len(batches[b]) for b in todo)
    if done:
        log(f"[rollouts] resuming: {len(batches) - len(todo)} of {len(batches)} batches in {parts}")
    start, made, generated, cut, empty = time.perf_counter(), 0, 0, 0, []
    answer = _answerer(teacher, tokenizer, max_tokens, temp, top_p, top_k, presence_penalty, seed)
    for first in range(0, len(todo), world.size):
        # A round: batch todo[first + r] is rank r's; rank 0 writes them all.
        round_ = todo[first : first + world.size]
        mine = answer(batches[round_[world.rank]], round_[world.rank])
        for b, (records, token_counts) in zip(round_, world.gather(mine)):
            chunk = batches[b]
            _write_shard(shards[b], records)
            done, made = done + len(chunk), made + len(chunk)
            generated += sum(token_counts)
            cut += sum(n == max_tokens for n in token_counts)
            empty += [p.line for p, r in zip(chunk, records) if not _answer_text(r).strip()]
        elapsed = time.perf_counter() - start
        log(f"[rollouts] {done}/{len(prompts)} prompts | {generated / elapsed:.0f} tok/s | "
            f"{timedelta(seconds=int(elapsed))} elapsed | "
            f"ETA {timedelta(seconds=int(elapsed / made * (len(prompts) - done)))}")
    if cut:
        # Training closes every answer (EOS or end of turn), so these teach stopping early.
        log(f"[rollouts] {cut} of {made} answers stopped at max_tokens {max_tokens}, unfinished")
    if empty:
        lines = ", ".join(map(str, empty))
        log(f"[rollouts] {len(empty)} answers are empty (prompt lines {lines}); training "
            "leaves them out")

    def join(f: IO[bytes]) -> None:
        for shard in shards:
            with open(shard, "rb") as s:
                shutil.copyfileobj(s, f)

    _atomic(out_file, join)
    shutil.rmtree(parts)
    log(f"[rollouts] wrote {len(prompts)} records to {out_file}")
    return out_file


def _answerer(teacher: nn.Module, tokenizer: TokenizerWrapper, max_tokens: int, temp: float,
              top_p: float, top_k: int, presence_penalty: float, seed: int) -> Callable:
    """(batch of prompts, its index) -> (the answered records, each answer's token count)."""
    sampler = make_sampler(temp, top_p=top_p, top_k=top_k)
    # mlx-lm 0.32's BatchGenerator runs each sequence's logits processors over its
    # own prompt + output, so the presence penalty applies batched exactly as in
    # mlx_lm.generate (its window: the last 20 tokens, the prompt's included).
    processors = make_logits_processors(presence_penalty=presence_penalty)

    def answer(chunk: List[Prompt], b: int) -> Tuple[List[dict], List[int]]:
        # Seeded per batch, so a batch draws the same tokens in a resumed run, and
        # whichever rank answers it.
        mx.random.seed(seed_of(seed, b))
        result = batch_generate(
            teacher, tokenizer, [p.tokens for p in chunk], max_tokens=max_tokens,
            sampler=sampler, logits_processors=processors, return_token_ids=True,
            prefill_batch_size=len(chunk), completion_batch_size=len(chunk))
        # batch_generate drops the stop token, so no answer holds EOS text.
        records = [_answered(p.record, t) for p, t in zip(chunk, result.texts)]
        return records, [len(ids) for ids in result.token_ids]

    return answer


def _answer_text(record: dict) -> str:
    return record["messages"][-1]["content"] if "messages" in record else record["completion"]


def _answer_share(teacher: nn.Module, tokenizer: TokenizerWrapper, prompts: List[Prompt],
                  max_tokens: int, temp: float, top_p: float, top_k: int,
                  presence_penalty: float, seed: int, batch_size: int, world: World) -> None:
    """A rank other than 0: answer the batches rank 0 names, round by round, as
    teacher_rollouts does, and hand them to rank 0."""
    todo = json.loads(world.bytes_from_main(b""))
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    answer = _answerer(teacher, tokenizer, max_tokens, temp, top_p, top_k, presence_penalty, seed)
    for first in range(0, len(todo), world.size):
        round_ = todo[first : first + world.size]
        world.gather(answer(batches[round_[world.rank]], round_[world.rank])
                     if world.rank < len(round_) else None)


def _silent(line: str) -> None:
    pass


def _check_vocabulary(model: nn.Module, tok: TokenizerWrapper, student: TokenizerWrapper,
                      student_rows: Optional[int], where: Any) -> None:
    t, s = tok.get_vocab(), student.get_vocab()
    if t != s:
        if len(t) != len(s):
            what = f"{len(t)} tokens, the student's {len(s)}"
        else:
            token = next(k for k in sorted(s) if t.get(k) != s[k])
            what = f"token {token!r} is id {t.get(token)} there, {s[token]} in the student's"
        raise PipoError(f"{where}: the teacher's vocabulary differs from the student's ({what}); "
                        "the teacher must share the student's tokenizer")
    # A quantized embedding packs its columns, not its rows.
    rows = next((int(m.weight.shape[0]) for name, m in model.named_modules()
                 if name.endswith("embed_tokens") and hasattr(m, "weight")), None)
    top = max(s.values())
    if rows is not None and (rows <= top or student_rows not in (None, rows)):
        theirs = f"the student's {student_rows}" if student_rows else f"too few for id {top}"
        raise PipoError(f"{where}: the teacher's embedding has {rows} rows, {theirs}; the "
                        "teacher must have the student's vocabulary size")


def _refuse_pipo(config: dict, where: Any) -> None:
    if "pipo" in config:
        raise PipoError(f"{where} is a PIPO model; the teacher must be an ordinary causal LM, "
                        "e.g. the base model")


def check_teacher(
    teacher_path: str, student_tokenizer: TokenizerWrapper, student_vocab_size: Optional[int] = None
) -> Tuple[nn.Module, TokenizerWrapper]:
    """Load a teacher with mlx-lm, refusing one the student cannot learn from.

    `student_vocab_size` (the student's embedding rows), when given, must equal the
    teacher's: distillation (§7) compares the two models' logits entry by entry.
    """
    folder = Path(teacher_path).expanduser()
    local = not is_hub_id(teacher_path)
    if local:
        if not folder.is_dir():
            raise PipoError(f"teacher folder {folder} not found; pass an mlx-lm model folder "
                            "or a Hugging Face repo id")
        _refuse_pipo(read_json(folder / "config.json", "a model folder"), folder)
    where = folder if local else teacher_path
    try:
        # Lazy: the checks need no weights, so a refusal comes before a large read.
        model, tokenizer, config = load(str(where), lazy=True, return_config=True)
    except Exception as e:  # mlx-lm and the hub raise many kinds for unusable folders
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        what = "this teacher" if local else "it as a Hugging Face repo (no such local folder)"
        raise PipoError(f"{where}: mlx-lm cannot load {what} ({reason}); "
                        "pass an ordinary mlx-lm causal LM") from None
    _refuse_pipo(config, where)
    _check_vocabulary(model, tokenizer, student_tokenizer, student_vocab_size, where)
    try:
        mx.eval(model.parameters())
    except Exception as e:
        raise PipoError(f"{where}: the teacher's weights are unreadable ({type(e).__name__}: "
                        f"{e}); download or convert it again") from None
    return model, tokenizer
