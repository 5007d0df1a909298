"""XLA compiles each training program once per trainer and process, and nothing at all when told not to.

No GPU here: tests/fakegpu.py makes a process believe it has one where Keras and the package look, and
XLA_FLAGS' --xla_dump_to counts real XLA compilations (one file set each), not traces. Every command of this
module dumps into one folder, so that they share one warm server (tests/warmstart.py; XLA_FLAGS is read at
start-up), and a command's compilations are the files it adds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import warmstart

import emnist_cnn  # noqa: F401  (selects the backend before keras is imported)
import keras
from emnist_cnn.io.rundir import RunDir

pytestmark = [pytest.mark.trains,
              pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                 reason="fakes TensorFlow's device list; JAX compiles everything with XLA")]

FAKE_GPU = Path(__file__).resolve().parent / "fakegpu.py"
TINY = ["--dataset", "mnist", "--models", "2", "--dropout", "0.3", "--val-fraction", "0.2", "--quiet",
        "--bn-recalibration", "100"]


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla-dump")


def compiled_programs(dump: Path) -> set[Path]:
    # XLA names a module's files module_<id>.<program>.<stage>.txt; one "before optimizations" file each.
    return set(dump.glob("*.before_optimizations.txt"))


def run_with_fake_gpu(argv: list, dump: Path, fake: str = "physical") -> tuple[list[str], str]:
    """`emnist-cnn ARGV` in a warm process with a fake GPU (see tests/fakegpu.py); returns the names of the XLA
    programs it compiled, one per compilation, and its console output."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={dump}", EMNIST_CNN_FAKE_GPU=fake)
    before = compiled_programs(dump)
    done = warmstart.run([sys.executable, str(FAKE_GPU), *map(str, argv)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [p.name.split(".")[1] for p in compiled_programs(dump) - before], done.stdout + done.stderr


def test_each_training_program_is_compiled_once_per_trainer_and_process(tiny_mnist_dir, tmp_path, dump):
    """2 fused members, 480 images in batches of 50: 10 steps an epoch, in calls of 3, 3, 3 and a 1-step tail.
    Epochs 1-2, then a resume to epoch 3 in a new process: each process compiles the trainer's step with XLA
    once. Catches a step loop whose trip count comes from the call's first step (one compilation for every
    new first step: 4 a process and trainer here, 27 for the reference's epochs on a GPU) and a tail that
    compiles a program of its own."""
    run = tmp_path / "run"
    for epochs in (2, 3):
        names, out = run_with_fake_gpu(["train", "--run-dir", run, "--data-dir", tiny_mnist_dir, *TINY,
                                        "--epochs", epochs, "--checkpoint-every", 1, "--batch-size", 50,
                                        "--fused", "--jit-compile", "on", "--steps-per-call", 3], dump)
        training = [n for n in names if "one_step_on_data" not in n]  # Keras' own functions: inference here
        assert len(training) == 1, sorted(names)
        assert "compiling the training step (2 members, 3 steps per call, XLA)..." in out
        assert "compiled the training step in " in out
    assert [int(r["epoch"]) for r in RunDir(run).read_history_rows(0.3, 1)] == [1, 2, 3]


@pytest.mark.parametrize("fake, flags", [("physical", ["--device", "cpu"]), ("visible", ["--jit-compile", "off"])])
def test_xla_off_compiles_nothing_with_xla(tiny_mnist_dir, tmp_path, dump, fake, flags):
    """A GPU machine told `--device cpu`, or `--jit-compile off`: a run (training, BatchNormalization
    recalibration, validation, evaluation) compiles nothing with XLA, and config.json says XLA off. Catches
    inference left to Keras' "auto", which looks at the physical GPUs (13 XLA programs for this run)."""
    import json

    names, out = run_with_fake_gpu(["train", "--run-dir", tmp_path / "run", "--data-dir", tiny_mnist_dir, *TINY,
                                    "--epochs", 1, "--batch-size", 64, *flags], dump, fake)
    assert names == []
    assert json.loads((tmp_path / "run" / "config.json").read_text())["runtime"]["xla"] is False
    assert "XLA off" in out
