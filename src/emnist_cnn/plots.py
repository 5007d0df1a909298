"""Plots of a run: checkpoint errors, training curves, predictions, augmentation.

Every `plot_*` function takes plain arrays or table rows and returns a
`matplotlib.figure.Figure` built without pyplot (no global state, no display);
`write_figure` saves one as PNG. `plot_run` gathers a run directory's inputs
and writes every PNG under `RUN/plot_history/`; `cmd_plot` (the `emnist-cnn
plot` subcommand) also writes `RUN/report.html`.

Error axes are in percent on a log scale zoomed on the data (a short run's
30% and the reference's 0.16% fit on one axis, and 0.16% stays apart from
0.18%); they fall back to linear from 0 when an error is exactly 0.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import AugmentConfig, TrainConfig, dropout_dirname
from .errors import ConfigError, DataError, EmnistCnnError, RunDirError
from .rundir import atomic_write_bytes, read_csv_rows, read_run_config

log = logging.getLogger(__name__)

SPLIT_NAMES = {"test": "test", "val": "validation"}
# The grid of misclassified images gets one subplot each; beyond this matplotlib
# becomes slow and the PNG unwieldy, so an early, bad checkpoint is truncated.
MAX_GRID_IMAGES = 400
_MEMBER_CMAP = "viridis"
_REF_COLOR = "#c0392b"


# ----------------------------------------------------------------------------- reading a run


def load_run_config(run_dir) -> dict:
    """RUN/config.json as saved by `train` (keys config, data, versions, created, updated)."""
    return read_run_config(run_dir)[1]


def load_errors(run_dir, dropout: float) -> list[dict]:
    """errors.csv of one dropout rate with typed values (epoch, n_errors, n: int; error_pct: float)."""
    path = Path(run_dir) / dropout_dirname(dropout) / "history" / "errors.csv"
    out = []
    for k, row in enumerate(read_csv_rows(path), start=2):
        try:
            out.append({"epoch": int(row["epoch"]), "model": row["model"], "split": row["split"],
                        "error_pct": float(row["error_pct"]), "n_errors": int(row["n_errors"]),
                        "n": int(row["n"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise RunDirError(f"{path}:{k}: malformed row ({exc})") from exc
    return out


def load_histories(run_dir, dropout: float, models: int) -> dict[int, dict[str, np.ndarray]]:
    """Per member index, the columns of history/model_i.csv as float arrays (absent members omitted)."""
    folder = Path(run_dir) / dropout_dirname(dropout) / "history"
    out = {}
    for i in range(models):
        rows = read_csv_rows(folder / f"model_{i}.csv")
        if not rows:
            continue
        try:
            out[i] = {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}
        except (TypeError, ValueError) as exc:
            raise RunDirError(f"{folder / f'model_{i}.csv'}: malformed value ({exc})") from exc
    return out


def last_epoch(rows: Sequence[Mapping]) -> int | None:
    """The last checkpoint epoch with an ensemble row, or None."""
    epochs = [int(r["epoch"]) for r in rows if r["model"] == "ensemble"]
    return max(epochs) if epochs else None


def select_dropout(errors_by_dropout: Mapping[float, Sequence[Mapping]]) -> float | None:
    """The dropout rate whose ensemble has the lowest validation error at its last checkpoint.

    Without a validation split, the first rate with a checkpoint: the test
    split is never used to choose.
    """
    scored = []
    for k, (d, rows) in enumerate(errors_by_dropout.items()):
        e = last_epoch(rows)
        if e is None:
            continue
        val = [r for r in rows if int(r["epoch"]) == e and r["model"] == "ensemble" and r["split"] == "val"]
        scored.append((float(val[0]["error_pct"]) if val else math.inf, k, d))
    return min(scored)[2] if scored else None


def find_fixed_lr_phase(history: Mapping[int, Mapping[str, np.ndarray]], base_lr: float):
    """The epochs trained at a rate other than `base_lr`: (last base-rate epoch, last epoch, rates), or None."""
    fixed_epochs, rates = [], set()
    for cols in history.values():
        lr, epochs = cols.get("learning_rate"), cols.get("epoch")
        if lr is None or epochs is None:
            continue
        # The history stores rates with 6 significant digits.
        off = ~np.isclose(lr, base_lr, rtol=1e-5, atol=0)
        fixed_epochs += epochs[off].astype(int).tolist()
        rates |= {float(f"{x:.6g}") for x in lr[off]}
    if not fixed_epochs:
        return None
    last = max(int(c["epoch"].max()) for c in history.values())
    return min(fixed_epochs) - 1, last, sorted(rates)


# ----------------------------------------------------------------------------- the reference's tables


@dataclass(frozen=True)
class ReferenceTable:
    """One of the reference's training_history CSVs: test error (%) per row over epochs."""

    path: Path
    epochs: np.ndarray  # int, from the "N Epochen" headers
    members: dict[str, np.ndarray]  # "0".."9" -> error %, NaN where the cell is empty
    ensemble: np.ndarray | None
    best: np.ndarray | None  # the reference's "Best single Model" row (chosen on test by the reference)


