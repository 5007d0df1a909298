"""Resumable training of augmented CNN ensembles, one per dropout rate, and their checkpoint evaluations.

`train_and_evaluate(config, run_dir, source, options)` is the library entry
point. It is built from public steps that a scheduler can also call one at a
time: `open_session` (training.session: lock, config.json, invocation, tracker),
`open_member` and `train_members_to` (training.members), then
`evaluate_checkpoint` and `record_checkpoint` once every member of a dropout
rate has a checkpoint's weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..config import DataSource, TrainConfig, TrainOptions
from .device import describe_runtime, format_runtime
from ..core.metrics import ensemble_probabilities, evaluate_error, find_mistakes
from ..io.rundir import ErrorRecord, RunDir
from ..io.weights import load_checkpoint_model
from .members import (Member, TrainContext, find_member_predictor, open_member, resolve_fused,
                      sample_calibration_images, train_members_to)
from .prepare import PreparedData
from .session import (TrainedRun, check_compatible, configure_process, load_training_data, log_checkpoint,
                      open_session)
from .tracking import Tracker

__all__ = ["evaluate_checkpoint", "record_checkpoint", "train_ensembles", "train_and_evaluate", "find_last_errors"]

log = logging.getLogger(__name__)

# Called with (dropout, epoch, records) once a checkpoint's evaluation is recorded (a search reports it).
OnCheckpoint = Callable[[float, int, list[ErrorRecord]], None]


def evaluate_checkpoint(run: RunDir, config: TrainConfig, data: PreparedData, dropout: float,
                        epoch: int, members: dict[int, Member] | None = None,
                        predictors: dict | None = None) -> list[ErrorRecord]:
    """Errors of every member and of the ensemble at one checkpoint, on val and test.

    Members held in memory at exactly `epoch` are used as they are (their weights
    are the checkpoint's) with the validation softmax of their last epoch; the
    others are loaded from their checkpoint files. All members predict in one pass,
    through a predictor kept in `predictors` for the same member models (so later
    checkpoints reuse its compiled function).
    """
    from ..core.model import build_member_predictor, predict_members

    members = members or {}
    models, val = [], {}
    for i in range(config.models):
        m = members.get(i)
        if m is not None and m.epoch == epoch:
            models.append(m.model)
            if m.val_probs is not None and m.val_probs[0] == epoch:
                val[i] = m.val_probs[1]
            continue
        models.append(load_checkpoint_model(run, dropout, epoch, i, config=config, data=data))
    # Kept only for members held in memory (alive as long as the cache): a model loaded from a file is
    # freed on return, and its id could come back as another checkpoint's model.
    held = all(members.get(i) is not None and members[i].model is models[i] for i in range(config.models))
    predictor = find_member_predictor(predictors, models) if held and predictors is not None \
        else build_member_predictor(models)
    # A search's trials carry no test images (training.search): nothing to predict there.
    probs = {"test": list(predict_members(predictor, data.x_test)) if len(data.y_test) else []}
    missing = [i for i in range(config.models) if i not in val]
    if len(data.y_val) and missing:
        # Reuse the predictor when every member needs its validation pass (all loaded from files).
        subset = predictor if len(missing) == config.models else [models[i] for i in missing]
        for i, p in zip(missing, predict_members(subset, data.x_val)):
            val[i] = p
    probs["val"] = [val.get(i) for i in range(config.models)]
    records = []
    labels = {"val": data.y_val, "test": data.y_test}
    for split in ("val", "test"):
        if not len(labels[split]):
            continue
        for i, p in enumerate(probs[split]):
            records.append(ErrorRecord(epoch, str(i), split, evaluate_error(p, labels[split])))
        ens_probs = ensemble_probabilities(probs[split])
        records.append(ErrorRecord(epoch, "ensemble", split, evaluate_error(ens_probs, labels[split]),
                                   tuple(find_mistakes(ens_probs, labels[split]))))
    return records


def record_checkpoint(run: RunDir, dropout: float, epoch: int, records: list[ErrorRecord]) -> None:
    """Write a checkpoint's errors: the reference's text table, the ensemble's mistakes, then errors.csv."""
    # errors.csv last: it is what marks a checkpoint as evaluated on resume, so a kill between
    # the writes must leave errors.csv without it, not the reverse.
    run.write_text_table(dropout, epoch, records)
    run.write_checkpoint_misclassified(dropout, epoch, records)
    old = [r for r in run.read_errors(dropout) if r.epoch != epoch]
    run.write_errors(dropout, old + records)


def train_ensembles(config: TrainConfig, run: RunDir, data: PreparedData, options: TrainOptions | None = None,
                    on_checkpoint: OnCheckpoint | None = None) -> dict[float, list[ErrorRecord]]:
    """Train (or resume) every ensemble of the run in this process; returns each dropout rate's
    last-checkpoint errors. See `TrainOptions` for how (a fixed rate, fused members, XLA, tracking).
    `on_checkpoint(dropout, epoch, records)` is called after each checkpoint's evaluation is on disk."""
    from ..core.model import use_jit_compile  # deferred: imports the backend

    options = options or TrainOptions()
    fused = resolve_fused(options.fused, config)
    runtime = describe_runtime(options.jit_compile, fused, config.model.precision, options.steps_per_call)
    use_jit_compile(runtime["xla"])
    log.info("%s", format_runtime(runtime))
    with open_session(run, config, data, options, runtime=runtime, fused=fused) as session:
        tracker = session.tracker
        ctx = TrainContext(run, session.config, data, sample_calibration_images(session.config, data),
                           options.verbose, fused, on_epoch=lambda m: tracker.sync(members=[(m.dropout, m.index)]),
                           fixed_lr=options.fixed_lr, jit_compile=runtime["xla"],
                           steps_per_call=runtime["steps_per_call"], loop=runtime["loop"])
        return {dropout: _train_ensemble(ctx, dropout, tracker, on_checkpoint) for dropout in session.config.dropouts}


def _train_ensemble(ctx: TrainContext, dropout: float, tracker: Tracker,
                    on_checkpoint: OnCheckpoint | None = None) -> list[ErrorRecord]:
    """Train one dropout rate's members checkpoint by checkpoint, evaluating each complete checkpoint."""
    run, config = ctx.run, ctx.config
    members: dict[int, Member] = {}
    done = run.evaluated_epochs(dropout)
    ckpts = config.checkpoint_epochs()
    for target in ckpts:
        for i in range(config.models):
            if i not in members:
                members[i] = open_member(run, config, ctx.data, dropout, i, ctx.fixed_lr)
        train_members_to(list(members.values()), target, ctx)
        if target not in done and run.has_all_weights(dropout, target, config.models):
            records = evaluate_checkpoint(run, config, ctx.data, dropout, target, members, ctx.predictors)
            record_checkpoint(run, dropout, target, records)
            tracker.sync(dropouts=[dropout])
            done.add(target)
            log_checkpoint(dropout, target, records)
            if on_checkpoint is not None:
                on_checkpoint(dropout, target, records)
    ctx.trainers.clear()
    ctx.predictors.clear()
    return find_last_errors(run, config, dropout)


def find_last_errors(run: RunDir, config: TrainConfig, dropout: float) -> list[ErrorRecord]:
    """A dropout rate's recorded errors at the run's last checkpoint (a warning when there are none)."""
    last_epoch = config.checkpoint_epochs()[-1]
    last = [r for r in run.read_errors(dropout) if r.epoch == last_epoch]
    if not last:
        log.warning("dropout %g: no evaluation at epoch %d (not every member has its weights)", dropout, last_epoch)
    return last


def train_and_evaluate(config: TrainConfig, run_dir, source: DataSource | None = None,
                       options: TrainOptions | None = None, on_checkpoint: OnCheckpoint | None = None) -> TrainedRun:
    """Load (or download) the data, then train and evaluate every ensemble in `run_dir`, in this process.

    This process is configured (`options.scaleout.threads`, `options.device`) before its backend starts.
    Returns the run, its config and data, and each dropout rate's errors at the last checkpoint.
    `on_checkpoint(dropout, epoch, records)` is called after each checkpoint's evaluation is on disk.
    """
    options = options or TrainOptions()
    run = RunDir.of(run_dir)
    # A changed experiment is refused before the backend starts (0.3 s instead of 6 for TensorFlow's import);
    # --device gpu without a GPU still before any data is read.
    check_compatible(run, config, options.fixed_lr)
    configure_process(options, options.scaleout.threads)
    data = load_training_data(config, source or DataSource())
    errors = train_ensembles(config, run, data, options, on_checkpoint)
    return TrainedRun(run, run.read_config(), data, errors)
