"""Adaptive drafting: the policy against a cost model, and the decoder when steps skip the MTP.

Drafting decisions are scripted here (DraftSchedule.decide patched) wherever the
point is the decoder's arithmetic: a step that skips the MTP head reads
(token1, PAD) next, and the MTP entries it owes are computed by the next drafting
step, so the tokens must equal the full-recomputation reference of
test_generate.py told the same decisions.
"""

import itertools
import json
import random
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import random_ids
from safetensors.numpy import load_file
from test_generate import assert_logprobs_close, fused, prompt_of, record_steps, reference, with_eos

from pipo_mlx import load, make_prompt_cache, stream_generate
from pipo_mlx.batch import BatchGenerator
from pipo_mlx.drafting import PROBE_MAX, DraftSchedule, KeepRate, draft_cost, weight_bytes


@pytest.fixture(scope="module")
def pipo(mlx_pipo):
    return load(str(mlx_pipo))


@pytest.fixture
def scripted(monkeypatch):
    """Make every DraftSchedule follow `pattern(call number)` unless a row asks
    "always"; returns a setter."""

    def use(pattern):
        calls = itertools.count()

        def decide(self, rates, forced=False):
            drafting = forced or pattern(next(calls))
            if drafting:
                self.unread.append(False)  # not a probe: no backing off to keep track of
            return drafting

        monkeypatch.setattr(DraftSchedule, "decide", decide)

    return use


# -- the policy against a hand-written cost model


def simulate(cost, keeps, steps=3000):
    """Tokens per unit time of the policy, of always drafting and of never drafting,
    with a plain step costing 1 and a drafting step 1 + cost; `keeps(i)` says whether
    the i-th step's draft would be kept. The decoder reads a step one step late, as here."""
    schedule, rate = DraftSchedule(cost), KeepRate(cost)
    tokens = time = 0.0
    drafted, pending = [], None
    for i in range(steps):
        d = schedule.decide([rate.value])
        if not d:
            rate.relax(cost)
        kept = d and keeps(i)
        tokens += 1 + kept
        time += 1 + cost * d
        drafted.append(d)
        if pending is not None:  # the step before this one is read only now
            rate.observe(pending)
            schedule.observe(pending)
        pending = kept if d else None
    always = sum(1 + keeps(i) for i in range(steps)) / (steps * (1 + cost))
    return tokens / time, always, 1.0, drafted


def bernoulli(p, seed=0):
    draws = np.random.default_rng(seed).random(100_000)
    return lambda i: bool(draws[i] < p)


@pytest.mark.parametrize("cost", [0.1, 0.2, 0.4])
@pytest.mark.parametrize("keep_rate", [0.0, 0.05, 0.25, 0.5, 0.75, 1.0])
def test_the_policy_is_near_the_better_of_always_and_never(cost, keep_rate):
    ours, always, never, _ = simulate(cost, bernoulli(keep_rate))
    assert ours >= 0.97 * max(always, never), (ours, always, never)


def test_it_stops_drafting_below_break_even_and_probes_rarely():
    *_, drafted = simulate(0.2, lambda i: False, steps=2000)
    # The estimate starts at break-even and loses 1/16 of itself per miss; step i has
    # seen i - 1 misses, and stops below half of break-even: 15/16 ** 11 < 1/2.
    assert drafted[:12] == [True] * 12
    # Then a probe at the 8th plain step; it misses (read one step late), so the next
    # comes 16 steps after it, and so on up to PROBE_MAX apart.
    assert drafted[12:20] == [False] * 7 + [True]
    assert drafted[20:36] == [False] * 15 + [True]
    assert sum(drafted[200:]) <= 1800 / PROBE_MAX + 1


def test_probes_take_good_drafts_up_again():
    *_, drafted = simulate(0.2, lambda i: i >= 1000, steps=1200)
    assert sum(drafted[500:1000]) < 20
    assert all(drafted[1000 + 2 * PROBE_MAX :])  # back on within two probes