def load_reference_history(directory) -> dict:
    """Parse the reference's plot_history CSVs.

    Returns {"dropouts": {rate: ReferenceTable}, "fixed_lr": ReferenceTable | None}
    ("training_history_emnist_manual_lr.csv" is the fixed-learning-rate phase).
    Headers may be German ("Modell", "16 Epochen") or English; empty cells are NaN.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"--compare-reference {directory}: not a folder")
    out: dict = {"dropouts": {}, "fixed_lr": None}
    for path in sorted(directory.glob("*.csv")):
        m = re.search(r"dropout_([0-9]*\.?[0-9]+)\.csv$", path.name)
        if m:
            out["dropouts"][float(m.group(1))] = read_reference_table(path)
        elif re.search(r"(manual|fixed)_?lr", path.name):
            out["fixed_lr"] = read_reference_table(path)
    if not out["dropouts"] and out["fixed_lr"] is None:
        raise ConfigError(f"--compare-reference {directory}: no training_history_*dropout_*.csv or *manual_lr.csv")
    return out


def read_reference_table(path) -> ReferenceTable:
    """One reference CSV: a header of epochs, then rows "Modell k", "Ensemble", "Best single Model"."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable reference table ({exc})") from exc
    if len(rows) < 2:
        raise DataError(f"{path}: reference table has no rows")
    epochs = []
    for cell in rows[0][1:]:
        m = re.search(r"\d+", cell)
        if not m:
            raise DataError(f"{path}: header cell {cell!r} names no epoch")
        epochs.append(int(m.group()))
    members, ensemble, best = {}, None, None
    for line, row in enumerate(rows[1:], start=2):
        cells = (row[1:] + [""] * len(epochs))[: len(epochs)]
        try:
            values = np.array([float(c) if c.strip() else np.nan for c in cells])
        except ValueError as exc:
            raise DataError(f"{path}:{line}: not a number ({exc})") from exc
        name = row[0].strip().lower()
        if "ensemble" in name:
            ensemble = values
        elif "best" in name:
            best = values
        elif (m := re.fullmatch(r"model+\s*(\d+)", name)):
            members[m.group(1)] = values
        else:
            log.warning("%s:%d: ignoring row %r", path, line, row[0])
    return ReferenceTable(path, np.array(epochs, dtype=int), members, ensemble, best)


def reference_best_ensemble(reference: Mapping) -> tuple[float, int] | None:
    """The reference's lowest published ensemble test error (%) and its epoch (the headline 0.16%)."""
    found = []
    tables = list(reference.get("dropouts", {}).values()) + [reference.get("fixed_lr")]
    for t in tables:
        if t is not None and t.ensemble is not None and np.isfinite(t.ensemble).any():
            k = int(np.nanargmin(t.ensemble))
            found.append((float(t.ensemble[k]), int(t.epochs[k])))
    return min(found) if found else None


def _reference_fixed_lr(reference: Mapping):
    """The reference's fixed-LR phase with its run-up: (start epoch, epochs, ensemble, best, continued rate).

    The manual-LR table's first column (epoch 256) repeats the dropout-0.2
    table's 16-epoch values instead of its 256-epoch ones, so the epochs up to
    the start come from the dropout table that was continued: the one whose
    values at the phase's last epoch equal the manual-LR table's.
    """
    fixed = reference.get("fixed_lr")
    if fixed is None or fixed.ensemble is None:
        return None
    start, end = int(fixed.epochs[0]), int(fixed.epochs[-1])
    source = None
    for d, t in sorted(reference.get("dropouts", {}).items()):
        if t.ensemble is not None and end in t.epochs:
            if np.isclose(t.ensemble[list(t.epochs).index(end)], fixed.ensemble[-1], atol=1e-6):
                source = (d, t)
                break
    keep = fixed.epochs > start
    epochs, ens = list(fixed.epochs[keep]), list(fixed.ensemble[keep])
    best = list(fixed.best[keep]) if fixed.best is not None else None
    rate = None
    if source is not None:
        rate, t = source
        before = t.epochs <= start
        epochs = list(t.epochs[before]) + epochs
        ens = list(t.ensemble[before]) + ens
        if best is not None and t.best is not None:
            best = list(t.best[before]) + best
        elif best is not None:
            best = [np.nan] * int(before.sum()) + best
    return start, np.array(epochs), np.array(ens), None if best is None else np.array(best), rate


