"""`emnist-cnn tune`: successive halving (Ray Tune's ASHA scheduler) over experiment settings, on validation.

Every trial is a run directory (io.searchdir), trained by this package's own loop on a dataset that carries no
test images, with a checkpoint every epoch; after each it reports its ensemble's validation error, and ASHA
stops the trials that trail at its rungs. Tune samples the configurations (seeded) and schedules the trials;
a trial stopped or interrupted is an ordinary run that resumes from its last finished epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import DataSource, SearchSettings, TrainConfig, TrainOptions
from ..core.metrics import ErrorRate
from ..core.stats import McNemarResult, mcnemar_exact
from ..errors import ConfigError, RunDirError, format_one_line
from ..io.config_files import format_config_toml
from ..io.download import load_or_download
from ..io.search_space import SearchSpace, apply_sample, read_sample
from ..io.searchdir import SearchDir
from .scaleout import import_ray, init_ray
from .tracking import close_search_run, open_search_run

__all__ = ["METRIC", "TrialResult", "Leaderboard", "run_search", "run_trial", "read_leaderboard", "train_winner",
           "build_trial_config", "build_final_config"]

log = logging.getLogger(__name__)

METRIC = "val_error_pct"  # what a trial reports after each epoch and ASHA ranks on (lower is better)


@dataclass(frozen=True)
class TrialResult:
    """One trial at its last evaluated epoch: the settings it varied and its ensemble's validation error."""

    name: str
    settings: dict[str, Any]
    epochs: int
    val: ErrorRate
    wrong: frozenset[int]  # validation images its ensemble gets wrong at that epoch

    def to_json(self) -> dict[str, Any]:
        lo, hi = self.val.interval_pct
        return {"trial": self.name, "settings": self.settings, "epochs": self.epochs, "val_error_pct": self.val.pct,
                "val_errors": self.val.n_errors, "val_n": self.val.n, "val_error_ci_pct": [lo, hi]}


@dataclass(frozen=True)
class Leaderboard:
    """The trials, best first on validation (ties: fewer epochs, then name), and the best against the next."""

    trials: tuple[TrialResult, ...]
    max_epochs: int
    best_vs_next: McNemarResult | None  # on the same validation images; None with fewer than two trials

    @property
    def best(self) -> TrialResult | None:
        return self.trials[0] if self.trials else None

    def to_json(self) -> dict[str, Any]:
        versus = self.best_vs_next
        return {"max_epochs": self.max_epochs, "trials": [t.to_json() for t in self.trials],
                "best_vs_next": None if versus is None else
                {"only_best": versus.only_a, "only_next": versus.only_b, "p_value": versus.p_value}}


def build_trial_config(base: TrainConfig, settings: SearchSettings, sample: dict[str, Any]) -> TrainConfig:
    """A trial's experiment: the base with the sampled settings, its members, one checkpoint per epoch, and one
    dropout rate (the base's first, unless the space varies it)."""
    trial = base.replace(dropouts=base.dropouts[:1], models=settings.members_per_trial, epochs=settings.max_epochs,
                         checkpoint_every=1)
    return apply_sample(trial, sample)


def build_final_config(base: TrainConfig, settings: SearchSettings, best: TrialResult) -> TrainConfig:
    """The winner as a run of its own: the base's members and checkpoints, the best trial's settings (its one
    dropout rate too), trained for the search's longest trial length."""
    return apply_sample(base.replace(dropouts=base.dropouts[:1], epochs=settings.max_epochs), best.settings)


def _without_test(dataset):
    """The dataset a trial sees: training images only (its validation split is cut from them)."""
    empty = np.zeros((0, *dataset.x_test.shape[1:]), dataset.x_test.dtype)
    return dataclasses.replace(dataset, x_test=empty, y_test=np.zeros((0,), dataset.y_test.dtype))


def run_trial(sample: dict[str, Any], *, base: TrainConfig, settings: SearchSettings, search_dir: str, dataset,
              options: TrainOptions) -> None:
    """Ray Tune's trainable: train (or resume) this trial's run directory, reporting after every epoch.

    A trial first reports again the epochs already on its disk (a resumed search's scheduler starts empty): with
    one trial at a time the scheduler sees the same results in the same order, so it decides as before."""
    from ray import tune

    name = "trial_" + tune.get_context().get_trial_id().rsplit("_", 1)[-1]
    config = build_trial_config(base, settings, sample)
    run = SearchDir(search_dir).trial(name)

    def send(epoch: int, val: ErrorRate) -> None:
        tune.report({"epoch": epoch, METRIC: val.pct, "val_errors": val.n_errors, "trial": name})

    if run.exists():
        for r in sorted(_ensemble_val(run.read_errors(config.dropouts[0])), key=lambda r: r.epoch):
            send(r.epoch, r.rate)

    from .train import train_and_evaluate  # after the replay: a trial the scheduler stops there never loads Keras

    def on_checkpoint(dropout: float, epoch: int, records) -> None:
        send(epoch, _ensemble_val(records)[0].rate)

    train_and_evaluate(config, run, DataSource(dataset=dataset), options, on_checkpoint=on_checkpoint)


