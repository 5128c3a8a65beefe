"""Prompt-cache files, end-of-sequence and chat-template options: going on from a
saved prompt gives what the whole prompt gives, and foreign or broken files are refused."""

import runpy
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from hf_reference import random_ids
from mlx_lm.models.cache import KVCache, save_prompt_cache as mlx_save_prompt_cache

from pipo_mlx import ChatSession, PipoError, load, stream_generate
from pipo_mlx.prompt_cache_file import fill_prompt_cache, load_prompt_cache, save_prompt_cache
from pipo_mlx.tokenizer_options import read_chat_template, set_chat_template

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipo(mlx_pipo):
    return load(str(mlx_pipo))


@pytest.fixture(scope="module")
def other(mlx_pipo, tmp_path_factory):
    """The fixture model with every weight nudged: same config, names and sizes."""
    folder = tmp_path_factory.mktemp("other") / "pipo"
    shutil.copytree(mlx_pipo, folder)
    weights, meta = mx.load(str(folder / "model.safetensors"), return_metadata=True)
    nudged = {k: v + 1e-3 if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), nudged, meta)
    return folder


def tokens(model, tokenizer, prompt, cache=None, threshold=0.5, max_tokens=16):
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                             prompt_cache=cache, conf_threshold=threshold, draft="always")]


@pytest.mark.parametrize("threshold", [-1.0, 0.5, 1.0])
@pytest.mark.parametrize("length", [7, 10])  # an odd prompt leaves one token pending
def test_going_on_from_a_file_equals_the_whole_prompt(pipo, mlx_pipo, tmp_path, threshold, length):
    model, tokenizer = pipo
    head = random_ids(1, length, seed=length)[0].tolist()
    rest = random_ids(1, 5, seed=99)[0].tolist()
    cache, pending = fill_prompt_cache(model, head, prefill_step_size=4)
    assert len(pending) == length % 2
    file = tmp_path / "cache.safetensors"
    save_prompt_cache(str(file), cache, model, pending)
    assert [p.name for p in tmp_path.iterdir()] == ["cache.safetensors"]  # no temporary left
    # A fresh load of the model: the file names the weights, not the Python object.
    fresh, _ = load(str(mlx_pipo))
    loaded = load_prompt_cache(str(file), fresh)
    assert loaded.cache.tokens == head[: length - length % 2]
    got = tokens(fresh, tokenizer, loaded.continuation(rest), loaded.cache, threshold)
    assert got == tokens(model, tokenizer, head + rest, None, threshold)


def test_a_file_from_other_weights_is_refused(pipo, other, tmp_path):
    model, _ = pipo
    cache, pending = fill_prompt_cache(model, list(range(5, 17)))
    file = tmp_path / "c.safetensors"
    save_prompt_cache(str(file), cache, model, pending)
    other_model, _ = load(str(other))
    with pytest.raises(PipoError, match="made with another model"):
        load_prompt_cache(str(file), other_model)


def rewrite(file, change):
    arrays, meta = mx.load(str(file), return_metadata=True)
    change(arrays, meta)
    mx.save_safetensors(str(file), arrays, meta)


def test_files_that_are_not_ours_or_not_whole_pairs_are_refused(pipo, tmp_path):
    model, _ = pipo
    cache, pending = fill_prompt_cache(model, list(range(5, 17)))
    good = tmp_path / "good.safetensors"
    save_prompt_cache(str(good), cache, model, pending)
    n = len(model.make_cache())  # the layers; the PIPO fields follow

    def copy_of(name, change):
        file = tmp_path / name
        shutil.copy(good, file)
        rewrite(file, change)
        return file

    unaligned = [
        copy_of("pairs.safetensors", lambda a, m: m.update({"0.pairs": str(int(m["0.pairs"]) + 1)})),
        # Two tokens fewer than the caches hold.
        copy_of("tokens.safetensors", lambda a, m: a.update({f"{n}.0.0": a[f"{n}.0.0"][:-2]})),
    ]
    for file in unaligned:
        with pytest.raises(PipoError, match="does not hold whole pairs"):
            load_prompt_cache(str(file), model)
    mlx_lm_file = tmp_path / "mlx_lm.safetensors"
    kv = KVCache()
    kv.update_and_fetch(mx.zeros((1, 2, 4, 8)), mx.zeros((1, 2, 4, 8)))
    mlx_save_prompt_cache(str(mlx_lm_file), [kv], {"model": "x"})
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    for file in (mlx_lm_file, junk):
        with pytest.raises(PipoError, match="not a pipo_mlx prompt-cache file"):
            load_prompt_cache(str(file), model)
    with pytest.raises(PipoError, match="must end in .safetensors"):
        save_prompt_cache(str(tmp_path / "c.cache"), cache, model)
    with pytest.raises(PipoError, match="does not exist"):
        load_prompt_cache(str(tmp_path / "missing.safetensors"), model)


