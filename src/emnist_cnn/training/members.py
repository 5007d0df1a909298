"""Ensemble members: open one from its saved state, train a group of them to a target epoch.

These are the public training steps a scheduler calls one at a time (the
local loop in `train`, or one task per member group elsewhere):

    member = open_member(run, config, data, dropout, index, fixed_lr)
    train_members_to([members...], target_epoch, context)

Each finished epoch is recorded before the next starts (checkpoint weights,
history row, then state), so an interruption costs at most the epoch in flight.
The state files' bytes are written in background threads while the members
are validated; each is put in place (renamed) after its history row.
"""

from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..config import TrainConfig
from ..core.metrics import evaluate_error, evaluate_loss
from ..core.schedule import learning_rate_at, steps_per_epoch
from ..errors import ConfigError
from ..io.files import remove_temp_file, save_weights_atomic, write_temp_file
from ..io.rundir import RunDir, make_history_row
from ..io.state import encode_member_state, load_member_state, put_member_state, snapshot_member_state
from .prepare import PreparedData

__all__ = ["Member", "TrainContext", "member_seed", "build_member_model", "open_member", "sample_calibration_images",
           "find_member_predictor",
           "fused_by_default", "resolve_fused", "train_members_to"]

log = logging.getLogger(__name__)

# Threads writing a group's state files: the writes release the GIL, the .npz encoding mostly does not.
STATE_WRITERS = 4


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
    trainers: dict = field(default_factory=dict)  # compiled steps, built once per group of member models
    predictors: dict = field(default_factory=dict)  # checkpoint evaluation's predictors, per group of models
    device_images: object = None  # the training images on the device (a DeviceImages), uploaded once
    device_calibration: object = None  # `calibration` on the device, uploaded once
    device_validation: object = None  # the validation images on the device, uploaded once
    jit_compile: bool = False  # XLA for the compiled steps
    steps_per_call: int = 1  # training steps per compiled call (see core.trainer.train_epoch)
    loop: str = "outer"  # how a call runs several steps (see core.trainer.train_steps)
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
        compile_model(model, config.lr, config.recipe_spec.label_smoothing, config.model.loss_scaling)
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


def resolve_fused(fused: bool | None, config: TrainConfig) -> bool:
    """Whether members train fused: as asked, else `fused_by_default()`; never with mixed_float16, whose
    one loss scale per trainer would be shared by the members (an overflow in one would skip every
    member's step), so fused training would no longer equal one member at a time."""
    if config.model.loss_scaling:
        if fused:
            log.warning("--fused is off with --precision mixed_float16: the members would share one loss scale")
        return False
    return fused_by_default() if fused is None else fused


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
        _train_group_epoch(group, ctx)
    for m in members:
        path = ctx.run.weights_path(m.dropout, target, m.index)
        if m.epoch == target and target in ctx.checkpoint_epochs and not path.exists():
            save_weights_atomic(m.model, path)


def _trainer(group: list[Member], ctx: TrainContext):
    """The compiled step for `group` (built once per group of member models), or None when the members'
    optimizers have taken different numbers of steps (they then train one by one)."""
    from ..core.model import read_variable
    from ..core.schedule import build_step_rates
    from ..core.trainer import DeviceImages, StepRates, build_device_trainer

    steps = {int(read_variable(m.model.optimizer.iterations)) for m in group}
    if len(steps) > 1:
        log.info("members %s have taken different numbers of optimizer steps (%s); training them one by one",
                 [m.index for m in group], sorted(steps))
        return None
    # Keyed by the model objects: members reopened from their states get a trainer of their own.
    key = tuple(id(m.model) for m in group)
    if key not in ctx.trainers:
        if ctx.device_images is None:
            ctx.device_images = DeviceImages(ctx.data.x_train, name="training_images")
        config = ctx.config
        if ctx.scheduled:
            lr = StepRates(build_step_rates(config, len(ctx.data.y_train)))
        else:
            lr = float(read_variable(group[0].model.optimizer.learning_rate))
        ctx.trainers[key] = build_device_trainer([m.model for m in group], ctx.device_images, config.augment,
                                                 config.batch_size, lr, config.recipe_spec.label_smoothing,
                                                 ctx.jit_compile, config.model.loss_scaling)
    return ctx.trainers[key]


def _epoch_order(member: Member, n: int, epoch: int) -> np.ndarray:
    """The member's image order for `epoch`: a function of (member seed, epoch) only, so a resumed run, or
    a fused one, draws exactly the same batches."""
    return np.random.default_rng([member.seed, epoch]).permutation(n).astype(np.int32)


