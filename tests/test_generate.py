"""The fused decoder against a plain reference loop, stopping rules, sampling, chat caches.

The reference recomputes everything each step with the teacher-forced pass
(`Model.__call__`, checked against Hugging Face in the model tests): no caches,
no chunks, no fusing, no async, an evaluation after every phase. It follows
docs/design.md §4-5, including the two rules decided where the paper is silent:
processors see every token read (PADs included), and PAD is never sampled
unless it is an EOS token.
"""

import copy
import io
import itertools
import math
import re
from collections import Counter

import mlx.core as mx
import pytest
from hf_reference import random_ids
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from pipo_mlx import ChatSession, PipoError, generate, load, make_prompt_cache, stream_generate
from pipo_mlx.heads import ConfidenceHead, MTPHead

PAD_TEXT = "<|endoftext|>"


@pytest.fixture(scope="session")
def pipo(mlx_pipo):
    return load(str(mlx_pipo))


def with_eos(tokenizer, *eos):
    tokenizer = copy.copy(tokenizer)
    tokenizer.eos_token_ids = set(eos)
    return tokenizer


def detokenize(tokenizer, ids):
    """Text of `ids` through mlx-lm's streaming detokenizer, as stream_generate uses.

    (It renders stray bytes differently from `tokenizer.decode`, and a random
    model emits plenty of them.)
    """
    detokenizer = tokenizer.detokenizer
    for t in ids:
        detokenizer.add_token(t)
    detokenizer.finalize()
    return detokenizer.text


def prompt_of(length, seed=0):
    return random_ids(1, length, seed=seed)[0].tolist()


def reference(model, prompt, threshold, max_tokens, eos=(), processors=(), drafts=None):
    """Full recomputation: ([(token, is_token2)], ids the backbone read, [logprobs]).

    `drafts(step)` False: that step skips the MTP head, i.e. reads (token1, PAD) next.
    """
    pad = model.args.pad_token_id
    ids = list(prompt) + [pad] * (len(prompt) % 2)
    out, logprobs = [], []
    steps = itertools.count()

    def pick(logits, history):
        for p in processors:
            logits = p(mx.array(history), logits)
        if pad not in eos:
            logits[:, pad] = -mx.inf
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(lp)
        return int(mx.argmax(lp, axis=-1).item()), lp[0]

    while True:
        # Causal: a dummy pair after the sequence changes nothing before it (and
        # the teacher-forced pass needs two pairs to run its MTP at all).
        L = len(ids) // 2
        t1, lp = pick(model(mx.array([ids + [pad, pad]])).logits[:, L - 1], ids)
        out.append((t1, False))
        logprobs.append(lp)
        drafting = threshold < 1 and (drafts is None or drafts(next(steps)))
        if t1 in eos or len(out) == max_tokens or not drafting:
            ids += [t1, pad]
            if t1 in eos or len(out) == max_tokens:
                return out, ids, logprobs
            continue
        # The teacher-forced pass drafts at position L - 1 from token t_{2L}:
        # put token1 there (the slot after it is never read).
        o = model(mx.array([ids + [t1, pad]]))
        t2, lp = pick(o.mtp_logits[:, L - 1], ids + [t1])
        conf = 1 / (1 + math.exp(-o.confidence[0, L - 1].item()))
        if threshold >= 0 and conf < threshold:
            ids += [t1, pad]
            continue
        out.append((t2, True))
        logprobs.append(lp)
        ids += [t1, t2]
        if t2 in eos or len(out) == max_tokens:
            return out, ids, logprobs


def assert_logprobs_close(responses, expected):
    """Tokens can agree by luck (an argmax is robust); the distributions cannot."""
    assert len(responses) == len(expected)
    for r, lp in zip(responses, expected):
        finite = mx.isfinite(lp)
        assert mx.array_equal(mx.isfinite(r.logprobs), finite)
        assert mx.allclose(
            mx.where(finite, r.logprobs, 0), mx.where(finite, lp, 0), atol=1e-4
        ).item()


