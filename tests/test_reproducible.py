"""Reproducibility through the command line: the same settings twice with the same seed on CPU give
bit-identical results (every history CSV, errors.csv, the text tables, every checkpoint and the members'
full state), another seed does not, and the run directory records everything needed to rerun it: the second
run is started from nothing but the first one's config.json."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import warmstart

from conftest import trains_a_model
from oracles import arrays, assert_same_run, result_files, without_seconds
from emnist_cnn.demos import make_tiny_digits, write_mnist_idx
from emnist_cnn.cli import build_parser, config_from_args
from emnist_cnn.config import AugmentConfig, ModelConfig, TrainConfig

ARGS = ["--dataset", "mnist", "--dropout", "0.2", "--models", "2", "--epochs", "2", "--checkpoint-every", "1",
        "--batch-size", "32", "--val-fraction", "0.2", "--bn-recalibration", "100", "--seed", "3", "--quiet"]


def cli(argv: list[str], cache: Path, warm: bool = True) -> subprocess.CompletedProcess:
    """The CLI in a process of its own: warm (tests/warmstart.py), or one started by Python from nothing."""
    # A module fixture runs outside conftest's per-test cache folder: never the user's ~/.cache.
    env = dict(os.environ, EMNIST_CNN_CACHE=str(cache))
    r = (warmstart.run if warm else subprocess.run)([sys.executable, "-m", "emnist_cnn", *argv], capture_output=True,
                                                    text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def train(run_dir: Path, data: Path, *extra, warm: bool = True) -> subprocess.CompletedProcess:
    return cli(["train", "--run-dir", str(run_dir), "--data-dir", str(data), *ARGS, *extra],
               data.parent / "decoded-cache", warm)


def command_from_record(run: Path, new_run: Path) -> list[str]:
    """A `train` command for `new_run` built from nothing but RUN/config.json: its settings and data folder."""
    saved = json.loads((run / "config.json").read_text())
    config = TrainConfig.from_dict(saved["config"])
    # Settings without a flag must be at their defaults for a command line to rebuild the run.
    assert config.lr == TrainConfig().lr and config.augment in (AugmentConfig(), AugmentConfig(enabled=False))
    assert dataclasses.replace(config.model, precision="float32") == ModelConfig()
    flags = ["train", "--run-dir", str(new_run), "--data-dir", saved["data"]["data_dir"], "--dataset", config.dataset,
             "--dropout", *map(str, config.dropouts), "--models", str(config.models), "--epochs", str(config.epochs),
             "--checkpoint-every", str(config.checkpoint_every), "--batch-size", str(config.batch_size),
             "--val-fraction", str(config.val_fraction), "--seed", str(config.seed),
             "--bn-recalibration", str(config.bn_recalibration_images), "--precision", config.model.precision,
             "--quiet"]
    if config.limit_train is not None:
        flags += ["--limit-train", str(config.limit_train)]
    if not config.augment.enabled:
        flags.append("--no-augment")
    return flags


@pytest.fixture(scope="module")
@trains_a_model
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproducible")
    data = write_mnist_idx(root / "data", *make_tiny_digits(n_train=200, n_test=60))
    # a in a process Python starts, b in a warm one: equal bits also show that a warm process trains as a new one.
    train(root / "a", data, warm=False)
    cli(command_from_record(root / "a", root / "b"), root / "decoded-cache")  # b: a rerun from a's record
    train(root / "other_seed", data, "--seed", "4", "--models", "1")  # model 0 is all the next test compares
    return root, data


@pytest.mark.cpu_facts
def test_same_command_same_seed_is_bit_identical(runs):
    root, _ = runs
    kinds = assert_same_run(root / "a", root / "b")
    # 2 members: 2 histories, 1 errors.csv, 2 ensemble mistake tables and 2 text tables (one per checkpoint),
    # 2 x 2 checkpoints, 2 states + 2 previous states.
    assert kinds == {"history": 2, "errors": 1, "misclassified": 2, "text": 2, "weights": 4, "state": 4}


def test_another_seed_gives_other_results(runs):
    root, _ = runs
    a, c = result_files(root / "a"), result_files(root / "other_seed")
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

    # The recorded command line, parsed again for a new run directory (an existing one would lend it its saved
    # settings), is this very experiment.
    def parsed(command: list[str]) -> TrainConfig:
        at = command.index("--run-dir") + 1
        fresh = [*command[:at], str(root / "never-created"), *command[at + 1:]]
        return config_from_args(build_parser().parse_args(fresh))

    assert parsed(argv) == config
    # The config alone rebuilt the command that made run b (bit-identical to a: see the first test).
    rebuilt = command_from_record(root / "a", root / "b")
    assert parsed(rebuilt) == config
    saved_b = json.loads((root / "b" / "config.json").read_text())
    assert saved_b["config"] == saved["config"]
    same_data = ("name", "fingerprint", "data_dir", "n_train", "n_val", "n_test", "classes", "mean", "std")
    assert {k: saved_b["data"][k] for k in same_data} == {k: saved["data"][k] for k in same_data}
    [record_b] = [json.loads(line) for line in (root / "b" / "invocations.jsonl").read_text().splitlines()]
    assert record_b["argv"][1:] == rebuilt


def test_recorded_versions_are_the_ones_that_ran(runs):
    """config.json's versions are those of the process that trained, not placeholders."""
    import platform

    import keras
    import tensorflow as tf

    import emnist_cnn

    root, _ = runs
    versions = json.loads((root / "a" / "config.json").read_text())["versions"]
    assert versions["emnist_cnn"] == emnist_cnn.__version__ and versions["keras"] == keras.__version__
    assert versions["tensorflow"] == tf.__version__ and versions["numpy"] == np.__version__
    assert versions["backend"] == keras.backend.backend() and versions["python"] == platform.python_version()
    assert versions["cpu_count"] == os.cpu_count()
    assert versions["tf_threads"] == {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                                      "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}


@pytest.mark.trains
def test_config_records_the_onednn_and_determinism_variables(tmp_path, monkeypatch):
    """They change TensorFlow's summation order (README, "to the bit"): a run started with them says so."""
    data = write_mnist_idx(tmp_path / "data", *make_tiny_digits(n_train=200, n_test=60))
    run = tmp_path / "run"
    env = dict(os.environ, EMNIST_CNN_CACHE=str(tmp_path / "cache"), TF_ENABLE_ONEDNN_OPTS="0",
               TF_DETERMINISTIC_OPS="1")
    r = subprocess.run([sys.executable, "-m", "emnist_cnn", "train", "--run-dir", str(run), "--data-dir", str(data),
                        "--dataset", "mnist", "--dropout", "0.2", "--models", "1", "--epochs", "1", "--batch-size",
                        "160", "--val-fraction", "0.2", "--bn-recalibration", "0", "--quiet"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    recorded = json.loads((run / "config.json").read_text())["versions"]["env"]
    assert recorded["TF_ENABLE_ONEDNN_OPTS"] == "0" and recorded["TF_DETERMINISTIC_OPS"] == "1"
    # Unset, they are not recorded (an absent variable is TensorFlow's default, not an empty string).
    from emnist_cnn.io.rundir import collect_versions

    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    monkeypatch.delenv("TF_DETERMINISTIC_OPS", raising=False)
    assert not {"TF_ENABLE_ONEDNN_OPTS", "TF_DETERMINISTIC_OPS"} & set(collect_versions(threads=False)["env"])
