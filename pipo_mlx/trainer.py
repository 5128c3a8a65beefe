"""Training the PIPO heads with MLX: the schedule and the loop (docs/design.md §6, §7).

The pieces it runs live beside it: `stages` (where batches come from and what
their loss is: supervised or distillation), `adapters` (what trains),
`train_state` (checkpoints).
"""

import signal
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import get_total_parameters

from . import backbones
from .adapters import dequantized_reads, grad_checkpointing, save_fused, setup_trainable
from .distributed import World, run_parts, share_state
from .interrupts import ctrl_c_noted
from .model import PipoModel
from .model_io import load
from .rollouts import check_teacher
from .stages import make_stage
from .train_config import TrainConfig
from .train_state import restore_checkpoint, save_checkpoint, start_run


def learning_rate(cfg: TrainConfig) -> Callable[[mx.array], mx.array]:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio x peak at `iters`."""
    lr = cfg.learning_rate
    decay = optim.cosine_decay(lr, max(cfg.iters - cfg.warmup, 1), lr * cfg.min_lr_ratio)
    if cfg.warmup == 0:
        return decay
    # lr * (step + 1) / warmup: the first step already moves the weights.
    warm = optim.linear_schedule(lr / cfg.warmup, lr, max(cfg.warmup - 1, 1))
    return optim.join_schedules([warm, decay], [cfg.warmup])


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    lr = learning_rate(cfg)
    if cfg.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    if cfg.optimizer == "lion":
        return optim.Lion(learning_rate=lr, weight_decay=cfg.weight_decay)
    return optim.SGD(learning_rate=lr, momentum=0.9, weight_decay=cfg.weight_decay)


def _checkpoint_then_stop() -> None:
    """The first Ctrl-C lets the loop checkpoint and stop after the current step;
    the default handler is back for a second one, which stops at once."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    info("\n[INFO] Ctrl-C: saving a checkpoint after this step (press again to quit now)")


def info(line: str) -> None:
    """Notes and warnings go to stderr, as the other tools' do; stdout carries the
    training and validation figures."""
    print(line, file=sys.stderr, flush=True)


def _silent(*args, **kwargs) -> None:
    pass


