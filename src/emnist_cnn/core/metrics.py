"""Error rates, losses and confusion counts from softmax outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .stats import CONFIDENCE, wilson_interval

__all__ = ["ErrorRate", "Mistake", "evaluate_error", "evaluate_loss", "ensemble_probabilities", "confusion_matrix",
           "find_mistakes"]


@dataclass(frozen=True)
class ErrorRate:
    """n_errors wrong of n images; `str()` is the one cell format every table uses:
    "0.160% (64/40000; 95% CI 0.125-0.204%)", the interval Wilson's."""

    n_errors: int
    n: int

    @property
    def pct(self) -> float:
        return 100.0 * self.n_errors / self.n if self.n else float("nan")

    @property
    def interval_pct(self) -> tuple[float, float]:
        """The 95% Wilson interval of the error rate, in percent."""
        low, high = wilson_interval(self.n_errors, self.n)
        return 100.0 * low, 100.0 * high

    def __str__(self) -> str:
        if not self.n:
            return "-"
        low, high = self.interval_pct
        return f"{self.pct:.3f}% ({self.n_errors}/{self.n}; {CONFIDENCE:.0%} CI {low:.3f}-{high:.3f}%)"


def evaluate_error(probabilities: np.ndarray, labels: np.ndarray) -> ErrorRate:
    """Top-1 error of (N, C) probabilities against integer labels."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return ErrorRate(0, 0)
    wrong = int(np.count_nonzero(np.argmax(probabilities, axis=1) != labels))
    return ErrorRate(wrong, int(len(labels)))


def ensemble_probabilities(member_probabilities: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """The ensemble's prediction: the mean of the members' softmax outputs."""
    return np.mean(np.stack(list(member_probabilities)), axis=0)


def evaluate_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy, clipped as Keras clips it."""
    if len(labels) == 0:
        return float("nan")
    p = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    return float(-np.mean(np.log(p)))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts: rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(predictions)), 1)
    return cm


class Mistake(NamedTuple):
    """One wrong prediction: the image's index in its split, its label, the predicted class, and the
    probability given to that class (nan where a file made before it was recorded lacks it)."""

    index: int
    label: int
    predicted: int
    confidence: float


def find_mistakes(probabilities: np.ndarray, labels: np.ndarray) -> list[Mistake]:
    """Every wrong top-1 prediction of (N, C) probabilities, in image order."""
    labels = np.asarray(labels)
    pred = np.argmax(probabilities, axis=1)
    return [Mistake(int(i), int(labels[i]), int(pred[i]), float(probabilities[i, pred[i]]))
            for i in np.flatnonzero(pred != labels)]