def test_draft_cost_from_the_checkpoint_bytes(pipo, mlx_pipo):
    """The bytes each step reads, summed here from the safetensors file by key prefix."""
    model, _ = pipo
    arrays = {}
    for f in mlx_pipo.glob("*.safetensors"):
        arrays.update(load_file(str(f)))
    size = Counter()
    for key, a in arrays.items():
        size[key.split(".")[0] if not key.startswith("model.") else key.split(".")[1]] += a.nbytes
    config = json.loads((mlx_pipo / "config.json").read_text())
    embed = size["embed_tokens"]
    B = sum(size.values()) - embed - size["lm_head"] - size["mtp"] - size["confidence_head"] - size["compressor"]
    E = embed if config["tie_word_embeddings"] else size["lm_head"]
    M, C = size["mtp"] + size["confidence_head"], size["compressor"]
    assert weight_bytes(model) == {"B": B, "E": E, "M": M, "C": C}
    assert draft_cost(model) == pytest.approx((E + M) / (B + E + C))
    model.args.draft_cost = 0.3  # a measurement stored by calibration wins
    try:
        assert draft_cost(model) == 0.3
    finally:
        model.args.draft_cost = None


# -- the decoder when steps skip the MTP head

PATTERNS = {
    "every third": lambda i: i % 3 == 0,
    "first only": lambda i: i == 0,
    "late start": lambda i: i >= 5,
    "random": lambda i: random.Random(i).random() < 0.4,
}


@pytest.mark.parametrize("threshold", [-1.0, 0.5])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("length,step", [(1, 2048), (10, 2048), (31, 8)])
def test_skipped_steps_equal_the_reference(pipo, scripted, threshold, pattern, length, step):
    model, tokenizer = pipo
    prompt = prompt_of(length)
    scripted(PATTERNS[pattern])
    got, responses, cache = fused(model, tokenizer, prompt, max_tokens=20, conf_threshold=threshold,
                                  prefill_step_size=step, draft="auto")
    expected, ids, logprobs = reference(model, prompt, threshold, 20, eos=tokenizer.eos_token_ids,
                                       drafts=PATTERNS[pattern])
    assert got == expected
    assert_logprobs_close(responses, logprobs)
    assert cache.tokens == ids


def test_never_equals_threshold_one_and_always_drafts_every_step(pipo):
    model, tokenizer = pipo
    prompt = prompt_of(13)
    never, r_never, _ = fused(model, tokenizer, prompt, max_tokens=20, conf_threshold=0.5, draft="never")
    one, r_one, _ = fused(model, tokenizer, prompt, max_tokens=20, conf_threshold=1.0, draft="always")
    assert never == one and not any(d for _, d in never)
    assert_logprobs_close(r_never, [r.logprobs for r in r_one])
    always, _, _ = fused(model, tokenizer, prompt, max_tokens=20, conf_threshold=-1.0, draft="always")
    assert always == reference(model, prompt, -1.0, 20, eos=tokenizer.eos_token_ids)[0]
    assert sum(d for _, d in always) == 10  # keep-all: every step drafted and kept


@pytest.mark.parametrize("second_length", [2, 9])
def test_a_cache_that_owes_entries_continues_like_a_fresh_run(pipo, scripted, second_length):
    """Turn 1 ends with steps that skipped the MTP head; turn 2 (drafting every step)
    must see an MTP cache as complete as a fresh prefill of everything held."""
    model, tokenizer = pipo
    tokenizer = with_eos(tokenizer)  # no end of sequence: turn 1 runs its whole budget
    cache = make_prompt_cache(model)
    scripted(lambda i: i == 1)
    fused(model, tokenizer, prompt_of(11), cache=cache, max_tokens=9, conf_threshold=-1.0, draft="auto")
    held = list(cache.tokens)
    assert cache.last_hidden.shape[1] > 1  # several entries owed
    new = prompt_of(second_length, seed=3)
    got, responses, _ = fused(model, tokenizer, new, cache=cache, max_tokens=12, conf_threshold=-1.0)
    expected, ids, logprobs = reference(model, held + new, -1.0, 12, eos=tokenizer.eos_token_ids)
    assert got == expected
    assert_logprobs_close(responses, logprobs)
    assert cache.tokens == ids