def fused(model, tokenizer, prompt, cache=None, **kwargs):
    """The decoder's tokens, responses and cache; it drafts at every step unless told
    otherwise, as the reference does (adaptive drafting: tests/test_drafting.py)."""
    kwargs.setdefault("draft", "always")
    cache = make_prompt_cache(model) if cache is None else cache
    responses = list(stream_generate(model, tokenizer, prompt, prompt_cache=cache, **kwargs))
    return [(r.token, r.from_draft) for r in responses], responses, cache


PROMPTS = [  # (length, prefill_step_size)
    (1, 2048),  # one token: a single padded pair, no prefill chunk at all
    (9, 2048),  # odd, shorter than a chunk
    (10, 2048),  # even, shorter than a chunk
    (31, 8),  # odd, four chunks
    (40, 7),  # even, a step size that is kept even (6): seven chunks
]


@pytest.mark.parametrize("threshold", [-1.0, 0.5, 1.0])
@pytest.mark.parametrize("length,step", PROMPTS)
def test_greedy_matches_reference(pipo, threshold, length, step):
    model, tokenizer = pipo
    prompt = prompt_of(length, seed=length)
    expected, expected_ids, logprobs = reference(model, prompt, threshold, max_tokens=24)
    got, responses, cache = fused(
        model, tokenizer, prompt, max_tokens=24, conf_threshold=threshold, prefill_step_size=step
    )
    assert got == expected
    assert_logprobs_close(responses, logprobs)
    assert cache.tokens == expected_ids
    kept = [d for _, d in got]
    if threshold < 0:
        assert kept == [False, True] * 12  # every token2 kept
    elif threshold >= 1:
        assert not any(kept)
    last = responses[-1]
    assert (last.steps, last.token2_kept) == (kept.count(False), kept.count(True))


def test_threshold_half_gates_both_ways(pipo):
    """The 0.5 cases above are only meaningful if the gate both keeps and drops."""
    model, _ = pipo
    got, _, _ = reference(model, prompt_of(31, seed=31), 0.5, max_tokens=24)
    flags = [d for _, d in got]
    steps, kept = flags.count(False), flags.count(True)
    assert 0 < kept < steps


def test_threshold_one_never_runs_the_mtp(pipo, monkeypatch):
    model, tokenizer = pipo
    calls = Counter()
    for cls, name in ((MTPHead, "mtp"), (ConfidenceHead, "confidence")):
        original = cls.__call__

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", counted)
    fused(model, tokenizer, prompt_of(31), max_tokens=12, conf_threshold=1.0, prefill_step_size=8)
    fused(model, tokenizer, prompt_of(31), max_tokens=12, conf_threshold=3.0)
    assert calls == Counter()
    fused(model, tokenizer, prompt_of(31), max_tokens=4, conf_threshold=0.5)
    assert calls["mtp"] > 0 and calls["confidence"] > 0  # the counter does see them


def test_eos_as_token1_stops_and_drops_token2(pipo):
    model, tokenizer = pipo
    prompt = prompt_of(12, seed=3)
    stream, _, _ = reference(model, prompt, -1.0, max_tokens=40)
    seen = set()
    for i, (token, is_token2) in enumerate(stream):
        if not is_token2 and i > 0 and token not in seen:
            break
        seen.add(token)
    else:
        pytest.fail("no fresh token1 to declare EOS")
    tok = with_eos(tokenizer, token)
    got, responses, cache = fused(model, tok, prompt, max_tokens=40, conf_threshold=-1.0)
    assert got == stream[: i + 1]
    assert responses[-1].finish_reason == "stop"
    assert cache.tokens[-2:] == [
        token,
        model.args.pad_token_id,
    ]  # token2 dropped from the caches too
    text = "".join(r.text for r in responses)
    assert text == detokenize(tokenizer, [t for t, _ in stream[:i]])