def _train_group_epoch(group: list[Member], ctx: TrainContext) -> None:
    """Train every member of `group` (all at the same epoch) for one epoch and record it.

    Fused, all members take each step together in one compiled step; otherwise
    one after another, each in its own. Both draw the same batches and warps
    and give the same weights.
    """
    trainer = _trainer(group, ctx) if ctx.fused and len(group) > 1 else None
    if trainer is None:
        for m in group:
            t0 = time.perf_counter()
            logs = _run_epoch([m], _trainer([m], ctx), ctx)
            _finish_epochs([m], logs, time.perf_counter() - t0, ctx)
        return
    t0 = time.perf_counter()
    logs = _run_epoch(group, trainer, ctx)
    _finish_epochs(group, logs, (time.perf_counter() - t0) / len(group), ctx)


def _run_epoch(group: list[Member], trainer, ctx: TrainContext) -> list[tuple[float, float]]:
    """One epoch of `trainer`'s steps for `group`; returns (loss, accuracy) per member, means over the epoch.

    The members' optimizer state moves into the trainer's optimizer and back;
    a scheduled recipe's rate comes from the trainer's `StepRates` (a function
    of the step count, so resumed and fused runs match), and each member keeps
    the epoch's last rate.
    """
    from ..core.model import copy_optimizer_state, read_variable
    from ..core.schedule import learning_rate_at
    from ..core.trainer import augment_key, read_member_logs, train_epoch

    config, data = ctx.config, ctx.data
    n, bs = len(data.y_train), config.batch_size
    steps = steps_per_epoch(n, bs)
    epoch = group[0].epoch + 1
    opt = trainer.optimizer
    for m in group:
        copy_optimizer_state(m.model.optimizer, opt, m.model.trainable_variables)
    if ctx.scheduled:
        done = int(read_variable(opt.iterations))
        if done != (epoch - 1) * steps:
            raise ConfigError(f"dropout {group[0].dropout:g} model {group[0].index}: {done} optimizer steps before "
                              f"epoch {epoch}, not {(epoch - 1) * steps}; the schedule cannot place this epoch")
        last_lr = learning_rate_at(config, epoch, steps - 1, steps)
    else:
        # A float, not the member's variable: JAX may have donated that variable's buffer to a step.
        last_lr = float(read_variable(group[0].model.optimizer.learning_rate))
        opt.learning_rate.assign(last_lr)
    orders = [_epoch_order(m, n, epoch) for m in group]
    for k, m in enumerate(group):
        trainer.get_layer(f"augment_{k}").set_key(augment_key(m.seed, epoch))
    onehot = np.eye(data.num_classes, dtype=np.float32) if config.recipe_spec.label_smoothing else None
    ys = [data.y_train[o] if onehot is None else onehot[data.y_train[o]] for o in orders]
    # Bars only on a terminal: in a log file their frames add about 16 KB per member-epoch, and the
    # epoch's own log line says the same.
    logs = train_epoch(trainer, orders, ys, bs, show_bar=bool(ctx.verbose) and sys.stdout.isatty(),
                       steps_per_call=ctx.steps_per_call, loop=ctx.loop)
    for m in group:
        copy_optimizer_state(opt, m.model.optimizer, m.model.trainable_variables)
        m.model.optimizer.learning_rate.assign(last_lr)
    return read_member_logs(logs, len(group))


def _finish_epochs(group: list[Member], logs: list[tuple[float, float]], train_seconds: float,
                   ctx: TrainContext) -> None:
    """BatchNormalization recalibration and validation of every member of `group` (just trained together),
    then each one's epoch recorded. Images stay on the device: one call recalibrates a member, one call
    per validation batch predicts for all members. The members' state files are written while they are
    validated (on a GPU the host is otherwise idle then) and put in place as each epoch is recorded."""
    from ..core.model import read_variable, recalibrate_batchnorm, upload_images

    t0 = time.perf_counter()
    config, data = ctx.config, ctx.data
    if config.bn_recalibration_images > 0:
        if ctx.device_calibration is None:
            ctx.device_calibration = upload_images(ctx.calibration, batch_size=None)
        for m in group:
            recalibrate_batchnorm(m.model, ctx.device_calibration)
    # The snapshots may share memory with the variables (a CPU backend's arrays): every write ends with this
    # block, before the members train again.
    rates = [read_variable(m.model.optimizer.learning_rate) for m in group]  # the epoch's last, kept by each
    states = [snapshot_member_state(m.model, m.epoch + 1, {"seed": m.seed, "learning_rate": lr})
              for m, lr in zip(group, rates)]
    with ThreadPoolExecutor(min(len(group), STATE_WRITERS), thread_name_prefix="member-state") as pool:
        writes = [pool.submit(_write_state, ctx.run.state_path(m.dropout, m.index), a) for m, a in zip(group, states)]
        try:
            probs = [None] * len(group)
            if len(data.y_val):
                probs = list(_validate(group, ctx))
            # Training time (a fused epoch's shared equally among its members) plus recalibration and validation.
            seconds = train_seconds + (time.perf_counter() - t0) / len(group)
            for k, m in enumerate(group):
                _record_epoch(m, m.epoch + 1, logs[k], rates[k], seconds, probs[k], writes[k], ctx)
        finally:
            _discard_unplaced(writes)