def test_batched_rows_share_the_decision_and_equal_the_reference(pipo, scripted, monkeypatch):
    model, tokenizer = pipo
    scripted(lambda i: random.Random(100 + i).random() < 0.5)
    flags = {}
    real_step = BatchGenerator._step

    def recording_step(self, pairs, remaining):
        step = real_step(self, pairs, remaining)
        for uid in step.uids:
            flags.setdefault(uid, []).append(step.drafted)
        return step

    monkeypatch.setattr(BatchGenerator, "_step", recording_step)
    prompts = {n: random_ids(1, n, seed=n)[0].tolist() for n in (3, 8, 13, 20)}
    budgets = {3: 8, 8: 16, 13: 12, 20: 16}
    gen = BatchGenerator(model, (), release_caches=True)
    uids = {n: gen.insert(prompts[n], budgets[n], conf_threshold=-1.0) for n in (3, 8)}
    got, step = {}, 0
    while len(gen):
        if step == 4:  # joins while the batch owes MTP entries
            uids.update({n: gen.insert(prompts[n], budgets[n], conf_threshold=-1.0) for n in (13, 20)})
        for r in gen.next():
            got.setdefault(r.uid, []).append((r.token, r.from_draft))
        step += 1
    assert {d for f in flags.values() for d in f} == {True, False}
    for n, uid in uids.items():
        expected, ids, _ = reference(model, prompts[n], -1.0, budgets[n], drafts=flags[uid].__getitem__)
        assert got[uid] == expected, n
        # The released cache goes on like a fresh run over what it holds.
        released = gen.released[uid]
        assert released.tokens == ids
        new = prompt_of(5, seed=n)
        more, _, _ = fused(model, tokenizer, new, cache=released, max_tokens=6, conf_threshold=-1.0)
        assert more == reference(model, ids + new, -1.0, 6, eos=tokenizer.eos_token_ids)[0], n


def test_never_rows_in_a_drafting_batch_keep_nothing(pipo):
    model, _ = pipo
    gen = BatchGenerator(model, ())
    a = gen.insert(prompt_of(9), 10, conf_threshold=-1.0, draft="always")
    b = gen.insert(prompt_of(12, seed=1), 10, conf_threshold=-1.0, draft="never")
    got = {}
    while len(gen):
        for r in gen.next():
            got.setdefault(r.uid, []).append((r.token, r.from_draft))
    assert sum(d for _, d in got[a]) == 5 and not any(d for _, d in got[b])
    assert got[b] == reference(model, prompt_of(12, seed=1), 1.0, 10)[0]


def test_one_graph_per_step_whether_or_not_it_drafts(pipo, scripted, monkeypatch):
    """As test_generate's graph test: each step is queued whole before the previous one
    is read, and a skipped step has one sampling, a drafting step two."""
    model, tokenizer = pipo
    pattern = lambda i: i % 4 in (0, 3)  # noqa: E731
    scripted(pattern)
    expected = reference(model, prompt_of(31), 0.5, 16, eos=tokenizer.eos_token_ids, drafts=pattern)[0]
    log, graphs, unread = record_steps(monkeypatch)
    got, responses, _ = fused(model, tokenizer, prompt_of(31), max_tokens=16, conf_threshold=0.5,
                              prefill_step_size=8, draft="auto")
    assert got == expected
    steps = responses[-1].steps
    assert log == ["eval"] * 4 + ["async_eval"] * (steps + 1)
    assert unread == [True] * steps
    for i, graph in enumerate(graphs):
        assert graph["ArgReduce"] == (2 if pattern(i) else 1), i
        assert (graph["GreaterEqual"] > 0) == pattern(i)


def test_auto_is_reproducible_and_the_default(pipo):
    model, tokenizer = pipo
    prompt = prompt_of(9)
    runs = [[r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=40, conf_threshold=0.5)]
            for _ in range(2)]
    auto = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=40, conf_threshold=0.5,
                                             draft="auto")]
    assert runs[0] == runs[1] == auto


def test_filling_the_mtp_cache_writes_what_drafting_writes(pipo):
    """The owed entries are keys and values only; they must equal those a whole MTP
    pass over the same positions leaves in the cache."""
    model, _ = pipo
    H = model.args.hidden_size
    token1 = mx.array(random_ids(1, 7, seed=5))
    hidden = mx.random.normal((1, 7, H), key=mx.random.key(1))
    drafted, filled = model.make_cache()[-1:], model.make_cache()[-1:]
    for cache in (drafted, filled):  # a history first, so offsets and RoPE matter
        model.draft(token1[:, :3], hidden[:, :3], cache)
    model.draft(token1[:, 3:], hidden[:, 3:], drafted)
    model.fill_mtp_cache(token1[:, 3:], hidden[:, 3:], filled)
    assert drafted[0].offset == filled[0].offset == 7
    for name in ("keys", "values"):
        a, b = (getattr(c[0], name)[..., :7, :] for c in (drafted, filled))
        assert mx.allclose(a, b, atol=1e-5).item(), name