def test_eos_as_token2_stops_after_it(pipo):
    model, tokenizer = pipo
    prompt = prompt_of(12, seed=3)
    stream, _, _ = reference(model, prompt, -1.0, max_tokens=40)
    seen = set()
    for i, (token, is_token2) in enumerate(stream):
        if is_token2 and token not in seen:
            break
        seen.add(token)
    else:
        pytest.fail("no fresh token2 to declare EOS")
    got, responses, cache = fused(
        model, with_eos(tokenizer, token), prompt, max_tokens=40, conf_threshold=-1.0
    )
    assert got == stream[: i + 1]
    assert responses[-1].finish_reason == "stop"
    assert cache.tokens[-1] == token


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 8])
def test_max_tokens_is_exact(pipo, max_tokens):
    model, tokenizer = pipo
    prompt = prompt_of(9)
    stream, ids, _ = reference(model, prompt, -1.0, max_tokens=max_tokens)
    got, responses, cache = fused(
        model, tokenizer, prompt, max_tokens=max_tokens, conf_threshold=-1.0
    )
    assert got == stream and len(got) == max_tokens
    assert responses[-1].generation_tokens == max_tokens
    assert responses[-1].finish_reason == "length"
    # A token2 past the limit is not in the caches either.
    assert cache.tokens == ids
    if max_tokens % 2:
        assert cache.tokens[-1] == model.args.pad_token_id


def test_pad_never_reaches_the_text(pipo):
    model, tokenizer = pipo
    pad = model.args.pad_token_id
    prompt = prompt_of(9)
    plain, _, _ = fused(model, tokenizer, prompt, max_tokens=30, conf_threshold=0.5)
    # A huge bias towards PAD changes nothing: PAD is never sampled as a token...
    biased = make_logits_processors(logit_bias={pad: 100.0})
    got, responses, cache = fused(
        model, tokenizer, prompt, max_tokens=30, conf_threshold=0.5, logits_processors=biased
    )
    assert got == plain
    assert pad not in [t for t, _ in got]
    assert pad in cache.tokens[len(prompt) + 1 :]  # ...though dropped token2s are PADs
    text = "".join(r.text for r in responses)
    assert PAD_TEXT not in text
    assert text == detokenize(tokenizer, [t for t, _ in got])
    # ...unless the tokenizer counts PAD as an end of sequence: then it ends the text.
    tok = with_eos(tokenizer, 1, pad)
    got, responses, _ = fused(
        model, tok, prompt, max_tokens=30, conf_threshold=0.5, logits_processors=biased
    )
    assert got == [(pad, False)]
    assert responses[-1].finish_reason == "stop" and responses[-1].text == ""


def test_logits_processors_see_the_read_tokens(pipo):
    model, tokenizer = pipo
    prompt = prompt_of(9, seed=5)
    processors = make_logits_processors(repetition_penalty=1.5, presence_penalty=0.8)
    stream, ids, logprobs = reference(model, prompt, 0.5, max_tokens=24, processors=processors)
    plain, _, _ = reference(model, prompt, 0.5, max_tokens=24)
    assert stream != plain  # the penalties do act
    got, responses, cache = fused(
        model, tokenizer, prompt, max_tokens=24, conf_threshold=0.5, logits_processors=processors
    )
    assert got == stream
    assert_logprobs_close(responses, logprobs)
    assert cache.tokens == ids


def test_seeded_sampling_is_reproducible_and_pieces_join(pipo):
    model, tokenizer = pipo
    prompt = "def add(a, b):"
    options = dict(
        max_tokens=40,
        conf_threshold=0.5,
        sampler=make_sampler(1.0, top_p=0.95, top_k=20),
        logits_processors=make_logits_processors(presence_penalty=1.5),
    )
    runs = []
    for seed in (7, 7, 8):
        mx.random.seed(seed)
        runs.append(fused(model, tokenizer, prompt, **options))
    (a, ra, _), (b, _, _), (c, _, _) = runs
    assert a == b
    assert a != c
    text = "".join(r.text for r in ra)
    mx.random.seed(7)
    assert generate(model, tokenizer, prompt, **options) == text
    eos = tokenizer.eos_token_ids
    assert text == detokenize(tokenizer, [t for t, _ in a if t not in eos])


