"""The two training stages as the trainer's loop sees them: where a micro-batch
comes from, what its loss is, and how it is reported (docs/design.md §6, §7).

Both make micro-batch k a pure function of (seed, k) and the model's weights,
so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .data import (
    batch_indices, load_data, load_dataset, seed_of, train_batch, valid_batches, valid_chunks,
)
from .distributed import World
from .errors import PipoError
from .losses import Meter, sft_pass, sft_terms
from .model import PipoModel
from .opd import OPDMeter, Rollouts, Slots, opd_pass, opd_terms, rollout, slots, teacher_forced
from .rollouts import Prompt, read_prompts, teacher_rollouts
from .train_config import TrainConfig

ONE = (1.0, 1.0, 1.0)  # the loss terms' scales in a lone process (trainer.py)
ROLLOUTS = "rollouts"  # the teacher's answers for supervised training, in the run folder


def _splits(folder: Path) -> Tuple[Path, Optional[Path]]:
    if not (folder / "train.jsonl").is_file():
        raise PipoError(
            f"{folder / 'train.jsonl'} not found; the data folder holds train.jsonl and, "
            "optionally, valid.jsonl"
        )
    valid = folder / "valid.jsonl"
    return folder / "train.jsonl", valid if valid.is_file() else None


class SupervisedStage:
    """Stage 1: cross-entropies and the confidence BCE on records, or on the
    teacher's answers to their prompts when there is a teacher."""

    def __init__(
        self, cfg: TrainConfig, model: PipoModel, tokenizer: TokenizerWrapper, teacher: Any,
        world: World,
    ):
        self.cfg, self.model, self.tokenizer, self.teacher = cfg, model, tokenizer, teacher
        self.world = world
        self.weights = (cfg.mtp_loss_weight, cfg.conf_loss_weight)
        if teacher is None:
            self.train_set, self.valid_set = load_data(
                cfg.data, tokenizer, model.pad_token_id, cfg
            )
        else:  # checked now, answered once the run folder exists (prepare)
            train, valid = _splits(Path(cfg.data).expanduser())
            self.prompts = {"train": read_prompts(train, tokenizer)}
            if valid is not None:
                self.prompts["valid"] = read_prompts(valid, tokenizer)

    def prepare(self, out: Path) -> None:
        if self.teacher is None:
            return
        cfg, folder, world = self.cfg, out / ROLLOUTS, self.world
        if world.main:
            folder.mkdir(exist_ok=True)
        for split, prompts in self.prompts.items():
            teacher_rollouts(
                self.teacher, self.tokenizer, prompts, folder / f"{split}.jsonl",
                max_tokens=cfg.max_new_tokens, temp=cfg.temp, top_p=cfg.top_p,
                top_k=cfg.top_k, presence_penalty=cfg.presence_penalty,
                seed=seed_of(cfg.seed, 4, split == "valid"), identity={"teacher": cfg.teacher},
                log=lambda line: print(line, flush=True), world=world,
            )
        pad = self.model.pad_token_id
        if world.main:
            self.train_set, self.valid_set = load_data(
                str(folder), self.tokenizer, pad, cfg, skip_empty=True
            )
        if world.size > 1:  # rank 0's files, to the ranks whose disk has none
            texts = {
                split: world.bytes_from_main(
                    (folder / f"{split}.jsonl").read_bytes() if world.main else b""
                ).decode("utf-8")
                for split in self.prompts
            }
            if not world.main:
                sets = {
                    split: load_dataset(
                        folder / f"{split}.jsonl", self.tokenizer, pad, cfg.max_seq_length,
                        cfg.too_long, skip_empty=True, text=text,
                    )
                    for split, text in texts.items()
                }
                self.train_set, self.valid_set = sets["train"], sets.get("valid", [])

    def describe(self) -> str:
        return f"{len(self.train_set)} train / {len(self.valid_set)} valid records"

    def batch(self, micro_step: int) -> Tuple[mx.array, mx.array, int]:
        """This rank's rows of micro-batch `micro_step`."""
        return train_batch(
            self.train_set, micro_step, self.cfg, self.model.pad_token_id,
            self.world.rows(self.cfg.batch_size),
        )

    def valid(self) -> Iterator[Tuple[mx.array, mx.array, int]]:
        w = self.world
        return valid_batches(self.valid_set, self.cfg, self.model.pad_token_id, w.rank, w.size)

    def evaluate(self, batch: Tuple[mx.array, mx.array, int]) -> Tuple[Any, Dict[str, float]]:
        ids, labels, _ = batch
        prepared, stats = sft_pass(self.model, ids, labels, self.cfg.ce_chunk_size)
        return (ids, prepared), stats

    def loss(self, prepared: Any, scales: Sequence[float] = ONE) -> mx.array:
        """The weighted sum of the terms, each scaled as the trainer asks (1 alone)."""
        terms, w, s = sft_terms(self.model, *prepared), self.weights, scales
        return s[0] * terms["lm"] + w[0] * (s[1] * terms["mtp"]) + w[1] * (s[2] * terms["conf"])

    @staticmethod
    def tokens(batch: Tuple[mx.array, mx.array, int]) -> int:
        return batch[2]

    @staticmethod
    def meter() -> Meter:
        return Meter()


OPDBatch = Tuple[Rollouts, Slots, Slots]


def _distillation_loss(
    model: PipoModel, weights: Tuple[float, float], prepared: Any, s: Sequence[float]
) -> mx.array:
    terms = opd_terms(model, *prepared)
    w = weights
    return s[0] * terms["kl1"] + w[0] * (s[1] * terms["kl2"]) + w[1] * (s[2] * terms["conf"])


