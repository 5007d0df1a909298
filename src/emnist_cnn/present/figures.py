"""What every figure shares: a pyplot-free Figure, error and epoch axes, colours, legends, PNG writing.

Error axes are in percent on a log scale zoomed on the data (a short run's
30% and the reference's 0.16% fit on one axis, and 0.16% stays apart from
0.18%); they fall back to linear from 0 when an error is exactly 0.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.selection import select_best
from ..io.files import atomic_write_bytes
from ..io.rundir import ErrorRecord

__all__ = ["SPLIT_NAMES", "MEMBER_CMAP", "REF_COLOR", "new_figure", "get_error_series", "list_member_names",
           "list_split_names", "get_best_member_series", "set_error_scale", "set_epoch_axis", "choose_line_marker",
           "pick_member_colors", "legend_outside", "write_figure"]

log = logging.getLogger(__name__)

SPLIT_NAMES = {"test": "test", "val": "validation"}
MEMBER_CMAP = "viridis"
REF_COLOR = "#c0392b"


def new_figure(width: float, height: float):
    """A Figure with constrained layout, made without pyplot (no global state, no display)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def get_error_series(rows: Sequence[ErrorRecord], model: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, error %) of one member or "ensemble" on one split, by epoch."""
    pts = sorted((r.epoch, r.rate.pct) for r in rows
                 if r.model == model and r.split == split)
    return np.array([p[0] for p in pts], dtype=int), np.array([p[1] for p in pts], dtype=float)


def list_member_names(rows: Sequence[ErrorRecord]) -> list[str]:
    """The member names ("0", "1", ...) in the records, in index order."""
    return sorted({r.model for r in rows if r.model != "ensemble"}, key=int)


def list_split_names(rows: Sequence[ErrorRecord]) -> list[str]:
    """The splits in the records, test first."""
    present = {r.split for r in rows}
    return [s for s in ("test", "val") if s in present]


def get_best_member_series(rows: Sequence[ErrorRecord], split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Per checkpoint, the `split` error of the member with the lowest validation error.

    Without validation rows the member is the best on `split` itself, and the label says so.
    """
    by = {(r.epoch, r.model, r.split): r.rate for r in rows}
    members = list_member_names(rows)
    has_val = any(s == "val" for _, _, s in by)
    chooser = "val" if has_val else split
    epochs, values = [], []
    for e in sorted({e for e, _, _ in by}):
        best = select_best({m: by[e, m, chooser] for m in members if (e, m, chooser) in by})
        if best is not None and (e, best, split) in by:
            epochs.append(e)
            values.append(by[e, best, split].pct)
    label = "best member (chosen on val)" if has_val else f"best member (on {split}: no val split)"
    return np.array(epochs, dtype=int), np.array(values), label


def set_error_scale(ax, values: Sequence[float]) -> None:
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


def set_epoch_axis(ax, run_epochs: Sequence[int] = (), reference_epochs: Sequence[int] = ()) -> None:
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


def choose_line_marker(n_points: int) -> str | None:
    """Markers on sparse lines: a one-checkpoint line would be invisible without them."""
    return "o" if n_points <= 24 else None


def pick_member_colors(n: int):
    """`n` distinct colours for members, from MEMBER_CMAP."""
    from matplotlib import colormaps

    cmap = colormaps[MEMBER_CMAP]
    return [cmap(0.1 + 0.75 * k / max(n - 1, 1)) for k in range(n)]


def legend_outside(fig, ax_or_axes) -> None:
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
