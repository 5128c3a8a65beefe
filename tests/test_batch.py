"""Batched decoding: every row of a batch equals what the single-sequence decoder gives it."""

import pytest
from hf_reference import random_ids
from mlx_lm.sample_utils import make_logits_processors

from mlx_lm.generate import BatchResponse as MlxBatchResponse
from mlx_lm.generate_utils import BatchStats

from pipo_mlx import PipoError, load, make_prompt_cache, stream_generate
from pipo_mlx.batch import BatchGenerator
from pipo_mlx.batch_api import batch_generate
from pipo_mlx.decode import generate, generate_step


@pytest.fixture(scope="module")
def lib(mlx_pipo):
    return load(str(mlx_pipo))


def single(model, ids, threshold, budget, eos, processors=None):
    """(token, is_token2) pairs of the single-sequence decoder, drafting at every step
    (rows of a batch share "auto" decisions, a single sequence makes its own)."""
    out = generate_step(ids, model, eos_token_ids=eos, max_tokens=budget, conf_threshold=threshold,
                        logits_processors=processors, draft="always")
    return [(t, d) for t, _, d in out]


def run(gen, joins=None):
    """Drive a BatchGenerator to the end; `joins` maps a step number to rows to insert then."""
    got, step, uids = {}, 0, {}
    joins = dict(joins or {})
    while len(gen) or joins:
        for key, args in joins.pop(step, []):
            uids[key] = gen.insert(*args[0], **args[1])
        for r in gen.next():
            got.setdefault(r.uid, []).append((r.token, r.from_draft))
        step += 1
    return got, uids


LENGTHS = (1, 2, 5, 8, 13, 21)  # odd and even, one pair, one token


@pytest.mark.parametrize("thresholds", [(-1.0, 0.5, 1.0), (0.5,), (-1.0,)])
def test_each_row_equals_the_single_decoder(lib, thresholds):
    model, tokenizer = lib
    eos = tokenizer.eos_token_ids
    rows = [(random_ids(1, n, seed=n)[0].tolist(), thresholds[i % len(thresholds)], 10 + i)
            for i, n in enumerate(LENGTHS)]
    gen = BatchGenerator(model, eos)
    uids = [gen.insert(ids, budget, conf_threshold=t, draft="always") for ids, t, budget in rows]
    got, _ = run(gen)
    for uid, (ids, t, budget) in zip(uids, rows):
        assert got[uid] == single(model, ids, t, budget, eos), (len(ids), t)
    assert any(d for uid in uids for _, d in got[uid])  # some drafts were kept


def test_rows_ending_and_joining_leave_the_others_unchanged(lib):
    model, _ = lib
    base = [random_ids(1, n, seed=100 + n)[0].tolist() for n in (6, 9, 12, 15)]
    free = [single(model, ids, -1.0, 24, ()) for ids in base]
    # End-of-sequence tokens chosen from the free runs: the first row's 5th token (a
    # token1) and the first draft of the second row that neither row has produced before.
    eos1 = free[0][4][0]
    assert not free[0][4][1]
    seen = {t for t, _ in free[0][:5]}
    eos2 = next(t for j, (t, d) in enumerate(free[1])
                if d and t not in seen and t not in {u for u, _ in free[1][:j]} | {eos1})
    eos = [eos1, eos2]
    rows = {  # key: (prompt, threshold, budget)
        "eos": (base[0], -1.0, 24),
        "eos2": (base[1], -1.0, 24),
        "budget-on-token1": (base[2], -1.0, 5),
        "budget-on-token2": (base[3], -1.0, 6),
        "late": (random_ids(1, 11, seed=7)[0].tolist(), 0.5, 12),
        "later": (random_ids(1, 4, seed=8)[0].tolist(), 1.0, 9),
    }
    gen = BatchGenerator(model, eos)
    first = {k: gen.insert(ids, b, conf_threshold=t, draft="always")
             for k, (ids, t, b) in rows.items() if "late" not in k}
    joins = {3: [("late", ((rows["late"][0], 12), {"conf_threshold": 0.5, "draft": "always"}))],
             5: [("later", ((rows["later"][0], 9), {"conf_threshold": 1.0, "draft": "always"}))]}
    got, joined = run(gen, joins)
    for key, uid in {**first, **joined}.items():
        ids, t, budget = rows[key]
        want = single(model, ids, t, budget, eos)
        assert got[uid] == want, key
    endings = {got[first[k]][-1] for k in ("eos", "eos2")}
    assert {d for t, d in endings if t in eos} == {False, True}  # ended on a token1 and on a token2
    for key, budget in (("budget-on-token1", 5), ("budget-on-token2", 6)):
        out = got[first[key]]
        assert len(out) == budget or out[-1][0] in eos, key


