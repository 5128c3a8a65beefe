"""The settings of a head-training run, and what makes two runs the same run."""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from .errors import PipoError

OPTIMIZERS = ("adamw", "adam", "lion", "sgd")
TOO_LONG = ("truncate", "refuse")
STAGES = ("sft", "opd")
KL_MODES = ("full", "topk", "sampled")
COMPUTE_DTYPES = ("auto", "float32", "weights")


@dataclass
class TrainConfig:
    model: str
    data: str
    adapter_path: str
    iters: int = 1000
    batch_size: int = 4
    grad_accumulation: int = 1
    max_seq_length: int = 2048
    too_long: str = "truncate"
    max_pad_ratio: float = 0.25
    optimizer: str = "adamw"
    learning_rate: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    lora: bool = True
    lora_rank: int = 64
    lora_alpha: float = 128.0
    mtp_loss_weight: float = 1.0
    conf_loss_weight: float = 1.0
    ce_chunk_size: int = 256
    grad_checkpoint: bool = False
    compute_dtype: str = "auto"
    steps_per_report: int = 10
    val_every: int = 200
    val_batches: int = 25
    save_every: int = 100
    seed: int = 0
    # The stage (docs/design.md §6, §7), the teacher, and the sampling of the
    # rollouts (the teacher's for sft with a teacher, the student's for opd);
    # defaults are the paper's.
    stage: str = "sft"
    teacher: Optional[str] = None
    soft_targets: bool = False
    kl: str = "topk"
    kl_topk: int = 32
    max_new_tokens: int = 256
    temp: float = 1.0
    top_p: float = 0.95
    top_k: int = 20
    presence_penalty: float = 1.5
    conf_threshold: float = 0.95
    resume: bool = False
    force: bool = False
    fuse: bool = False
    dequantize: bool = False
    # Several ranks (mlx.launch): how long a rank waits for the others at a
    # collective before it stops (pipo_mlx/distributed.py).
    peer_timeout: float = 600.0

    # What a resumed run may change: nothing here alters the data order, the
    # model being trained or the optimizer's rule. (`iters` does reshape the
    # learning-rate schedule from the resumed step on; extending a run is the
    # point of changing it.)
    RESUMABLE = frozenset(
        {
            "iters",
            "steps_per_report",
            "val_every",
            "val_batches",
            "save_every",
            "grad_checkpoint",
            "ce_chunk_size",
            "resume",
            "force",
            "fuse",
            "dequantize",
            "adapter_path",
            "peer_timeout",
        }
    )

    def check(self) -> None:
        positive = (
            "iters",
            "batch_size",
            "grad_accumulation",
            "lora_rank",
            "ce_chunk_size",
            "steps_per_report",
            "val_every",
            "save_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise PipoError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_seq_length < 4 or self.max_seq_length % 2:
            raise PipoError("--max-seq-length must be even and at least 4 (PIPO reads pairs)")
        if not 0.0 <= self.max_pad_ratio <= 1.0:
            raise PipoError("--max-pad-ratio must lie in [0, 1]")
        if self.too_long not in TOO_LONG:
            raise PipoError(f"--too-long must be one of {', '.join(TOO_LONG)}")
        if self.optimizer not in OPTIMIZERS:
            raise PipoError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.learning_rate <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise PipoError("--learning-rate must be positive and --min-lr-ratio in [0, 1]")
        if self.warmup < 0 or self.grad_clip < 0 or self.val_batches < -1 or self.val_batches == 0:
            raise PipoError("--warmup and --grad-clip must be >= 0; --val-batches >= 1 or -1 (all)")
        if self.dequantize and not self.fuse:
            raise PipoError("--dequantize is an option of --fuse; pass --fuse as well")
        if self.resume and self.force:
            raise PipoError("--resume continues a run and --force discards it; pass only one")
        if not self.peer_timeout > 0:
            raise PipoError("--peer-timeout must be positive (seconds)")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise PipoError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}")
        if self.stage not in STAGES or self.kl not in KL_MODES:
            raise PipoError(
                f"--stage must be one of {', '.join(STAGES)} and --kl one of {', '.join(KL_MODES)}"
            )
        if self.stage == "opd" and not self.teacher:
            raise PipoError(
                "--stage opd distills toward a teacher; pass --teacher with an ordinary "
                "causal LM folder (e.g. the base model) that shares the tokenizer"
            )
        if self.soft_targets and (self.stage != "sft" or not self.teacher):
            raise PipoError(
                "--soft-targets is for --stage sft with a --teacher: it learns the teacher's "
                "distribution over its own answers; pass --teacher, or drop --soft-targets"
            )
        if self.soft_targets and self.kl == "sampled":
            raise PipoError(
                "--soft-targets learns whole distributions: --kl full or topk (sampled needs "
                "the student's own samples, --stage opd)"
            )
        if self.kl_topk < 1 or self.max_new_tokens < 1 or not self.temp >= 0:
            raise PipoError("--kl-topk and --max-new-tokens must be at least 1, --temp >= 0")
        if not 0 < self.top_p <= 1:
            raise PipoError("--top-p must lie in (0, 1]")
        if self.iters <= self.warmup:
            raise PipoError(
                f"--iters {self.iters} is not above --warmup {self.warmup}: the whole run "
                "would be warmup and the learning rate would never decay; pass a smaller "
                f"--warmup (e.g. {max(self.iters // 10, 0)}) or more --iters"
            )

    def identity(self) -> Dict[str, Any]:
        """The settings that define a run, with paths made absolute."""
        d = {k: v for k, v in asdict(self).items() if k not in self.RESUMABLE}
        d["model"] = str(Path(self.model).expanduser().resolve())
        d["data"] = str(Path(self.data).expanduser().resolve())
        if self.teacher and Path(self.teacher).expanduser().exists():
            d["teacher"] = str(Path(self.teacher).expanduser().resolve())
        return d
