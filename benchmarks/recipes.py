"""Recipes side by side: error against wall time and member-images, with seeds, intervals and paired tests.

    .venv/bin/python -m benchmarks.recipes [--seeds 0 1 2] [--fast-epochs 1 2 4] [--reference-epochs 4 12]
                                           [--json PATH]
    .venv/bin/python -m benchmarks.recipes --ingredients [--seeds 0 1] [--candidates NAME ...]
                                                      # how `fast` was chosen (validation only)

Trains the quick preset (2 members, the recipe's batch size: 128 for the
reference recipe, 64 for fast) on the real MNIST digits in ../shared (9,000
train / 1,000 validation / 10,000 test) once per recipe and seed; the fast
recipe once per schedule length, the reference recipe (a constant rate, so its
first E epochs are a run of E epochs) once to its longest length, with a
checkpoint at each. Prints, per recipe and length: wall time (for a whole run),
a member's training seconds, member-images, members' and ensemble's validation
and test error (mean and spread over seeds, and the pooled 95% Wilson
interval), the training seconds at which each reaches the reference recipe's
final validation error, and McNemar's exact test between the recipes'
ensembles on the same test images (each seed's pair, and their discordant
images pooled over seeds). `--ingredients` trains the candidate recipes (each
ingredient of `fast` added or left out) and ranks them on the validation split;
the test set is not read for that choice.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .harness import dated_results_path, save_results

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"

# Candidates for --ingredients: the fast recipe (schedule+3x+b64) and recipes with some of its ingredients.
CANDIDATES = {
    "reference": dict(),
    "reference+b64": dict(batch_size=64),
    "schedule+3x+b64": dict(lr_scale=3.0, warmup_frac=0.1, decay="linear", batch_size=64),
    "schedule+5x+b64": dict(lr_scale=5.0, warmup_frac=0.1, decay="linear", batch_size=64),
    "schedule": dict(warmup_frac=0.1, decay="linear"),
    "schedule+3x": dict(lr_scale=3.0, warmup_frac=0.1, decay="linear"),
    "schedule+3x+smooth": dict(lr_scale=3.0, warmup_frac=0.1, decay="linear", label_smoothing=0.1),
    "schedule+smooth": dict(warmup_frac=0.1, decay="linear", label_smoothing=0.1),
    "schedule+5x+smooth": dict(lr_scale=5.0, warmup_frac=0.1, decay="linear", label_smoothing=0.1),
    "schedule+5x": dict(lr_scale=5.0, warmup_frac=0.1, decay="linear"),
}


def train_one(recipe: str, seed: int, lengths: list[int], root: Path) -> dict[int, dict]:
    """One quick-preset run of `recipe` to the longest of `lengths`, with a checkpoint at each; per length, its
    figures (wall time only for the whole run)."""
    from emnist_cnn.config import RECIPES, DataSource, TrainConfig, TrainOptions
    from emnist_cnn.training.train import train_and_evaluate
    from emnist_cnn.io.rundir import RunDir

    # A scheduled recipe's rates depend on the run's length: its shorter lengths are runs of their own.
    assert len(lengths) == 1 or not RECIPES[recipe].scheduled, (recipe, lengths)
    epochs = max(lengths)
    config = TrainConfig.from_preset("quick", dataset="mnist", recipe=recipe, seed=seed, epochs=epochs,
                                     checkpoint_every=math.gcd(*lengths))
    run_dir = root / f"{recipe}-e{epochs}-s{seed}"
    t0 = time.perf_counter()
    train_and_evaluate(config, run_dir, DataSource(data_dir=MNIST), TrainOptions(verbose=0))
    wall = time.perf_counter() - t0
    print(f"trained {recipe}, {epochs} epochs, seed {seed}: {wall:.1f} s", file=sys.stderr, flush=True)
    run = RunDir(run_dir)
    d = config.dropouts[0]
    hist = run.read_histories(d, config.models)
    n_train = int(run.read_record()["data"]["n_train"])
    # Per epoch: members' mean validation error (%) and the cumulative training seconds (mean over members).
    val = [float(100 * (1 - np.mean([h["val_accuracy"][e] for h in hist.values()]))) for e in range(epochs)]
    seconds = np.cumsum(np.mean([h["seconds"] for h in hist.values()], axis=0)).tolist()
    errors = run.read_errors(d)
    out = {}
    for length in lengths:
        by = {(r.model, r.split): r.rate for r in errors if r.epoch == length}
        out[length] = {
            "recipe": recipe, "seed": seed, "epochs": length, "batch_size": config.batch_size,
            "wall_s": wall if length == epochs else None,
            "member_images": length * n_train * config.models,
            "val_error_by_epoch": val[:length], "seconds_by_epoch": seconds[:length],
            "ensemble": {s: [by[("ensemble", s)].n_errors, by[("ensemble", s)].n] for s in ("val", "test")},
            "members": {s: [[r.n_errors, r.n] for (m, sp), r in sorted(by.items()) if m != "ensemble" and sp == s]
                        for s in ("val", "test")},
            "test_wrong": sorted(m.index for m in run.read_checkpoint_misclassified(d, length, "test")),
        }
    return out


def summarise(runs: list[dict], split: str) -> dict:
    """Mean, spread (sd over seeds) and pooled Wilson interval of the ensembles' error on `split`."""
    from emnist_cnn.core.stats import wilson_interval

    pct = [100 * r["ensemble"][split][0] / r["ensemble"][split][1] for r in runs]
    k, n = sum(r["ensemble"][split][0] for r in runs), sum(r["ensemble"][split][1] for r in runs)
    low, high = wilson_interval(k, n)
    member = [100 * e / n_ for r in runs for e, n_ in r["members"][split]]
    return {"mean": statistics.mean(pct), "sd": statistics.stdev(pct) if len(pct) > 1 else 0.0,
            "pooled_ci": [100 * low, 100 * high], "member_mean": statistics.mean(member)}


