"""train_heads.py as one rank of a test's run (tests/test_distributed.py), with
what the tests need set through the environment:

PIPO_TEST_FIXED_ROLLOUTS=1   the student's rollouts are a fixed function of the
                             prompt, so runs that sample differently still agree
PIPO_TEST_RANK1={"--flag": v} rank 1 takes these values instead (e.g. its own
                             --adapter-path, where nothing may appear)
PIPO_TEST_STOP=R:K           rank R presses Ctrl-C while building micro-batch K
PIPO_TEST_HANG=R:K           rank R hangs there, as a host gone from the network
PIPO_TEST_EXIT=R:K           rank R dies there (exit status 3)
"""

import json
import os
import signal
import sys
import time

import numpy as np

from pipo_mlx import stages
from pipo_mlx.cli.train import main
from pipo_mlx.opd import Rollouts

RANK = int(os.environ.get("MLX_RANK", "0"))


def fixed_rollout(model, prompts, eos_token_ids, max_tokens, *_):
    """Completions made of the prompt's own tokens, every third draft dropped."""
    pad, rows, starts, kept = model.pad_token_id, [], [], 0
    for prompt in prompts:
        row = list(prompt) + [pad] * (len(prompt) % 2)
        starts.append(len(row))
        for i in range(min(max_tokens, 8) // 2):
            token2 = pad if i % 3 == 2 else prompt[(i + 1) % len(prompt)]
            row += [prompt[i % len(prompt)], token2]
            kept += token2 != pad
        rows.append(row)
    lengths = np.array([len(r) for r in rows])
    ids = np.full((len(rows), int(lengths.max())), pad, np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    return Rollouts(ids, lengths, np.array(starts), int(sum(lengths - starts)) // 2, kept)


def at_micro_step(spec: str, act) -> None:
    rank, step = map(int, spec.split(":"))
    if rank != RANK:
        return
    real = stages.train_batch

    def batch(examples, k, *rest):
        if k == step:
            act()
        return real(examples, k, *rest)

    stages.train_batch = batch


if __name__ == "__main__":
    if os.environ.get("PIPO_TEST_FIXED_ROLLOUTS"):
        stages.rollout = fixed_rollout
    if RANK == 1:
        for flag, value in json.loads(os.environ.get("PIPO_TEST_RANK1", "{}")).items():
            sys.argv[sys.argv.index(flag) + 1] = value
    if os.environ.get("PIPO_TEST_STOP"):
        at_micro_step(os.environ["PIPO_TEST_STOP"], lambda: os.kill(os.getpid(), signal.SIGINT))
    if os.environ.get("PIPO_TEST_HANG"):
        at_micro_step(os.environ["PIPO_TEST_HANG"], lambda: time.sleep(3600))
    if os.environ.get("PIPO_TEST_EXIT"):
        at_micro_step(os.environ["PIPO_TEST_EXIT"], lambda: os._exit(3))
    main()
