"""Throughput, efficiency and memory figures for emnist_cnn, measured in one process run.

    make bench [ARGS="--quick | --only KEY[,KEY] | --json PATH"]
    .venv/bin/python -m benchmarks.bench [--quick] [--only KEY[,KEY]] [--json PATH]

Every figure is the median of several timed repetitions after an untimed
warm-up. Figures that form a ratio are timed in alternating repetitions (A, B,
A, B, ...) in the same process, so the ratio holds on a noisy shared machine
even when the absolute numbers move. Only the peak resident memory is measured
in a subprocess of its own (a process's peak cannot be reset). The data is
synthetic, of EMNIST Digits' shape; no download happens.

Prints the environment, then one aligned table (key, value, unit, note) and the
targets met or missed, and writes the figures as one JSON object (figures at
the top level, plus "units", "notes", "targets", "env") to a dated file under
benchmarks/results/. Progress goes to stderr. The groups live in
benchmarks/figures/, the harness in benchmarks/harness.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from emnist_cnn.demos import synthetic_images

from .figures import GROUPS
from .harness import (NUM_CLASSES, QUICK, Results, Sizes, dated_results_path, environment, print_environment,
                      print_table, save_results, target_status)
from .keys import DEPENDS, GROUP_ORDER, KEYS, TARGETS

log = logging.getLogger("bench")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="keys: " + ", ".join(KEYS))
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and 2 repetitions, for a smoke test; figures are not meaningful (default: off)")
    p.add_argument("--only", metavar="KEY[,KEY]", default=None,
                   help="measure only these keys (and the figures they are computed from) (default: all keys)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write the figures as one JSON object to PATH (default: "
                        "benchmarks/results/DATE-bench-ISA-Ncores.json; none with --quick or --only)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per figure, median reported (default: 5, 2 with --quick; "
                        "3 for the ensemble, predict and .mat figures)")
    p.add_argument("--members", type=int, default=None,
                   help="ensemble members for the ensemble and predict figures (default: 10, 2 with --quick)")
    p.add_argument("--predict-images", type=int, default=None,
                   help="images predicted per repetition by the whole ensemble (default: 2000, 400 with --quick)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: off)")
    return p


def selected_groups(only: str | None) -> tuple[list[str], list[str] | None]:
    if not only:
        return list(GROUP_ORDER), None
    wanted = [k.strip() for k in only.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in KEYS]
    if unknown:
        raise SystemExit(f"--only: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(KEYS)}")
    groups = {KEYS[k][1] for k in wanted}
    for g in list(groups):
        groups.update(DEPENDS.get(g, []))
    return [g for g in GROUP_ORDER if g in groups], wanted


def build_sizes(args: argparse.Namespace) -> Sizes:
    sizes = Sizes(**QUICK) if args.quick else Sizes()
    if args.reps is not None:
        sizes.reps = sizes.ens_reps = sizes.predict_reps = sizes.load_reps = max(1, args.reps)
    if args.members is not None:
        sizes.members = max(1, args.members)
    if args.predict_images is not None:
        sizes.predict_images = max(1, args.predict_images)
    sizes.predict_batch = min(sizes.predict_batch, sizes.predict_images)
    return sizes


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    groups, wanted = selected_groups(args.only)
    sizes = build_sizes(args)
    env = environment()
    print_environment(env)
    res = Results()
    tmp = tempfile.mkdtemp(prefix="emnist-bench-")
    ctx: dict = {"tmp": tmp}
    try:
        if set(groups) - {"load", "memory"}:
            ctx["pool"] = synthetic_images(sizes.pool, 0)
            ctx["labels"] = np.random.default_rng(0).integers(0, NUM_CLASSES, sizes.pool).astype(np.int64)
            ctx["test_pool"] = synthetic_images(sizes.predict_images, 1)
        for g in groups:
            t0 = time.perf_counter()
            log.info("[%s]", g)
            GROUPS[g](res, sizes, ctx)
            log.info("[%s] done in %.1f s", g, time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - start
    env["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print()
    print_table(res)
    print(f"\n{'quick ' if args.quick else ''}run: {elapsed:.0f} s; load avg at end {env['loadavg_end']}")
    if wanted:
        log.debug("asked for %s; also shown: the figures they are computed from", ", ".join(wanted))
    path = args.json or (None if args.quick or wanted else dated_results_path("bench"))
    if path is not None:
        out = dict(res.figures)
        out["units"] = {k: KEYS[k][0] for k in res.figures}
        out["notes"] = dict(res.notes)
        out["targets"] = {k: target_status(k, res.figures[k]) for k in TARGETS if k in res.figures}
        out["env"] = env
        out["quick"] = args.quick
        out["elapsed_s"] = elapsed
        save_results(Path(path), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
