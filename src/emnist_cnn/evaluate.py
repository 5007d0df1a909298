"""Error rates of members and ensembles from softmax outputs, and their tables."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ErrorRate:
    n_errors: int
    n: int

    @property
    def pct(self) -> float:
        return 100.0 * self.n_errors / self.n if self.n else float("nan")

    def __str__(self) -> str:
        if not self.n:
            return "-"
        return f"{self.pct:.3f}% ({self.n_errors}/{self.n})"


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


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)