def test_a_failed_write_leaves_the_old_file(pipo, tmp_path, monkeypatch):
    import pipo_mlx.prompt_cache_file as pcf

    model, _ = pipo
    cache, pending = fill_prompt_cache(model, list(range(5, 17)))
    file = tmp_path / "c.safetensors"
    save_prompt_cache(str(file), cache, model, pending)
    before = file.read_bytes()

    def broken(name, *args):
        Path(name).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pcf.mlx_cache, "save_prompt_cache", broken)
    with pytest.raises(PipoError, match="No space left"):
        save_prompt_cache(str(file), cache, model, pending)
    assert file.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


# -- the command lines --------------------------------------------------------------


def cli(monkeypatch, capsys, script, *argv):
    """(exit code, stdout, stderr) of a tool run in this process."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    code = 0
    try:
        if script == "generate.py":
            runpy.run_path(str(ROOT / "generate.py"), run_name="__main__")
        else:
            from pipo_mlx.cli.cache_prompt import main

            main()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


GEN = ("--max-tokens", "12", "--conf-threshold", "0.5", "--draft", "always", "--verbose", "False")


@pytest.mark.parametrize("template", [False, True])
def test_cli_generate_from_a_cache_file_equals_the_whole_prompt(mlx_pipo, tmp_path, monkeypatch, capsys,
                                                                template):
    head, rest = "def add(a, b):\n    return a + b\n\ndef", " mul(a, b):"
    _, tokenizer = load(str(mlx_pipo))
    assert tokenizer.encode(head + rest) == tokenizer.encode(head) + tokenizer.encode(rest)
    raw = () if template else ("--ignore-chat-template",)
    file = tmp_path / "head.safetensors"
    code, out, err = cli(monkeypatch, capsys, "cache_prompt.py", "--model", mlx_pipo, "--prompt", head,
                         "--prompt-cache-file", file, *raw)
    assert code == 0, err
    assert "Cached" in out and file.is_file()
    code, cached, err = cli(monkeypatch, capsys, "generate.py", "--model", mlx_pipo, "--prompt", rest,
                            "--prompt-cache-file", file, *raw, *GEN)
    assert code == 0, err
    code, whole, err = cli(monkeypatch, capsys, "generate.py", "--model", mlx_pipo, "--prompt", head + rest,
                           *raw, *GEN)
    assert code == 0, err
    assert cached == whole and whole.strip()
    # Made with the template, used without it (or the other way): refused.
    other = () if not template else ("--ignore-chat-template",)
    code, _, err = cli(monkeypatch, capsys, "generate.py", "--model", mlx_pipo, "--prompt", rest,
                       "--prompt-cache-file", file, *other, *GEN)
    assert code == 2 and "prompt-cache file was made" in err and err.count("\n") == 1


def test_cli_refusals_are_one_line(mlx_pipo, other, tmp_path, monkeypatch, capsys):
    file = tmp_path / "c.safetensors"
    assert cli(monkeypatch, capsys, "cache_prompt.py", "--model", mlx_pipo, "--prompt", "x = 1\n",
               "--prompt-cache-file", file)[0] == 0
    cases = [
        (("--model", other, "--prompt", "y", "--prompt-cache-file", file), "made with another model"),
        (("--model", mlx_pipo, "--prompt", "y", "--prompt-cache-file", tmp_path / "none.safetensors"),
         "does not exist"),
        (("--model", mlx_pipo, "--prompt", "y", "--prompt-cache-file", file, "--system-prompt", "s"),
         "belongs in the cached prompt"),
        (("--model", mlx_pipo, "--prompt", "y", "--extra-eos-token", "no-such-token"), "not a token"),
        (("--model", mlx_pipo, "--prompt", "y", "--chat-template-config", "{bad"), "not valid JSON"),
        (("--model", mlx_pipo, "--prompt", "y", "--chat-template-config", "[1]"), "must be a JSON object"),
        (("--model", mlx_pipo, "--prompt", "y", "--chat-template", "plain words"), "neither a file nor"),
    ]
    for argv, message in cases:
        code, _, err = cli(monkeypatch, capsys, "generate.py", *argv)
        assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, err
    code, _, err = cli(monkeypatch, capsys, "cache_prompt.py", "--model", mlx_pipo, "--prompt", "z",
                       "--prompt-cache-file", tmp_path / "c.bin")
    assert code == 2 and "must end in .safetensors" in err and err.count("\n") == 1


def test_extra_eos_token_ends_generation(mlx_pipo, monkeypatch, capsys):
    model, tokenizer = load(str(mlx_pipo))
    prompt = "import os\n"
    free = [r.token for r in stream_generate(model, tokenizer, tokenizer.encode(prompt), max_tokens=12,
                                             conf_threshold=1.0)]
    stop = next(t for t in free[2:] if t not in free[:2])  # a token first generated third or later
    cut = free[: free.index(stop)]
    for spec in (str(stop), tokenizer.convert_ids_to_tokens(stop)):
        code, out, err = cli(monkeypatch, capsys, "generate.py", "--model", mlx_pipo, "--prompt", prompt,
                             "--ignore-chat-template", "--max-tokens", "12", "--conf-threshold", "1",
                             "--verbose", "False", "--extra-eos-token", spec)
        assert code == 0, err
        assert out == tokenizer.decode(cut) + "\n"


def test_chat_template_and_its_kwargs_shape_the_prompt(mlx_pipo, tmp_path):
    model, tokenizer = load(str(mlx_pipo))  # its own tokenizer: the template changes it
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if shout %}!!{% endif %}{% if add_generation_prompt %}> {% endif %}")
    file = tmp_path / "t.jinja"
    file.write_text(template)
    set_chat_template(tokenizer, read_chat_template(str(file)))
    session = ChatSession(model, tokenizer, chat_template_kwargs={"shout": True})
    ids, text = session.prompt_ids("hi")
    assert text == "[user] hi\n!!> " and ids == tokenizer.encode(text, add_special_tokens=False)


def test_the_server_takes_a_chat_template_and_its_arguments(mlx_pipo):
    import http.client
    import json
    import threading

    from pipo_mlx.cli import server as server_cli

    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if shout %}!!{% endif %}{% if add_generation_prompt %}> {% endif %}")
    args = server_cli.setup_arg_parser().parse_args(
        ["--model", str(mlx_pipo), "--port", "0", "--chat-template", template,
         "--chat-template-args", '{"shout": true}', "--conf-threshold", "1"])
    server = server_cli.make_server(args)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    model, tokenizer = load(str(mlx_pipo))
    try:
        for extra, rendered in (({}, "[user] hi\n!!> "), ({"chat_template_kwargs": {"shout": False}}, "[user] hi\n> ")):
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, **extra}
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            reply = json.loads(conn.getresponse().read())
            ids = tokenizer.encode(rendered, add_special_tokens=False)
            want = "".join(r.text for r in stream_generate(model, tokenizer, ids, max_tokens=6, conf_threshold=1.0))
            assert reply["usage"]["prompt_tokens"] == len(ids), reply
            assert reply["choices"][0]["message"]["content"] == want
    finally:
        server.shutdown()
        server.server_close()
        server.app.engine.stop()
