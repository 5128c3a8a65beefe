"""Data-parallel training over MLX's own distributed backend (`mx.distributed`,
started by `mlx.launch`; docs/training.md, "Training on several Macs").

Every rank holds the whole model and optimizer and takes its own rows of each
global batch. The per-rank losses are scaled so that the averaged gradient is
exactly the one-process gradient of the whole batch (`term_scales`), so every
rank applies the same update and stays identical without weights ever being
sent. Only rank 0 touches the run folder; what it reads (a checkpoint, the
teacher's rollouts) reaches the other ranks through collectives, so the ranks
need no shared disk.

Collectives block until every rank arrives. A rank that exits closes its
sockets, and MLX's ring backend then fails the others' pending collective with
"[ring] connection to a peer was lost" at once; a rank that hangs, or a host
that drops off the network, closes nothing, so each collective runs under a
watchdog that ends the process after `timeout` seconds without an answer.
"""

import hashlib
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map

from .errors import PipoError
from .train_config import TrainConfig

TIMEOUT_EXIT = 2  # the status of a user-facing error, as run_cli's


class World:
    """This process's place among the ranks; a lone process (no `mlx.launch`) is
    a world of one, where every method below is the identity and sends nothing."""

    def __init__(self, timeout: float, alone: bool = False):
        self.group = None if alone else mx.distributed.init()
        self.rank, self.size = (0, 1) if alone else (self.group.rank(), self.group.size())
        self.main = self.rank == 0
        self.timeout = timeout
        self.waited = 0.0  # seconds in collectives, the wait for slower ranks included

    @classmethod
    def alone(cls) -> "World":
        """This process by itself, even under mlx.launch."""
        return cls(0.0, alone=True)

    @contextmanager
    def _watched(self, what: str) -> Iterator[None]:
        """Run a collective; stop this process if no answer comes within the timeout."""

        def give_up() -> None:
            print(
                f"error: rank {self.rank}: no answer from the other ranks for "
                f"{self.timeout:g} s while {what} (a rank hangs or its host is unreachable); "
                "stopping. Raise --peer-timeout if a rank is only slow",
                file=sys.stderr, flush=True,
            )
            os._exit(TIMEOUT_EXIT)  # the main thread is blocked inside MLX: nothing else stops it

        timer = threading.Timer(self.timeout, give_up)
        timer.daemon = True
        timer.start()
        tic = time.perf_counter()
        try:
            yield
        except RuntimeError as e:
            if "[ring]" not in str(e):
                raise
            raise PipoError(
                f"rank {self.rank}: lost the connection to another rank while {what} "
                "(it stopped: see its own message)"
            ) from None
        finally:
            timer.cancel()
            self.waited += time.perf_counter() - tic

    def _sum(self, x: Any, what: str) -> Any:
        with self._watched(what):
            total = tree_map(
                lambda a: mx.distributed.all_sum(a, group=self.group, stream=mx.cpu), x
            )
            mx.eval(total)
        return total

    def rows(self, n: int) -> slice:
        """This rank's rows of a global batch of n."""
        if n % self.size:
            raise PipoError(
                f"--batch-size {n} does not divide among {self.size} ranks; pass a multiple "
                f"of {self.size} (it is the global batch, shared equally by the ranks)"
            )
        share = n // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def term_scales(self, counts: Sequence[int]) -> List[float]:
        """Factors for the loss terms (each a mean over this rank's n_r slots) that
        make the averaged gradient the mean over all N slots: size * n_r / N."""
        if self.size == 1:
            return [1.0] * len(counts)
        total = self._sum(mx.array(list(counts), dtype=mx.int32), "counting the batch's slots")
        return [self.size * n / max(int(t), 1) for n, t in zip(counts, total.tolist())]

    def average(self, grads: Any) -> Any:
        if self.size == 1:
            return grads
        with self._watched("averaging the gradients"):
            grads = average_gradients(grads, group=self.group, communication_stream=mx.cpu)
            mx.eval(grads)
        return grads

    def total(self, sums: Dict[str, float]) -> Dict[str, float]:
        """Report figures summed over the ranks; a rank with none (no validation
        batch of its own) takes part all the same."""
        if self.size == 1:
            return sums
        total: Dict[str, float] = {}
        for theirs in self.gather_bytes(json.dumps(sums).encode()):
            for k, v in json.loads(theirs).items():
                total[k] = total.get(k, 0.0) + v
        return total

    def any(self, flag: bool) -> bool:
        """Whether any rank says so: every rank stops at the same step."""
        if self.size == 1:
            return flag
        return bool(self._sum(mx.array(int(flag)), "agreeing to stop").item())

    def from_main(self, tree: Any) -> Any:
        """Rank 0's arrays on every rank (a sum in which the others add zeros)."""
        if self.size == 1:
            return tree
        mine = tree if self.main else tree_map(mx.zeros_like, tree)
        return self._sum(mine, "receiving rank 0's state")

    def bytes_from_main(self, data: bytes) -> bytes:
        """Rank 0's bytes (e.g. a file only its disk holds) on every rank."""
        if self.size == 1:
            return data
        n = int(self.from_main(mx.array(len(data) if self.main else 0)).item())
        if n == 0:
            return b""
        buf = np.frombuffer(data, np.uint8) if self.main else np.zeros(n, np.uint8)
        return bytes(np.array(self.from_main(mx.array(buf))))

    def gather_bytes(self, data: bytes) -> List[bytes]:
        """Every rank's bytes, in rank order, on every rank."""
        if self.size == 1:
            return [data]
        lengths = self._sum(
            mx.array([len(data) if r == self.rank else 0 for r in range(self.size)]),
            "gathering sizes",
        ).tolist()
        buf = np.zeros(max(*lengths, 1), np.uint8)  # never empty: see opd.py on empty arrays
        buf[: len(data)] = np.frombuffer(data, np.uint8)
        with self._watched("gathering results"):
            rows = mx.distributed.all_gather(mx.array(buf)[None], group=self.group, stream=mx.cpu)
            rows = np.array(rows)
        return [bytes(rows[r, :n]) for r, n in enumerate(lengths)]

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's JSON-able `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        return [json.loads(b) for b in self.gather_bytes(json.dumps(obj).encode())]

    def check_same(self, parts: Callable[[], Dict[str, bytes]]) -> None:
        """Refuse ranks that disagree with rank 0 on any of `parts()` (computed only
        when there are several ranks: hashing a large model's weights takes seconds)."""
        if self.size == 1:
            return
        named = parts()
        mine = b"".join(hashlib.sha256(named[k]).digest() for k in sorted(named))
        every = self.gather_bytes(mine)
        for r, theirs in enumerate(every):
            for i, k in enumerate(sorted(named)):
                if theirs[32 * i : 32 * i + 32] != every[0][32 * i : 32 * i + 32]:
                    raise PipoError(
                        f"rank {r}'s {k} differs from rank 0's; every rank must train the same "
                        "model on the same data with the same settings (copy them to every host)"
                    )


