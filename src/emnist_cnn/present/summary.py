"""A run's results as they are shown: last checkpoints, the fixed-LR phase (choices: core.selection)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..core.results import EnsembleEvaluation, ModelErrors
from ..core.schedule import build_epoch_rates
from ..core.selection import find_last_epoch, select_best_member
from ..io.rundir import RunDir

__all__ = ["CheckpointResults", "load_recipe_rates", "find_fixed_lr_phase", "load_results"]

# A run's own learning rate: a number, or epoch -> rate for a scheduled recipe.
Rates = float | Callable[[int], float]


def load_recipe_rates(run: RunDir) -> Rates:
    """The rate the run's recipe gives each epoch's history row: its base rate, or the schedule's."""
    config = run.read_config()
    if not config.recipe_spec.scheduled:
        return config.lr
    return build_epoch_rates(config, int(run.read_record()["data"]["n_train"]),
                             run.find_schedule_epochs(config.epochs))


def find_fixed_lr_phase(history: Mapping[int, Mapping[str, np.ndarray]], base_lr: Rates):
    """The epochs trained at a rate other than the recipe's (`base_lr`, a number or epoch -> rate):
    (last epoch at the recipe's rate, last epoch, rates), or None."""
    fixed_epochs, rates = [], set()
    for cols in history.values():
        lr, epochs = cols.get("learning_rate"), cols.get("epoch")
        if lr is None or epochs is None:
            continue
        expected = np.array([base_lr(int(e)) for e in epochs]) if callable(base_lr) else base_lr
        # The history stores rates with 6 significant digits.
        off = ~np.isclose(lr, expected, rtol=1e-5, atol=0)
        fixed_epochs += epochs[off].astype(int).tolist()
        rates |= {float(f"{x:.6g}") for x in lr[off]}
    if not fixed_epochs:
        return None
    last = max(int(c["epoch"].max()) for c in history.values())
    return min(fixed_epochs) - 1, last, sorted(rates)


@dataclass(frozen=True)
class CheckpointResults:
    """One dropout rate's results at its last evaluated checkpoint (`epoch` None: none yet).

    `members` and `ensemble` hold test errors (`error`) and validation errors (`val`,
    None without a validation split); `best_member` is the member chosen on validation;
    `evaluation`, the newest `emnist-cnn evaluate` result on the test split at any epoch.
    """

    dropout: float
    epoch: int | None = None
    members: tuple[ModelErrors, ...] = ()
    ensemble: ModelErrors | None = None
    best_member: str | None = None
    evaluation: EnsembleEvaluation | None = None


def load_results(run_dir) -> list[CheckpointResults]:
    """Per dropout rate, the last checkpoint's errors and the choices made on validation."""
    run = RunDir.of(run_dir)
    out = []
    for d in run.read_config().dropouts:
        rows = run.read_errors(d)
        epoch = find_last_epoch(rows)
        if epoch is None:
            out.append(CheckpointResults(d, evaluation=run.latest_evaluation(d)))
            continue
        by = {(r.model, r.split): r.rate for r in rows if r.epoch == epoch}
        names = sorted({m for m, _ in by if m != "ensemble"}, key=int)
        best = select_best_member({int(m): by.get((m, "val")) for m in names})
        out.append(CheckpointResults(
            d, epoch, tuple(ModelErrors(m, by.get((m, "test")), by.get((m, "val"))) for m in names),
            ModelErrors("ensemble", by.get(("ensemble", "test")), by.get(("ensemble", "val"))),
            None if best is None else str(best), run.latest_evaluation(d)))
    return out
