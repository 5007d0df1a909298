"""Two runs' chosen ensembles on the same test images: each error with its interval, and McNemar's exact test.

Each run's ensemble is the one `evaluate` and `export` would pick: the dropout
rate with the lowest validation error at its last checkpoint. Nothing is
loaded or predicted: the runs' records hold every wrong test prediction.
"""

from __future__ import annotations

import numpy as np

from ..core.metrics import ErrorRate
from ..core.selection import find_last_epoch, select_dropout
from ..core.stats import mcnemar_exact
from ..errors import ConfigError, RunDirError
from ..io.rundir import RunDir

__all__ = ["compare_runs"]


def compare_runs(run_a, run_b) -> dict:
    """{"n", "runs": [A, B], "paired": {only_a_wrong, only_b_wrong, p_value}} on the test split.

    A and B: run, dataset, recipe, dropout, epoch, error (ErrorRate). Refuses runs
    whose test images differ (another dataset or other files).
    """
    runs = [RunDir.of(r) for r in (run_a, run_b)]
    chosen = [_chosen_ensemble(r) for r in runs]
    a, b = chosen
    if a["fingerprint"] != b["fingerprint"]:
        raise ConfigError(f"{runs[0]} and {runs[1]} were tested on different images ({a['dataset']} "
                          f"{a['fingerprint'][:12]} vs {b['dataset']} {b['fingerprint'][:12]}): a paired test "
                          "needs the same test set")
    n = a["error"].n
    flags = []
    for c in chosen:
        wrong = np.zeros(n, bool)
        wrong[c.pop("wrong")] = True
        flags.append(wrong)
    test = mcnemar_exact(*flags)
    return {"n": n, "runs": chosen,
            "paired": {"only_a_wrong": test.only_a, "only_b_wrong": test.only_b, "p_value": test.p_value}}


def _chosen_ensemble(run: RunDir) -> dict:
    """The run's ensemble chosen on validation at its last checkpoint, with its wrong test images."""
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
    wrong = [i for i, _, _ in run.read_checkpoint_misclassified(d, epoch, "test")]
    if len(wrong) != error.n_errors:
        raise RunDirError(f"{run.checkpoint_misclassified_path(d, epoch)}: holds {len(wrong)} wrong test images, "
                          f"errors.csv counts {error.n_errors}; the run's per-image record is missing or damaged")
    return {"run": str(run.path), "dataset": record.get("name", config.dataset), "fingerprint": record["fingerprint"],
            "recipe": config.recipe, "dropout": d, "epoch": epoch, "error": ErrorRate(error.n_errors, error.n),
            "wrong": wrong}