def _model_digest(path: str, params: Any) -> bytes:
    """A model's folder's small files (config, tokenizer) and its weights."""
    h = hashlib.sha256()
    folder = Path(path).expanduser()
    for f in sorted(folder.glob("*")) if folder.is_dir() else []:
        if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja"):
            h.update(f.name.encode() + f.read_bytes())
    for name, p in tree_flatten(params):
        h.update(name.encode() + str(p.dtype).encode() + bytes(np.array(p.view(mx.uint8))))
    return h.digest()


def run_parts(cfg: TrainConfig, model: nn.Module, teacher: Optional[nn.Module]) -> Dict[str, bytes]:
    """What the ranks must share: the settings (paths aside: hosts may keep their
    copies elsewhere), the data files, the model as set up to train (LoRA's initial
    weights included) and the teacher."""
    local = ("model", "data", "teacher", "adapter_path", "peer_timeout")
    settings = {k: v for k, v in asdict(cfg).items() if k not in local}
    data = b""
    for name in ("train.jsonl", "valid.jsonl"):
        f = Path(cfg.data).expanduser() / name
        data += name.encode() + (f.read_bytes() if f.is_file() else b"")
    parts = {
        "settings": json.dumps(settings, sort_keys=True).encode(),
        "data": data,
        "model": _model_digest(cfg.model, model.parameters()),
    }
    if teacher is not None:
        parts["teacher"] = _model_digest(str(cfg.teacher), teacher.parameters())
    return parts


def share_state(world: World, model: nn.Module, optimizer: Any, step: int) -> int:
    """After rank 0 restored a checkpoint: its weights, optimizer state and step everywhere."""
    if world.size == 1:
        return step
    # Rank 0's state came from the checkpoint; init leaves it as it is, and gives
    # the others a state of the same shape to receive it into.
    optimizer.init(model.trainable_parameters())
    weights, state, step = world.from_main(
        (model.trainable_parameters(), optimizer.state, mx.array(step))
    )
    model.update(weights)
    optimizer.state = state
    return int(step.item())