def _ensemble_val(records) -> list:
    """The ensemble's validation records, what a trial reports and is ranked by."""
    return [r for r in records if r.is_ensemble and r.split == "val"]


def _record(base: TrainConfig, space: SearchSpace, settings: SearchSettings, fingerprint: str) -> dict[str, Any]:
    # The space as [key, spec] pairs: Tune samples in this order, so a reordered file samples other trials.
    return {"base": base.to_dict(), "space": [[k, v] for k, v in space.to_dict().items()],
            "settings": dataclasses.asdict(settings),
            "data": {"dataset": base.dataset, "fingerprint": fingerprint}}


def _check_same_search(search: SearchDir, saved: dict[str, Any], new: dict[str, Any]) -> None:
    """A resumed search must be the one on disk: name the first setting that differs."""
    for part in ("space", "settings", "base", "data"):
        old, now = saved.get(part), new[part]
        if old == now:
            continue
        if part == "space":
            pairs = list(zip(old or [], now))
            key = next((b[0] for a, b in pairs if a != b), now[-1][0] if len(now) > len(old or []) else part)
        else:
            keys = sorted(set(old or {}) | set(now))
            key = next((k for k in keys if (old or {}).get(k) != now.get(k)), part)
        flag = "--search-seed" if key == "seed" else f"--{key.replace('_', '-')}"
        what = {"space": f"space key {key}", "settings": flag, "base": f"base setting {key}",
                "data": f"data ({key})"}[part]
        raise ConfigError(f"{search.path} holds a search whose {what} differs; run the same command to resume it, "
                          f"or use a new --search-dir")


