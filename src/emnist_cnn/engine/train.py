"""Resumable training of augmented CNN ensembles, one per dropout rate, and their checkpoint evaluations.

`train_and_evaluate(config, run_dir)` is the library entry point. It is built
from public steps that a scheduler can also call one at a time:
`open_run` (lock held), `open_member` and `train_members_to` (engine.members),
then `evaluate_checkpoint` and `record_checkpoint` once every member of a
dropout rate has a checkpoint's weights.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import numpy as np

from ..config import RESUMABLE_CHANGES, TrackingConfig, TrainConfig
from ..core.device import describe_runtime, format_runtime
from ..core.metrics import ensemble_probabilities, evaluate_error
from ..errors import ConfigError, DataError, RunDirError
from ..io.download import load_or_download
from ..io.rundir import ErrorRecord, RunDir, collect_versions, format_utc_now
from ..io.weights import load_checkpoint_model
from .members import (Member, TrainContext, find_member_predictor, open_member, resolve_fused,
                      sample_calibration_images, train_members_to)
from .prepare import PreparedData, prepare_data
from .tracking import Tracker

__all__ = ["check_compatible", "open_run", "evaluate_checkpoint", "record_checkpoint", "train_ensembles",
           "open_tracker", "tracker_closed_on_exit", "load_training_data", "train_and_evaluate", "find_last_errors"]

log = logging.getLogger(__name__)


def check_compatible(run: RunDir, config: TrainConfig, fixed_lr: float | None = None) -> dict | None:
    """Refuse a config that would change an existing run's experiment; returns its config.json.

    Checked before any data is loaded or downloaded, and again with the data's
    fingerprint once it is. Also refuses --epochs below what is already trained,
    and a new --epochs for a scheduled recipe unless a `fixed_lr` replaces the schedule.
    """
    if not run.exists():
        return None
    saved = run.read_record()
    if "fingerprint" not in saved["data"]:
        raise RunDirError(f"{run.config_path}: unreadable run configuration (no data fingerprint)")
    old_d, new_d = run.read_config().to_dict(), config.to_dict()
    changed = [k for k in new_d if k not in RESUMABLE_CHANGES and old_d.get(k) != new_d[k]]
    if changed:
        details = "; ".join(f"{k}: run has {old_d.get(k)!r}, command asks {new_d[k]!r}" for k in changed)
        raise ConfigError(
            f"{run} holds a different experiment ({details}); use a new --run-dir or the original settings"
        )
    done = run.trained_epochs(config)
    if done > config.epochs:
        raise ConfigError(f"--epochs {config.epochs} is lower than the {done} epochs already trained in {run}")
    if config.recipe_spec.scheduled and fixed_lr is None and done > 0:
        span = run.find_schedule_epochs(old_d["epochs"])
        if config.epochs != span:
            raise ConfigError(f"--epochs {config.epochs}: the {config.recipe} recipe's learning rate schedule in "
                              f"{run} spans {span} epochs; train to {span}, or past it with a fixed --lr")
    return saved


def open_run(run: RunDir, config: TrainConfig, data: PreparedData, fixed_lr: float | None = None,
             runtime: dict | None = None) -> TrainConfig:
    """Create RUN/config.json, or check that a resumed run is the same experiment (hold the run's lock).

    Returns the config to train with. Changing anything but the epoch count and
    checkpoint interval of an existing run is refused. `runtime` (where this
    process trains, see `core.device.describe_runtime`) is recorded as the latest.
    """
    saved = check_compatible(run, config, fixed_lr)
    if saved is not None:
        old_fp = saved["data"]["fingerprint"]
        if old_fp != data.fingerprint:
            raise ConfigError(
                f"{run} was trained on different data (fingerprint {old_fp[:12]} vs {data.fingerprint[:12]}); "
                "use the same data files or a new --run-dir"
            )
        now, before = collect_versions(), saved.get("versions", {})
        # Keys both records hold: a run recorded by an older release lacks some, or has others.
        changed = sorted(k for k in (set(now) & set(before)) - {"platform"} if now[k] != before[k])
        if changed:
            # Allowed (a run may move to another machine), but its resume is then no longer bit-identical.
            log.warning("%s: resumed with different %s than the run started with (see invocations.jsonl); "
                        "results will not match an uninterrupted run to the bit", run, ", ".join(changed))
        saved["config"] = config.to_dict()
        saved["updated"] = format_utc_now()
        if runtime is not None:
            saved["runtime"] = runtime
        run.write_record(saved)
    else:
        run.write_record({"config": config.to_dict(), "data": data.describe(), "versions": collect_versions(),
                          "created": format_utc_now(), "updated": format_utc_now(),
                          **({"runtime": runtime} if runtime is not None else {})})
    return config


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
    probs = {"test": list(predict_members(predictor, data.x_test))}
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
        predicted = ens_probs.argmax(axis=1)
        wrong = [(int(k), int(labels[split][k]), int(predicted[k]))
                 for k in np.flatnonzero(predicted != labels[split])]
        records.append(ErrorRecord(epoch, "ensemble", split, evaluate_error(ens_probs, labels[split]), tuple(wrong)))
    return records


def record_checkpoint(run: RunDir, dropout: float, epoch: int, records: list[ErrorRecord]) -> None:
    """Write a checkpoint's errors: the reference's text table, the ensemble's mistakes, then errors.csv."""
    # errors.csv last: it is what marks a checkpoint as evaluated on resume, so a kill between
    # the writes must leave errors.csv without it, not the reverse.
    run.write_text_table(dropout, epoch, records)
    run.write_checkpoint_misclassified(dropout, epoch, records)
    old = [r for r in run.read_errors(dropout) if r.epoch != epoch]
    run.write_errors(dropout, old + records)


def train_ensembles(config: TrainConfig, run_dir, data: PreparedData, *, fixed_lr: float | None = None,
                    verbose: int = 1, fused: bool | None = None, tracking: TrackingConfig | None = None,
                    jit_compile: str = "auto", steps_per_call: int | None = None) -> dict[float, list[ErrorRecord]]:
    """Train (or resume) every ensemble of the run; returns each dropout rate's last-checkpoint errors.

    `fixed_lr` sets the learning rate for the epochs this call trains (the
    reference's "continue with a fixed learning rate"); without it the run's
    configured rate is used. `fused` trains each ensemble's members in one
    compiled step (same results as one by one); None: on a GPU only.
    `tracking`: where progress is sent (default: TensorBoard event files only).
    `jit_compile`: XLA for every compiled function, "auto" (on with a GPU), "on" or "off".
    `steps_per_call`: training steps per compiled call (None: 16 on a GPU, 1 on a CPU).
    """
    from ..core.model import use_jit_compile  # deferred: imports the backend

    run = RunDir(run_dir)
    fused = resolve_fused(fused, config)
    runtime = describe_runtime(jit_compile, fused, config.model.precision, steps_per_call)
    use_jit_compile(runtime["xla"])
    log.info("%s", format_runtime(runtime))
    with run.lock():
        run.remove_stale_temporaries()
        config = open_run(run, config, data, fixed_lr, runtime)
        run.append_invocation({"time": format_utc_now(), "argv": sys.argv, "epochs": config.epochs,
                               "fixed_lr": fixed_lr, "fused": fused, "runtime": runtime,
                               "versions": collect_versions()})
        tracker = open_tracker(run, config, tracking, data)
        ctx = TrainContext(run, config, data, sample_calibration_images(config, data), verbose, fused,
                           on_epoch=lambda m: tracker.sync(members=[(m.dropout, m.index)]), fixed_lr=fixed_lr,
                           jit_compile=runtime["xla"], steps_per_call=runtime["steps_per_call"],
                           loop=runtime["loop"])
        with tracker_closed_on_exit(tracker):
            return {dropout: _train_ensemble(ctx, dropout, tracker) for dropout in config.dropouts}


def open_tracker(run: RunDir, config: TrainConfig, tracking: TrackingConfig | None,
                 data: PreparedData) -> Tracker:
    """The run's tracker, caught up with everything the run directory already records."""
    tracker = Tracker(run, config, tracking or TrackingConfig(), data, training=True)
    tracker.sync()
    return tracker


@contextlib.contextmanager
def tracker_closed_on_exit(tracker: Tracker):
    """Close `tracker` when the block ends, marking its MLflow run finished, killed (Ctrl-C) or failed."""
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.close("KILLED")
        raise
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close("FINISHED")


def _train_ensemble(ctx: TrainContext, dropout: float, tracker: Tracker) -> list[ErrorRecord]:
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
            ens = {r.split: r.rate for r in records if r.is_ensemble}
            log.info("dropout %g epoch %d: ensemble error val %s test %s", dropout, target,
                     _pct(ens.get("val")), _pct(ens.get("test")))
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


def _pct(rate) -> str:
    return "-" if rate is None else f"{rate.pct:.3f}%"


def load_training_data(config: TrainConfig, run_dir, *, data_dir=None, mirror=None, dataset=None,
                       download: bool = True, fixed_lr: float | None = None) -> PreparedData:
    """Check `run_dir` can take `config` (trained at `fixed_lr`, if given), then load (or download) and
    split the data it trains on."""
    check_compatible(RunDir(run_dir), config, fixed_lr)  # before a download or a long parse, not after
    if dataset is None:
        dataset, data_dir = load_or_download(config.dataset, data_dir, mirror=mirror, download=download)
    if dataset.name != config.dataset:
        raise DataError(f"dataset {dataset.name} given for a run configured with {config.dataset}")
    data = prepare_data(config, dataset, data_dir)
    log.info("data: %s, %d train / %d val / %d test images, %d classes", data.name, len(data.y_train),
             len(data.y_val), len(data.y_test), data.num_classes)
    return data


def train_and_evaluate(config: TrainConfig, run_dir, *, data_dir=None, mirror=None, fixed_lr=None,
                       dataset=None, download: bool = True, verbose: int = 1, fused: bool | None = None,
                       tracking: TrackingConfig | None = None, jit_compile: str = "auto",
                       steps_per_call: int | None = None) -> dict[float, list[ErrorRecord]]:
    """Load (or download) the data, then train and evaluate every ensemble in `run_dir`.

    Returns each dropout rate's errors at the last checkpoint.
    """
    data = load_training_data(config, run_dir, data_dir=data_dir, mirror=mirror, dataset=dataset,
                              download=download, fixed_lr=fixed_lr)
    return train_ensembles(config, Path(run_dir), data, fixed_lr=fixed_lr, verbose=verbose, fused=fused,
                           tracking=tracking, jit_compile=jit_compile, steps_per_call=steps_per_call)
