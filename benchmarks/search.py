"""What successive halving saves: `emnist-cnn tune` with ASHA against the same sampled trials all trained to the
end, on the real MNIST digits in ../shared, per search seed.

    .venv/bin/python -m benchmarks.search [--seeds 0 1 2] [--trials 8] [--max-epochs 4] [--grace-epochs 1]
                                          [--reduction-factor 2] [--json PATH]

For each seed: one search with ASHA and one with every trial run to --max-epochs (--grace-epochs equal to
--max-epochs: the scheduler never stops a trial), the same sampled configurations in both (the same search
seed), one trial at a time. Prints member-epochs and wall time of each, the share ASHA used, whether both found
the same best trial, and, when not, McNemar's exact test between the two winners on the same validation
images. Only validation is read: the test split is never loaded by a trial. Writes the figures to a dated JSON
file under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .harness import dated_results_path, save_results

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
SPACE = """
dropout = [0.2, 0.3, 0.4, 0.5]
lr = {loguniform = [2e-4, 5e-3]}
[augment]
rotation_deg = {uniform = [0.0, 15.0]}
"""


def run_one(folder: Path, seed: int, args, grace: int) -> dict:
    from emnist_cnn.config import DataSource, SearchSettings, TrainConfig, TrainOptions
    from emnist_cnn.io.search_space import read_search_space
    from emnist_cnn.training.search import run_search

    base = TrainConfig.from_preset("quick", dataset="mnist")
    folder.mkdir(parents=True)
    (folder / "space.toml").write_text(SPACE)
    space = read_search_space(folder / "space.toml", base)
    settings = SearchSettings(trials=args.trials, max_epochs=args.max_epochs, grace_epochs=grace,
                              reduction_factor=args.reduction_factor, seed=seed)
    start = time.perf_counter()
    board = run_search(base, space, folder / "search", settings, DataSource(data_dir=MNIST, download=False),
                       TrainOptions(verbose=0))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "member_epochs": sum(t.epochs for t in board.trials), "board": board}


def compare_winners(a, b) -> dict:
    from emnist_cnn.core.stats import mcnemar_exact

    same = a.best.name == b.best.name
    n = a.best.val.n
    flags = [np.isin(np.arange(n), sorted(t.wrong)) for t in (a.best, b.best)]
    test = mcnemar_exact(*flags)
    return {"same_best_trial": same, "asha_best": a.best.name, "full_best": b.best.name,
            "asha_best_val_errors": a.best.val.n_errors, "full_best_val_errors": b.best.val.n_errors,
            "val_n": n, "only_asha_best": test.only_a, "only_full_best": test.only_b, "p_value": test.p_value}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search seeds (default: 0 1 2)")
    p.add_argument("--trials", type=int, default=8, help="sampled configurations per search (default: 8)")
    p.add_argument("--max-epochs", type=int, default=4, help="a trial's full length (default: 4)")
    p.add_argument("--grace-epochs", type=int, default=1, help="ASHA's grace period (default: 1)")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA's reduction factor (default: 2)")
    p.add_argument("--json", type=Path, default=None, help="where to write the figures (default: a dated file)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("emnist_cnn").setLevel(logging.INFO)
    if not MNIST.is_dir():
        print(f"benchmarks.search: the MNIST digits are not at {MNIST}", file=sys.stderr)
        return 2
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
            asha = run_one(Path(tmp) / "asha", seed, args, args.grace_epochs)
            full = run_one(Path(tmp) / "full", seed, args, args.max_epochs)
        row = {"seed": seed, "asha_member_epochs": asha["member_epochs"], "full_member_epochs": full["member_epochs"],
               "asha_wall_s": round(asha["wall_s"], 1), "full_wall_s": round(full["wall_s"], 1),
               "member_epoch_share": asha["member_epochs"] / full["member_epochs"],
               "wall_share": asha["wall_s"] / full["wall_s"], **compare_winners(asha["board"], full["board"])}
        rows.append(row)
        print(f"seed {seed}: ASHA {row['asha_member_epochs']} member-epochs in {row['asha_wall_s']} s, all trials to "
              f"the end {row['full_member_epochs']} in {row['full_wall_s']} s (share {row['member_epoch_share']:.2f} "
              f"of member-epochs, {row['wall_share']:.2f} of wall time); best trial: ASHA {row['asha_best']} "
              f"({row['asha_best_val_errors']}/{row['val_n']}), full {row['full_best']} "
              f"({row['full_best_val_errors']}/{row['val_n']}), McNemar p = {row['p_value']:.3g}")
    shares = [r["member_epoch_share"] for r in rows]
    walls = [r["wall_share"] for r in rows]
    summary = {"member_epoch_share_mean": statistics.mean(shares),
               "member_epoch_share_sd": statistics.stdev(shares) if len(shares) > 1 else 0.0,
               "wall_share_mean": statistics.mean(walls),
               "wall_share_sd": statistics.stdev(walls) if len(walls) > 1 else 0.0,
               "same_or_indistinguishable_best": sum(r["same_best_trial"] or r["p_value"] >= 0.05 for r in rows)}
    print(f"ASHA used {summary['member_epoch_share_mean']:.2f} (sd {summary['member_epoch_share_sd']:.2f}) of the "
          f"member-epochs and {summary['wall_share_mean']:.2f} (sd {summary['wall_share_sd']:.2f}) of the wall "
          f"time; its best was the same trial or not distinguishable on validation in "
          f"{summary['same_or_indistinguishable_best']} of {len(rows)} seeds")
    out = args.json or dated_results_path("search")
    save_results(out, {"benchmark": "search", "settings": {k: v for k, v in vars(args).items() if k != "json"}
                       | {"space": SPACE}, "seeds": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
