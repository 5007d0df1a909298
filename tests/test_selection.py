"""Choices on the validation split against error tables where validation and test disagree (issue 28, #3)."""

from __future__ import annotations

from emnist_cnn.core.metrics import ErrorRate
from emnist_cnn.core.selection import select_best_dropout, select_best_member, select_dropout
from emnist_cnn.io.rundir import ErrorRecord


def rows(epoch: int, val_errors: int, test_errors: int, n_val: int = 2000, n_test: int = 4000) -> list[ErrorRecord]:
    return [ErrorRecord(epoch, "ensemble", "val", ErrorRate(val_errors, n_val)),
            ErrorRecord(epoch, "ensemble", "test", ErrorRate(test_errors, n_test))]


def test_the_dropout_rate_is_chosen_on_validation_at_the_last_checkpoint_never_on_test():
    """Validation ranks 0.3 first; test, the highest and the lowest rate each rank a different one first; at
    earlier checkpoints 0.4 led. Catches a choice on test rows, at an earlier checkpoint, or by position."""
    errors = {
        0.2: rows(16, 30, 12) + rows(32, 20, 9),
        0.3: rows(16, 25, 15) + rows(32, 11, 14),  # best on validation at the last checkpoint
        0.4: rows(16, 5, 30) + rows(32, 19, 6),  # best on test, and on validation at epoch 16
        0.5: rows(16, 40, 40) + rows(32, 25, 30),
    }
    assert select_dropout(errors) == 0.3
    last_val = {d: r[-2].rate for d, r in errors.items()}
    assert select_best_dropout(last_val) == 0.3
    assert select_best_dropout({0.5: ErrorRate(3, 100), 0.2: ErrorRate(1, 100)}) == 0.2  # not the order given
    # Ties go to the first rate given; without validation errors, to the first rate too (never to test).
    assert select_best_dropout({0.4: ErrorRate(2, 100), 0.2: ErrorRate(2, 100)}) == 0.4
    no_val = {d: [r for r in rs if r.split == "test"] for d, rs in errors.items()}
    assert select_dropout({0.5: no_val[0.5], 0.4: no_val[0.4]}) == 0.5


def test_the_best_member_is_chosen_on_validation_and_only_when_every_member_has_one():
    assert select_best_member({0: ErrorRate(9, 100), 1: ErrorRate(4, 100), 2: ErrorRate(6, 100)}) == 1
    assert select_best_member({2: ErrorRate(4, 100), 0: ErrorRate(4, 100)}) == 0  # ties: the lowest index
    assert select_best_member({0: ErrorRate(4, 100), 1: None}) is None
    assert select_best_member({0: ErrorRate(4, 100), 1: ErrorRate(0, 0)}) is None
