"""The token2 head option: cheaper stand-ins for the LM head, used for token2 only.

Each check runs the fused decoder with every token2 kept, then recomputes the
same sequence with the teacher-forced pass (no caches) and applies a reference
head to its MTP states: token1 must still come from the full LM head, token2
from the stand-in.
"""

import runpy
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from hf_reference import random_ids
from mlx_lm.sample_utils import make_sampler

from pipo_mlx import PipoError, load
from pipo_mlx.decode import generate_step
from pipo_mlx.token2_head import make_token2_head

ROOT = Path(__file__).resolve().parents[1]
PROMPT = random_ids(1, 11, seed=7)[0].tolist()  # odd: the pairing PAD is in play too
STEPS = 12


@pytest.fixture(scope="module")
def model(mlx_pipo):
    return load(str(mlx_pipo))[0]


def keep_all(model, **kwargs):
    """(token1s, token2s, token2 logprobs) of STEPS decode steps with every token2 kept."""
    out = list(
        generate_step(PROMPT, model, max_tokens=2 * STEPS, conf_threshold=-1.0, **kwargs)
    )
    assert [is2 for _, _, is2 in out] == [False, True] * STEPS
    return [t for t, _, _ in out[0::2]], [t for t, _, _ in out[1::2]], [lp for _, lp, _ in out[1::2]]


def teacher_forced(model, token1s, token2s):
    """Full-head token1 logits [STEPS, V] and MTP states [STEPS, H] at the decode steps."""
    pad = model.args.pad_token_id
    ids = PROMPT + [pad] * (len(PROMPT) % 2)
    first = len(ids) // 2 - 1  # the pair position the first decode step reads
    for t1, t2 in zip(token1s, token2s):
        ids += [t1, t2]
    o = model(mx.array([ids]))
    positions = slice(first, first + STEPS)
    return o.logits[0, positions], o.mtp_hidden[0, positions]


def masked_logprobs(model, logits):
    logits = logits.astype(mx.float32)
    logits[:, model.args.pad_token_id] = -mx.inf  # PAD is never sampled
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def assert_close(a, b):
    finite = mx.isfinite(b)
    assert mx.array_equal(mx.isfinite(a), finite)
    assert mx.allclose(mx.where(finite, a, 0), mx.where(finite, b, 0), atol=1e-4).item()


def check_stream(model, spec, reference_head):
    token1s, token2s, logprobs2 = keep_all(model, token2_head=spec)
    logits1, m = teacher_forced(model, token1s, token2s)
    assert token1s == masked_logprobs(model, logits1).argmax(-1).tolist()
    expected = masked_logprobs(model, reference_head(m))
    assert token2s == expected.argmax(-1).tolist()
    assert_close(mx.stack(logprobs2), expected)
    return expected


def test_default_is_the_lm_head(model):
    assert make_token2_head(model) == model.lm_logits
    default = keep_all(model)
    assert keep_all(model, token2_head="full")[:2] == default[:2]
    # A shortlist of the whole vocabulary is the full head computed from a slice.
    assert keep_all(model, token2_head="top:320")[:2] == default[:2]


def test_q4_head_is_a_4bit_copy_of_the_lm_head(model):
    w, scales, biases = mx.quantize(model.model.embed_tokens.weight, 64, 4)

    def reference(m):
        return mx.quantized_matmul(m, w, scales, biases, transpose=True, group_size=64, bits=4)

    expected = check_stream(model, "q4", reference)
    # The copy really is coarser than the head it stands in for.
    _, m = teacher_forced(model, *keep_all(model, token2_head="q4")[:2])
    assert not mx.allclose(expected, masked_logprobs(model, model.lm_logits(m)), atol=1e-3).item()


def test_shortlist_head_only_draws_the_first_ids(model):
    K = 100
    weight = model.model.embed_tokens.weight

    def reference(m):
        logits = m @ weight[:K].T
        return mx.concatenate([logits, mx.full((m.shape[0], 320 - K), -mx.inf)], axis=-1)

    check_stream(model, f"top:{K}", reference)
    mx.random.seed(3)
    sampled = list(
        generate_step(
            PROMPT,
            model,
            max_tokens=80,
            conf_threshold=-1.0,
            sampler=make_sampler(temp=1.0),
            token2_head=f"q8+top:{K}",
        )
    )
    token2s = [t for t, _, is2 in sampled if is2]
    assert len(token2s) == 40 and max(token2s) < K
    assert max(t for t, _, is2 in sampled if not is2) >= K  # token1 is not restricted


def test_heads_of_a_quantized_model(model, mlx_pipo):
    """A quantized LM head is sliced as it is (top:K) or re-quantized from its values (q4)."""
    qmodel = load(str(mlx_pipo))[0]
    qmodel.model.embed_tokens = qmodel.model.embed_tokens.to_quantized(group_size=64, bits=8)
    q = qmodel.model.embed_tokens
    check_stream(
        qmodel,
        "top:50",
        lambda m: mx.pad(q.as_linear(m)[:, :50], [(0, 0), (0, 270)], constant_values=-mx.inf),
    )
    values = mx.dequantize(q.weight, q.scales, q.biases, group_size=64, bits=8)
    w, scales, biases = mx.quantize(values, 64, 4)
    check_stream(
        qmodel,
        "q4",
        lambda m: mx.quantized_matmul(m, w, scales, biases, transpose=True, group_size=64, bits=4),
    )


def test_a_built_head_is_reused(model, monkeypatch):
    head = make_token2_head(model, "q4+top:200")
    expected = keep_all(model, token2_head="q4+top:200")[:2]
    monkeypatch.setattr(mx, "quantize", lambda *a, **k: pytest.fail("quantized again"))
    assert keep_all(model, token2_head=head)[:2] == expected


@pytest.mark.parametrize(
    "spec", ["", "q3", "q4+q8", "top:0", "top:-1", "top:x", "top:", "full+q4", "top:321"]
)
def test_bad_specs(model, spec):
    with pytest.raises(PipoError, match="token2 head"):
        make_token2_head(model, spec)


def cli(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["generate.py", *argv])
    code = 0
    try:
        runpy.run_path(str(ROOT / "generate.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code
    return code, *capsys.readouterr()


def test_cli_flag(mlx_pipo, monkeypatch, capsys):
    common = ["--model", str(mlx_pipo), "--prompt", "hi", "--max-tokens", "8", "--verbose"]
    code, out, err = cli(monkeypatch, capsys, *common, "--token2-head", "q4+top:200")
    assert code == 0, err
    assert "tokens per step" in out
    code, out, err = cli(monkeypatch, capsys, *common, "--token2-head", "q5")
    assert code != 0 and "unknown token2 head 'q5'" in err