class SoftTargetStage(SupervisedStage):
    """Stage 1 with --soft-targets: the teacher's answers as in SupervisedStage, but
    each slot learns the teacher's whole distribution there, by the distillation
    losses run teacher-forced (docs/design.md §7)."""

    def __init__(
        self, cfg: TrainConfig, model: PipoModel, tokenizer: TokenizerWrapper, teacher: Any,
        world: World,
    ):
        super().__init__(cfg, model, tokenizer, teacher, world)
        self.eos = sorted(tokenizer.eos_token_ids)

    def evaluate(self, batch: Tuple[mx.array, mx.array, int]) -> Tuple[Any, Dict[str, float]]:
        cfg, pad = self.cfg, self.model.pad_token_id
        forced = teacher_forced(np.array(batch[0]), np.array(batch[1]))
        token1, token2 = slots(self.teacher, forced, pad, self.eos)
        prepared, stats = opd_pass(
            self.model, forced, token1, token2, cfg.kl, cfg.kl_topk, cfg.ce_chunk_size,
            on_policy=False,
        )
        return (forced, token1, token2, prepared), stats

    def loss(self, prepared: Any, scales: Sequence[float] = ONE) -> mx.array:
        return _distillation_loss(self.model, self.weights, prepared, scales)

    @staticmethod
    def meter() -> OPDMeter:
        return OPDMeter()


class DistillationStage:
    """Stage 2: the student's own rollouts, scored by the teacher (docs/design.md §7)."""

    def __init__(
        self, cfg: TrainConfig, model: PipoModel, tokenizer: TokenizerWrapper, teacher: Any,
        world: World,
    ):
        self.cfg, self.model, self.teacher, self.world = cfg, model, teacher, world
        self.weights = (cfg.mtp_loss_weight, cfg.conf_loss_weight)
        self.eos = sorted(tokenizer.eos_token_ids)
        train, valid = _splits(Path(cfg.data).expanduser())
        self.train_set = self._fitting(read_prompts(train, tokenizer), train)
        self.valid_set = self._fitting(read_prompts(valid, tokenizer), valid) if valid else []
        self.sampler = make_sampler(cfg.temp, cfg.top_p, top_k=cfg.top_k)
        self.processors = make_logits_processors(presence_penalty=cfg.presence_penalty or None)

    def _fitting(self, prompts: List[Prompt], path: Path) -> List[Prompt]:
        limit = self.cfg.max_seq_length
        for p in prompts:
            if len(p.tokens) + len(p.tokens) % 2 + 2 > limit:
                raise PipoError(
                    f"{path} line {p.line}: the prompt has {len(p.tokens)} tokens, which "
                    f"leaves no room for a completion within --max-seq-length {limit}; "
                    "shorten the prompt or raise --max-seq-length"
                )
        return prompts

    def prepare(self, out: Path) -> None:
        pass

    def describe(self) -> str:
        return f"{len(self.train_set)} train / {len(self.valid_set)} valid prompts"

    def _rollouts(self, prompts: List[Prompt], seed: int) -> OPDBatch:
        cfg = self.cfg
        room = cfg.max_seq_length - max(len(p.tokens) + len(p.tokens) % 2 for p in prompts)
        mx.random.seed(seed)
        batch = rollout(
            self.model, [p.tokens for p in prompts], self.eos, min(cfg.max_new_tokens, room),
            self.sampler, self.processors, cfg.conf_threshold,
        )
        return (batch, *slots(self.teacher, batch, self.model.pad_token_id, self.eos))

    def batch(self, micro_step: int) -> OPDBatch:
        """This rank's prompts of micro-batch `micro_step`, rolled out."""
        cfg, world = self.cfg, self.world
        picked = batch_indices(len(self.train_set), micro_step, cfg.batch_size, cfg.seed)
        picked = picked[world.rows(cfg.batch_size)]
        # Each rank samples its own stream; one process keeps the stream it always
        # had, so its runs (and their resumes) are unchanged.
        seed = seed_of(cfg.seed, 2, micro_step, *([world.rank] if world.size > 1 else []))
        return self._rollouts([self.train_set[i] for i in picked], seed)

    def valid(self) -> Iterator[OPDBatch]:
        w = self.world
        for b, chunk in enumerate(valid_chunks(self.valid_set, self.cfg)):
            if b % w.size == w.rank:
                yield self._rollouts(chunk, seed_of(self.cfg.seed, 3, b))

    def evaluate(self, batch: OPDBatch) -> Tuple[Any, Dict[str, float]]:
        cfg = self.cfg
        prepared, stats = opd_pass(self.model, *batch, cfg.kl, cfg.kl_topk, cfg.ce_chunk_size)
        return (*batch, prepared), stats

    def loss(self, prepared: Any, scales: Sequence[float] = ONE) -> mx.array:
        return _distillation_loss(self.model, self.weights, prepared, scales)

    @staticmethod
    def tokens(batch: OPDBatch) -> int:
        return int(batch[0].lengths.sum())

    @staticmethod
    def meter() -> OPDMeter:
        return OPDMeter()


def make_stage(
    cfg: TrainConfig, model: PipoModel, tokenizer: TokenizerWrapper, teacher: Optional[nn.Module],
    world: Optional[World] = None,
):
    """The stage `cfg` asks for, on `world`'s share of each batch (default: the
    ranks mlx.launch started, or this process alone); reads and checks its data,
    writes nothing."""
    world = world or World(cfg.peer_timeout)
    if cfg.stage == "opd":
        return DistillationStage(cfg, model, tokenizer, teacher, world)
    stage = SoftTargetStage if cfg.soft_targets else SupervisedStage
    return stage(cfg, model, tokenizer, teacher, world)