# ----------------------------------------------------------------------------- helpers


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _series(rows: Sequence[Mapping], model: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((int(r["epoch"]), float(r["error_pct"])) for r in rows
                 if r["model"] == model and r["split"] == split)
    return np.array([p[0] for p in pts], dtype=int), np.array([p[1] for p in pts], dtype=float)


def _members(rows: Sequence[Mapping]) -> list[str]:
    return sorted({r["model"] for r in rows if r["model"] != "ensemble"}, key=int)


def _splits(rows: Sequence[Mapping]) -> list[str]:
    present = {r["split"] for r in rows}
    return [s for s in ("test", "val") if s in present]


def _best_member_series(rows: Sequence[Mapping], split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Per checkpoint, the `split` error of the member with the lowest validation error.

    Without validation rows the member is the best on `split` itself, and the label says so.
    """
    by = {(int(r["epoch"]), r["model"], r["split"]): float(r["error_pct"]) for r in rows}
    members = _members(rows)
    has_val = any(s == "val" for _, _, s in by)
    chooser = "val" if has_val else split
    epochs, values = [], []
    for e in sorted({e for e, _, _ in by}):
        scores = [(by[e, m, chooser], int(m)) for m in members if (e, m, chooser) in by]
        if not scores:
            continue
        best = str(min(scores)[1])
        if (e, best, split) in by:
            epochs.append(e)
            values.append(by[e, best, split])
    label = "best member (chosen on val)" if has_val else f"best member (on {split}: no val split)"
    return np.array(epochs, dtype=int), np.array(values), label


def _set_error_scale(ax, values: Sequence[float]) -> None:
    """A log y axis zoomed on the data, so that 0.16% and 0.25% stay apart; linear from 0 if an error is 0."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) and v.min() > 0:
        ax.set_yscale("log")
        lo, hi = v.min() / 1.15, v.max() * 1.15
        ax.set_ylim(lo, hi)
        # Plain 1-2-5 ticks, denser when the range is narrow; the default labels only powers of ten.
        if hi / lo > 30:
            subs = (1.0, 2.0, 5.0)
        elif hi / lo > 4:
            subs = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
        else:
            subs = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        top = float(v.max()) * 1.15 if len(v) and v.max() > 0 else 1.0
        ax.set_ylim(0, top)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.4g}"))
    ax.grid(True, which="major", alpha=0.3)


def _set_epoch_axis(ax, run_epochs: Sequence[int] = (), reference_epochs: Sequence[int] = ()) -> None:
    """Integer epoch ticks; a log axis when the reference runs far longer than the run, so both show."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    run_max = max((int(e) for e in run_epochs), default=0)
    ref_max = max((int(e) for e in reference_epochs), default=0)
    if run_max and ref_max > 8 * run_max:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlabel("epoch (log scale)")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")


def _marker(n_points: int) -> str | None:
    # A one-checkpoint line would be invisible without markers; dense lines stay clean.
    return "o" if n_points <= 24 else None


def _member_colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps[_MEMBER_CMAP]
    return [cmap(0.1 + 0.75 * k / max(n - 1, 1)) for k in range(n)]


def _legend_outside(fig, ax_or_axes) -> None:
    """One legend below the plots, so it never covers data; duplicate labels merged."""
    axes = ax_or_axes if isinstance(ax_or_axes, (list, tuple, np.ndarray)) else [ax_or_axes]
    seen = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if not lab.startswith("_"):
                seen.setdefault(lab, h)
    if seen:
        ncols = 1 if len(seen) < 3 else 2 if len(seen) <= 4 else 3
        fig.legend(list(seen.values()), list(seen.keys()), loc="outside lower center", ncols=ncols,
                   fontsize="small", frameon=False)


def write_figure(fig, path, dpi: int = 110) -> Path:
    """Save a Figure as PNG, atomically (a reader never sees half a file)."""
    path = Path(path)
    buf = io.BytesIO()
    # Figure.savefig without pyplot picks the Agg canvas for PNG: no display needed.
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    atomic_write_bytes(path, buf.getvalue())
    log.debug("wrote %s", path)
    return path


# ----------------------------------------------------------------------------- error plots


def plot_checkpoint_errors(rows: Sequence[Mapping], dropout: float, reference: ReferenceTable | None = None,
                           reference_best: tuple[float, int] | None = None):
    """Test and validation error of every member (thin) and of the ensemble (bold) over the checkpoints.

    `rows` are errors.csv rows; `reference` overlays the reference's test errors for this rate.
    """
    splits = _splits(rows) or ["test"]
    members = _members(rows)
    fig = _figure(5.2 * len(splits) + 2.4, 4.6)
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    colors = _member_colors(len(members))
    for ax, split in zip(axes, splits):
        plotted = []
        for m, color in zip(members, colors):
            e, v = _series(rows, m, split)
            ax.plot(e, v, lw=1.0, alpha=0.75, color=color, marker=_marker(len(e)), ms=3, label=f"model {m}")
            plotted += list(v)
        e, v = _series(rows, "ensemble", split)
        ax.plot(e, v, lw=2.8, color="black", marker=_marker(len(e)), ms=5, label="ensemble", zorder=5)
        plotted += list(v)
        if split == "test" and reference is not None:
            plotted += _draw_reference(ax, reference, label_prefix=f"reference (dropout {dropout:g})")
        if split == "test" and reference_best is not None:
            ax.axhline(reference_best[0], color=_REF_COLOR, lw=1.0, ls=":",
                       label=f"reference's best ensemble {reference_best[0]:.3f}% (epoch {reference_best[1]})")
            plotted.append(reference_best[0])
        ax.set_title(f"{SPLIT_NAMES[split]} error")
        _set_epoch_axis(ax, [r["epoch"] for r in rows],
                        reference.epochs if split == "test" and reference is not None else ())
        ax.set_ylabel(f"{SPLIT_NAMES[split]} error (%)")
        _set_error_scale(ax, plotted)
    fig.suptitle(f"Dropout {dropout:g}: error of each member (thin) and of the ensemble (bold) at every checkpoint")
    _legend_outside(fig, axes)
    return fig


def _draw_reference(ax, ref: ReferenceTable, label_prefix: str = "reference") -> list[float]:
    values = []
    for k, (m, v) in enumerate(sorted(ref.members.items(), key=lambda kv: int(kv[0]))):
        ax.plot(ref.epochs, v, lw=0.7, ls="--", color="0.6", alpha=0.8,
                label=f"{label_prefix} members" if k == 0 else "_nolegend_")
        values += list(v)
    if ref.ensemble is not None:
        ax.plot(ref.epochs, ref.ensemble, lw=2.4, ls="--", color=_REF_COLOR, label=f"{label_prefix} ensemble")
        values += list(ref.ensemble)
    return values


def plot_ensemble_comparison(errors_by_dropout: Mapping[float, Sequence[Mapping]], reference: Mapping | None = None):
    """Every dropout rate's ensemble (solid) and best member (dashed) on one plot, test and validation.

    The best member is chosen on validation at each checkpoint. `reference`
    (from `load_reference_history`) overlays the reference's ensembles and best single models.
    """
    from matplotlib import colormaps

    rates = [d for d, rows in errors_by_dropout.items() if rows]
    splits = sorted({s for d in rates for s in _splits(errors_by_dropout[d])}, key=["test", "val"].index) or ["test"]
    fig = _figure(5.2 * len(splits) + 3.0, 4.8)
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    tab = colormaps["tab10"]
    all_rates = sorted(set(rates) | set((reference or {}).get("dropouts", {})))
    color = {d: tab(k % 10) for k, d in enumerate(all_rates)}
    for ax, split in zip(axes, splits):
        plotted = []
        for d in rates:
            rows = errors_by_dropout[d]
            e, v = _series(rows, "ensemble", split)
            ax.plot(e, v, lw=2.4, color=color[d], marker=_marker(len(e)), ms=4, label=f"dropout {d:g} ensemble")
            be, bv, blabel = _best_member_series(rows, split)
            ax.plot(be, bv, lw=1.2, ls="--", color=color[d], marker=_marker(len(be)), ms=3,
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
        _set_epoch_axis(ax, [r["epoch"] for d in rates for r in errors_by_dropout[d]],
                        ref_epochs if split == "test" else ())
        ax.set_ylabel(f"{SPLIT_NAMES[split]} error (%)")
        _set_error_scale(ax, plotted)
    fig.suptitle("Ensembles (solid) and best single members (dashed) of every dropout rate")
    _legend_outside(fig, axes)
    return fig


def plot_fixed_lr_phase(errors_by_dropout: Mapping[float, Sequence[Mapping]],
                        histories_by_dropout: Mapping[float, Mapping[int, Mapping[str, np.ndarray]]],
                        base_lr: float, reference: Mapping | None = None, context: int | None = None):
    """Error per epoch after a continuation at a fixed learning rate, with the checkpoints before it.

    One row per dropout rate with a fixed-LR phase, test and validation
    columns; x is epochs since the phase began (0 = last epoch at `base_lr`),
    so runs of any length line up with the reference's epochs 256-272.
    `context` is how many epochs before the phase to show (default: twice the phase's length).
    """
    from matplotlib.ticker import MaxNLocator

    phases = {d: p for d in errors_by_dropout
              if (p := find_fixed_lr_phase(histories_by_dropout.get(d, {}), base_lr)) and errors_by_dropout[d]}
    if not phases:
        raise DataError(f"no epoch was trained at a learning rate other than the base rate {base_lr:g}")
    ref = _reference_fixed_lr(reference) if reference else None
    ref_best = reference_best_ensemble(reference) if reference else None
    splits = sorted({s for d in phases for s in _splits(errors_by_dropout[d])}, key=["test", "val"].index)
    fig = _figure(5.0 * len(splits) + 3.0, 3.6 * len(phases) + 0.6)
    axes = fig.subplots(len(phases), len(splits), squeeze=False)
    for row_axes, (d, (start, end, rates)) in zip(axes, phases.items()):
        rows = errors_by_dropout[d]
        back = context if context is not None else max(2 * (end - start), 2)
        members = _members(rows)
        for ax, split in zip(row_axes, splits):
            plotted = []
            for m, color in zip(members, _member_colors(len(members))):
                e, v = _series(rows, m, split)
                keep = e >= start - back
                ax.plot(e[keep] - start, v[keep], lw=1.0, alpha=0.75, color=color,
                        marker=_marker(int(keep.sum())), ms=3, label=f"model {m}")
                plotted += list(v[keep])
            e, v = _series(rows, "ensemble", split)
            keep = e >= start - back
            ax.plot(e[keep] - start, v[keep], lw=2.8, color="black", marker=_marker(int(keep.sum())), ms=5,
                    label="ensemble", zorder=5)
            plotted += list(v[keep])
            rate_txt = ", ".join(f"{r:g}" for r in rates)
            ax.axvspan(0, end - start, color="#f5b041", alpha=0.15, label=f"fixed learning rate {rate_txt}")
            if split == "test" and ref is not None:
                r_start, r_epochs, r_ens, r_best, r_rate = ref
                # The reference at the same epochs since its switch; its longer run-up would squash this run's.
                keep = (r_epochs - r_start >= -back) & (r_epochs - r_start <= end - start)
                src = f"dropout {r_rate:g}" if r_rate is not None else "continued ensemble"
                ax.plot(r_epochs[keep] - r_start, r_ens[keep], lw=2.2, ls="--", color=_REF_COLOR,
                        marker=".", label=f"reference ensemble ({src}, 0 = epoch {r_start})")
                plotted += list(r_ens[keep])
                if r_best is not None:
                    ax.plot(r_epochs[keep] - r_start, r_best[keep], lw=1.0, ls="-.", color=_REF_COLOR,
                            alpha=0.7, label="reference best single model (on test)")
                    plotted += list(r_best[keep])
            if split == "test" and ref_best is not None:
                ax.axhline(ref_best[0], color=_REF_COLOR, lw=1.0, ls=":",
                           label=f"reference's best ensemble {ref_best[0]:.3f}% (epoch {ref_best[1]})")
                plotted.append(ref_best[0])
            ax.set_title(f"dropout {d:g}: {SPLIT_NAMES[split]} error")
            ax.set_xlabel(f"epochs after the switch (0 = epoch {start})")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(f"{SPLIT_NAMES[split]} error (%)")
            _set_error_scale(ax, plotted)
    fig.suptitle("Fixed-learning-rate phase: error per epoch after the continuation (shaded), "
                 "with the checkpoints before it")
    _legend_outside(fig, axes)
    return fig


def plot_training_curves(history: Mapping[int, Mapping[str, np.ndarray]], dropout: float,
                         base_lr: float | None = None):
    """Per member (one row each): loss and error (100 - accuracy, %), training against validation.

    Training values are on augmented images with dropout active, validation
    values in inference mode; a fixed-learning-rate phase is shaded.
    """
    members = sorted(history)
    if not members:
        raise DataError(f"dropout {dropout:g}: no training history to plot")
    phase = find_fixed_lr_phase(history, base_lr) if base_lr is not None else None
    fig = _figure(11.0, 2.5 * len(members) + 0.9)
    axes = fig.subplots(len(members), 2, squeeze=False)
    for (ax_loss, ax_err), i in zip(axes, members):
        cols = history[i]
        ep = cols["epoch"]
        mk = _marker(len(ep))
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
            _set_epoch_axis(ax, ep)
            ax.set_ylabel(ylabel)
            ax.set_title(f"model {i}: {'loss' if key == 'loss' else 'error (100 - accuracy)'}")
            _set_error_scale(ax, np.concatenate([train, val]))
    fig.suptitle(f"Dropout {dropout:g}: training curves of every member")
    _legend_outside(fig, axes)
    return fig


# ----------------------------------------------------------------------------- image plots


def plot_prediction_grid(images: np.ndarray, labels: Sequence[int], preds: Sequence[int], indices: Sequence[int],
                         classes: Sequence[str], title: str, *, ncols: int = 10):
    """A grid of images titled "Pred/Label/#index" (wrong predictions in red).

    `images[k]` is test image number `indices[k]` with true class `labels[k]`
    and predicted class `preds[k]` (class indices into `classes`).
    """
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = _figure(1.15 * ncols + 0.3, 1.3 * nrows + 0.8)
    if n == 0:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize="x-large")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel() if n else []
    for k, ax in enumerate(axes):
        ax.set_axis_off()
        if k >= n:
            continue
        img = np.asarray(images[k]).reshape(28, 28)
        ax.imshow(img, cmap="gray_r", vmin=0, vmax=255 if img.dtype == np.uint8 else 1, interpolation="nearest")
        p, y = int(preds[k]), int(labels[k])
        ax.set_title(f"{classes[p]}/{classes[y]}/#{int(indices[k])}", fontsize=9,
                     color="#c0392b" if p != y else "#1e8449")
    fig.suptitle(title)
    return fig


def plot_misclassified(images: np.ndarray, labels: Sequence[int], preds: Sequence[int], indices: Sequence[int],
                       classes: Sequence[str], *, n_total: int | None = None, what: str = "the ensemble",
                       max_images: int = MAX_GRID_IMAGES):
    """Every misclassified image, one subplot each, titled "Pred/Label/#index" (the reference's grid).

    Arrays are aligned as in `plot_prediction_grid`; `n_total` is the size of
    the evaluated split. More than `max_images` are truncated (and the title says so).
    """
    n = len(images)
    shown = min(n, max_images)
    of = f" of {n_total:,}" if n_total else ""
    head = f"All {n} misclassified test images{of} ({what})" if shown == n else \
        f"First {shown} of {n} misclassified test images{of} ({what})"
    return plot_prediction_grid(images[:shown], labels[:shown], preds[:shown], indices[:shown], classes,
                                f"{head}\ntitle: predicted/true label/#test index")


def plot_correct_samples(images: np.ndarray, labels: Sequence[int], preds: Sequence[int], indices: Sequence[int],
                         classes: Sequence[str], *, what: str = "the ensemble"):
    """A grid of correctly classified images, titled "Pred/Label/#index"."""
    return plot_prediction_grid(images, labels, preds, indices, classes,
                                f"{len(images)} random correctly classified test images ({what})\n"
                                "title: predicted/true label/#test index")


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], normalize: bool = False, title: str | None = None):
    """Confusion matrix, rows true class, columns predicted: counts, or % of each true class.

    Errors (off the diagonal) are coloured on a log scale so that single
    mistakes stand out; the diagonal is a flat tint with its numbers written in.
    """
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.ticker import FuncFormatter

    cm = np.asarray(cm, dtype=float)
    c = len(classes)
    if cm.shape != (c, c):
        raise DataError(f"confusion matrix of shape {cm.shape} for {c} classes")
    if normalize:
        totals = cm.sum(axis=1, keepdims=True)
        values = np.divide(100.0 * cm, totals, out=np.zeros_like(cm), where=totals > 0)
    else:
        values = cm
    diag = np.eye(c, dtype=bool)
    side = max(5.0, 0.42 * c + 2.0)
    fig = _figure(side + 1.4, side)
    ax = fig.add_subplot()
    ax.imshow(np.ma.masked_where(~diag, np.ones_like(values)), cmap=ListedColormap(["#d6eaf8"]),
              interpolation="nearest")
    off = values[~diag & (values > 0)]
    if len(off):
        # vmin below the smallest error, so that a single mistake is tinted, not white.
        norm = LogNorm(vmin=off.min() / 3, vmax=max(off.max(), off.min() * 10))
        im = ax.imshow(np.ma.masked_where(diag | (values <= 0), values), cmap="Reds", norm=norm,
                       interpolation="nearest")
        bar = fig.colorbar(im, ax=ax, shrink=0.8,
                           label="misclassified, % of the true class" if normalize else "misclassified images")
        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        bar.ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "125" else ""))
    ax.set_xticks(range(c), labels=list(classes), fontsize="small" if c > 20 else "medium")
    ax.set_yticks(range(c), labels=list(classes), fontsize="small" if c > 20 else "medium")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if c <= 26:
        for (i, j), v in np.ndenumerate(values):
            if v <= 0:
                continue
            txt = (f"{v:.1f}" if v >= 1 else f"{v:.2f}") if normalize else f"{int(v)}"
            dark = i != j and len(off) and norm(v) > 0.6
            ax.text(j, i, txt, ha="center", va="center", fontsize=7 if c > 12 else 8,
                    fontweight="bold" if i == j else "normal", color="white" if dark else "black")
    errors = int(cm.sum() - np.trace(cm))
    kind = "% of each true class" if normalize else "counts"
    ax.set_title(title or f"Confusion matrix ({kind})\n{errors} errors of {int(cm.sum())}")
    return fig


def plot_samples(images: np.ndarray, labels: Sequence[int], classes: Sequence[str], *, per_class: int = 8,
                 seed: int = 0):
    """`per_class` random images of every class, one row per class, as the model sees them (upright)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fig = _figure(per_class * 0.9 + 0.6, len(classes) * 0.9 + 0.6)
    axes = fig.subplots(len(classes), per_class, squeeze=False)
    for c, row in enumerate(axes):
        idx = np.flatnonzero(labels == c)
        pick = rng.choice(idx, min(per_class, len(idx)), replace=False) if len(idx) else []
        for k, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if k < len(pick):
                ax.imshow(images[pick[k]], cmap="gray", vmin=0, vmax=255)
            else:
                ax.axis("off")
        row[0].set_ylabel(str(classes[c]), rotation=0, labelpad=12, fontsize=12, va="center")
    fig.suptitle(f"{per_class} random training images per class")
    return fig


def plot_class_balance(y_train: Sequence[int], y_val: Sequence[int], y_test: Sequence[int],
                       classes: Sequence[str]):
    """Images per class in the training, validation and test splits (grouped bars)."""
    fig = _figure(max(6.0, 0.5 * len(classes) + 2), 3.6)
    ax = fig.subplots()
    x = np.arange(len(classes))
    splits = [("train", y_train), ("validation", y_val), ("test", y_test)]
    width = 0.8 / len(splits)
    for k, (name, y) in enumerate(splits):
        counts = np.bincount(np.asarray(y, np.int64), minlength=len(classes))[: len(classes)]
        ax.bar(x + (k - 1) * width, counts, width, label=f"{name} ({int(counts.sum()):,})")
    ax.set_xticks(x, [str(c) for c in classes])
    ax.set_xlabel("class")
    ax.set_ylabel("images")
    ax.set_title("Class balance per split")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    return fig


def plot_augmented_samples(image: np.ndarray, augment: AugmentConfig, *, n: int = 39, seed: int = 0,
                           title: str | None = None):
    """One image and `n` random augmentations of it, with the settings that drew them."""
    from .augment import augment_batch

    rng = np.random.default_rng(seed)
    batch = np.repeat(np.asarray(image, dtype=np.uint8)[None], n, axis=0)
    warped = augment_batch(batch, rng, augment)
    if not isinstance(warped, np.ndarray):
        import keras

        warped = keras.ops.convert_to_numpy(warped)
    warped = np.asarray(warped)[..., 0]
    ncols = 10
    nrows = math.ceil((n + 1) / ncols)
    fig = _figure(1.1 * ncols + 0.3, 1.2 * nrows + 1.0)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for k, ax in enumerate(axes):
        ax.set_axis_off()
        if k == 0:
            ax.imshow(image, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title("original", fontsize=9, fontweight="bold")
        elif k <= n:
            ax.imshow(warped[k - 1], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"#{k}", fontsize=8)
    a = augment
    settings = (f"rotation ±{a.rotation_deg:g}°, shift ±{100 * a.shift_frac:g}%, shear ±{a.shear_rad:g} rad, "
                f"zoom {a.zoom_min:g}-{a.zoom_max:g}, fill {a.fill_mode}, {a.interpolation}")
    fig.suptitle((title or f"{n} random augmentations of one training image") + f"\n{settings}")
    return fig


# ----------------------------------------------------------------------------- a whole run


def plot_run(run_dir, out_dir=None, compare_reference=None, data_dir=None, data=None, *, dropout=None,
             images: bool = True, dpi: int = 110) -> dict[str, Path]:
    """Write every plot of a run as PNG under `out_dir` (default RUN/plot_history); returns name -> path.

    See `plot_run_figures` for the arguments and the names.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plot_history"
    figures = plot_run_figures(run_dir, compare_reference, data_dir, data, dropout=dropout, images=images)
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
    skipped with a warning. Predictions come from the ensemble's
    `evaluation/test_epoch_NNN/` tables (`emnist-cnn evaluate`) when present,
    else from its checkpoint weights. `compare_reference` is the reference's plot_history folder.
    """
    run_dir = Path(run_dir)
    saved = load_run_config(run_dir)
    config = TrainConfig.from_dict(saved["config"])
    if dropout is not None and dropout not in config.dropouts:
        raise ConfigError(f"--dropout {dropout:g} is not in this run (it has "
                          f"{', '.join(f'{d:g}' for d in config.dropouts)})")
    reference = load_reference_history(compare_reference) if compare_reference else None
    errors = {d: load_errors(run_dir, d) for d in config.dropouts}
    histories = {d: load_histories(run_dir, d, config.models) for d in config.dropouts}
    if not any(errors.values()):
        raise RunDirError(f"{run_dir}: no evaluated checkpoint yet (no history/errors.csv); train first")
    ref_best = reference_best_ensemble(reference) if reference else None
    figs: dict = {}
    for d, rows in errors.items():
        if rows:
            ref = reference["dropouts"].get(d) if reference else None
            figs[f"errors_dropout_{d:g}"] = plot_checkpoint_errors(rows, d, ref, ref_best)
    figs["ensembles"] = plot_ensemble_comparison(errors, reference)
    if any(find_fixed_lr_phase(h, config.lr) for h in histories.values()):
        figs["fixed_lr"] = plot_fixed_lr_phase(errors, histories, config.lr, reference)
    else:
        log.info("no fixed-learning-rate phase in %s: no fixed_lr plot", run_dir)
    for d, h in histories.items():
        if h:
            figs[f"training_curves_dropout_{d:g}"] = plot_training_curves(h, d, config.lr)
    if images:
        figs.update(_image_figures(run_dir, config, errors, data, data_dir, dropout))
    return figs


def _image_figures(run_dir: Path, config: TrainConfig, errors: Mapping, data, data_dir, dropout) -> dict:
    if data is None:
        from .train import load_run_data

        try:
            _, data = load_run_data(run_dir, data_dir)
        except EmnistCnnError as exc:
            log.warning("skipping the image plots (misclassified, confusion matrix, augmentation): %s", exc)
            return {}
    figs = {}
    d = dropout if dropout is not None else select_dropout(errors)
    epoch = last_epoch(errors.get(d, []))
    preds = _load_or_predict(run_dir, config, data, d, epoch) if epoch is not None else None
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
        cm = _confusion(y, preds, len(data.classes))
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


def _confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def _load_or_predict(run_dir: Path, config: TrainConfig, data, dropout: float, epoch: int) -> np.ndarray | None:
    """The ensemble's test predictions: from `emnist-cnn evaluate`'s misclassified.csv, else from the weights."""
    folder = run_dir / dropout_dirname(dropout) / "evaluation" / f"test_epoch_{epoch:03d}"
    table = folder / "misclassified.csv"
    y = np.asarray(data.y_test)
    if table.is_file():
        preds = y.copy()
        for k, row in enumerate(read_csv_rows(table), start=2):
            try:
                i, label, pred = int(row["index"]), int(row["label"]), int(row["predicted"])
            except (KeyError, TypeError, ValueError) as exc:
                raise RunDirError(f"{table}:{k}: malformed row ({exc})") from exc
            if not 0 <= i < len(y) or y[i] != label or not 0 <= pred < len(data.classes):
                raise RunDirError(f"{table}:{k}: index {i} or label {label} does not match this run's test set")
            preds[i] = pred
        log.info("predictions of dropout %g epoch %d from %s", dropout, epoch, table)
        return preds
    from .train import weights_path

    paths = [weights_path(run_dir, dropout, epoch, i) for i in range(config.models)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        log.warning("skipping misclassified and confusion plots: %s is missing", missing[0])
        return None
    return _predict_ensemble(paths, config, data, dropout).argmax(axis=1)


def _predict_ensemble(paths: Sequence[Path], config: TrainConfig, data, dropout: float) -> np.ndarray:
    from .evaluate import ensemble_probabilities
    from .model import build_model, predict_ensemble

    log.info("predicting the test set with the %d members of dropout %g (no evaluation tables found)",
             len(paths), dropout)
    models = []
    for path in paths:
        models.append(build_model(data.num_classes, dropout, data.mean, data.std, config.model))
        try:
            models[-1].load_weights(path)
        except Exception as exc:  # h5py/keras raise many types for damaged files
            raise RunDirError(f"{path}: cannot load checkpoint weights ({exc})") from exc
    return ensemble_probabilities(predict_ensemble(models, data.x_test))


# ----------------------------------------------------------------------------- command line


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `plot` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "plot", help="write a run's plots (PNG) and a self-contained report.html",
        description="Write RUN/plot_history/*.png and RUN/report.html (plots embedded, opens offline).")
    p.add_argument("--run-dir", type=Path, required=True, help="the run directory to plot (required, no default)")
    p.add_argument("--out-dir", type=Path, default=None, help="folder for the PNGs (default: RUN/plot_history)")
    p.add_argument("--report", type=Path, default=None, help="path of the HTML report (default: RUN/report.html)")
    p.add_argument("--compare-reference", type=Path, default=None, metavar="DIR",
                   help="the reference's plot_history folder (training_history_emnist_*.csv) to overlay, "
                        "e.g. ../shared/reference/plot_history (default: no overlay)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the dataset files, for the image plots (default: the folder recorded in "
                        "RUN/config.json)")
    p.add_argument("--dropout", type=float, default=None, metavar="D",
                   help="ensemble whose misclassified images and confusion matrix are drawn (default: the "
                        "dropout rate with the lowest validation error at its last checkpoint)")
    p.add_argument("--no-images", action="store_true",
                   help="skip the plots that need the data and weights: misclassified, correct, confusion "
                        "matrix, augmentation (default: draw them)")
    p.set_defaults(func=cmd_plot)
    return p


def cmd_plot(args: argparse.Namespace) -> int:
    """`emnist-cnn plot`: write the PNGs and report.html, print the report's path."""
    from .report import write_report

    pngs = plot_run(args.run_dir, args.out_dir, args.compare_reference, args.data_dir,
                    dropout=args.dropout, images=not args.no_images)
    reference = load_reference_history(args.compare_reference) if args.compare_reference else None
    path = write_report(args.run_dir, pngs, reference=reference, out_path=args.report)
    print(path)
    return 0