def run_search(base: TrainConfig, space: SearchSpace, search_dir, settings: SearchSettings,
               source: DataSource | None = None, options: TrainOptions | None = None) -> Leaderboard:
    """Run (or resume) a search in `search_dir`; returns its leaderboard and writes it with best.toml. Raises
    RunDirError when a trial failed (after writing what the others found)."""
    source, options = source or DataSource(), options or TrainOptions()
    search = SearchDir(search_dir)
    if search.holds_something_else():
        raise ConfigError(f"--search-dir {search.path} holds files but no search.json: not a search directory")
    ray = import_ray("tune")  # before the data is read: a missing extra is one line, not a late failure
    with search.lock():
        saved = search.read_record()
        if saved is not None:  # the settings before the data is read, the data's fingerprint after
            _check_same_search(search, saved, _record(base, space, settings,
                                                      saved.get("data", {}).get("fingerprint")))
        # Data is read once, here; the trials get it without its test images.
        dataset, _ = load_or_download(base.dataset, source.data_dir, mirror=source.mirror,
                                      download=source.download)
        record = _record(base, space, settings, dataset.fingerprint)
        if saved is not None:
            _check_same_search(search, saved, record)
        if saved is not None and saved.get("mlflow_run_id"):
            record["mlflow_run_id"] = saved["mlflow_run_id"]  # kept for a later start with --mlflow
        threads = options.scaleout.threads or max(1, (os.cpu_count() or 1) // settings.concurrent)
        scaleout = dataclasses.replace(options.scaleout, ray_address=options.scaleout.ray_address or "local",
                                       threads=threads)
        init_ray(ray, scaleout)
        tracking, status, failed = options.tracking, "FAILED", []
        try:
            if tracking.mlflow_uri is not None:  # one parent run for the search, its trials' runs under it
                parent = open_search_run(search.path, tracking, record.get("mlflow_run_id"))
                if parent is not None:
                    record["mlflow_run_id"] = parent
                    tracking = dataclasses.replace(tracking, parent_run_id=parent)
            search.write_record(record)
            failed = _fit(search, base, space, settings, _without_test(dataset),
                          dataclasses.replace(options, tracking=tracking,
                                              scaleout=dataclasses.replace(scaleout, ray_address=None)))
            status = "FAILED" if failed else "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            ray.shutdown()
            board = _write_results(search, base, settings)
            if tracking.parent_run_id is not None:
                close_search_run(tracking, tracking.parent_run_id, board.best.val.pct if board.best else None,
                                 [search.leaderboard_path, search.best_config_path], status)
    if failed:
        raise RunDirError(f"{len(failed)} trial(s) failed, the first: {failed[0]}; run the same command to "
                          "resume them")
    return board


def _write_results(search: SearchDir, base: TrainConfig, settings: SearchSettings) -> Leaderboard:
    """The leaderboard and best.toml, from the trials on disk."""
    board = read_leaderboard(search)
    search.write_leaderboard(board.to_json())
    if board.best is not None:
        final = build_final_config(base, settings, board.best)
        search.write_best_config(format_config_toml(
            final, f"best trial of {search.path}: {board.best.name}, validation error {board.best.val} "
                   f"after {board.best.epochs} epochs"))
    return board


def train_winner(search_dir, base: TrainConfig, settings: SearchSettings, board: Leaderboard, members: int,
                 source: DataSource | None = None, options: TrainOptions | None = None):
    """Train (or resume) the best trial's settings with `members` members in SEARCH/final, in this process, on
    the whole dataset: the one place a search's test error is measured. Returns the engine's TrainedRun."""
    from .train import train_and_evaluate

    search = SearchDir(search_dir)
    if board.best is None:
        raise ConfigError(f"{search_dir}: no trial has finished an epoch, so there is no winner to train")
    final = build_final_config(base, settings, board.best).replace(models=members)
    run = search.final_run()
    if run.exists() and run.read_config().models != members:
        raise ConfigError(f"--final-members {members}: {run} holds the winner trained with "
                          f"{run.read_config().models} members; give that number to resume it, or remove {run}")
    options = options or TrainOptions()
    parent = (search.read_record() or {}).get("mlflow_run_id")
    if options.tracking.mlflow_uri is not None and parent:  # the winner beside its trials, under the search
        options = dataclasses.replace(options, tracking=dataclasses.replace(options.tracking, parent_run_id=parent))
    return train_and_evaluate(final, run, source, options)


def _fit(search: SearchDir, base: TrainConfig, space: SearchSpace, settings: SearchSettings, dataset,
         options: TrainOptions) -> list[str]:
    """Run every trial with a new Tuner; returns one line per failed trial."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Not Tune's console tables, nor its TensorBoard logger (it warns without tensorboardX): the trials are run
    # directories with histories and TensorBoard files of their own, and the driver logs one line per trial epoch.
    # Its JSON logger stays: Tune reads each trial's results back from it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl-C as everywhere else in this tool: KeyboardInterrupt (Tune's own handler would stop the trials and
    # return as if the search had ended).
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, settings=settings, search_dir=str(search.path.resolve()),
                             dataset=dataset, options=options),
        {"cpu": options.scaleout.task_threads})
    # Tune's saved state is not what resumes a search: it leaves out the scheduler's rungs. Every start is a new
    # Tuner with the same seeded sampler, so trial N gets the same settings and run directory; each trial first
    # reports again what it has on disk, which rebuilds the rungs, and stops where the scheduler stopped it.
    shutil.rmtree(search.tune_dir, ignore_errors=True)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=settings.max_epochs, grace_period=settings.grace_epochs,
                              reduction_factor=settings.reduction_factor)
    tuner = tune.Tuner(
        trainable, param_space=_to_tune(space),
        tune_config=tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler, num_samples=settings.trials,
                                    reuse_actors=True,
                                    search_alg=BasicVariantGenerator(random_state=settings.seed,
                                                                     max_concurrent=settings.concurrent)),
        # A trial whose worker or node dies is started again, and resumes from its run directory.
        run_config=tune.RunConfig(name="experiment", storage_path=str(search.tune_dir.resolve()), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=options.scaleout.max_retries),
                                  callbacks=[_progress_lines(settings.max_epochs), JsonLoggerCallback()]))
    results = tuner.fit()
    return [format_one_line(r.error) for r in results if r.error is not None]


def _to_tune(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    make = {"choice": lambda v: tune.choice(list(v)), "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v)}
    return {d.key: make[d.kind](d.values) for d in space.dimensions}


def _progress_lines(max_epochs: int):
    """A Tune callback: one log line per trial epoch reported and per trial ended, on the driver's console."""
    from ray.tune import Callback

    class ProgressLines(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            log.info("%s epoch %d: val error %.3f%% (%s)", result.get("trial", trial.trial_id), result["epoch"],
                     result[METRIC], _format_settings(trial.config))

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            epoch = result.get("epoch", 0)
            how = "done" if epoch >= max_epochs else "stopped by ASHA"
            log.info("%s %s at epoch %s of %d", result.get("trial", trial.trial_id), how, epoch, max_epochs)

    return ProgressLines()


def _format_settings(sample: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sample.items())


def read_leaderboard(search: SearchDir) -> Leaderboard:
    """The trials on disk ranked by their ensemble's validation error at their last evaluated epoch, each with
    the values of the settings the search varies."""
    record = search.read_record() or {}
    varied = [key for key, _ in record.get("space", [])]
    results = []
    for name in search.trial_names():
        run = search.trial(name)
        config = run.read_config()
        dropout = config.dropouts[0]
        rows = _ensemble_val(run.read_errors(dropout))
        if not rows:
            continue
        last = max(rows, key=lambda r: r.epoch)
        wrong = frozenset(m.index for m in run.read_checkpoint_misclassified(dropout, last.epoch, "val"))
        values = read_sample(config)
        results.append(TrialResult(name, {k: values[k] for k in varied}, last.epoch, last.rate, wrong))
    results.sort(key=lambda t: (t.val.n_errors / max(t.val.n, 1), t.epochs, t.name))
    versus = None
    if len(results) >= 2:
        n = results[0].val.n
        versus = mcnemar_exact(*(np.isin(np.arange(n), sorted(t.wrong)) for t in results[:2]))
    return Leaderboard(tuple(results), int(record.get("settings", {}).get("max_epochs", 0)), versus)
