"""Two runs' chosen ensembles on the same test images: each error with its interval, and McNemar's exact test.

Each run's ensemble is the one `evaluate` and `export` would pick: the dropout
rate with the lowest validation error at its last checkpoint. Nothing is
loaded or predicted: the runs' records hold every wrong test prediction.
"""

from __future__ import annotations

import numpy as np

from ..core.results import ChosenEnsemble, Comparison
from ..core.selection import find_last_epoch, select_dropout
from ..core.stats import mcnemar_exact
from ..errors import ConfigError, RunDirError
from ..io.rundir import RunDir

__all__ = ["compare_runs"]


def compare_runs(run_a, run_b) -> Comparison:
    """Each run's chosen ensemble on the test split, and McNemar's exact test between them.

    Refuses runs whose test images differ (another dataset or other files).
    """
    runs = [RunDir.of(r) for r in (run_a, run_b)]
    (a, wrong_a), (b, wrong_b) = (_chosen_ensemble(r) for r in runs)
    if a.fingerprint != b.fingerprint:
        raise ConfigError(f"{runs[0]} and {runs[1]} were tested on different images ({a.dataset} "
                          f"{a.fingerprint[:12]} vs {b.dataset} {b.fingerprint[:12]}): a paired test "
                          "needs the same test set")
    flags = []
    for wrong in (wrong_a, wrong_b):
        flags.append(np.zeros(a.error.n, bool))
        flags[-1][wrong] = True
    return Comparison(a, b, mcnemar_exact(*flags))


def _chosen_ensemble(run: RunDir) -> tuple[ChosenEnsemble, list[int]]:
    """The run's ensemble chosen on validation at its last checkpoint, and the indices of its wrong test images."""
    if not run.exists():
        raise RunDirError(f"{run}: not a run directory (no config.json)")
    config = run.read_config()
    record = run.read_record()["data"]
    errors = {d: run.read_errors(d) for d in config.dropouts}
    d = select_dropout(errors)
    if d is None:
        raise RunDirError(f"{run}: no evaluated checkpoint yet; train first")
    epoch = find_last_epoch(errors[d])
    error = next(r.rate for r in errors[d] if r.is_ensemble and r.split == "test" and r.epoch == epoch)
    wrong = [m.index for m in run.read_checkpoint_misclassified(d, epoch, "test")]
    if len(wrong) != error.n_errors:
        raise RunDirError(f"{run.checkpoint_misclassified_path(d, epoch)}: holds {len(wrong)} wrong test images, "
                          f"errors.csv counts {error.n_errors}; the run's per-image record is missing or damaged")
    chosen = ChosenEnsemble(str(run.path), record.get("name", config.dataset), record["fingerprint"], config.recipe,
                            d, epoch, error)
    return chosen, wrong
