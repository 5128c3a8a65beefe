"""Teacher rollouts (pipo_mlx/rollouts.py) with the shipped demo models."""

import inspect
import json
import os
import re
import shutil
import textwrap
from pathlib import Path

import mlx_lm
import pytest
from mlx_lm.generate import BatchResponse
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.utils import load_tokenizer

from pipo_mlx import rollouts
from pipo_mlx.data import load_dataset
from pipo_mlx.errors import PipoError
from pipo_mlx.rollouts import check_teacher, read_prompts, teacher_rollouts

MODELS = Path(__file__).resolve().parent.parent / "models"
BASE, PIPO = MODELS / "base-stdlib", MODELS / "pipo-stdlib"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Ten short lines of stdlib Python: the demo models were trained on such code.
LINES = [s.strip() for s in inspect.getsource(textwrap).splitlines() if len(s.strip()) > 20][:10]


@pytest.fixture(scope="module")
def base():
    return mlx_lm.load(str(BASE))


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def prompts(base, tmp_path):
    # An old completion is replaced; an extra field is kept.
    records = [{"prompt": s, "completion": "old", "source": i} for i, s in enumerate(LINES)]
    return read_prompts(write_jsonl(tmp_path / "prompts.jsonl", records), base[1])


def run(base, prompts, out: Path, **kw):
    kw = {"max_tokens": 8, "batch_size": 4, "log": lambda line: None, **kw}
    return teacher_rollouts(base[0], base[1], prompts, out, **kw)


def test_rollouts_match_unbatched_generation(base, prompts, tmp_path):
    model, tok = base
    logs = []
    out = run(base, prompts, tmp_path / "out.jsonl", temp=0.0, log=logs.append)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == LINES
    assert [r["source"] for r in records] == list(range(10))
    progress = [line for line in logs if "prompts |" in line]
    assert [line.split()[1] for line in progress] == ["4/10", "8/10", "10/10"]
    assert re.fullmatch(r"\[rollouts\] 4/10 prompts \| \d+ tok/s \| 0:00:\d\d elapsed \| "
                        r"ETA 0:00:\d\d", progress[0])

    # Reference: mlx-lm's unbatched path, one prompt at a time, same greedy
    # sampler and presence penalty, EOS left out. Batching right-pads the prompts;
    # on the CPU backend that matched the one-at-a-time path exactly in every run,
    # so equality is asserted (a backend whose padded kernels round differently
    # would need a tolerance on the share of equal answers).
    same = 0
    for p, r in zip(prompts, records):
        ids = [g.token for g in mlx_lm.stream_generate(
            model, tok, p.tokens, max_tokens=8, sampler=make_sampler(0.0),
            logits_processors=make_logits_processors(presence_penalty=1.5))]
        ids = [t for t in ids if t not in tok.eos_token_ids]
        assert tok.eos_token not in r["completion"]
        same += r["completion"] == tok.decode(ids)
    assert same == len(prompts)
    # The output is training data as pipo_mlx.data reads it.
    assert len(load_dataset(out, tok, pad=1, max_len=256, too_long="refuse")) == 10