def paired(a: list[dict], b: list[dict], n_test: int) -> dict:
    """McNemar's exact test between two recipes' ensembles on the test images, per seed and pooled."""
    from scipy import stats

    from emnist_cnn.core.stats import mcnemar_exact

    per_seed, only_a, only_b = [], 0, 0
    for ra, rb in zip(a, b):
        flags = [np.zeros(n_test, bool), np.zeros(n_test, bool)]
        flags[0][ra["test_wrong"]] = True
        flags[1][rb["test_wrong"]] = True
        res = mcnemar_exact(*flags)
        per_seed.append({"seed": ra["seed"], "only_a": res.only_a, "only_b": res.only_b, "p": res.p_value})
        only_a, only_b = only_a + res.only_a, only_b + res.only_b
    pooled = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"per_seed": per_seed, "only_a": only_a, "only_b": only_b, "pooled_p": float(pooled)}


def time_to_reach(runs: list[dict], target: float) -> float | None:
    """Training seconds at which the seeds' mean members' validation error first is <= target (mean time)."""
    val = np.mean([r["val_error_by_epoch"] for r in runs], axis=0)
    seconds = np.mean([r["seconds_by_epoch"] for r in runs], axis=0)
    hit = np.flatnonzero(val <= target + 1e-9)
    return float(seconds[hit[0]]) if len(hit) else None


def run_ingredients(args, root: Path) -> dict:
    from emnist_cnn.config import RECIPES, Recipe

    for name, fields in CANDIDATES.items():
        RECIPES.setdefault(name, Recipe(**fields))
    names = args.candidates or list(CANDIDATES)
    results = {name: [train_one(name, s, [4], root)[4] for s in args.seeds] for name in names}
    print(f"\nIngredients (quick preset, seeds {args.seeds}; validation split only, 1,000 images)")
    print(f"{'candidate':<22}{'member val %':>14}{'ensemble val errors':>22}{'wall s':>9}")
    for name, runs in sorted(results.items(), key=lambda kv: statistics.mean(
            r["val_error_by_epoch"][-1] for r in kv[1])):
        mv = statistics.mean(r["val_error_by_epoch"][-1] for r in runs)
        ev = sum(r["ensemble"]["val"][0] for r in runs)
        print(f"{name:<22}{mv:>14.3f}{ev:>22d}{statistics.mean(r['wall_s'] for r in runs):>9.1f}")
    return {"ingredients": {k: [{kk: vv for kk, vv in r.items() if kk != "test_wrong"} for r in v]
                            for k, v in results.items()}}