def _write_state(path, arrays: dict[str, np.ndarray]):
    """A state file's bytes in a temp file beside `path` (in a writer thread); returns the temp file."""
    return write_temp_file(path, encode_member_state(arrays))


def _discard_unplaced(writes: list[Future]) -> None:
    """Wait for every state write and remove the temp files not put in place (after an error or Ctrl-C)."""
    for w in writes:
        try:
            tmp = w.result()
        except Exception:  # the write's own error, raised where it was awaited (a Ctrl-C here goes up)
            continue
        remove_temp_file(tmp)  # gone already once put in place


def _validate(group: list[Member], ctx: TrainContext) -> np.ndarray:
    """Inference-mode softmax on the validation images, (members, N, classes), through the predictor that
    checkpoint evaluation keeps for the same member models."""
    from ..core.model import predict_members, upload_images

    if ctx.device_validation is None:
        ctx.device_validation = upload_images(ctx.data.x_val)
    models = [m.model for m in group]
    predictor = models[0] if len(models) == 1 else find_member_predictor(ctx.predictors, models)
    return predict_members(predictor, ctx.device_validation, count=len(ctx.data.y_val))


def find_member_predictor(predictors: dict, models: list):
    """`core.model.build_member_predictor(models)`, built (and compiled by its first call) once per group of
    member models and kept in `predictors`, keyed by the models (which must outlive the cache)."""
    from ..core.model import build_member_predictor

    key = tuple(id(m) for m in models)
    if key not in predictors:
        predictors[key] = build_member_predictor(models)
    return predictors[key]


def _record_epoch(member: Member, epoch: int, loss_acc: tuple[float, float], lr: float, seconds: float,
                  val_probs: np.ndarray | None, state: Future, ctx: TrainContext) -> None:
    """The epoch's validation figures, then checkpoint, history row and state (`state`: the temp file being
    written by `_write_state`), in that order. `lr`: the rate the member ends the epoch with."""
    config, data, model = ctx.config, ctx.data, member.model
    loss, accuracy = float(loss_acc[0]), float(loss_acc[1])
    val_loss = val_acc = float("nan")
    if val_probs is not None:
        member.val_probs = (epoch, val_probs)
        val_loss = evaluate_loss(val_probs, data.y_val)
        val_acc = 1.0 - evaluate_error(val_probs, data.y_val).pct / 100.0
    row = make_history_row(epoch, loss, accuracy, val_loss, val_acc, lr, seconds)
    # The state's bytes first (written during validation): a failed write stops the epoch before anything
    # else of it is written, and the files are written in one order.
    tmp = state.result()
    # Order matters for crash safety: checkpoint weights, then history, then state.
    # A state at epoch E therefore always has its history row and checkpoint file.
    if epoch in ctx.checkpoint_epochs:
        save_weights_atomic(model, ctx.run.weights_path(member.dropout, epoch, member.index))
    member.history = member.history + [row]
    ctx.run.write_history_rows(member.dropout, member.index, member.history)
    put_member_state(ctx.run.state_path(member.dropout, member.index), tmp)
    member.epoch = epoch
    if ctx.on_epoch is not None:
        ctx.on_epoch(member)
    val_txt = f"val_loss {val_loss:.4f} val_error {100 * (1 - val_acc):.3f}%" if len(data.y_val) else "no val split"
    log.info("dropout %g model %d epoch %d/%d: loss %.4f accuracy %.2f%% %s lr %.3g (%.1f s)",
             member.dropout, member.index, epoch, config.epochs, loss, 100 * accuracy, val_txt, lr, seconds)
