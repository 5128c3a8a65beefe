"""Data-parallel training over MLX's ring backend on the loopback: two ranks
started by mlx.launch against one process over the same global batch, resume,
who writes, and ranks that fail (pipo_mlx/distributed.py).

Each rank runs tests/distributed_rank.py (train_heads.py with the test's
seams); the reference, one process over the whole batch, runs in this one.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from distributed_rank import fixed_rollout
from pipo_mlx import stages
from pipo_mlx import trainer as T
from pipo_mlx.train_config import TrainConfig
from test_opd_train import plain_teacher
from test_train import cyclic_records, write_data

HERE = Path(__file__).resolve().parent
RANK = str(HERE / "distributed_rank.py")
LAUNCH = str(Path(sys.executable).parent / "mlx.launch")
# SGD: its updates are linear in the gradients, so the ranks' other order of
# summation stays at rounding level (Adam divides by the gradients' own size,
# which magnifies it where they are tiny).
TINY = dict(
    optimizer="sgd", iters=4, batch_size=4, lora_rank=4, lora_alpha=8.0, learning_rate=3e-3,
    warmup=1,
    ce_chunk_size=16, max_seq_length=64, max_pad_ratio=0.5, val_every=4, val_batches=2,
    steps_per_report=1, save_every=1000, peer_timeout=60,
)


def free_ports() -> int:
    """A port p with p + 1 free as well: mlx.launch listens on one per rank."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def alone(model, data, out, **kw) -> None:
    """The reference: one process, in this one, over the whole batch."""
    T.train(TrainConfig(str(model), str(data), str(out), **{**TINY, **kw}))


