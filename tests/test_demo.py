"""The shipped demo models (scripts/make_demo.py) load and write plausible Python.

Set PIPO_DEMO_MODELS to test a recipe's --out folder instead of models/.
"""

import os
from pathlib import Path

import mlx.core as mx
import pytest

from pipo_mlx import load
from pipo_mlx.decode import generate_step

MODELS = Path(os.environ.get("PIPO_DEMO_MODELS", Path(__file__).resolve().parents[1] / "models"))
PIPO, BASE = MODELS / "pipo-stdlib", MODELS / "base-stdlib"
# Held-in style code, written here (not from the corpus): a trained model
# should predict much of it; a random one gets about 1 in 4096.
SNIPPET = '''import os
import sys


class Counter:
    """Count things."""

    def __init__(self, name):
        self.name = name
        self.count = 0

    def add(self, value=1):
        self.count += value
        return self.count


def main():
    """Print the arguments."""
    for arg in sys.argv[1:]:
        print(arg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def assert_function_body(text: str) -> None:
    """What follows `def f(...):` is a new line, indented, with something on it."""
    lines = text.split("\n")
    assert len(lines) > 1 and lines[0] == "", repr(text)
    assert lines[1].startswith("    ") and lines[1].strip(), repr(text)


@pytest.fixture(scope="module")
def pipo():
    assert PIPO.is_dir(), f"{PIPO} is missing: run python scripts/make_demo.py"
    return load(str(PIPO))


def test_shipped_size_budget():
    size = sum(f.stat().st_size for d in (PIPO, BASE) for f in d.iterdir())
    assert size <= 16 * 2**20, f"shipped models take {size / 2**20:.1f} MiB, over 16"


def test_pad_is_a_real_token_apart_from_eos(pipo):
    model, tokenizer = pipo
    pad = model.args.pad_token_id
    assert pad == tokenizer.pad_token_id
    assert pad not in tokenizer.eos_token_ids
    assert tokenizer.convert_ids_to_tokens(pad) == "<|pad|>"


@pytest.mark.parametrize("threshold", [0.95, -1.0])
def test_pipo_greedy_writes_python(pipo, threshold):
    model, tokenizer = pipo
    prompt = tokenizer.encode("def fib(n):", add_special_tokens=False)
    out = list(generate_step(prompt, model, eos_token_ids=tokenizer.eos_token_ids, max_tokens=24, conf_threshold=threshold))
    tokens = [t for t, _, _ in out]
    assert model.args.pad_token_id not in tokens
    if threshold < 0:  # every draft kept: two tokens per step after the first
        assert sum(is2 for _, _, is2 in out) >= len(out) // 2 - 1
    assert_function_body(tokenizer.decode(tokens))


def test_pipo_predicts_code_teacher_forced(pipo):
    model, tokenizer = pipo
    ids = tokenizer.encode(SNIPPET, add_special_tokens=False)
    ids = mx.array([ids[: len(ids) // 2 * 2]])
    out = model(ids)
    tok1 = (out.logits[:, :-1].argmax(-1) == ids[:, 2::2]).mean().item()
    tok2 = (out.mtp_logits.argmax(-1) == ids[:, 3::2]).mean().item()
    # Chance is 1/4096; the shipped model gets about 0.3 / 0.28 on held-out files.
    assert tok1 > 0.25 and tok2 > 0.15, (tok1, tok2)


def test_base_loads_in_mlx_lm_and_agrees_with_pipo_tokenizer(pipo):
    from mlx_lm import generate, load as mlx_lm_load

    base, tokenizer = mlx_lm_load(str(BASE))
    assert tokenizer.encode(SNIPPET) == pipo[1].encode(SNIPPET)
    text = generate(base, tokenizer, "def fib(n):", max_tokens=16)
    assert "<|pad|>" not in text
    assert_function_body(text)