def test_a_removed_row_stops_and_the_others_go_on(lib):
    model, tokenizer = lib
    eos = tokenizer.eos_token_ids
    prompts = [random_ids(1, n, seed=200 + n)[0].tolist() for n in (7, 10, 3)]
    gen = BatchGenerator(model, eos)
    uids = [gen.insert(p, 16, conf_threshold=0.5, draft="always") for p in prompts]
    got = {u: [] for u in uids}
    for step in range(40):
        if step == 2:
            gen.remove(uids[1])
        for r in gen.next():
            got[r.uid].append((r.token, r.from_draft))
        if not len(gen):
            break
    for i in (0, 2):
        assert got[uids[i]] == single(model, prompts[i], 0.5, 16, eos)
    assert 0 < len(got[uids[1]]) < len(single(model, prompts[1], 0.5, 16, eos))


def test_logits_processors_see_each_rows_own_history(lib):
    model, tokenizer = lib
    eos = tokenizer.eos_token_ids
    prompts = [random_ids(1, n, seed=300 + n)[0].tolist() for n in (9, 4)]
    gen = BatchGenerator(model, eos)
    uids = [gen.insert(p, 14, conf_threshold=-1.0,
                       logits_processors=make_logits_processors(repetition_penalty=1.5 + i), draft="always")
            for i, p in enumerate(prompts)]
    got, _ = run(gen)
    for i, (uid, p) in enumerate(zip(uids, prompts)):
        want = single(model, p, -1.0, 14, eos, make_logits_processors(repetition_penalty=1.5 + i))
        assert got[uid] == want


def test_batch_generate_gives_each_prompt_its_single_reply(lib):
    model, tokenizer = lib
    prompts = ["def add(a, b):", "import os\n", "class Point:\n    def"]
    thresholds = [-1.0, 0.5, 1.0]
    result = batch_generate(model, tokenizer, prompts, max_tokens=12, conf_threshold=thresholds,
                            draft="always")
    for prompt, t, text in zip(prompts, thresholds, result.texts):
        assert text == generate(model, tokenizer, prompt, max_tokens=12, conf_threshold=t, draft="always")
    assert result.caches is None and result.token_ids is None and result.logprobs is None


def test_batch_generate_answers_as_mlx_lm_does(lib):
    """mlx-lm's `BatchResponse` fields, each against the single-sequence decoder."""
    model, tokenizer = lib
    eos = tokenizer.eos_token_ids
    prompts = [random_ids(1, n, seed=200 + n)[0].tolist() for n in (5, 8, 11)]
    result = batch_generate(model, tokenizer, prompts, max_tokens=[9, 10, 11], conf_threshold=-1.0,
                            draft="always", return_prompt_caches=True, return_token_ids=True,
                            return_logprobs=True)
    assert isinstance(result, MlxBatchResponse) and isinstance(result.stats, BatchStats)
    produced = 0
    for i, ids in enumerate(prompts):
        want = list(stream_generate(model, tokenizer, ids, max_tokens=9 + i, conf_threshold=-1.0,
                                    draft="always"))
        produced += len(want)
        assert result.token_ids[i] == [r.token for r in want if r.token not in eos]
        assert result.logprobs[i] == pytest.approx(
            [r.logprobs[r.token].item() for r in want if r.token not in eos], abs=1e-4)
        assert (result.steps[i], result.token2_kept[i]) == (want[-1].steps, want[-1].token2_kept)
        # The returned cache holds prompt and reply: going on from it equals a fresh
        # run over everything it read, PADs of dropped drafts included.
        cache = result.caches[i]
        read = list(cache.tokens)
        assert read[: len(ids)] == ids
        on = [r.token for r in stream_generate(model, tokenizer, [7, 9], max_tokens=6,
                                                   prompt_cache=cache, conf_threshold=-1.0, draft="always")]
        fresh = [r.token for r in stream_generate(model, tokenizer, read + [7, 9], max_tokens=6,
                                                      conf_threshold=-1.0, draft="always")]
        assert on == fresh
    assert result.stats.prompt_tokens == sum(len(p) for p in prompts)
    assert result.stats.generation_tokens == produced


def test_batch_generate_goes_on_from_prompt_caches_and_leaves_them(lib):
    model, tokenizer = lib
    head, tail = random_ids(1, 12, seed=300)[0].tolist(), [21, 22, 23]
    cache = make_prompt_cache(model)
    list(stream_generate(model, tokenizer, head, max_tokens=4, prompt_cache=cache, draft="always"))
    held = list(cache.tokens)
    result = batch_generate(model, tokenizer, [tail, head + tail], prompt_caches=[cache, None],
                            max_tokens=8, return_token_ids=True, draft="always")
    assert cache.tokens == held  # the caller's cache is not filled further
    want = [r.token for r in stream_generate(model, tokenizer, held + tail, max_tokens=8, draft="always")]
    assert result.token_ids[0] == [t for t in want if t not in tokenizer.eos_token_ids]


def test_bad_rows_are_refused(lib):
    model, tokenizer = lib
    gen = BatchGenerator(model, tokenizer.eos_token_ids)
    with pytest.raises(PipoError, match="empty"):
        gen.insert([], 4)
    with pytest.raises(PipoError, match="max_tokens"):
        gen.insert([5, 6], 0)
    with pytest.raises(PipoError, match="context"):
        gen.insert([5] * 5000, 4)
    with pytest.raises(PipoError, match="not a number"):
        gen.insert([5, 6], 4, conf_threshold=float("nan"))
    assert len(gen) == 0 and gen.next() == []
