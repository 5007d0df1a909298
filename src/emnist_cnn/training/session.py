"""A training session: what every command that writes a run does around its work, written once.

`open_session` holds the run's lock, sweeps temporaries a killed process left,
creates or checks RUN/config.json, appends one invocation record (the same keys
for the local scheduler, the Ray scheduler and `import-reference`) and, when
asked, opens the run's tracker and closes it as finished, killed or failed.
`configure_process` applies a command's threads and device to this process,
for the CLI and library callers alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from ..config import RESUMABLE_CHANGES, DataSource, TrainConfig, TrainOptions
from .device import configure_device
from .threads import configure_threads
from ..errors import ConfigError, DataError, RunDirError
from ..io.download import load_or_download
from ..io.rundir import ErrorRecord, RunDir, collect_versions, format_utc_now
from .prepare import PreparedData, prepare_data
from .tracking import Tracker

__all__ = ["Session", "TrainedRun", "check_compatible", "open_run", "record_session", "open_session", "open_tracker",
           "tracker_closed_on_exit", "load_training_data", "configure_process", "log_checkpoint"]

log = logging.getLogger(__name__)


@dataclass
class Session:
    """An open training session: the run (its lock held), the config it trains, its data and options."""

    run: RunDir
    config: TrainConfig
    data: PreparedData
    options: TrainOptions
    tracker: Tracker | None


@dataclass
class TrainedRun:
    """What training hands back: each dropout rate's last-checkpoint errors, and the run, config and data it
    used (so a command that goes on to evaluate or plot does not load them again)."""

    run: RunDir
    config: TrainConfig
    data: PreparedData
    errors: dict[float, list[ErrorRecord]]


def configure_process(options: TrainOptions, threads: int | None) -> None:
    """Apply `threads` and the options' device to this process, before its backend trains."""
    configure_threads(threads)
    configure_device(options.device)


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
    old_d, new_d = TrainConfig.from_dict(saved["config"]).to_dict(), config.to_dict()
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
    process trains, see `training.device.describe_runtime`) is recorded as the latest.
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


def record_session(run: RunDir, config: TrainConfig, data: PreparedData, options: TrainOptions, *,
                   scheduler: str, runtime: dict | None = None, record_runtime: bool = True,
                   fused: bool | None = None, **invocation) -> TrainConfig:
    """Under the run's lock: sweep temporaries, create or check config.json (`open_run`), and append this
    command to invocations.jsonl with the same keys whichever scheduler writes the run (`invocation`: keys
    of its own). Returns the config to train with."""
    run.remove_stale_temporaries()
    config = open_run(run, config, data, options.fixed_lr, runtime if record_runtime else None)
    run.append_invocation({"time": format_utc_now(), "pid": os.getpid(), "argv": sys.argv, "scheduler": scheduler,
                           "epochs": config.epochs, "fixed_lr": options.fixed_lr, "fused": fused,
                           "runtime": runtime, **invocation, "versions": collect_versions()})
    return config


@contextlib.contextmanager
def open_session(run: RunDir, config: TrainConfig, data: PreparedData, options: TrainOptions, *,
                 scheduler: str = "local", runtime: dict | None = None, record_runtime: bool = True,
                 fused: bool | None = None, track: bool = True, **invocation) -> Iterator[Session]:
    """Hold the run's lock for the block: temporaries swept, config.json created or checked (see `open_run`),
    the invocation recorded (`invocation`: keys of the scheduler's own), the tracker caught up (`track`).

    `runtime` (where and how this command trains) goes into the invocation, and into config.json as the
    latest unless `record_runtime` is False (a Ray run's is decided per task).

    The tracker is closed when the block ends: finished, killed (Ctrl-C) or failed.
    """
    with run.lock():
        config = record_session(run, config, data, options, scheduler=scheduler, runtime=runtime,
                                record_runtime=record_runtime, fused=fused, **invocation)
        if not track:
            yield Session(run, config, data, options, None)
            return
        tracker = open_tracker(run, config, options, data)
        with tracker_closed_on_exit(tracker):
            yield Session(run, config, data, options, tracker)


def open_tracker(run: RunDir, config: TrainConfig, options: TrainOptions, data: PreparedData) -> Tracker:
    """The run's tracker, caught up with everything the run directory already records."""
    tracker = Tracker(run, config, options.tracking, data, training=True)
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


def load_training_data(config: TrainConfig, source: DataSource) -> PreparedData:
    """Load (or download) and split the data `config` trains on. Callers check the run can take `config`
    (`check_compatible`) first: before a download or a long parse, not after."""
    dataset, data_dir = source.dataset, source.data_dir
    if dataset is None:
        dataset, data_dir = load_or_download(config.dataset, data_dir, mirror=source.mirror,
                                             download=source.download)
    if dataset.name != config.dataset:
        raise DataError(f"dataset {dataset.name} given for a run configured with {config.dataset}")
    data = prepare_data(config, dataset, data_dir)
    log.info("data: %s, %d train / %d val / %d test images, %d classes", data.name, len(data.y_train),
             len(data.y_val), len(data.y_test), data.num_classes)
    return data


def log_checkpoint(dropout: float, epoch: int, records: list[ErrorRecord]) -> None:
    """The line a recorded checkpoint gets in the log: its ensemble's validation and test errors."""
    ens = {r.split: r.rate for r in records if r.is_ensemble}
    log.info("dropout %g epoch %d: ensemble error val %s test %s", dropout, epoch,
             *("-" if ens.get(s) is None else f"{ens[s].pct:.3f}%" for s in ("val", "test")))
