"""KV-cache options (docs/memory.md): a quantized and a rotating attention cache.

Each decoder run is checked against a reference that recomputes every step from
scratch with the teacher-forced pass (no decoder, no pipelining):
* quantized: fresh caches whose attention layers are mlx-lm's QuantizedKVCache
  from the position the documented rule names (start in tokens, whole pairs);
* rotating: every key kept, and a mask written out here that lets position p
  see the first `keep` pairs and the latest `window - keep` (itself included),
  which is what a rotating cache of `window` pairs holds.
Greedy decoding, so tokens must match; log-probabilities must match too
(tokens can agree by luck, distributions cannot).
"""

import io
import sys
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import random_ids
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

import pipo_mlx.cli.generate as gen_cli
import pipo_mlx.cli.server as server_cli
from pipo_mlx import BatchGenerator, ChatSession, PipoError, load, make_prompt_cache, stream_generate
from pipo_mlx.backbones.qwen3_5 import Model, ModelArgs
from pipo_mlx.decode import generate_step
from pipo_mlx.engine import Engine, Finished, Job, TokenEvent


@pytest.fixture(scope="module")
def wide():
    """A random PIPO model whose attention heads (32) can be quantized in groups of 32;
    layers: linear, attention, linear, attention, then the MTP's attention layer."""
    args = ModelArgs.from_dict({
        "model_type": "qwen3_5_text", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "full_attention_interval": 2,
        "tie_word_embeddings": True, "vocab_size": 256, "max_position_embeddings": 4096,
        "pipo": {"pad_token_id": 255},
    })
    mx.random.seed(3)
    model = Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def lib(mlx_pipo):
    return load(str(mlx_pipo))


def prompt_of(length, seed=0, vocab=250):
    return random_ids(1, length, vocab=vocab, seed=seed)[0].tolist()


def pick(model, logits):
    logits = logits[None]
    logits[:, model.pad_token_id] = -mx.inf
    lp = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]
    return int(mx.argmax(lp).item()), lp


def reference(model, prompt, max_tokens, keep_all, forward):
    """[(token, logprobs)] of greedy PIPO decoding, recomputed from scratch each step.

    `forward(ids)` is the teacher-forced pass over paired ids; `keep_all`: every
    token2 kept (threshold below 0), else none (the MTP never runs).
    """
    pad = model.pad_token_id
    ids = list(prompt) + [pad] * (len(prompt) % 2)
    out = []
    while len(out) < max_tokens:
        L = len(ids) // 2
        # Causal: a dummy pair after the sequence changes nothing before it.
        t1, lp = pick(model, forward(ids + [pad, pad]).logits[0, L - 1])
        out.append((t1, lp))
        if not keep_all or len(out) == max_tokens:
            ids += [t1, pad]
            continue
        t2, lp = pick(model, forward(ids + [t1, pad]).mtp_logits[0, L - 1])
        out.append((t2, lp))
        ids += [t1, t2]
    return out


def with_caches(model, attention_cache):
    """The teacher-forced pass with `attention_cache()` for every attention layer."""

    def forward(ids):
        caches = [attention_cache() if isinstance(c, KVCache) else c for c in model.make_cache()]
        return model(mx.array([ids]), cache=caches)

    return forward


class WindowView(KVCache):
    """All keys kept; the mask shows position p the first `keep` positions and the latest
    `window - keep`, itself included."""

    def __init__(self, window, keep):
        super().__init__()
        self.window, self.keep = window, keep

    def make_mask(self, N, return_array=False, window_size=None):
        p = mx.arange(self.offset, self.offset + N)[:, None]
        q = mx.arange(self.offset + N)[None]
        return (q <= p) & ((q < self.keep) | (q > p - (self.window - self.keep)))


def decoded(model, prompt, max_tokens, keep_all, **options):
    out = generate_step(prompt, model, max_tokens=max_tokens, conf_threshold=-1.0 if keep_all else 1.0,
                        draft="always", **options)
    return [(t, lp) for t, lp, _ in out]