@pytest.mark.parametrize(
    "threshold,first_max_tokens,eos_first",
    [(0.5, 7, False), (-1.0, 9, False), (-1.0, 40, True), (1.0, 8, False)],
)
def test_chat_second_turn_equals_a_fresh_run(pipo, threshold, first_max_tokens, eos_first):
    """Turn 2 over reused caches equals a fresh run over the ids the caches hold."""
    model, tokenizer = pipo
    session = ChatSession(
        model,
        tokenizer,
        system_prompt="be brief",
        max_tokens=first_max_tokens,
        conf_threshold=threshold,
        prefill_step_size=6,
        draft="always",
    )
    first_prompt, _ = session.prompt_ids("def add(a, b):")
    if eos_first:
        # End turn 1 on <|im_end|> as token1 (at step 3), so its token2 slot is PAD.
        boost_from = len(first_prompt) + len(first_prompt) % 2 + 6

        def force_eos(tokens, logits):
            if tokens.shape[0] >= boost_from:
                logits[:, 1] = 1e4
            return logits

        session.options["logits_processors"] = [force_eos]
    first = list(session.turn("def add(a, b):"))
    held = list(session.cache.tokens)
    if eos_first:
        assert [r.token for r in first][-1] == 1 and held[-2:] == [1, model.args.pad_token_id]
    session.options.update(max_tokens=20, logits_processors=None)
    second = list(session.turn("print(i * i)"))
    new = session.cache.tokens[len(held) : len(held) + second[-1].prompt_tokens]
    # Only the new turn was prefilled: the template's continuation of the conversation.
    closing = "" if eos_first else "<|im_end|>"
    assert (
        tokenizer.decode(new)
        == closing + "\n<|im_start|>user\nprint(i * i)<|im_end|>\n<|im_start|>assistant\n"
    )
    assert session.cache.tokens[: len(held)] == held
    got = [(r.token, r.from_draft) for r in second]

    fresh, _, _ = fused(model, tokenizer, held + new, max_tokens=20, conf_threshold=threshold)
    expected, expected_ids, logprobs = reference(
        model, held + new, threshold, 20, eos=tokenizer.eos_token_ids
    )
    assert got == fresh == expected
    assert_logprobs_close(second, logprobs)
    assert session.cache.tokens == expected_ids


def test_prompt_cache_keeps_its_mtp_mode(pipo):
    model, tokenizer = pipo
    cache = make_prompt_cache(model)
    fused(model, tokenizer, prompt_of(9), cache=cache, max_tokens=3, conf_threshold=1.0)
    with pytest.raises(PipoError, match="conf_threshold >= 1"):
        fused(model, tokenizer, prompt_of(4), cache=cache, max_tokens=3, conf_threshold=0.5)
    with pytest.raises(TypeError, match="make_prompt_cache"):
        fused(model, tokenizer, prompt_of(4), cache=model.make_cache(), max_tokens=3)