def train(cfg: TrainConfig) -> PipoModel:
    """Train the PIPO heads as `cfg` says; returns the trained model (with LoRA layers,
    or fused when cfg.fuse)."""
    cfg.check()
    # Under mlx.launch each rank takes its rows of every batch; alone, all of them.
    world = World(cfg.peer_timeout)
    world.rows(cfg.batch_size)  # a batch the ranks cannot share is refused before loading
    model, tokenizer = load(cfg.model)
    teacher = None
    if cfg.teacher:
        teacher, _ = check_teacher(cfg.teacher, tokenizer, model.args.vocab_size)
    stage = make_stage(cfg, model, tokenizer, teacher, world)
    mx.random.seed(cfg.seed)  # LoRA's initial A matrices
    tuning = setup_trainable(model, cfg)
    world.check_same(lambda: run_parts(cfg, model, teacher))
    optimizer = make_optimizer(cfg)
    # Only rank 0 keeps the run folder; the others receive what it holds.
    out = start_run(cfg) if world.main else Path(cfg.adapter_path).expanduser()
    stage.prepare(out)
    step = restore_checkpoint(out, model, optimizer) if cfg.resume and world.main else 0
    if cfg.resume:
        step = share_state(world, model, optimizer, step)
    # Rank 0 speaks for all: the figures it prints are summed over the ranks.
    show, say = (print, info) if world.main else (_silent, _silent)

    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_all = get_total_parameters(model)  # a quantized weight counted unpacked, as mlx-lm does
    lora = "LoRA r=%d + heads" % cfg.lora_rank if cfg.lora else "heads only"
    if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        lora += ", over quantized weights"
    if world.size > 1:
        lora += f", data-parallel over {world.size} ranks"
    say(
        f"[INFO] {cfg.stage}: {stage.describe()}; trainable "
        f"{n_train / 1e6:.3f}M of {n_all / 1e6:.3f}M parameters ({lora}), computing in "
        f"{str(model.compute_dtype).split('.')[-1]}"
    )
    if step:
        say(f"[INFO] resumed from step {step} in {out}")

    weights = (cfg.mtp_loss_weight, cfg.conf_loss_weight)
    loss_and_grad = nn.value_and_grad(model, stage.loss)

    def validate(at: int) -> None:
        meter = stage.meter()
        model.eval()
        for batch in stage.valid():
            meter.add(stage.evaluate(batch)[1])
        model.train()
        meter.sums = world.total(meter.sums)
        if meter.sums:
            show(f"[val] step {at}: {meter.line(weights)}", flush=True)

    model.train()
    if teacher is not None:
        # The fast route is training mode's; a frozen teacher has nothing else that
        # trains (no dropout), so its scoring takes the route too.
        teacher.train()
    meter, tokens, elapsed, window = stage.meter(), 0, 0.0, 0
    exchanging = 0.0  # of elapsed, in collectives (the wait for slower ranks included)
    with (
        backbones.of(model).fast_training(model),
        backbones.of(model).fast_training(teacher) if teacher is not None else nullcontext(),
        grad_checkpointing(model, cfg.grad_checkpoint),
        dequantized_reads(model, teacher),
        ctrl_c_noted(_checkpoint_then_stop) as stop_requested,
    ):
        if step == 0:
            validate(0)
        start, total_elapsed = step, 0.0
        while step < cfg.iters:
            tic, waited = time.perf_counter(), world.waited
            grads = None
            for j in range(cfg.grad_accumulation):
                batch = stage.batch(step * cfg.grad_accumulation + j)
                # Values and head-input gradients first, outside autodiff; then one
                # lazy forward and backward (losses.py says why).
                prepared, stats = stage.evaluate(batch)
                # The terms are means over token1, token2 and token2 slots; scaled so
                # that the ranks' average is the mean over the whole batch.
                _, g = loss_and_grad(
                    prepared, world.term_scales([stats["n1"], stats["n2"], stats["n2"]])
                )
                grads = g if grads is None else tree_map(mx.add, grads, g)
                mx.eval(grads)
                meter.add(stats)
                tokens += stage.tokens(batch)
            grads = world.average(grads)
            if cfg.grad_accumulation > 1:
                grads = tree_map(lambda g: g / cfg.grad_accumulation, grads)
            if cfg.grad_clip > 0:
                grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state)
            step += 1
            dt = time.perf_counter() - tic
            exchanging += world.waited - waited
            elapsed += dt
            total_elapsed += dt
            window += 1

            if step % cfg.steps_per_report == 0 or step == cfg.iters:
                totals = world.total({**meter.sums, "tokens": tokens})
                tokens, meter.sums = totals.pop("tokens"), totals
                eta = total_elapsed / (step - start) * (cfg.iters - step)
                # The optimizer holds the rate of its latest update.
                lr = optimizer.learning_rate.item()
                ranks = f" ({exchanging / window:.2f} exchanging)" if world.size > 1 else ""
                show(
                    f"[train] step {step}/{cfg.iters} | {meter.line(weights)} | lr {lr:.2e} | "
                    f"{tokens / elapsed:.0f} tok/s, {elapsed / window:.2f} s/step{ranks} | "
                    f"peak {mx.get_peak_memory() / 1e9:.2f} GB | "
                    f"ETA {timedelta(seconds=int(eta))}",
                    flush=True,
                )
                meter, tokens, elapsed, window = stage.meter(), 0, 0.0, 0
                exchanging = 0.0
            if step % cfg.val_every == 0 or step == cfg.iters:
                validate(step)
            stop = world.any(stop_requested())  # every rank stops after the same step
            if (step % cfg.save_every == 0 or step == cfg.iters or stop) and world.main:
                save_checkpoint(out, step, model, optimizer)
            if stop:
                say(f"[INFO] saved step {step} in {out}; continue with --resume")
                raise KeyboardInterrupt
    say(f"[INFO] step {step}: checkpoint in {out / f'step-{step:07d}'}")
    if cfg.fuse and world.main:
        dst = save_fused(model, tuning, cfg.model, out / "fused", tokenizer, cfg.dequantize)
        say(f"[INFO] fused model in {dst}")
    return model
