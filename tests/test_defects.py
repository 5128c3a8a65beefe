"""Defects a newcomer met: package attributes, generation past the context, untrained heads."""

import copy
import http.client
import itertools
import json
import runpy
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hf_reference import RefPIPO, hf_config_dict, random_ids, tiny_config, write_checkpoint

from pipo_mlx import convert, load, make_prompt_cache, stream_generate
from pipo_mlx.batch import BatchGenerator
from pipo_mlx.cli import server as server_cli

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 40  # tokens, the short model's context


def test_cli_modules_leave_the_package_functions_bound():
    code = (
        "import inspect, pipo_mlx.generate, pipo_mlx.convert\n"
        "from pipo_mlx import generate, convert\n"
        "import pipo_mlx\n"
        "assert inspect.isfunction(generate) and inspect.isfunction(convert), (generate, convert)\n"
        "assert pipo_mlx.generate is generate and pipo_mlx.convert is convert\n"
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, cwd=ROOT, timeout=300)
    for tool in ("generate", "convert"):
        # -W error: runpy's warning about a module imported before it runs fails the run.
        result = subprocess.run([sys.executable, "-W", "error", "-m", f"pipo_mlx.{tool}", "--help"],
                                capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr


# -- the context ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def short(mlx_pipo, tmp_path_factory):
    """The fixture model with a context of CONTEXT tokens."""
    folder = tmp_path_factory.mktemp("short") / "pipo"
    shutil.copytree(mlx_pipo, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def no_eos(tokenizer):
    tokenizer = copy.copy(tokenizer)
    tokenizer.eos_token_ids = set()
    return tokenizer


@pytest.mark.parametrize("length", [9, 14])
@pytest.mark.parametrize("max_tokens", [-1, 6000])
def test_generation_stops_at_the_context(short, mlx_pipo, length, max_tokens):
    model, tokenizer = load(str(short))
    tokenizer = no_eos(tokenizer)
    prompt = random_ids(1, length, seed=length)[0].tolist()
    cache = make_prompt_cache(model)
    # At most a few tokens past the context, so that a run that would not stop fails.
    got = list(itertools.islice(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                                prompt_cache=cache, conf_threshold=-1.0, draft="always"),
                                CONTEXT + 4))
    steps = (CONTEXT - length - length % 2) // 2
    assert len(cache.tokens) == CONTEXT
    assert got[-1].finish_reason == "length" and got[-1].steps == steps
    assert all(r.finish_reason is None for r in got[:-1])
    # The same weights with the whole context: the same tokens up to the cap, where
    # every step kept its draft except the last, which does not draft.
    full, full_tokenizer = load(str(mlx_pipo))
    free = stream_generate(full, no_eos(full_tokenizer), prompt, max_tokens=2 * steps,
                           conf_threshold=-1.0, draft="always")
    assert [r.token for r in got] == [r.token for r in free][: 2 * steps - 1]
    # Nothing left: a new turn on this cache is refused, as in a chat.
    with pytest.raises(ValueError, match="context"):
        list(stream_generate(model, tokenizer, [5], prompt_cache=cache))


def test_a_prompt_that_fills_the_context_is_refused(short):
    model, tokenizer = load(str(short))
    for n in (CONTEXT - 1, CONTEXT):
        with pytest.raises(ValueError, match="leaves no room for a reply"):
            list(stream_generate(model, tokenizer, list(range(5, 5 + n))))
    with pytest.raises(ValueError, match="more than the model's context"):
        list(stream_generate(model, tokenizer, list(range(5, 6 + CONTEXT))))


def test_batch_rows_stop_at_the_context(short):
    model, tokenizer = load(str(short))
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 10, 21)]
    gen = BatchGenerator(model, (), release_caches=True)
    uids = [gen.insert(p, -1, conf_threshold=0.5, draft="always") for p in prompts]
    got = {uid: [] for uid in uids}
    while len(gen) and max(map(len, got.values())) < CONTEXT + 4:
        for r in gen.next():
            got[r.uid].append(r)
    for uid, p in zip(uids, prompts):
        assert got[uid][-1].finish_reason == "length"
        assert sum(not r.from_draft for r in got[uid]) == (CONTEXT - len(p) - len(p) % 2) // 2
        assert len(gen.released[uid].tokens) == CONTEXT


def test_the_cli_stops_at_the_context(short, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["generate.py", "--model", str(short), "--prompt", "a b c d e",
                                      "--ignore-chat-template", "--max-tokens", "300",
                                      "--conf-threshold", "1"])
    runpy.run_path(str(ROOT / "generate.py"), run_name="__main__")
    out, _ = capsys.readouterr()
    model, tokenizer = load(str(short))
    prompt = len(tokenizer.encode("a b c d e"))
    # Without drafts one token per step, and a step per pair of context left.
    assert f"Generation: {(CONTEXT - prompt - prompt % 2) // 2} tokens" in out


def test_the_server_stops_at_the_context(short):
    args = server_cli.setup_arg_parser().parse_args(
        ["--model", str(short), "--port", "0", "--max-tokens", "300"])
    server = server_cli.make_server(args)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        def post(body):
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())

        ids = list(range(5, 15))
        status, body = post({"prompt": ids, "conf_threshold": 1.0})
        assert status == 200, body
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == (CONTEXT - len(ids)) // 2
        status, body = post({"prompt": list(range(5, 5 + CONTEXT))})
        assert status == 400 and "no room for a reply" in body["error"]["message"], body
    finally:
        server.shutdown()
        server.server_close()
        server.app.engine.stop()


# -- untrained heads -----------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_heads(tmp_path_factory):
    """A plain Qwen3.5 (no compressor, no confidence head) converted: fresh heads."""
    root = tmp_path_factory.mktemp("plain")
    config = tiny_config()
    state = RefPIPO(config, "mlp", seed=40).hf_state_dict()
    plain = {k: v for k, v in state.items() if not k.startswith(("compressor.", "confidence_head."))}
    src = write_checkpoint(root / "hf", plain, hf_config_dict(config))
    return convert(str(src), str(root / "mlx"), dtype="float32")


def test_untrained_heads_are_marked_and_warned_about_once(fresh_heads, mlx_pipo, capsys):
    config = json.loads((fresh_heads / "config.json").read_text())
    assert config["pipo"]["untrained_heads"] == ["compressor", "confidence_head"]
    capsys.readouterr()
    load(str(fresh_heads))
    load(str(fresh_heads))
    out, err = capsys.readouterr()
    assert err.count("never trained") == 1 and "compressor, confidence_head" in err and not out
    # Trained heads: no mark, no warning.
    assert "untrained_heads" not in json.loads((mlx_pipo / "config.json").read_text())["pipo"]
    load(str(mlx_pipo))
    assert "never trained" not in capsys.readouterr().err


def test_training_with_fuse_clears_the_mark(fresh_heads, tmp_path, monkeypatch, capsys):
    from test_train import cyclic_records, write_data
    from test_train_cli import cli_args, run

    data = write_data(tmp_path / "data", cyclic_records(12, 0))
    code, _, err = run(monkeypatch, capsys, *cli_args(fresh_heads, data, tmp_path / "a", iters=1, warmup=0, fuse=True))
    assert code == 0, err
    fused = tmp_path / "a" / "fused"
    assert "untrained_heads" not in json.loads((fused / "config.json").read_text())["pipo"]
    load(str(fused))
    assert "never trained" not in capsys.readouterr().err