def run_comparison(args, root: Path) -> dict:
    lengths = sorted(set(args.reference_epochs))
    by_seed = [train_one("reference", s, lengths, root) for s in args.seeds]
    refs = {e: [r[e] for r in by_seed] for e in lengths}
    fast = {e: [train_one("fast", s, [e], root)[e] for s in args.seeds] for e in args.fast_epochs}
    ref = refs[lengths[-1]]  # the longest reference run: its final validation error is the target
    n_test = ref[0]["ensemble"]["test"][1]
    target = statistics.mean(r["val_error_by_epoch"][-1] for r in ref)
    ref_wall = statistics.mean(r["wall_s"] for r in ref)
    ref_train = statistics.mean(r["seconds_by_epoch"][-1] for r in ref)
    rows = [("reference", e, runs) for e, runs in refs.items()] + [("fast", e, runs) for e, runs in
                                                                   sorted(fast.items())]
    out = {"seeds": args.seeds, "target_val_error": target, "rows": []}
    print(f"\nRecipes on real MNIST (quick preset: 2 members, 9,000 train images, batch: reference "
          f"{ref[0]['batch_size']}, fast {next(iter(fast.values()))[0]['batch_size']}; epochs as shown), "
          f"seeds {args.seeds}")
    print("errors in %: mean over seeds (sd); test ensembles also with the 95% Wilson interval of the pooled "
          "count; wall s for whole runs only (a shorter reference length is a checkpoint of the longest run); "
          "member s: a member's training seconds to that epoch")
    print(f"{'recipe':<10}{'epochs':>7}{'wall s':>8}{'member s':>9}{'member-img':>11}{'val member':>12}"
          f"{'val ens':>14}{'test member':>13}{'test ens':>16}{'test ens 95% CI':>17}{'reach ref val':>15}")
    for name, e, runs in rows:
        v, t = summarise(runs, "val"), summarise(runs, "test")
        reach = time_to_reach(runs, target)
        walls = [r["wall_s"] for r in runs if r["wall_s"] is not None]
        wall = statistics.mean(walls) if walls else None
        train_s = statistics.mean(r["seconds_by_epoch"][-1] for r in runs)
        cells = [f"{name:<10}", f"{e:>7}", f"{'-' if wall is None else f'{wall:.1f}':>8}", f"{train_s:>9.1f}",
                 f"{runs[0]['member_images']:>11,}",
                 f"{v['member_mean']:>12.3f}", f"{v['mean']:>8.3f} ({v['sd']:.2f})",
                 f"{t['member_mean']:>13.3f}", f"{t['mean']:>10.3f} ({t['sd']:.2f})",
                 f"{t['pooled_ci'][0]:>10.3f}-{t['pooled_ci'][1]:.3f}",
                 f"{'-' if reach is None else f'{reach:.1f} s':>15}"]
        print("".join(cells))
        out["rows"].append({"recipe": name, "epochs": e, "wall_s": wall, "member_train_s": train_s, "val": v,
                            "test": t,
                            "reach_target_train_s": reach,
                            "runs": [{k: x for k, x in r.items() if k != "test_wrong"} for r in runs]})
    print(f"\nreference recipe's final member validation error: {target:.3f}% after {ref_train:.1f} s of "
          f"training ({ref_wall:.1f} s wall with evaluation)")
    levels = sorted({*args.levels, round(target, 3)}, reverse=True)
    print("training seconds until the members' validation error (mean over seeds) first reaches a level:")
    print(f"{'recipe':<10}{'epochs':>7}" + "".join(f"{f'<= {x:.3f}%':>12}" for x in levels))
    for name, e, runs in rows:
        cells = [time_to_reach(runs, x) for x in levels]
        print(f"{name:<10}{e:>7}" + "".join(f"{'-' if c is None else f'{c:.1f}':>12}" for c in cells))
    out["levels"] = {f"{name}-{e}": {str(x): time_to_reach(runs, x) for x in levels} for name, e, runs in rows}
    for e, runs in sorted(fast.items()):
        for length, ref_runs in refs.items():
            level = statistics.mean(r["val_error_by_epoch"][-1] for r in ref_runs)
            ref_s = statistics.mean(r["seconds_by_epoch"][-1] for r in ref_runs)
            reach = time_to_reach(runs, level)
            share = None if reach is None else reach / ref_s
            print(f"fast, {e}-epoch schedule: reaches the {length}-epoch reference's {level:.3f}% after "
                  f"{'never' if reach is None else f'{reach:.1f} s, {share:.2f}x its {ref_s:.1f} s'}")
            out.setdefault("reach_share", {})[f"fast{e}-reference{length}"] = share
        for length, ref_runs in refs.items():
            p = paired(runs, ref_runs, n_test)
            ratio = statistics.mean(100 * r["ensemble"]["test"][0] / n_test for r in runs) / \
                statistics.mean(100 * r["ensemble"]["test"][0] / n_test for r in ref_runs)
            print(f"  test ensembles, fast ({e} epochs) vs reference ({length}): error ratio {ratio:.2f}; "
                  f"{p['only_a']} images wrong only in fast, {p['only_b']} only in reference over {len(runs)} "
                  f"seeds, McNemar exact p = {p['pooled_p']:.3g} (per seed: "
                  + ", ".join(f"{s['only_a']}/{s['only_b']} p={s['p']:.2g}" for s in p["per_seed"]) + ")")
            out.setdefault("paired", {})[f"fast{e}-reference{length}"] = {**p, "error_ratio": ratio}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds (default: 0 1 2)")
    p.add_argument("--fast-epochs", type=int, nargs="+", default=[1, 2, 4],
                   help="schedule lengths of the fast recipe, in epochs (default: 1 2 4)")
    p.add_argument("--reference-epochs", type=int, nargs="+", default=[4],
                   help="lengths of the reference recipe's runs, checkpoints of one run per seed: 4 is the quick "
                        "preset's budget, more asks how long the reference recipe needs for what the fast one "
                        "reaches; the longest sets the validation error to reach, and its wall time includes "
                        "the shorter lengths' checkpoint evaluations (default: 4)")
    p.add_argument("--levels", type=float, nargs="+", default=[3.0, 2.5, 2.0, 1.75],
                   help="validation errors (%%) whose time to reach is reported, besides the reference "
                        "recipe's final one (default: 3 2.5 2 1.75)")
    p.add_argument("--ingredients", action="store_true",
                   help="rank candidate recipes on the validation split instead (default: off)")
    p.add_argument("--candidates", nargs="+", choices=sorted(CANDIDATES), default=None,
                   help="with --ingredients: only these candidates (default: all)")
    p.add_argument("--json", type=Path, default=None,
                   help="write the figures here "
                        "(default: benchmarks/results/DATE-recipes[-ingredients]-ISA-Ncores.json)")
    args = p.parse_args(argv)
    if not MNIST.is_dir():
        print(f"recipes.py: error: the real MNIST digits are not at {MNIST}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="emnist-cnn-recipes-") as tmp:
        os.environ.setdefault("EMNIST_CNN_CACHE", str(Path(tmp) / "cache"))
        result = run_ingredients(args, Path(tmp)) if args.ingredients else run_comparison(args, Path(tmp))
    path = save_results(args.json or dated_results_path("recipes-ingredients" if args.ingredients else "recipes"),
                        result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
