"""Ensemble members: open one from its saved state, train a group of them to a target epoch.

These are the public training steps a scheduler calls one at a time (the
local loop in `train`, or one task per member group elsewhere):

    member = open_member(run, config, data, dropout, index, fixed_lr)
    train_members_to([members...], target_epoch, context)

Each finished epoch is recorded before the next starts (checkpoint weights,
history row, then state), so an interruption costs at most the epoch in flight.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..config import TrainConfig
from ..core.augment import augment_batch
from ..core.metrics import evaluate_error, evaluate_loss
from ..core.schedule import learning_rate_at, steps_per_epoch
from ..errors import ConfigError
from ..io.files import save_weights_atomic
from ..io.rundir import RunDir, make_history_row
from ..io.state import load_member_state, save_member_state
from .prepare import PreparedData

__all__ = ["Member", "TrainContext", "member_seed", "build_member_model", "open_member", "sample_calibration_images",
           "fused_by_default", "train_members_to"]

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One member of a dropout rate's ensemble, in memory, with its model and recorded history."""

    dropout: float
    index: int
    seed: int
    model: object
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    val_probs: tuple[int, np.ndarray] | None = None  # (epoch, validation softmax) from the last epoch


@dataclass
class TrainContext:
    """What training a group of members needs besides the members: the run, its data, how to show progress."""

    run: RunDir
    config: TrainConfig
    data: PreparedData
    calibration: np.ndarray  # uint8 training images for BatchNormalization recalibration
    verbose: int = 1
    fused: bool = False  # train same-epoch members in one compiled step where possible
    fused_trainers: dict = field(default_factory=dict)  # built once per group of member models
    on_epoch: Callable[["Member"], None] | None = None  # called once each finished epoch is recorded
    fixed_lr: float | None = None  # a rate for every step this call trains, instead of the recipe's

    @property
    def scheduled(self) -> bool:
        """True when the learning rate is set before every step (the recipe's schedule)."""
        return self.fixed_lr is None and self.config.recipe_spec.scheduled

    @property
    def checkpoint_epochs(self) -> set[int]:
        return set(self.config.checkpoint_epochs())


def member_seed(seed: int, dropout: float, index: int) -> int:
    """Each member's own random stream: init, shuffling, augmentation, dropout."""
    return int(np.random.SeedSequence([seed, int(round(dropout * 1e6)), index]).generate_state(1)[0])


def build_member_model(config: TrainConfig, data: PreparedData, dropout: float, seed: int, compiled: bool = True):
    """A new member's model, initialised from `seed`; compiled with its optimizer built unless told not to."""
    import keras  # deferred: the backend is slow to import

    from ..core.model import build_model, compile_model

    keras.utils.set_random_seed(seed)
    model = build_model(data.num_classes, dropout, data.mean, data.std, config.model, seed=seed)
    if compiled:
        compile_model(model, config.lr, config.recipe_spec.label_smoothing)
        model.optimizer.build(model.trainable_variables)
    return model


def open_member(run: RunDir, config: TrainConfig, data: PreparedData, dropout: float, index: int,
                fixed_lr: float | None = None) -> Member:
    """A member as its state file left it (or new), training at `fixed_lr` from here on if given,
    else at the recipe's rate (constant, or set before every step by `train_members_to`)."""
    seed = member_seed(config.seed, dropout, index)
    model = build_member_model(config, data, dropout, seed)
    member = Member(dropout, index, seed, model)
    meta = load_member_state(run.state_path(dropout, index), model)
    if meta is not None:
        member.epoch = int(meta["epoch"])
    # Rows past the saved state belong to an epoch whose state never landed: it is trained again.
    rows = run.read_history_rows(dropout, index)
    member.history = [r for r in rows if int(r["epoch"]) <= member.epoch]
    if member.epoch > config.epochs:
        raise ConfigError(f"--epochs {config.epochs} is lower than the {member.epoch} epochs already trained in "
                          f"{run}")
    n_steps = steps_per_epoch(len(data.y_train), config.batch_size)
    lr = fixed_lr if fixed_lr is not None else learning_rate_at(config, member.epoch + 1, 0, n_steps)
    # Set after restoring the optimizer, so the value reaches the variable the train step reads.
    model.optimizer.learning_rate.assign(lr)
    return member