def launch(model, data, out, env=None, **kw) -> subprocess.CompletedProcess:
    """train_heads.py on two ranks: `mlx.launch --backend ring -n 2` on 127.0.0.1."""
    args = ["--model", str(model), "--data", str(data), "--adapter-path", str(out)]
    for k, v in {**TINY, **kw}.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [flag, str(v)]
    cmd = [LAUNCH, "--backend", "ring", "-n", "2", "-p", str(free_ports()), "--",
           sys.executable, RANK, *args]
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})}, start_new_session=True,
    ) as p:
        try:  # the timeout only guards against a hang; nothing here is timed
            out, err = p.communicate(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):  # ranks left by a stuck launch
                os.killpg(p.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def weights(out: Path) -> dict:
    pointer = json.loads((out / "checkpoint.json").read_text())
    return mx.load(str(out / pointer["dir"] / "adapters.safetensors")), pointer["step"]


def assert_close(a: dict, b: dict) -> None:
    """Equal to float32 rounding (seen: 1.5e-8 at most; a run on half the batch
    differs by 1.7e-3)."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = np.array(a[k]), np.array(b[k])
        assert np.allclose(x, y, rtol=1e-5, atol=1e-7), (k, np.abs(x - y).max())


def ended(result: subprocess.CompletedProcess, ranks: int = 2) -> None:
    """Every rank ended with a non-zero status (mlx.launch itself exits 0 and says so
    in a warning per rank; a rank it stopped because another failed shows as killed
    or by its signal)."""
    for r in range(ranks):
        assert f"Node with rank {r} exited with code" in result.stderr or (
            f"Node with rank {r} was killed" in result.stderr
        ), result.stderr
    assert "exited with code 0" not in result.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(
        tmp_path_factory.mktemp("ddata"), cyclic_records(24, 0, "pc"), cyclic_records(6, 1, "pc")
    )


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return plain_teacher(tmp_path_factory.mktemp("dteacher") / "base", seed=7)


@pytest.fixture(scope="module")
def two_ranks(mlx_pipo, data, tmp_path_factory):
    """A two-rank run whose rank 1 was given an --adapter-path of its own."""
    out = tmp_path_factory.mktemp("two") / "run"
    own = {"PIPO_TEST_RANK1": json.dumps({"--adapter-path": f"{out}-rank1"})}
    return launch(mlx_pipo, data, out, env=own, fuse=True), out


def test_two_ranks_train_as_one_process_with_the_whole_batch(mlx_pipo, data, two_ranks, tmp_path):
    alone(mlx_pipo, data, tmp_path / "one")
    two, out = two_ranks
    assert two.returncode == 0 and "WARN" not in two.stderr, two.stderr
    (a, step_a), (b, step_b) = weights(tmp_path / "one"), weights(out)
    assert step_a == step_b == 4
    assert_close(a, b)
    # Rank 0 alone printed, and wrote the checkpoint and the fused model; rank 1's
    # own folder never came to exist.
    assert two.stdout.count("[train] step 1/4") == 1 and two.stdout.count("[val] step 4") == 1
    assert re.search(r"s/step \([\d.]+ exchanging\)", two.stdout), two.stdout
    assert "data-parallel over 2 ranks" in two.stderr
    assert (out / "fused" / "config.json").is_file()
    assert not Path(f"{out}-rank1").exists()


def test_a_resumed_two_rank_run_equals_the_uninterrupted_one(mlx_pipo, data, two_ranks, tmp_path):
    out = tmp_path / "split"
    own = {"PIPO_TEST_RANK1": json.dumps({"--adapter-path": str(tmp_path / "elsewhere")})}
    # Ctrl-C on rank 1 alone, during step 3: both ranks stop after it, rank 0 saves.
    stopped = launch(mlx_pipo, data, out, env={**own, "PIPO_TEST_STOP": "1:2"}, fuse=True)
    assert "continue with --resume" in stopped.stderr, stopped.stderr
    assert weights(out)[1] == 3
    # Rank 1 has no checkpoint of its own: it receives rank 0's.
    resumed = launch(mlx_pipo, data, out, env=own, fuse=True, resume=True)
    assert resumed.returncode == 0 and "resumed from step 3" in resumed.stderr, resumed.stderr
    (whole, _), (split, step) = weights(two_ranks[1]), weights(out)
    assert step == 4 and whole.keys() == split.keys()
    for k in whole:
        assert mx.array_equal(whole[k], split[k]), k
    assert not (tmp_path / "elsewhere").exists()


def test_distillation_on_fixed_rollouts_matches_one_process(
    mlx_pipo, data, teacher, tmp_path, monkeypatch
):
    kw = dict(stage="opd", teacher=str(teacher), kl="full", max_new_tokens=8)
    monkeypatch.setattr(stages, "rollout", fixed_rollout)
    alone(mlx_pipo, data, tmp_path / "one", **kw)
    two = launch(mlx_pipo, data, tmp_path / "two", env={"PIPO_TEST_FIXED_ROLLOUTS": "1"}, **kw)
    assert two.returncode == 0, two.stderr
    assert_close(weights(tmp_path / "one")[0], weights(tmp_path / "two")[0])


def test_teacher_answers_and_soft_targets_split_by_rank_match_one_process(
    mlx_pipo, data, teacher, tmp_path
):
    kw = dict(teacher=str(teacher), soft_targets=True, kl="full", max_new_tokens=8)
    alone(mlx_pipo, data, tmp_path / "one", **kw)
    own = {"PIPO_TEST_RANK1": json.dumps({"--adapter-path": str(tmp_path / "elsewhere")})}
    two = launch(mlx_pipo, data, tmp_path / "two", env=own, **kw)
    assert two.returncode == 0, two.stderr
    # Each batch of prompts is seeded by its index, whichever rank answers it; rank
    # 0 joined the answers into the same files.
    for split in ("train", "valid"):
        a, b = (tmp_path / run / "rollouts" / f"{split}.jsonl" for run in ("one", "two"))
        assert a.read_text() == b.read_text()
    assert_close(weights(tmp_path / "one")[0], weights(tmp_path / "two")[0])
    assert not (tmp_path / "elsewhere").exists()


def test_bad_set_ups_stop_every_rank_with_one_line(mlx_pipo, data, tmp_path):
    odd = launch(mlx_pipo, data, tmp_path / "odd", batch_size=3)
    assert "error: --batch-size 3 does not divide among 2 ranks" in odd.stderr, odd.stderr
    ended(odd)

    other = write_data(tmp_path / "other", cyclic_records(24, 5, "pc"), cyclic_records(6, 1, "pc"))
    mixed = launch(mlx_pipo, data, tmp_path / "mixed",
                  env={"PIPO_TEST_RANK1": json.dumps({"--data": str(other)})})
    assert "error: rank 1's data differs from rank 0's" in mixed.stderr, mixed.stderr
    ended(mixed)


def test_a_hanging_rank_stops_the_other_within_the_timeout(mlx_pipo, data, tmp_path):
    hung = launch(mlx_pipo, data, tmp_path / "run", env={"PIPO_TEST_HANG": "1:2"},
                 peer_timeout=3)
    assert "error: rank 0: no answer from the other ranks for 3 s" in hung.stderr, hung.stderr
    ended(hung)


def test_a_dying_rank_stops_the_other(mlx_pipo, data, tmp_path):
    """Without mlx.launch, which would end the others itself: MLX's ring backend
    fails the survivor's exchange, and it says so in one line."""
    port = free_ports()
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    args = [sys.executable, RANK, "--model", str(mlx_pipo), "--data", str(data),
            "--adapter-path", str(tmp_path / "run"), "--batch-size", "4", "--iters", "4",
            "--warmup", "1", "--lora-rank", "4", "--max-seq-length", "64"]
    ranks = [
        subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts),
                 "PIPO_TEST_EXIT": "1:2"},
        )
        for r in range(2)
    ]
    (_, err0), (_, _) = (p.communicate(timeout=300) for p in ranks)
    assert ranks[1].returncode == 3
    assert ranks[0].returncode == 2, err0
    errors = [line for line in err0.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err0
    assert errors[0].startswith("error: rank 0: lost the connection to another rank while ")
    assert errors[0].endswith("(it stopped: see its own message)")
