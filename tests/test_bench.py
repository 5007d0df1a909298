"""`make bench`: python -m benchmarks.bench --quick runs end to end and reports every figure."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import trains_a_model

from benchmarks import bench
from benchmarks.baselines import k208_random_transform, reference_augment_batch
from benchmarks.harness import RESULTS_DIR, dated_results_path
from benchmarks.keys import KEYS, TARGETS

ROOT = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, "-m", "benchmarks.bench"]  # run from the repository root, as `make bench` does


def _fused_api_available() -> bool:
    from emnist_cnn.core import trainer

    return hasattr(trainer, "build_device_trainer")


@pytest.fixture(scope="module")
@trains_a_model
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run([*BENCH, "--quick", "--json", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


def test_quick_bench_reports_every_key(quick_run):
    stdout, figures = quick_run
    keys = list(KEYS)
    assert len(keys) >= 20
    # Figures that may be missing for a stated reason, and only then.
    may_be_null = set()
    if importlib.util.find_spec("torch") is None:
        may_be_null |= {"train_torch_img_s", "keras_vs_torch"}
    if not _fused_api_available():
        may_be_null |= {"ensemble_fused_img_s", "fused_speedup"}
    # A difference of two medians, floored at 0 when the loop measures no slower than the bare step (seen in
    # --quick's few rounds): 0 is a measurement there, not a missing one.
    may_be_zero = {"host_ms_per_step"}
    # The figures table only: the targets section below it repeats some keys.
    figures_part = stdout.split("\ntargets:")[0]
    table = {line.split()[0]: line for line in figures_part.splitlines() if line.strip()}
    for key in keys:
        assert key in figures, f"{key} missing from the JSON"
        assert key in table, f"{key} missing from the printed table"
        value = figures[key]
        note = figures["notes"][key]
        if value is None:
            assert key in may_be_null, f"{key} is null: {note}"
            assert note and "null" in table[key], f"{key}: null without a note in the table"
        else:
            assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
            assert value > 0 or (value == 0 and key in may_be_zero), (key, value)
        assert figures["units"][key] == KEYS[key][0]
    # Every target is judged on its figure: met exactly when the figure passes the threshold, and the
    # printed verdict says the same.
    assert set(figures["targets"]) == set(TARGETS)
    printed_targets = stdout.split("\ntargets:")[1]
    for key, target in figures["targets"].items():
        op, threshold, _ = TARGETS[key]
        assert target["target"] == f"{op} {threshold:g}"
        value = figures[key]
        expected = None if value is None else value >= threshold if op == ">=" else value < threshold
        assert target["met"] is expected, (key, value, target)
        verdict = {True: "met", False: "NOT met", None: "not measured"}[expected]
        assert re.search(rf"^  {key}\s+{re.escape(target['target'])}\s+{verdict}\s", printed_targets, re.M), key
    # Derived figures follow from the measured ones: 61.4 MFLOP per training image, counted here from the
    # architecture (3 x forward, 2 FLOP per multiply-add of the convolutions and dense layers).
    macs = (26 * 26 * 32 * 9 * 1 + 24 * 24 * 32 * 9 * 32 + 10 * 10 * 64 * 9 * 32 + 8 * 8 * 64 * 9 * 64
            + 1024 * 512 + 512 * 10)
    assert macs == 10_235_008
    assert figures["gflops_achieved"] == pytest.approx(figures["train_noaug_img_s"] * 3 * 2 * macs / 1e9, rel=1e-6)
    assert figures["peak_fraction"] == pytest.approx(figures["gflops_achieved"] / figures["gflops_peak"], rel=1e-9)
    assert figures["quick"] is True
    assert figures["env"]["cpu_count"] == os.cpu_count() and figures["env"]["cores"] >= 1
    import tensorflow as tf

    assert figures["env"]["tensorflow"] == tf.__version__
    # The environment is printed above the table.
    assert stdout.lstrip().startswith("cpu:")


def test_only_selects_keys_and_dependencies():
    groups, wanted = bench.selected_groups("peak_fraction,aug_img_s")
    assert wanted == ["peak_fraction", "aug_img_s"]
    assert groups == ["aug", "train", "flops"]  # gflops_achieved needs train_noaug_img_s
    with pytest.raises(SystemExit, match="unknown key"):
        bench.selected_groups("no_such_key")


def test_every_flag_states_its_default():
    import argparse

    parser = bench.build_parser()
    shown = [a for a in parser._actions if a.help not in (None, argparse.SUPPRESS) and a.dest != "help"]
    assert {"quick", "only", "json", "reps", "members", "predict_images"} <= {a.dest for a in shown}
    for action in shown:
        assert "(default: " in action.help, f"{action.option_strings}: help does not state its default"
    proc = subprocess.run([*BENCH, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "--only KEY[,KEY]" in proc.stdout


def test_reference_augmentation_matches_keras_208_geometry():
    """The re-implemented Keras 2.0.8 path: identity parameters give the image back, and a pure
    shift moves the content by the drawn number of pixels (order-0 resampling)."""
    import numpy as np

    from emnist_cnn.config import AugmentConfig

    img = np.zeros((1, 28, 28), np.float32)
    img[0, 10:18, 12:14] = 1.0
    still = AugmentConfig(rotation_deg=0, shift_frac=0, shear_rad=0, zoom_min=1, zoom_max=1)
    out = k208_random_transform(img, np.random.RandomState(0), still)
    np.testing.assert_array_equal(out, img)

    # A pure shift: Keras 2.0.8 draws theta, then tx (rows, height_shift_range), ty (columns), shear, zoom;
    # its matrix maps output pixel (r, c) to input (r + tx, c + ty), resampled to the nearest pixel.
    shift_only = AugmentConfig(rotation_deg=0, shift_frac=0.2, shear_rad=0, zoom_min=1, zoom_max=1)
    rows, cols = np.mgrid[0:28, 0:28]
    moved = set()
    for seed in range(6):
        draws = np.random.RandomState(seed)
        draws.uniform(-0.0, 0.0)  # theta
        tx, ty = draws.uniform(-0.2, 0.2) * 28, draws.uniform(-0.2, 0.2) * 28
        source_r = np.clip(np.rint(rows + tx).astype(int), 0, 27)  # fill_mode "nearest" repeats the edge
        source_c = np.clip(np.rint(cols + ty).astype(int), 0, 27)
        want = img[0][source_r, source_c]
        out = k208_random_transform(img, np.random.RandomState(seed), shift_only)
        np.testing.assert_array_equal(out[0], want, err_msg=f"seed {seed}: shift ({tx:.2f}, {ty:.2f})")
        moved.add((int(np.rint(tx)), int(np.rint(ty))))
    assert len(moved) >= 4  # the seeds drew different shifts, of several pixels
    assert max(abs(v) for shift in moved for v in shift) >= 3

    batch = (np.random.default_rng(0).random((4, 28, 28)) > 0.8).astype(np.uint8) * 255
    aug = reference_augment_batch(batch, np.random.RandomState(0), AugmentConfig())
    assert aug.shape == (4, 28, 28, 1) and aug.dtype == np.float32
    assert 0.0 <= aug.min() and aug.max() <= 1.0


def test_results_are_kept_in_dated_files_named_after_the_benchmark_and_machine():
    """`make bench` keeps its figures in benchmarks/results/DATE-bench-ISA-Ncores.json (the files the README
    quotes). Catches: a name without the day (a later run overwrites the figures a document quotes) or the
    machine kind (an AVX2 run overwrites an AVX-512 one), a folder elsewhere."""
    import time

    path = dated_results_path("bench")
    assert path.parent == RESULTS_DIR == ROOT / "benchmarks" / "results"
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert re.fullmatch(rf"{day}-bench-(avx512f|avx2|sse)-{len(os.sched_getaffinity(0))}cores\.json", path.name)
    # The committed results files parse and name the figures they hold.
    for kept in RESULTS_DIR.glob("*-bench-*.json"):
        figures = json.loads(kept.read_text())
        assert set(figures["units"]) <= set(KEYS) and figures["quick"] is False, kept.name
