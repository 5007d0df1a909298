"""Reproducibility through the command line: the same command twice with the same seed on CPU gives
bit-identical results (every history CSV, errors.csv, the text tables, every checkpoint and the members'
full state), another seed does not, and the run directory records everything needed to rerun it."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_digits, write_mnist_idx
from emnist_cnn.cli import build_parser, config_from_args
from emnist_cnn.config import AugmentConfig, ModelConfig, TrainConfig

ARGS = ["--dataset", "mnist", "--dropout", "0.2", "--models", "2", "--epochs", "2", "--checkpoint-every", "1",
        "--batch-size", "32", "--val-fraction", "0.2", "--bn-recalibration", "100", "--seed", "3", "--quiet"]


def train(run_dir: Path, data: Path, *extra) -> subprocess.CompletedProcess:
    # A module fixture runs outside conftest's per-test cache folder: never the user's ~/.cache.
    env = dict(os.environ, EMNIST_CNN_CACHE=str(data.parent / "decoded-cache"))
    r = subprocess.run([sys.executable, "-m", "emnist_cnn", "train", "--run-dir", str(run_dir), "--data-dir",
                        str(data), *ARGS, *extra], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def files(run: Path) -> dict[str, Path]:
    """Every result file of a run, by path relative to the run (logs of when and how aside)."""
    skip = {"config.json", "invocations.jsonl", ".lock"}
    return {str(p.relative_to(run)): p for p in sorted(run.rglob("*")) if p.is_file() and p.name not in skip}


def arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def without_seconds(path: Path) -> list[list[str]]:
    rows = [line.split(",") for line in path.read_text().splitlines()]
    col = rows[0].index("seconds")
    return [r[:col] + r[col + 1:] for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproducible")
    data = write_mnist_idx(root / "data", *make_tiny_digits(n_train=200, n_test=60))
    for name, extra in (("a", []), ("b", []), ("other_seed", ["--seed", "4"])):
        train(root / name, data, *extra)
    return root, data


def test_same_command_same_seed_is_bit_identical(runs):
    root, _ = runs
    a, b = files(root / "a"), files(root / "b")
    assert sorted(a) == sorted(b)
    kinds = {"history": 0, "errors": 0, "text": 0, "weights": 0, "state": 0}
    for rel, pa in a.items():
        pb = b[rel]
        if rel.endswith(".csv") and "/history/model_" in rel:
            # The wall time of an epoch is the one column that may differ.
            assert without_seconds(pa) == without_seconds(pb), rel
            kinds["history"] += 1
        elif rel.endswith((".csv", ".txt")):
            assert pa.read_bytes() == pb.read_bytes(), rel
            kinds["errors" if rel.endswith("errors.csv") else "text"] += 1
        elif rel.endswith((".npz", ".h5")):
            xa, xb = arrays(pa), arrays(pb)
            assert sorted(xa) == sorted(xb), rel
            for key in xa:
                assert xa[key].dtype == xb[key].dtype and xa[key].tobytes() == xb[key].tobytes(), f"{rel}: {key}"
            kinds["state" if rel.endswith(".npz") else "weights"] += 1
        else:
            raise AssertionError(f"unexpected result file {rel}")
    # 2 members: 2 histories, 1 errors.csv, 2 text tables, 2 x 2 checkpoints, 2 states + 2 previous states.
    assert kinds == {"history": 2, "errors": 1, "text": 2, "weights": 4, "state": 4}


def test_another_seed_gives_other_results(runs):
    root, _ = runs
    a, c = files(root / "a"), files(root / "other_seed")
    rel = "dropout_0.2/state/model_0.npz"
    assert arrays(a[rel])["weight_0"].tobytes() != arrays(c[rel])["weight_0"].tobytes()
    rel = "dropout_0.2/history/model_0.csv"
    assert without_seconds(a[rel]) != without_seconds(c[rel])


def test_the_run_records_everything_needed_to_rerun_it(runs):
    root, data = runs
    saved = json.loads((root / "a" / "config.json").read_text())
    # Settings: every field of the experiment, readable back into the same TrainConfig.
    config = TrainConfig.from_dict(saved["config"])
    assert set(saved["config"]) == set(TrainConfig.__dataclass_fields__)
    assert (config.dataset, config.dropouts, config.models, config.epochs, config.seed) == ("mnist", (0.2,), 2, 2, 3)
    # Data: which files, and a fingerprint of their decoded content (a changed file is caught on resume).
    assert saved["data"]["name"] == "mnist" and len(saved["data"]["fingerprint"]) == 64
    assert Path(saved["data"]["data_dir"]) == data.resolve()
    assert {"n_train", "n_val", "n_test", "mean", "std", "classes"} <= set(saved["data"])
    assert saved["data"]["fingerprint"] == json.loads((root / "b" / "config.json").read_text())["data"]["fingerprint"]
    # Versions of everything that computes.
    assert {"emnist_cnn", "keras", "backend", "tensorflow", "numpy", "python", "platform",
            "cpu_count", "tf_threads"} <= set(saved["versions"])  # threads set the summation order
    # The exact command line, one JSON line per command that trained.
    [record] = [json.loads(line) for line in (root / "a" / "invocations.jsonl").read_text().splitlines()]
    argv = record["argv"][1:]
    assert argv == ["train", "--run-dir", str(root / "a"), "--data-dir", str(data), *ARGS]
    assert record["fixed_lr"] is None and record["epochs"] == 2

    # The recorded config alone rebuilds the command: flags derived from config.json (only where it differs
    # from the defaults that have no flag) parse back into the very same TrainConfig.
    assert config.augment == AugmentConfig() or config.augment == AugmentConfig(enabled=False)
    assert config.model == ModelConfig() and config.lr == TrainConfig().lr
    flags = ["train", "--run-dir", str(root / "rebuilt"), "--dataset", config.dataset,
             "--dropout", *map(str, config.dropouts), "--models", str(config.models), "--epochs", str(config.epochs),
             "--checkpoint-every", str(config.checkpoint_every), "--batch-size", str(config.batch_size),
             "--val-fraction", str(config.val_fraction), "--seed", str(config.seed),
             "--bn-recalibration", str(config.bn_recalibration_images)]
    if config.limit_train is not None:
        flags += ["--limit-train", str(config.limit_train)]
    if not config.augment.enabled:
        flags.append("--no-augment")
    args = build_parser().parse_args(flags)
    assert isinstance(args, argparse.Namespace)
    assert config_from_args(args) == config
