"""The reference's published tables (plot_history/training_history_emnist_*.csv), read for overlays."""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError

__all__ = ["ReferenceTable", "load_reference_history", "read_reference_table", "reference_best_ensemble",
           "reference_fixed_lr"]

log = logging.getLogger(__name__)


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


def reference_fixed_lr(reference: Mapping):
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
