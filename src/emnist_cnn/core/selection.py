"""The choices made on the validation split: best member, best-k members, best dropout rate, and the
checkpoint a run's results are shown at.

The test split never drives a choice. Ties go to the first candidate in the
order given (the lowest member index, the first dropout rate of the run).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Hashable, Protocol, TypeVar

from .metrics import ErrorRate

__all__ = ["rank_on_validation", "select_best", "select_best_member", "select_best_dropout", "find_last_epoch",
           "select_dropout"]

K = TypeVar("K", bound=Hashable)


class ErrorRow(Protocol):
    """A row of a run's error table (io.rundir.ErrorRecord): one model's error on one split at one epoch."""

    epoch: int
    split: str
    rate: ErrorRate

    @property
    def is_ensemble(self) -> bool: ...


def rank_on_validation(val: Mapping[K, ErrorRate | None]) -> list[K]:
    """Candidates ordered by validation error, lowest first; ties and missing errors keep their order."""
    order = {k: i for i, k in enumerate(val)}
    return sorted(val, key=lambda k: (_score(val[k]), order[k]))


def select_best(val: Mapping[K, ErrorRate | None]) -> K | None:
    """The candidate with the lowest validation error (first on ties), None when there is none."""
    ranked = rank_on_validation(val)
    return ranked[0] if ranked else None


def select_best_member(val: Mapping[int, ErrorRate | None]) -> int | None:
    """The member with the lowest validation error; None unless every member has one."""
    if not val or any(v is None or not v.n for v in val.values()):
        return None
    return select_best(dict(sorted(val.items())))


def select_best_dropout(val: Mapping[float, ErrorRate | None]) -> float | None:
    """The dropout rate whose model (ensemble or chosen member) has the lowest validation error.

    Without any validation error: the first rate given, so that the test split
    is never used to choose.
    """
    return select_best(val)


def find_last_epoch(rows: Sequence[ErrorRow]) -> int | None:
    """The last evaluated checkpoint: the last epoch with an ensemble row, or None."""
    epochs = [r.epoch for r in rows if r.is_ensemble]
    return max(epochs) if epochs else None


def select_dropout(errors_by_dropout: Mapping[float, Sequence[ErrorRow]]) -> float | None:
    """The dropout rate whose ensemble has the lowest validation error at its last evaluated checkpoint.

    Without a validation split, the first rate with a checkpoint: the test
    split is never used to choose.
    """
    val = {}
    for d, rows in errors_by_dropout.items():
        e = find_last_epoch(rows)
        if e is not None:
            val[d] = next((r.rate for r in rows if r.epoch == e and r.is_ensemble and r.split == "val"), None)
    return select_best_dropout(val)


def _score(err: ErrorRate | None) -> float:
    return err.pct if err is not None and err.n else math.inf