def graph_nodes(*arrays):
    """{node id: primitive} of the unevaluated graph behind `arrays` (empty once evaluated)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *arrays)
    return dict(re.findall(r'(\d+) \[label ="(\w+)"', dot.getvalue()))


def record_steps(monkeypatch):
    """Replace mx.eval with a logger and mx.async_eval with a recorder that defers the
    work; returns (calls in order, each queued graph's new nodes by primitive, whether
    the graph queued before each call was still unread)."""
    log, new_nodes, unread, previous = [], [], [], []
    real_eval = mx.eval

    def logged_eval(*args):
        log.append("eval")
        real_eval(*args)

    def deferred_async_eval(*arrays):
        log.append("async_eval")
        before = graph_nodes(*previous) if previous else {}
        if previous:
            unread.append(bool(graph_nodes(previous[0])))
        nodes = graph_nodes(*arrays)
        new_nodes.append(Counter(v for k, v in nodes.items() if k not in before))
        previous[:] = arrays

    monkeypatch.setattr(mx, "eval", logged_eval)
    monkeypatch.setattr(mx, "async_eval", deferred_async_eval)
    return log, new_nodes, unread


@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_one_evaluation_per_decode_step(pipo, monkeypatch, threshold):
    """Each decode step is one lazy graph, queued once, before the previous step is read.

    `mx.async_eval` is replaced by a recorder that defers the work, so that what
    the generator did before each call can be seen deterministically:
    * the previous step's output must still be an unevaluated graph, i.e. the
      host queued this step before reading the previous one;
    * this step's new graph nodes (those not in the previous step's graph, which
      is alive, so ids are not reused) must hold the whole step: both samplings
      (ArgReduce), both embedding lookups (Gather), the backbone and the gate.
      Had anything in the step been evaluated or read early, it would be a
      leaf here instead.
    Nothing else may call mx.eval once decoding has started.
    """
    model, tokenizer = pipo
    prompt = prompt_of(31)
    expected, _, _ = reference(model, prompt, threshold, max_tokens=16)
    log, new_nodes, unread = record_steps(monkeypatch)
    got, responses, _ = fused(
        model, tokenizer, prompt, max_tokens=16, conf_threshold=threshold, prefill_step_size=8
    )
    assert got == expected
    steps = responses[-1].steps
    # 15 pairs before the last one, in chunks of 4, 4, 4 and 3 pairs; then one
    # call per step, plus the step queued behind the last one read.
    assert log == ["eval"] * 4 + ["async_eval"] * (steps + 1)
    assert unread == [True] * steps
    samplings = 2 if threshold < 1 else 1
    for i, graph in enumerate(new_nodes):
        assert graph["ArgReduce"] == samplings
        # embed(pair), embed(token1); the first step also writes the MTP entry the
        # prompt's last pair owes, from the embedding of that pair's first token.
        assert graph["Gather"] == samplings + (i == 0 and threshold < 1)
        assert graph["Convolution"] > 0  # the backbone's linear-attention layers
        assert (graph["GreaterEqual"] > 0) == (threshold < 1)  # the confidence gate


def test_bad_input(pipo):
    model, tokenizer = pipo
    with pytest.raises(PipoError, match="prompt is empty"):
        list(stream_generate(model, tokenizer, ""))
    with pytest.raises(PipoError, match="prompt is empty"):
        list(stream_generate(model, tokenizer, []))
    limit = model.args.max_position_embeddings
    with pytest.raises(PipoError, match=f"more than the model's context of {limit}"):
        list(stream_generate(model, tokenizer, prompt_of(limit + 1)))
    for bad in ("abc", "nan", [0.5]):
        with pytest.raises(PipoError, match="is not a number"):
            list(stream_generate(model, tokenizer, prompt_of(4), conf_threshold=bad))
    with pytest.raises(PipoError, match="max_tokens"):
        list(stream_generate(model, tokenizer, prompt_of(4), max_tokens=0))
    # The context check counts what a prompt cache already holds.
    cache = make_prompt_cache(model)
    fused(model, tokenizer, prompt_of(limit - 10), cache=cache, max_tokens=2, conf_threshold=1.0)
    held = list(cache.tokens)
    with pytest.raises(PipoError, match=f"{len(held)} already in the cache"):
        fused(model, tokenizer, prompt_of(20), cache=cache, max_tokens=2, conf_threshold=1.0)
    assert cache.tokens == held  # a refused prompt leaves the cache as it was


def test_library_errors_are_value_errors_and_numbers_are_numbers(mlx_pipo):
    model, tokenizer = load(str(mlx_pipo))
    assert issubclass(PipoError, ValueError)
    for threshold in ("0.5", float("nan")):
        with pytest.raises(ValueError, match="is not a number"):
            generate(model, tokenizer, "hi", max_tokens=2, conf_threshold=threshold)
    with pytest.raises(ValueError, match="prefill_step_size must be at least 2"):
        generate(model, tokenizer, "hi", max_tokens=2, prefill_step_size=1)


def test_the_threshold_stored_with_the_model_is_the_default(mlx_pipo):
    model, tokenizer = load(str(mlx_pipo))

    def kept(**kw):
        return sum(r.from_draft for r in stream_generate(model, tokenizer, "hi", max_tokens=12, **kw))

    assert model.args.conf_threshold is None  # none stored: the paper's 0.95
    assert kept() == kept(conf_threshold=0.95)
    model.args.conf_threshold = -1.0  # as a config's pipo.conf_threshold would set it
    assert kept() == kept(conf_threshold=-1.0) == 6
    assert kept(conf_threshold=1.0) == 0  # an explicit threshold wins
