"""`make bench`: benchmarks/bench.py --quick runs end to end and reports every figure."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _fused_api_available() -> bool:
    from emnist_cnn.core import model

    return hasattr(model, "build_fused_trainer")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


def test_quick_bench_reports_every_key(quick_run):
    stdout, figures = quick_run
    keys = list(_bench_module().KEYS)
    assert len(keys) >= 20
    # Figures that may be missing for a stated reason, and only then.
    may_be_null = set()
    if importlib.util.find_spec("torch") is None:
        may_be_null |= {"train_torch_img_s", "keras_vs_torch"}
    if not _fused_api_available():
        may_be_null |= {"ensemble_fused_img_s", "fused_speedup"}
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
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
        assert figures["units"][key]
    for key, target in figures["targets"].items():
        assert key in keys and target["met"] in (True, False, None)
    assert figures["quick"] is True
    assert figures["env"]["cores"] >= 1 and figures["env"]["tensorflow"]
    # The environment is printed above the table.
    assert stdout.lstrip().startswith("cpu:")


def test_only_selects_keys_and_dependencies():
    bench = _bench_module()
    groups, wanted = bench.selected_groups("peak_fraction,aug_img_s")
    assert wanted == ["peak_fraction", "aug_img_s"]
    assert groups == ["aug", "train", "flops"]  # gflops_achieved needs train_noaug_img_s
    with pytest.raises(SystemExit, match="unknown key"):
        bench.selected_groups("no_such_key")


def test_every_flag_states_its_default():
    import argparse

    parser = _bench_module().build_parser()
    shown = [a for a in parser._actions if a.help not in (None, argparse.SUPPRESS) and a.dest != "help"]
    assert {"quick", "only", "json", "reps", "members", "predict_images"} <= {a.dest for a in shown}
    for action in shown:
        assert "(default: " in action.help, f"{action.option_strings}: help does not state its default"
    proc = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--only KEY[,KEY]" in proc.stdout


def test_reference_augmentation_matches_keras_208_geometry():
    """The re-implemented Keras 2.0.8 path: identity parameters give the image back, and a pure
    shift moves the content by the drawn number of pixels (order-0 resampling)."""
    import numpy as np

    from emnist_cnn.config import AugmentConfig

    bench = _bench_module()
    img = np.zeros((1, 28, 28), np.float32)
    img[0, 10:18, 12:14] = 1.0
    still = AugmentConfig(rotation_deg=0, shift_frac=0, shear_rad=0, zoom_min=1, zoom_max=1)
    out = bench.k208_random_transform(img, np.random.RandomState(0), still)
    np.testing.assert_array_equal(out, img)

    batch = (np.random.default_rng(0).random((4, 28, 28)) > 0.8).astype(np.uint8) * 255
    aug = bench.reference_augment_batch(batch, np.random.RandomState(0), AugmentConfig())
    assert aug.shape == (4, 28, 28, 1) and aug.dtype == np.float32
    assert 0.0 <= aug.min() and aug.max() <= 1.0