def sample_calibration_images(config: TrainConfig, data: PreparedData) -> np.ndarray:
    """The training images BatchNormalization statistics are recomputed on (fixed per run seed)."""
    rng = np.random.default_rng([config.seed, 7])
    n = min(config.bn_recalibration_images, len(data.y_train))
    return data.x_train[np.sort(rng.choice(len(data.y_train), n, replace=False))]


def fused_by_default() -> bool:
    """Fuse members where it pays: on a GPU, whose steps a single 600k-parameter member leaves mostly idle.

    On a CPU one member's step already keeps every core busy; fusing there gains
    little and holds every member's activations at once (see README, Performance).
    """
    from ..core.model import accelerator_available

    return accelerator_available()


def train_members_to(members: list[Member], target: int, ctx: TrainContext) -> None:
    """Train `members` (one dropout rate) until each has finished epoch `target`, recording every epoch.

    Epoch by epoch, the members furthest behind first: after an interruption
    they catch up, then all train together again. When `target` is a checkpoint
    epoch, a member already there whose checkpoint file is missing (a changed
    --epochs or --checkpoint-every) gets it written from its state, which holds
    exactly those weights.
    """
    while pending := [m for m in members if m.epoch < target]:
        low = min(m.epoch for m in pending)
        group = [m for m in pending if m.epoch == low]
        trainer = _fused_trainer(group, ctx) if ctx.fused else None
        _train_group_epoch(group, ctx, trainer)
    for m in members:
        path = ctx.run.weights_path(m.dropout, target, m.index)
        if m.epoch == target and target in ctx.checkpoint_epochs and not path.exists():
            save_weights_atomic(m.model, path)


def _fused_trainer(group: list[Member], ctx: TrainContext):
    """The fused trainer for `group`, or None when it has one member or its optimizers' step counts differ."""
    from ..core.model import build_fused_trainer, read_variable

    if len(group) < 2:
        return None
    steps = {int(read_variable(m.model.optimizer.iterations)) for m in group}
    if len(steps) > 1:
        log.info("members %s have taken different numbers of optimizer steps (%s); training them one by one",
                 [m.index for m in group], sorted(steps))
        return None
    # Keyed by the model objects: members reopened from their states get a trainer of their own.
    key = tuple(id(m.model) for m in group)
    if key not in ctx.fused_trainers:
        lr = group[0].model.optimizer.learning_rate
        ctx.fused_trainers[key] = build_fused_trainer([m.model for m in group], float(read_variable(lr)),
                                                      ctx.config.recipe_spec.label_smoothing)
    return ctx.fused_trainers[key]


def _epoch_batches(member: Member, n: int, epoch: int):
    """The member's (rng, permutation) for `epoch`: they depend only on (member seed, epoch),
    so a resumed run, or a fused one, draws exactly the same batches and warps."""
    rng = np.random.default_rng([member.seed, epoch])
    return rng, rng.permutation(n)


def _train_group_epoch(group: list[Member], ctx: TrainContext, trainer) -> None:
    """Train every member of `group` (all at the same epoch) for one epoch and record it.

    With a fused trainer all members take each step together; otherwise one
    after another. Both draw the same batches and give the same weights.
    """
    if trainer is None:
        for m in group:
            t0 = time.perf_counter()
            sums = _run_steps([m], ctx, lambda xs, ys, m=m: [_member_step(m, xs[0], ys[0])], [m.model.optimizer])
            _finish_epoch(m, m.epoch + 1, sums[0], time.perf_counter() - t0, ctx)
        return
    from ..core.model import copy_optimizer_state, fused_member_logs, read_variable

    t0 = time.perf_counter()
    for m in group:
        copy_optimizer_state(m.model.optimizer, trainer.optimizer, m.model.trainable_variables)
    # A float, not the member's variable: JAX may have donated that variable's buffer to a step.
    trainer.optimizer.learning_rate.assign(float(read_variable(group[0].model.optimizer.learning_rate)))

    def step(xs, ys):
        logs = trainer.train_on_batch(xs, ys, return_dict=True)
        return fused_member_logs(logs, len(group))

    sums = _run_steps(group, ctx, step, [trainer.optimizer])
    train_seconds = (time.perf_counter() - t0) / len(group)
    last_lr = float(read_variable(trainer.optimizer.learning_rate))  # the members record and save it
    for k, m in enumerate(group):
        copy_optimizer_state(trainer.optimizer, m.model.optimizer, m.model.trainable_variables)
        m.model.optimizer.learning_rate.assign(last_lr)
        _finish_epoch(m, m.epoch + 1, sums[k], train_seconds, ctx)


