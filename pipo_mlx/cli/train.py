"""Train the PIPO heads (compressor, MTP, confidence) and LoRA on a converted model.

The application side of training: options, and the run folder's policy (never
overwrite another run; --resume only with the same settings; --force discards).
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ..distributed import World
from ..errors import PipoError
from ..hf_io import read_json
from ..train_config import COMPUTE_DTYPES, KL_MODES, OPTIMIZERS, STAGES, TrainConfig
from ..train_state import RUN_FILE
from ..trainer import train
from . import run_cli

D = TrainConfig("", "", "")  # defaults, for the help text


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(
            "Train a PIPO model's heads and LoRA. DATA holds train.jsonl and optionally "
            "valid.jsonl, one record per line in mlx-lm's formats: "
            '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]} '
            "(the last message is the completion). Stage sft (docs/design.md §6) learns "
            "the completions, or, with --teacher, the teacher's own answers to the "
            "records' prompts (generated into ADAPTER/rollouts/ first; --soft-targets: "
            "its whole distribution over them). Stage opd "
            "(docs/design.md §7) distills toward --teacher on the student's own "
            "rollouts of the prompts. Checkpoints go to ADAPTER; Ctrl-C saves one and "
            "--resume continues exactly."
        )
    )
    p.add_argument("--model", required=True, help="a converted PIPO folder (convert.py output)")
    p.add_argument(
        "--data", required=True, metavar="DATA", help="folder with train.jsonl [and valid.jsonl]"
    )
    p.add_argument(
        "--adapter-path",
        required=True,
        metavar="ADAPTER",
        help="output folder for checkpoints (and fused/)",
    )

    g = p.add_argument_group("stage and teacher")
    g.add_argument(
        "--stage",
        choices=STAGES,
        default=D.stage,
        help="sft: supervised (default); opd: on-policy distillation, needs --teacher",
    )
    g.add_argument(
        "--teacher",
        help="an ordinary causal LM folder or repo id that mlx-lm loads, sharing the "
        "student's tokenizer (e.g. the base model)",
    )
    g.add_argument(
        "--soft-targets",
        action="store_true",
        help="sft with --teacher: at every slot of the teacher's answers, learn the "
        "teacher's whole next-token distribution (reverse KL as --kl) rather than its "
        "sampled token; the confidence head learns the expected acceptance 1 - TV "
        "(docs/design.md §7)",
    )
    g.add_argument(
        "--kl",
        choices=KL_MODES,
        default=D.kl,
        help="opd and --soft-targets: reverse KL over the whole vocabulary (full), over "
        "the union of both top-k sets and the sampled token (topk, default, the paper's), "
        "or at the sampled token only (sampled, opd only)",
    )
    g.add_argument("--kl-topk", type=int, default=D.kl_topk, help=f"k for --kl topk (default {D.kl_topk})")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=D.max_new_tokens,
        help=f"most tokens per rollout, the teacher's or the student's (default {D.max_new_tokens})",
    )
    g.add_argument(
        "--temp", type=float, default=D.temp, help=f"rollout temperature (default {D.temp:g})"
    )
    g.add_argument("--top-p", type=float, default=D.top_p, help=f"rollout top-p (default {D.top_p})")
    g.add_argument("--top-k", type=int, default=D.top_k, help=f"rollout top-k (default {D.top_k})")
    g.add_argument(
        "--presence-penalty",
        type=float,
        default=D.presence_penalty,
        help=f"rollout presence penalty (default {D.presence_penalty})",
    )
    g.add_argument(
        "--conf-threshold",
        type=float,
        default=D.conf_threshold,
        help=f"opd: the gate of the student's rollouts (default {D.conf_threshold}, the paper's)",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--batch-size",
        type=int,
        default=D.batch_size,
        help=f"sequences per micro-batch (default {D.batch_size})",
    )
    g.add_argument(
        "--grad-accumulation",
        type=int,
        default=D.grad_accumulation,
        help="micro-batches per optimizer step (default 1)",
    )
    g.add_argument(
        "--max-seq-length",
        type=int,
        default=D.max_seq_length,
        help=f"tokens per sequence after pairing, even (default {D.max_seq_length})",
    )
    g.add_argument(
        "--too-long",
        choices=["truncate", "refuse"],
        default=D.too_long,
        help="a record longer than --max-seq-length after pairing: 'truncate' cuts it (the count "
        "is printed; records with no completion left are dropped), 'refuse' stops with its file "
        "and line (default truncate)",
    )
    g.add_argument(
        "--max-pad-ratio",
        type=float,
        default=D.max_pad_ratio,
        help="PAD augmentation: each step splits a random fraction, up to this one, of the "
        f"completion pairs (a,b) into (a,PAD),(b,PAD) (default {D.max_pad_ratio})",
    )

    g = p.add_argument_group("what trains")
    g.add_argument(
        "--no-lora",
        dest="lora",
        action="store_false",
        help="train only the heads (the MTP layer in full), no LoRA on the backbone",
    )
    g.add_argument(
        "--lora-rank",
        type=int,
        default=D.lora_rank,
        help=f"LoRA rank (default {D.lora_rank}, as the published checkpoints)",
    )
    g.add_argument(
        "--lora-alpha",
        type=float,
        default=D.lora_alpha,
        help=f"LoRA alpha; scale = alpha / rank (default {D.lora_alpha:g})",
    )
    g.add_argument(
        "--mtp-loss-weight",
        type=float,
        default=D.mtp_loss_weight,
        help="weight of the MTP cross-entropy (default 1)",
    )
    g.add_argument(
        "--conf-loss-weight",
        type=float,
        default=D.conf_loss_weight,
        help="weight of the confidence BCE (default 1)",
    )

    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=D.optimizer, help="default adamw")
    g.add_argument(
        "--learning-rate",
        type=float,
        default=D.learning_rate,
        help=f"peak learning rate (default {D.learning_rate:g})",
    )
    g.add_argument(
        "--warmup", type=int, default=D.warmup, help=f"linear warmup steps (default {D.warmup})"
    )
    g.add_argument(
        "--min-lr-ratio",
        type=float,
        default=D.min_lr_ratio,
        help=f"cosine decay ends at this fraction of the peak (default {D.min_lr_ratio})",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=D.weight_decay,
        help=f"for adamw, lion, sgd (default {D.weight_decay})",
    )
    g.add_argument(
        "--grad-clip",
        type=float,
        default=D.grad_clip,
        help=f"global gradient norm limit, 0 = off (default {D.grad_clip})",
    )
    g.add_argument(
        "--iters", type=int, default=D.iters, help=f"optimizer steps (default {D.iters})"
    )
    g.add_argument(
        "--seed",
        type=int,
        default=D.seed,
        help="fixes LoRA init, data order and PAD augmentation (default 0)",
    )
    g.add_argument(
        "--grad-checkpoint",
        action="store_true",
        help="recompute layer activations in the backward pass to save memory",
    )
    g.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        default=D.compute_dtype,
        help="what the training forward and backward compute in. weights: the model's "
        "own dtype; float32: float32 over the stored weights, which stay as they are "
        "in memory; auto (default): float32 on the CPU when the weights are half "
        "precision (MLX's CPU has no fast bfloat16 matmul), else the weights' dtype",
    )
    g.add_argument(
        "--ce-chunk-size",
        type=int,
        default=D.ce_chunk_size,
        help="tokens per cross-entropy chunk: bounds the [tokens, vocab] logits in memory "
        f"(default {D.ce_chunk_size})",
    )

    g = p.add_argument_group("reports and checkpoints")
    g.add_argument(
        "--steps-per-report",
        type=int,
        default=D.steps_per_report,
        help=f"print training figures every N steps (default {D.steps_per_report})",
    )
    g.add_argument(
        "--val-every",
        type=int,
        default=D.val_every,
        help=f"validate every N steps, at the start and at the end (default {D.val_every})",
    )
    g.add_argument(
        "--val-batches",
        type=int,
        default=D.val_batches,
        help=f"validation batches, -1 for all (default {D.val_batches})",
    )
    g.add_argument(
        "--save-every",
        type=int,
        default=D.save_every,
        help=f"checkpoint every N steps and at the end (default {D.save_every})",
    )
    g.add_argument(
        "--resume", action="store_true", help="continue the run in ADAPTER from its last checkpoint"
    )
    g.add_argument("--force", action="store_true", help="discard the run in ADAPTER and start over")
    g.add_argument(
        "--fuse",
        action="store_true",
        help="at the end, write ADAPTER/fused/: a model folder with LoRA merged, which "
        "pipo_mlx.load and generate.py read; quantized as --model is (the heads, which "
        "train in float, quantized again as they were). Later: pipo_mlx.fuse",
    )
    g.add_argument(
        "--dequantize",
        action="store_true",
        help="with --fuse and a quantized --model: write the fused model unquantized, "
        "in the dtype of the quantization scales",
    )
    g.add_argument(
        "--peer-timeout",
        type=float,
        default=D.peer_timeout,
        help="under mlx.launch: seconds a rank waits for the others at each exchange "
        f"before it stops with an error (default {D.peer_timeout:g}); it must cover the "
        "largest gap between ranks' steps",
    )

    return p


def check_output(cfg: TrainConfig) -> None:
    """Refuse to overwrite another run; on --resume, refuse changed settings. Writes nothing."""
    out = Path(cfg.adapter_path).expanduser()
    if out.exists() and not out.is_dir():
        raise PipoError(f"--adapter-path {out} is a file; pass a folder")
    run = out / RUN_FILE
    if cfg.resume:
        if not run.is_file():
            raise PipoError(
                f"--resume: {out} holds no training run ({RUN_FILE} missing); "
                "drop --resume to start one"
            )
        saved = read_json(run, "a train_heads.py output folder")
        for key, value in cfg.identity().items():
            if saved.get(key) != value:
                raise PipoError(
                    f"--resume: the run in {out} used {key}={saved.get(key)!r}, not {value!r}; "
                    "pass the same value, or --force to start over"
                )
        if saved.get("iters") not in (None, cfg.iters):
            print(
                f"[WARN] --resume: the run was started with --iters {saved['iters']}, now "
                f"{cfg.iters}: from the resumed step on, the learning rate follows a "
                f"schedule laid over {cfg.iters} steps",
                file=sys.stderr,
                flush=True,
            )
    elif out.is_dir() and any(out.iterdir()) and not cfg.force:
        what = "a training run" if run.exists() else "other files"
        raise PipoError(
            f"{out} already holds {what}; pass --resume to continue it, --force to start "
            "over (its checkpoints are deleted), or choose another --adapter-path"
        )


def run(cfg: TrainConfig) -> None:
    cfg.check()
    if World(cfg.peer_timeout).main:  # under mlx.launch only rank 0 has the run folder
        check_output(cfg)
    train(cfg)


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(lambda: run(TrainConfig(**vars(setup_arg_parser().parse_args(argv)))))


if __name__ == "__main__":
    main()