def assert_same(got, expected, atol=1e-4):
    assert [t for t, _ in got] == [t for t, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        finite = mx.isfinite(b)
        assert mx.allclose(mx.where(finite, a, 0), mx.where(finite, b, 0), atol=atol).item()


def differs(a, b):
    return any(not mx.allclose(mx.where(mx.isfinite(x), x, 0), mx.where(mx.isfinite(y), y, 0), atol=1e-3).item()
               for (_, x), (_, y) in zip(a, b))


# -- quantized ------------------------------------------------------------------------


@pytest.mark.parametrize("keep_all", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_from_the_start_matches_mlx_lms_quantized_cache(wide, keep_all, bits):
    """A one-pair prompt: every attention cache, the MTP's too, is quantized before it is read."""
    prompt, n = prompt_of(2, seed=1), 24
    got = decoded(wide, prompt, n, keep_all, kv_bits=bits, kv_group_size=32, quantized_kv_start=0)
    expected = reference(wide, prompt, n, keep_all,
                         with_caches(wide, lambda: QuantizedKVCache(group_size=32, bits=bits)))
    assert_same(got, expected)
    assert differs(expected, reference(wide, prompt, n, keep_all, with_caches(wide, KVCache)))


@pytest.mark.parametrize("start,convert_at", [(0, 10), (9, 10), (27, 14), (10_000, None)])
def test_quantization_starts_at_the_pair_holding_the_start_token(wide, start, convert_at):
    """A 21-token prompt is 11 pairs, 10 of them prefilled; the cache is quantized at the
    first check (after the prefill, then before each step) where it holds `start` tokens,
    i.e. ceil(start / 2) pairs: the reference keeps the pairs before that in full precision."""
    prompt, n = prompt_of(21, seed=2), 12

    def forward(ids):
        backbone = wide.make_cache()[: len(wide.layers)]
        c = min(len(ids) // 2 if convert_at is None else convert_at, len(ids) // 2)
        parts = [wide.hidden(mx.array([ids[: 2 * c]]), backbone)] if c else []
        for i, cache in enumerate(backbone):
            if isinstance(cache, KVCache):
                backbone[i] = cache.to_quantized(group_size=32, bits=4)
        if c < len(ids) // 2:
            parts.append(wide.hidden(mx.array([ids[2 * c :]]), backbone))
        return SimpleNamespace(logits=wide.lm_logits(mx.concatenate(parts, axis=1)))

    got = decoded(wide, prompt, n, False, kv_bits=4, kv_group_size=32, quantized_kv_start=start)
    assert_same(got, reference(wide, prompt, n, False, forward))


def test_the_cache_holds_what_mx_quantize_gives(wide):
    """The first attention layer reads only the embeddings and a linear-attention layer,
    so its keys are those of an unquantized one-pass run; the cache holds them quantized."""
    cache = make_prompt_cache(wide)
    list(generate_step(prompt_of(6, seed=4), wide, max_tokens=20, conf_threshold=1.0, prompt_cache=cache,
                       kv_bits=8, kv_group_size=32, quantized_kv_start=0))
    got = cache.layers[1]
    assert isinstance(got, QuantizedKVCache) and (got.bits, got.group_size) == (8, 32)
    plain = wide.make_cache()
    wide.hidden(mx.array([cache.tokens]), plain)
    n = len(cache.tokens) // 2
    assert got.offset == n
    for mine, full in ((got.keys, plain[1].keys), (got.values, plain[1].values)):
        want = mx.quantize(full[..., :n, :], group_size=32, bits=8)
        have = [np.array(x[..., :n, :]) for x in mine]
        want = [np.array(x) for x in want]
        # Step-by-step and one-pass float sums may differ in the last bit, which can move
        # a value across a rounding boundary: then by one level, and rarely.
        assert np.mean(have[0] == want[0]) > 0.99
        np.testing.assert_allclose(have[1], want[1], rtol=1e-4)
        deq = lambda q: np.array(mx.dequantize(*[mx.array(x) for x in q], group_size=32, bits=8))
        np.testing.assert_allclose(deq(have), deq(want), atol=float(np.max(want[1])) * 1.01)


# -- rotating -------------------------------------------------------------------------


@pytest.mark.parametrize("keep_all", [True, False])
@pytest.mark.parametrize("length,step", [(8, 2048), (21, 2)])
def test_a_rotating_window_keeps_whole_pairs(wide, keep_all, length, step):
    """13 tokens hold 6 pairs (an odd size rounds down): 2 kept, 4 rotating. A prompt longer
    than the window is prefilled a pair at a time here, so each pair sees what a decode step sees."""
    prompt, n = prompt_of(length, seed=5), 40
    cache = make_prompt_cache(wide, max_kv_size=13)
    got = decoded(wide, prompt, n, keep_all, prompt_cache=cache, prefill_step_size=step)
    expected = reference(wide, prompt, n, keep_all, with_caches(wide, lambda: WindowView(6, 2)))
    assert_same(got, expected)
    assert differs(expected, reference(wide, prompt, n, keep_all, with_caches(wide, KVCache)))
    for c in cache.layers:
        if isinstance(c, RotatingKVCache) and not c.empty():  # the MTP's is empty without drafts
            assert c.keys.shape[2] == 6 and c.max_size == 6 and c.keep == 2
    again = decoded(wide, prompt, n, keep_all, max_kv_size=12, prefill_step_size=step)
    assert [t for t, _ in again] == [t for t, _ in got]


def test_a_rotating_conversation_goes_on_as_one_sequence(wide):
    """A second call on the same rotating cache (the first left an MTP entry to trim)
    answers as the whole conversation decoded at once would."""
    first, second = prompt_of(9, seed=6), prompt_of(5, seed=7)
    cache = make_prompt_cache(wide, max_kv_size=12)
    a = decoded(wide, first, 15, True, prompt_cache=cache, prefill_step_size=2)
    held = list(cache.tokens)
    b = decoded(wide, second, 15, True, prompt_cache=cache, prefill_step_size=2)
    view = with_caches(wide, lambda: WindowView(6, 2))
    assert_same(a, reference(wide, first, 15, True, view))
    assert_same(b, reference(wide, held + second, 15, True, view))


@pytest.mark.parametrize("keep_all", [True, False])
def test_batch_rows_rotate_without_kept_pairs(wide, keep_all):
    """mlx-lm's batch rotating cache keeps no first tokens: each row sees its latest 6 pairs."""
    gen = BatchGenerator(wide, prefill_step_size=2, max_kv_size=12)
    prompts = [prompt_of(n, seed=10 + n) for n in (6, 9, 14)]
    uids = [gen.insert(p, 30, conf_threshold=-1.0 if keep_all else 1.0, draft="always") for p in prompts]
    got = {u: [] for u in uids}
    while len(gen):
        for r in gen.next():
            got[r.uid].append((r.token, r.logprobs))
    for uid, prompt in zip(uids, prompts):
        assert_same(got[uid], reference(wide, prompt, 30, keep_all, with_caches(wide, lambda: WindowView(6, 0))))


def test_the_server_engine_rotates_its_rows(lib):
    model, tokenizer = lib
    prompt = prompt_of(11, seed=8, vocab=300)
    engine = Engine(model, tokenizer, 2**20, prefill_step_size=2, max_kv_size=12).start()
    try:
        tokens = []
        for _ in range(2):  # the second request starts from the first's stored caches
            job = engine.submit(Job(prompt, 24, conf_threshold=-1.0, draft="always"))
            events = []
            while not events or not isinstance(events[-1], Finished):
                events.append(job.events.get(timeout=60))
            tokens.append([e.token for e in events if isinstance(e, TokenEvent)])
    finally:
        engine.stop()
    expected = reference(model, prompt, 24, True, with_caches(model, lambda: WindowView(6, 0)))
    assert tokens == [[t for t, _ in expected]] * 2


@pytest.mark.parametrize("keep_all", [True, False])
def test_the_server_engine_quantizes_one_request_at_a_time(wide, lib, keep_all):
    """mlx-lm's batch caches cannot be quantized: with kv_bits the engine decodes its
    requests one at a time, each as the quantized reference does (two at once here)."""
    prompt = prompt_of(2, seed=9)
    engine = Engine(wide, lib[1], 2**20, kv_bits=8, kv_group_size=32, quantized_kv_start=0).start()
    try:
        jobs = [engine.submit(Job(prompt, 20, conf_threshold=-1.0 if keep_all else 1.0, draft="always"))
                for _ in range(2)]
        tokens = []
        for job in jobs:
            events = []
            while not events or not isinstance(events[-1], Finished):
                events.append(job.events.get(timeout=60))
            tokens.append([e.token for e in events if isinstance(e, TokenEvent)])
            assert events[-1].finish_reason == "length"
    finally:
        engine.stop()
    expected = reference(wide, prompt, 20, keep_all, with_caches(wide, lambda: QuantizedKVCache(32, 8)))
    assert tokens == [[t for t, _ in expected]] * 2


def test_chat_keeps_its_window_across_turns(lib):
    model, tokenizer = lib
    chat = ChatSession(model, tokenizer, use_chat_template=False, max_kv_size=16, max_tokens=12)
    for query in ("def f(x):", " return x"):
        list(chat.turn(query))
    assert all(c.max_size == 8 for c in chat.cache.layers if isinstance(c, RotatingKVCache))
    assert sum(isinstance(c, RotatingKVCache) for c in chat.cache.layers) == 3


@pytest.mark.parametrize("options,kind", [
    (dict(kv_bits=8, kv_group_size=32, quantized_kv_start=34), QuantizedKVCache),  # at the 3rd step
    (dict(max_kv_size=12), RotatingKVCache),
])
def test_still_one_evaluation_per_decode_step(wide, monkeypatch, options, kind):
    """The conversion joins a step's lazy graph and the window writes in place: each decode
    step is still queued once, before the previous one is read (tests/test_generate.py)."""
    from test_generate import record_steps

    log, _, unread = record_steps(monkeypatch)
    cache = make_prompt_cache(wide, options.get("max_kv_size"))
    out = list(generate_step(prompt_of(31, seed=12), wide, max_tokens=16, conf_threshold=0.5, draft="always",
                             prefill_step_size=8, prompt_cache=cache, **options))
    steps = sum(not is_token2 for _, _, is_token2 in out)
    assert log == ["eval"] * 4 + ["async_eval"] * (steps + 1)  # 4 prefill chunks, then the steps
    assert unread == [True] * steps
    assert sum(isinstance(c, kind) for c in cache.layers) == 3


# -- refusals -------------------------------------------------------------------------


def test_bad_options_are_refused_by_the_library(wide, lib):
    prompt = prompt_of(4)
    for options, message in [
        (dict(kv_bits=7), "kv_bits must be one of"),
        (dict(kv_bits=4, kv_group_size=48), "kv_group_size must be one of"),
        (dict(kv_bits=4, kv_group_size=32, quantized_kv_start=-1), "quantized_kv_start"),
        (dict(kv_bits=4, kv_group_size=32, max_kv_size=64), "cannot be quantized"),
        (dict(max_kv_size=5), "at least 6"),
        (dict(max_kv_size=12, prompt_cache=make_prompt_cache(wide)), "not made with max_kv_size 12"),
        (dict(kv_bits=4, kv_group_size=32, prompt_cache=make_prompt_cache(wide, 12)), "rotating"),
    ]:
        with pytest.raises(PipoError, match=message):
            list(generate_step(prompt, wide, max_tokens=2, **options))
    with pytest.raises(PipoError, match="no group size does"):
        list(generate_step(prompt, lib[0], max_tokens=2, kv_bits=4, kv_group_size=32))
    cache = make_prompt_cache(wide)
    list(generate_step(prompt, wide, max_tokens=2, prompt_cache=cache, kv_bits=8, kv_group_size=32,
                       quantized_kv_start=0))
    with pytest.raises(PipoError, match="already quantized to 8 bits"):
        list(generate_step(prompt, wide, max_tokens=2, prompt_cache=cache, kv_bits=4, kv_group_size=32))
    with pytest.raises(PipoError, match="batch cannot quantize"):
        BatchGenerator(wide, kv_bits=4)
    with pytest.raises(PipoError, match="cannot be quantized"):
        Engine(wide, lib[1], 0, kv_bits=4, kv_group_size=32, max_kv_size=64)
    gen = BatchGenerator(wide, max_kv_size=12)
    with pytest.raises(PipoError, match="not made with this batch's max_kv_size"):
        gen.insert(prompt, 4, prompt_cache=make_prompt_cache(wide))


def run_cli(main, argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return (code, *capsys.readouterr())


@pytest.mark.parametrize("argv,message", [
    (["--kv-bits", "7"], "kv_bits must be one of"),
    (["--kv-bits", "4", "--kv-group-size", "48"], "kv_group_size must be one of"),
    (["--kv-bits", "4", "--quantized-kv-start", "-2"], "quantized_kv_start"),
    (["--kv-bits", "4", "--max-kv-size", "64"], "cannot be quantized"),
    (["--max-kv-size", "3"], "at least 6"),
    (["--kv-group-size", "32"], "only apply with --kv-bits"),
    (["--kv-bits", "4"], "no group size does"),  # the test model's heads are 16 wide
])
def test_generate_refuses_bad_values_with_one_line(mlx_pipo, monkeypatch, capsys, argv, message):
    code, out, err = run_cli(gen_cli.main, ["--model", str(mlx_pipo), "-p", "hi", *argv], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("argv,message", [
    (["--kv-bits", "4"], "no group size does"),  # the test model's heads are 16 wide
    (["--kv-bits", "4", "--max-kv-size", "64"], "cannot be quantized"),
    (["--quantized-kv-start", "0"], "only apply with --kv-bits"),
    (["--max-kv-size", "4"], "at least 6"),
])
def test_the_server_refuses_bad_values_with_one_line(mlx_pipo, monkeypatch, capsys, argv, message):
    code, out, err = run_cli(server_cli.main, ["--model", str(mlx_pipo), "--port", "0", *argv],
                             monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and message in err


def test_generate_passes_the_window_on(lib, mlx_pipo, monkeypatch, capsys):
    code, out, err = run_cli(gen_cli.main, ["--model", str(mlx_pipo), "-p", "def f(x):", "-m", "20",
                                            "--ignore-chat-template", "--max-kv-size", "9", "-q",
                                            "--conf-threshold", "-1", "--draft", "always"], monkeypatch, capsys)
    assert code == 0, err
    model, tokenizer = lib
    text = "".join(r.text for r in stream_generate(
        model, tokenizer, "def f(x):", max_tokens=20, conf_threshold=-1.0, draft="always",
        prompt_cache=make_prompt_cache(model, 8)))
    unwindowed = "".join(r.text for r in stream_generate(
        model, tokenizer, "def f(x):", max_tokens=20, conf_threshold=-1.0, draft="always"))
    assert out == text + "\n" and text != unwindowed


def test_generate_passes_the_quantization_on(monkeypatch, capsys):
    """On the shipped demo (heads of 64): the CLI's text is the library's with the same options."""
    demo = str(gen_cli.DEMO_PLACES[0])
    argv = ["--model", demo, "-p", "import os", "-m", "16", "--ignore-chat-template", "-q",
            "--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start", "0"]
    code, out, err = run_cli(gen_cli.main, argv, monkeypatch, capsys)
    assert code == 0, err
    model, tokenizer = load(demo)
    cache = make_prompt_cache(model)
    text = "".join(r.text for r in stream_generate(model, tokenizer, "import os", max_tokens=16, prompt_cache=cache,
                                                   kv_bits=4, kv_group_size=32, quantized_kv_start=0))
    assert out == text + "\n"
    assert all(c.bits == 4 for c in cache.layers if isinstance(c, QuantizedKVCache))
    assert sum(isinstance(c, QuantizedKVCache) for c in cache.layers) == 4


def test_the_memory_formula_holds_for_real_caches(wide):
    """docs/memory.md's 16 GB table rests on bench_kv.predicted: the bytes of the caches
    a real decode leaves, on both sides, for every option."""
    from pathlib import Path

    from mlx_lm.generate import generate_step as mlx_generate_step

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_kv

    g = bench_kv.geometry_of(wide.args)
    base = bench_kv.baseline_of(wide)
    for option in ({}, dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0),
                   dict(kv_bits=4, kv_group_size=32, quantized_kv_start=10), dict(max_kv_size=12)):
        cache = make_prompt_cache(wide, option.get("max_kv_size"))
        list(generate_step(prompt_of(40, seed=13), wide, max_tokens=30, conf_threshold=-1.0, draft="always",
                           prompt_cache=cache, **option))
        assert bench_kv.cache_figures(cache.layers) == bench_kv.predicted(g, "pipo", len(cache.tokens), option, 4)
        if "max_kv_size" in option:
            continue  # mlx-lm makes no window for Qwen3.5
        caches = base.make_cache()
        list(mlx_generate_step(mx.array(prompt_of(40, seed=13)), base, max_tokens=30, prompt_cache=caches,
                               **option))
        # mlx-lm's generator has read its last token too when it ends: 40 + 30 positions.
        assert bench_kv.cache_figures(caches) == bench_kv.predicted(g, "mlx-lm", 40 + 30, option, 4)