def test_resume_gives_the_uninterrupted_file(base, prompts, tmp_path, monkeypatch):
    whole = run(base, prompts, tmp_path / "a" / "out.jsonl", seed=7)
    other_seed = run(base, prompts, tmp_path / "c" / "out.jsonl", seed=8)
    assert whole.read_bytes() != other_seed.read_bytes()  # temp 1.0 really samples

    out = tmp_path / "b" / "out.jsonl"
    out.parent.mkdir()
    parts = out.parent / ".out.jsonl.parts"
    write_shard = rollouts._write_shard

    def interrupted(path, records):
        assert not out.exists()  # (3) no output before every shard exists
        if path.name == "part-00001.jsonl":
            raise KeyboardInterrupt
        write_shard(path, records)

    monkeypatch.setattr(rollouts, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(base, prompts, out, seed=7)
    monkeypatch.undo()
    assert sorted(os.listdir(out.parent)) == [parts.name]
    assert sorted(os.listdir(parts)) == ["part-00000.jsonl", "settings.json"]

    with pytest.raises(PipoError, match=r"\.parts holds rollouts made with other settings "
                       r"\(temp 1\.0 there, 0\.5 now\); re-run with those settings, or delete"):
        run(base, prompts, out, seed=7, temp=0.5)

    (parts / ".part-00001.jsonl.tmp").write_text('{"prompt": "half')  # as a kill leaves it
    logs = []
    run(base, prompts, out, seed=7, log=logs.append)
    assert logs[0].startswith("[rollouts] resuming: 1 of 3 batches")
    assert out.read_bytes() == whole.read_bytes()
    assert os.listdir(out.parent) == ["out.jsonl"]  # no parts folder, no temp files


def test_output_appears_only_complete(base, prompts, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    real_replace, seen = os.replace, []

    def replace(src, dst):
        if Path(dst) == out:
            assert not out.exists()
            seen.append(len(Path(src).read_text().splitlines()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    run(base, prompts, out)
    assert seen == [10]

    def no_work(*args, **kw):
        raise AssertionError("a complete output must not be generated again")

    monkeypatch.setattr(rollouts, "batch_generate", no_work)
    logs = []
    assert run(base, prompts, out, log=logs.append) == out
    assert logs == [f"[rollouts] {out} already holds all 10 records; nothing to do"]
    with pytest.raises(PipoError, match=r"already exists with 10 records for 9 prompts; delete it"):
        run(base, prompts[:9], out)


def test_empty_answers_are_reported(base, prompts, tmp_path, monkeypatch):
    def silent_teacher(model, tok, tokens, **kw):
        return BatchResponse(texts=[""] * len(tokens), stats=None, caches=None,
                             token_ids=[[] for _ in tokens])

    monkeypatch.setattr(rollouts, "batch_generate", silent_teacher)
    logs = []
    out = run(base, prompts[:3], tmp_path / "out.jsonl", log=logs.append)
    assert [json.loads(line)["completion"] for line in out.read_text().splitlines()] == [""] * 3
    assert "3 answers are empty (prompt lines 1, 2, 3); training leaves them out" in logs[-2]


def refused(match: str, call, *args, **kw) -> str:
    with pytest.raises(PipoError, match=match) as e:
        call(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_prompt_records(base, tmp_path):
    tok = base[1]
    cases = [
        ({"text": "def f(): pass"}, r"line 2: a 'text' record has no prompt for the teacher to "
                                    r"answer; write \{\"prompt\": \.\.\.\} records"),
        ({"prompt": "  "}, r"line 2: 'prompt' must be a non-empty string"),
        ({"messages": [{"role": "user", "content": "hi"}]},
         r"line 2: 'messages' records need a chat template and this tokenizer has none"),
        ({"input": "x"},
         r"line 2: the record has neither 'prompt' nor 'messages' \(it has 'input'\)"),
    ]
    for record, match in cases:
        path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "import os"}, record])
        refused(re.escape(str(path)) + " " + match, read_prompts, path, tok)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    refused(r"p\.jsonl line 2: not valid JSON", read_prompts, tmp_path / "p.jsonl", tok)


def test_messages_records_with_a_chat_template(base, tmp_path):
    tok = load_tokenizer(BASE, {"chat_template": CHAT_TEMPLATE})
    user = {"role": "user", "content": "import os"}
    records = [{"messages": [user, {"role": "assistant", "content": "old"}], "tools": None},
               {"prompt": "import sys"}]
    prompts = read_prompts(write_jsonl(tmp_path / "p.jsonl", records), tok)
    assert tok.decode(prompts[0].tokens) == "<|user|>import os\n<|assistant|>"
    assert tok.decode(prompts[1].tokens) == "<|user|>import sys\n<|assistant|>"
    out = run((base[0], tok), prompts, tmp_path / "out.jsonl", temp=0.0)
    first, second = [json.loads(line) for line in out.read_text().splitlines()]
    assert first["messages"][0] == user and first["tools"] is None
    assert first["messages"][1]["role"] == "assistant" and len(first["messages"]) == 2
    assert first["messages"][1]["content"] != "old" and set(second) == {"prompt", "completion"}
    refused(r"line 1: the conversation has no prompt before its answer", read_prompts,
            write_jsonl(tmp_path / "q.jsonl", [{"messages": records[0]["messages"][1:]}]), tok)


def test_check_teacher(base, tmp_path):
    tok = base[1]
    model, teacher_tok = check_teacher(str(BASE), tok)
    assert teacher_tok.get_vocab() == tok.get_vocab()

    refused(re.escape(f"{PIPO} is a PIPO model; the teacher must be an ordinary causal LM, "
                      "e.g. the base model"), check_teacher, str(PIPO), tok)
    refused(r"teacher folder .*nowhere not found", check_teacher, str(tmp_path / "nowhere"), tok)
    refused(r"embedding has 4096 rows, the student's 4000", check_teacher, str(BASE), tok, 4000)

    def copy_of_base(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for f in BASE.iterdir():
            if f.suffix == ".safetensors":
                (folder / f.name).symlink_to(f)
            else:
                shutil.copy(f, folder / f.name)
        return folder

    other = copy_of_base("other-vocab")
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(k for k, v in vocab.items() if v in (300, 301))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    refused(rf"the teacher's vocabulary differs from the student's \(token {re.escape(repr(a))} "
            rf"is id {vocab[a]} there, {vocab[b]} in the student's\)",
            check_teacher, str(other), tok)

    broken = copy_of_base("unsupported")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "no_such_model"}))
    refused(r"unsupported: mlx-lm cannot load this teacher \(ValueError: .*no_such_model",
            check_teacher, str(broken), tok)
