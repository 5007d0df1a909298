"""Image plots: predictions titled "Pred/Label/#index", confusion matrices, samples, class balance, augmentation.

Every `plot_*` function returns a `matplotlib.figure.Figure` built without pyplot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..config import IMAGE_SIDE, AugmentConfig
from ..errors import DataError
from .figures import new_figure

__all__ = ["MAX_GRID_IMAGES", "plot_prediction_grid", "plot_misclassified", "plot_correct_samples",
           "plot_confusion_matrix", "plot_samples", "plot_class_balance", "plot_augmented_samples"]

# The grid of misclassified images gets one subplot each; beyond this matplotlib
# becomes slow and the PNG unwieldy, so an early, bad checkpoint is truncated.
MAX_GRID_IMAGES = 400


def plot_prediction_grid(images: np.ndarray, labels: Sequence[int], preds: Sequence[int], indices: Sequence[int],
                         classes: Sequence[str], title: str, *, ncols: int = 10):
    """A grid of images titled "Pred/Label/#index" (wrong predictions in red).

    `images[k]` is test image number `indices[k]` with true class `labels[k]`
    and predicted class `preds[k]` (class indices into `classes`).
    """
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = new_figure(1.15 * ncols + 0.3, 1.3 * nrows + 0.8)
    if n == 0:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize="x-large")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel() if n else []
    for k, ax in enumerate(axes):
        ax.set_axis_off()
        if k >= n:
            continue
        img = np.asarray(images[k]).reshape(IMAGE_SIDE, IMAGE_SIDE)
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
    fig = new_figure(side + 1.4, side)
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
    fig = new_figure(per_class * 0.9 + 0.6, len(classes) * 0.9 + 0.6)
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
    fig = new_figure(max(6.0, 0.5 * len(classes) + 2), 3.6)
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
    from ..core.augment import augment_batch

    rng = np.random.default_rng(seed)
    batch = np.repeat(np.asarray(image, dtype=np.uint8)[None], n, axis=0)
    warped = augment_batch(batch, rng, augment)
    if not isinstance(warped, np.ndarray):
        import keras

        warped = keras.ops.convert_to_numpy(warped)
    warped = np.asarray(warped)[..., 0]
    ncols = 10
    nrows = math.ceil((n + 1) / ncols)
    fig = new_figure(1.1 * ncols + 0.3, 1.2 * nrows + 1.0)
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
