"""Error and training plots of a run: checkpoint errors, ensembles against best members, fixed-LR phase, curves.

Every `plot_*` function takes table records or arrays and returns a
`matplotlib.figure.Figure` built without pyplot (no global state, no display).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import DataError
from ..io.rundir import ErrorRecord
from .figures import (
    REF_COLOR,
    SPLIT_NAMES,
    get_best_member_series,
    get_error_series,
    legend_outside,
    choose_line_marker,
    pick_member_colors,
    list_member_names,
    new_figure,
    set_epoch_axis,
    set_error_scale,
    list_split_names,
)
from .reference_history import ReferenceTable, reference_best_ensemble, reference_fixed_lr
from .summary import find_fixed_lr_phase

__all__ = ["plot_checkpoint_errors", "plot_ensemble_comparison", "plot_fixed_lr_phase", "plot_training_curves"]


def plot_checkpoint_errors(rows: Sequence[ErrorRecord], dropout: float, reference: ReferenceTable | None = None,
                           reference_best: tuple[float, int] | None = None):
    """Test and validation error of every member (thin) and of the ensemble (bold) over the checkpoints.

    `rows` are errors.csv rows; `reference` overlays the reference's test errors for this rate.
    """
    splits = list_split_names(rows) or ["test"]
    members = list_member_names(rows)
    fig = new_figure(5.2 * len(splits) + 2.4, 4.6)
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    colors = pick_member_colors(len(members))
    for ax, split in zip(axes, splits):
        plotted = []
        for m, color in zip(members, colors):
            e, v = get_error_series(rows, m, split)
            ax.plot(e, v, lw=1.0, alpha=0.75, color=color, marker=choose_line_marker(len(e)), ms=3, label=f"model {m}")
            plotted += list(v)
        e, v = get_error_series(rows, "ensemble", split)
        ax.plot(e, v, lw=2.8, color="black", marker=choose_line_marker(len(e)), ms=5, label="ensemble", zorder=5)
        plotted += list(v)
        if split == "test" and reference is not None:
            plotted += _draw_reference(ax, reference, label_prefix=f"reference (dropout {dropout:g})")
        if split == "test" and reference_best is not None:
            ax.axhline(reference_best[0], color=REF_COLOR, lw=1.0, ls=":",
                       label=f"reference's best ensemble {reference_best[0]:.3f}% (epoch {reference_best[1]})")
            plotted.append(reference_best[0])
        ax.set_title(f"{SPLIT_NAMES[split]} error")
        set_epoch_axis(ax, [r.epoch for r in rows],
                        reference.epochs if split == "test" and reference is not None else ())
        ax.set_ylabel(f"{SPLIT_NAMES[split]} error (%)")
        set_error_scale(ax, plotted)
    fig.suptitle(f"Dropout {dropout:g}: error of each member (thin) and of the ensemble (bold) at every checkpoint")
    legend_outside(fig, axes)
    return fig


def _draw_reference(ax, ref: ReferenceTable, label_prefix: str = "reference") -> list[float]:
    values = []
    for k, (_, v) in enumerate(sorted(ref.members.items(), key=lambda kv: int(kv[0]))):
        ax.plot(ref.epochs, v, lw=0.7, ls="--", color="0.6", alpha=0.8,
                label=f"{label_prefix} members" if k == 0 else "_nolegend_")
        values += list(v)
    if ref.ensemble is not None:
        ax.plot(ref.epochs, ref.ensemble, lw=2.4, ls="--", color=REF_COLOR, label=f"{label_prefix} ensemble")
        values += list(ref.ensemble)
    return values


def plot_ensemble_comparison(errors_by_dropout: Mapping[float, Sequence[ErrorRecord]],
                             reference: Mapping | None = None):
    """Every dropout rate's ensemble (solid) and best member (dashed) on one plot, test and validation.

    The best member is chosen on validation at each checkpoint. `reference`
    (from `load_reference_history`) overlays the reference's ensembles and best single models.
    """
    from matplotlib import colormaps

    rates = [d for d, rows in errors_by_dropout.items() if rows]
    splits = sorted({s for d in rates for s in list_split_names(errors_by_dropout[d])},
                    key=["test", "val"].index) or ["test"]
    fig = new_figure(5.2 * len(splits) + 3.0, 4.8)
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    tab = colormaps["tab10"]
    all_rates = sorted(set(rates) | set((reference or {}).get("dropouts", {})))
    color = {d: tab(k % 10) for k, d in enumerate(all_rates)}
    for ax, split in zip(axes, splits):
        plotted = []
        for d in rates:
            rows = errors_by_dropout[d]
            e, v = get_error_series(rows, "ensemble", split)
            ax.plot(e, v, lw=2.4, color=color[d], marker=choose_line_marker(len(e)), ms=4,
                    label=f"dropout {d:g} ensemble")
            be, bv, blabel = get_best_member_series(rows, split)
            ax.plot(be, bv, lw=1.2, ls="--", color=color[d], marker=choose_line_marker(len(be)), ms=3,
                    label=f"dropout {d:g} {blabel}")
            plotted += list(v) + list(bv)
        if split == "test" and reference:
            for d, t in sorted(reference.get("dropouts", {}).items()):
                if t.ensemble is not None:
                    ax.plot(t.epochs, t.ensemble, lw=1.6, ls=":", color=color[d],
                            label=f"reference dropout {d:g} ensemble")
                    plotted += list(t.ensemble)
                if t.best is not None:
                    ax.plot(t.epochs, t.best, lw=0.9, ls="-.", color=color[d], alpha=0.7,
                            label=f"reference dropout {d:g} best single (on test)")
                    plotted += list(t.best)
            best = reference_best_ensemble(reference)
            if best is not None:
                ax.axhline(best[0], color="black", lw=1.0, ls=":",
                           label=f"reference's best ensemble {best[0]:.3f}% (epoch {best[1]})")
        ax.set_title(f"{SPLIT_NAMES[split]} error")
        ref_epochs = [e for t in (reference or {}).get("dropouts", {}).values() for e in t.epochs]
        set_epoch_axis(ax, [r.epoch for d in rates for r in errors_by_dropout[d]],
                        ref_epochs if split == "test" else ())
        ax.set_ylabel(f"{SPLIT_NAMES[split]} error (%)")
        set_error_scale(ax, plotted)
    fig.suptitle("Ensembles (solid) and best single members (dashed) of every dropout rate")
    legend_outside(fig, axes)
    return fig


def plot_fixed_lr_phase(errors_by_dropout: Mapping[float, Sequence[ErrorRecord]],
                        histories_by_dropout: Mapping[float, Mapping[int, Mapping[str, np.ndarray]]],
                        base_lr, reference: Mapping | None = None, context: int | None = None):
    """Error per epoch after a continuation at a fixed learning rate, with the checkpoints before it.

    One row per dropout rate with a fixed-LR phase, test and validation
    columns; x is epochs since the phase began (0 = last epoch at `base_lr`, the recipe's rate:
    a number or epoch -> rate),
    so runs of any length line up with the reference's epochs 256-272.
    `context` is how many epochs before the phase to show (default: twice the phase's length).
    """
    from matplotlib.ticker import MaxNLocator

    phases = {d: p for d in errors_by_dropout
              if (p := find_fixed_lr_phase(histories_by_dropout.get(d, {}), base_lr)) and errors_by_dropout[d]}
    if not phases:
        rate = "the recipe's scheduled rate" if callable(base_lr) else f"the base rate {base_lr:g}"
        raise DataError(f"no epoch was trained at a learning rate other than {rate}")
    ref = reference_fixed_lr(reference) if reference else None
    ref_best = reference_best_ensemble(reference) if reference else None
    splits = sorted({s for d in phases for s in list_split_names(errors_by_dropout[d])}, key=["test", "val"].index)
    fig = new_figure(5.0 * len(splits) + 3.0, 3.6 * len(phases) + 0.6)
    axes = fig.subplots(len(phases), len(splits), squeeze=False)
    for row_axes, (d, (start, end, rates)) in zip(axes, phases.items()):
        rows = errors_by_dropout[d]
        back = context if context is not None else max(2 * (end - start), 2)
        members = list_member_names(rows)
        for ax, split in zip(row_axes, splits):
            plotted = []
            for m, color in zip(members, pick_member_colors(len(members))):
                e, v = get_error_series(rows, m, split)
                keep = e >= start - back
                ax.plot(e[keep] - start, v[keep], lw=1.0, alpha=0.75, color=color,
                        marker=choose_line_marker(int(keep.sum())), ms=3, label=f"model {m}")
                plotted += list(v[keep])
            e, v = get_error_series(rows, "ensemble", split)
            keep = e >= start - back
            ax.plot(e[keep] - start, v[keep], lw=2.8, color="black", marker=choose_line_marker(int(keep.sum())), ms=5,
                    label="ensemble", zorder=5)
            plotted += list(v[keep])
            rate_txt = ", ".join(f"{r:g}" for r in rates)
            ax.axvspan(0, end - start, color="#f5b041", alpha=0.15, label=f"fixed learning rate {rate_txt}")
            if split == "test" and ref is not None:
                r_start, r_epochs, r_ens, r_best, r_rate = ref
                # The reference at the same epochs since its switch; its longer run-up would squash this run's.
                keep = (r_epochs - r_start >= -back) & (r_epochs - r_start <= end - start)
                src = f"dropout {r_rate:g}" if r_rate is not None else "continued ensemble"
                ax.plot(r_epochs[keep] - r_start, r_ens[keep], lw=2.2, ls="--", color=REF_COLOR,
                        marker=".", label=f"reference ensemble ({src}, 0 = epoch {r_start})")
                plotted += list(r_ens[keep])
                if r_best is not None:
                    ax.plot(r_epochs[keep] - r_start, r_best[keep], lw=1.0, ls="-.", color=REF_COLOR,
                            alpha=0.7, label="reference best single model (on test)")
                    plotted += list(r_best[keep])
            if split == "test" and ref_best is not None:
                ax.axhline(ref_best[0], color=REF_COLOR, lw=1.0, ls=":",
                           label=f"reference's best ensemble {ref_best[0]:.3f}% (epoch {ref_best[1]})")
                plotted.append(ref_best[0])
            ax.set_title(f"dropout {d:g}: {SPLIT_NAMES[split]} error")
            ax.set_xlabel(f"epochs after the switch (0 = epoch {start})")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(f"{SPLIT_NAMES[split]} error (%)")
            set_error_scale(ax, plotted)
    fig.suptitle("Fixed-learning-rate phase: error per epoch after the continuation (shaded), "
                 "with the checkpoints before it")
    legend_outside(fig, axes)
    return fig


def plot_training_curves(history: Mapping[int, Mapping[str, np.ndarray]], dropout: float,
                         base_lr=None):
    """Per member (one row each): loss and error (100 - accuracy, %), training against validation.

    Training values are on augmented images with dropout active, validation
    values in inference mode; epochs at a rate other than `base_lr` (the recipe's: a number
    or epoch -> rate) are shaded as a fixed-learning-rate phase.
    """
    members = sorted(history)
    if not members:
        raise DataError(f"dropout {dropout:g}: no training history to plot")
    phase = find_fixed_lr_phase(history, base_lr) if base_lr is not None else None
    fig = new_figure(11.0, 2.5 * len(members) + 0.9)
    axes = fig.subplots(len(members), 2, squeeze=False)
    for (ax_loss, ax_err), i in zip(axes, members):
        cols = history[i]
        ep = cols["epoch"]
        mk = choose_line_marker(len(ep))
        for ax, key, ylabel in ((ax_loss, "loss", "loss (cross-entropy)"), (ax_err, "accuracy", "error (%)")):
            to_y = (lambda a: a) if key == "loss" else (lambda a: 100.0 * (1.0 - a))
            train = to_y(cols[key])
            val = to_y(cols.get(f"val_{key}", np.full(len(ep), np.nan)))
            ax.plot(ep, train, color="#1f77b4", lw=1.6, marker=mk, ms=3, label="training (augmented, dropout on)")
            if np.isfinite(val).any():
                ax.plot(ep, val, color="#d62728", lw=1.6, ls="--", marker=mk, ms=3, label="validation")
            if phase is not None:
                ax.axvspan(phase[0], phase[1], color="#f5b041", alpha=0.15,
                           label=f"fixed learning rate {', '.join(f'{r:g}' for r in phase[2])}")
            set_epoch_axis(ax, ep)
            ax.set_ylabel(ylabel)
            ax.set_title(f"model {i}: {'loss' if key == 'loss' else 'error (100 - accuracy)'}")
            set_error_scale(ax, np.concatenate([train, val]))
    fig.suptitle(f"Dropout {dropout:g}: training curves of every member")
    legend_outside(fig, axes)
    return fig
