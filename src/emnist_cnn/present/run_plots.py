"""Every plot of a run directory at once: `plot_run` writes them as PNG under RUN/plot_history/."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..config import TrainConfig
from ..core.metrics import confusion_matrix
from ..core.selection import find_last_epoch, select_dropout
from ..errors import EmnistCnnError, RunDirError
from ..io.rundir import RunDir
from ..training.prepare import load_run_data
from .figures import write_figure
from .image_plots import plot_augmented_samples, plot_confusion_matrix, plot_correct_samples, plot_misclassified
from .plots import plot_checkpoint_errors, plot_ensemble_comparison, plot_fixed_lr_phase, plot_training_curves
from .reference_history import load_reference_history, reference_best_ensemble
from .summary import find_fixed_lr_phase, load_recipe_rates

__all__ = ["plot_run", "plot_run_figures"]

log = logging.getLogger(__name__)


def plot_run(run_dir, out_dir=None, compare_reference=None, data_dir=None, data=None, *, dropout=None,
             images: bool = True, dpi: int = 110) -> dict[str, Path]:
    """Write every plot of a run as PNG under `out_dir` (default RUN/plot_history); returns name -> path.

    See `plot_run_figures` for the arguments and the names.
    """
    run = RunDir.of(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run.plots_dir
    figures = plot_run_figures(run, compare_reference, data_dir, data, dropout=dropout, images=images)
    written = {name: write_figure(fig, out_dir / f"{name}.png", dpi) for name, fig in figures.items()}
    log.info("wrote %d plots to %s", len(written), out_dir)
    return written


def plot_run_figures(run_dir, compare_reference=None, data_dir=None, data=None, *, dropout=None,
                     images: bool = True) -> dict:
    """Every Figure of a run, by name (the PNG's file name without .png).

    Always: errors_dropout_<d> (per rate), ensembles, training_curves_dropout_<d>;
    fixed_lr when some epochs ran at a rate other than the base rate; with
    `images`: misclassified, correct, confusion_matrix, confusion_matrix_normalized
    (the ensemble of `dropout`, default `select_dropout`, at its last checkpoint)
    and augmentation. Image plots need the data (`data`, a PreparedData, or
    the folder recorded in config.json, or `data_dir`); without it they are
    skipped with a warning. Predictions come from the mistakes recorded when the
    checkpoint was evaluated (history/misclassified_epoch_NNN.csv); nothing is
    predicted again. `compare_reference` is the reference's plot_history folder.
    """
    run = RunDir.of(run_dir)
    config = run.read_config()
    if dropout is not None:
        dropout = config.find_dropout(dropout)
    reference = load_reference_history(compare_reference) if compare_reference else None
    errors = {d: run.read_errors(d) for d in config.dropouts}
    histories = {d: run.read_histories(d, config.models) for d in config.dropouts}
    if not any(errors.values()):
        raise RunDirError(f"{run}: no evaluated checkpoint yet (no history/errors.csv); train first")
    ref_best = reference_best_ensemble(reference) if reference else None
    figs: dict = {}
    for d, rows in errors.items():
        if rows:
            ref = reference["dropouts"].get(d) if reference else None
            figs[f"errors_dropout_{d:g}"] = plot_checkpoint_errors(rows, d, ref, ref_best)
    figs["ensembles"] = plot_ensemble_comparison(errors, reference)
    rates = load_recipe_rates(run)
    if any(find_fixed_lr_phase(h, rates) for h in histories.values()):
        figs["fixed_lr"] = plot_fixed_lr_phase(errors, histories, rates, reference)
    else:
        log.info("no fixed-learning-rate phase in %s: no fixed_lr plot", run)
    for d, h in histories.items():
        if h:
            figs[f"training_curves_dropout_{d:g}"] = plot_training_curves(h, d, rates)
    if images:
        figs.update(_image_figures(run, config, errors, data, data_dir, dropout))
    return figs


def _image_figures(run: RunDir, config: TrainConfig, errors: Mapping, data, data_dir, dropout) -> dict:
    """Misclassified, correct, confusion matrices (the chosen ensemble's last checkpoint) and augmentation."""
    if data is None:
        try:
            _, data = load_run_data(run, data_dir)
        except EmnistCnnError as exc:
            log.warning("skipping the image plots (misclassified, confusion matrix, augmentation): %s", exc)
            return {}
    figs = {}
    d = dropout if dropout is not None else select_dropout(errors)
    epoch = find_last_epoch(errors.get(d, []))
    preds = _checkpoint_predictions(run, data, d, epoch) if epoch is not None else None
    if preds is not None:
        y = np.asarray(data.y_test)
        what = f"dropout {d:g} ensemble, epoch {epoch}"
        wrong = np.flatnonzero(preds != y)
        figs["misclassified"] = plot_misclassified(np.asarray(data.x_test[wrong]), y[wrong], preds[wrong], wrong,
                                                   data.classes, n_total=len(y), what=what)
        right = np.flatnonzero(preds == y)
        pick = np.sort(np.random.default_rng(0).choice(right, min(40, len(right)), replace=False))
        figs["correct"] = plot_correct_samples(np.asarray(data.x_test[pick]), y[pick], preds[pick], pick,
                                               data.classes, what=what)
        cm = confusion_matrix(y, preds, len(data.classes))
        for name, norm in (("confusion_matrix", False), ("confusion_matrix_normalized", True)):
            kind = "% of each true class" if norm else "counts"
            figs[name] = plot_confusion_matrix(
                cm, data.classes, normalize=norm,
                title=f"Confusion matrix ({kind})\n{what}, test set: {len(wrong)} errors of {len(y):,}")
    if len(data.y_train):
        k = int(np.random.default_rng(config.seed).integers(len(data.y_train)))
        aug = config.augment
        note = ""
        if not aug.enabled:
            aug, note = dataclasses.replace(aug, enabled=True), " (this run trained without augmentation)"
        figs["augmentation"] = plot_augmented_samples(
            np.asarray(data.x_train[k]), aug, seed=config.seed,
            title=f"39 random augmentations of training image #{k} "
                  f"(class {data.classes[int(data.y_train[k])]}){note}")
    return figs


def _checkpoint_predictions(run: RunDir, data, dropout: float, epoch: int) -> np.ndarray | None:
    """The ensemble's test predictions at a checkpoint, from the mistakes recorded when it was evaluated
    (history/misclassified_epoch_NNN.csv); None, with a warning, when that file is missing."""
    path = run.checkpoint_misclassified_path(dropout, epoch)
    if not path.is_file():
        log.warning("skipping misclassified and confusion plots: %s is missing", path)
        return None
    y = np.asarray(data.y_test)
    preds = y.copy()
    for i, label, pred, _ in run.read_checkpoint_misclassified(dropout, epoch, "test"):
        if not 0 <= i < len(y) or y[i] != label or not 0 <= pred < len(data.classes):
            raise RunDirError(f"{path}: misclassified index {i} or label {label} does not match this run's test set")
        preds[i] = pred
    return preds