def _member_step(member: Member, x, y) -> tuple[float, float]:
    logs = member.model.train_on_batch(x, y, return_dict=True)
    return float(logs["loss"]), float(logs["accuracy"])


def _run_steps(group: list[Member], ctx: TrainContext, step, optimizers) -> np.ndarray:
    """One epoch of steps for `group`; `step(xs, ys)` trains and returns (loss, accuracy) per member.

    With a scheduled recipe, every optimizer in `optimizers` gets the step's rate
    before it (a function of epoch and step only, so resumed and fused runs match).
    Returns the epoch's mean (loss, accuracy) per member, weighted by batch size.
    """
    import keras  # deferred: the backend is slow to import

    data, bs = ctx.data, ctx.config.batch_size
    n = len(data.y_train)
    steps = steps_per_epoch(n, bs)
    epoch = group[0].epoch + 1
    streams = [_epoch_batches(m, n, epoch) for m in group]
    # Bars only on a terminal: in a log file their frames add about 16 KB per member-epoch, and the
    # epoch's own log line says the same.
    bar = keras.utils.Progbar(steps, verbose=1 if ctx.verbose and sys.stdout.isatty() else 0, unit_name="step")
    sums = np.zeros((len(group), 2))
    # Label smoothing needs one-hot targets (Keras' sparse loss has no smoothing).
    targets = np.eye(data.num_classes, dtype=np.float32) if ctx.config.recipe_spec.label_smoothing else None
    for s in range(steps):
        if ctx.scheduled:
            lr = learning_rate_at(ctx.config, epoch, s, steps)
            for opt in optimizers:
                opt.learning_rate.assign(lr)
        idxs = [perm[s * bs : (s + 1) * bs] for _, perm in streams]
        xs = [augment_batch(data.x_train[idx], rng, ctx.config.augment) for (rng, _), idx in zip(streams, idxs)]
        ys = [data.y_train[idx] if targets is None else targets[data.y_train[idx]] for idx in idxs]
        per = np.asarray(step(xs, ys))
        sums += per * len(idxs[0])
        bar.update(s + 1, values=[("loss", per[:, 0].mean()), ("accuracy", per[:, 1].mean())])
    return sums / n


def _finish_epoch(member: Member, epoch: int, loss_acc: np.ndarray, train_seconds: float,
                  ctx: TrainContext) -> None:
    """BatchNormalization recalibration, validation, then checkpoint, history row and state, in that order."""
    from ..core.model import predict_probabilities, read_variable, recalibrate_batchnorm

    t0 = time.perf_counter()
    config, data, model = ctx.config, ctx.data, member.model
    loss, accuracy = float(loss_acc[0]), float(loss_acc[1])
    if config.bn_recalibration_images > 0:
        recalibrate_batchnorm(model, ctx.calibration)
    val_loss = val_acc = float("nan")
    if len(data.y_val):
        p = predict_probabilities(model, data.x_val)
        member.val_probs = (epoch, p)
        val_loss = evaluate_loss(p, data.y_val)
        val_acc = 1.0 - evaluate_error(p, data.y_val).pct / 100.0
    lr = read_variable(model.optimizer.learning_rate)
    # Training time (a fused epoch's shared equally among its members) plus recalibration and validation.
    seconds = train_seconds + time.perf_counter() - t0
    row = make_history_row(epoch, loss, accuracy, val_loss, val_acc, lr, seconds)
    # Order matters for crash safety: checkpoint weights, then history, then state.
    # A state at epoch E therefore always has its history row and checkpoint file.
    if epoch in ctx.checkpoint_epochs:
        save_weights_atomic(model, ctx.run.weights_path(member.dropout, epoch, member.index))
    member.history = member.history + [row]
    ctx.run.write_history_rows(member.dropout, member.index, member.history)
    save_member_state(ctx.run.state_path(member.dropout, member.index), model, epoch,
                      {"seed": member.seed, "learning_rate": lr})
    member.epoch = epoch
    if ctx.on_epoch is not None:
        ctx.on_epoch(member)
    val_txt = f"val_loss {val_loss:.4f} val_error {100 * (1 - val_acc):.3f}%" if len(data.y_val) else "no val split"
    log.info("dropout %g model %d epoch %d/%d: loss %.4f accuracy %.2f%% %s lr %.3g (%.1f s)",
             member.dropout, member.index, epoch, config.epochs, loss, 100 * accuracy, val_txt, lr, seconds)
