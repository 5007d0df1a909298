"""Injected disk faults at every write of an epoch: a clear one-line error, a non-zero exit, the last state
intact, and the same command finishing the run once the disk is fine again."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import trains_a_model
from oracles import arrays, assert_same_arrays
from emnist_cnn.demos import make_tiny_digits, write_mnist_idx
from emnist_cnn.cli import main
from emnist_cnn.io.state import read_state_epoch

# Kept cheap: 1 member, 160 training images in one step per epoch (one shape, so one trace of the train step).
ARGS = ["--dataset", "mnist", "--dropout", "0.2", "--models", "1", "--checkpoint-every", "1", "--batch-size", "160",
        "--val-fraction", "0.2", "--bn-recalibration", "0", "--quiet"]

# What `train --epochs 2` writes to resume a run at epoch 1, in order: every file goes through a temporary
# file, fsync and a rename, so failing the Nth fsync fails the Nth write. The state's bytes are written (by a
# writer thread, during validation) before the checkpoint and the history row, and renamed into place after
# them.
EPOCH_2_WRITES = ["config.json", "invocations.jsonl", "model_0.npz", "002epochs_weights_model_0.weights.h5",
                  "model_0.csv", "test_errors_epoch_002.txt", "misclassified_epoch_002.csv", "errors.csv"]
STATE_PUT_AFTER = EPOCH_2_WRITES.index("model_0.csv") + 1  # epoch 2's state is in place once this write is


def fsynced_file(fd: int) -> str:
    return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))


def no_temporaries(run: Path) -> bool:
    return not list(run.rglob("*.tmp")) and not list(run.rglob(".tmp-*"))


@pytest.fixture(scope="module")
@trains_a_model
def runs(tmp_path_factory):
    """A 1-member run trained to epoch 1 (tiny data), and a copy resumed to epoch 2 without faults."""
    root = tmp_path_factory.mktemp("faults")
    data = write_mnist_idx(root / "data", *make_tiny_digits(n_train=200, n_test=60))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMNIST_CNN_CACHE", str(root / "cache"))
        assert main(["train", "--run-dir", str(root / "epoch1"), "--data-dir", str(data), *ARGS,
                     "--epochs", "1"]) == 0
        shutil.copytree(root / "epoch1", root / "clean")
        written = []
        real_fsync = os.fsync

        def recording_fsync(fd):
            written.append(fsynced_file(fd))
            real_fsync(fd)

        mp.setattr(os, "fsync", recording_fsync)
        assert main(["train", "--run-dir", str(root / "clean"), "--epochs", "2"]) == 0
    return {"epoch1": root / "epoch1", "clean": root / "clean", "written": written}


def test_the_planned_writes_are_every_write_of_the_epoch(runs):
    """If the resume writes other files, or in another order, update EPOCH_2_WRITES."""
    assert len(runs["written"]) == len(EPOCH_2_WRITES), runs["written"]
    for tmp_name, name in zip(runs["written"], EPOCH_2_WRITES):
        assert name in tmp_name, (runs["written"], EPOCH_2_WRITES)


@pytest.mark.parametrize("err, message, nth", [
    *[(errno.ENOSPC, "no space left on device", n) for n in range(1, len(EPOCH_2_WRITES) + 1)],
    (errno.EACCES, "not writable", EPOCH_2_WRITES.index("002epochs_weights_model_0.weights.h5") + 1),
], ids=[*[f"ENOSPC-{name}" for name in EPOCH_2_WRITES], "EACCES-weights"])
def test_disk_fault_at_any_write_is_one_line_and_keeps_the_last_state(runs, tmp_path, monkeypatch, capsys,
                                                                      err, message, nth):
    run = tmp_path / "run"
    shutil.copytree(runs["epoch1"], run)
    state = run / "dropout_0.2" / "state" / "model_0.npz"
    capsys.readouterr()

    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd):
        # From the nth write on, the disk is full (or read-only).
        calls.append(fsynced_file(fd))
        if len(calls) >= nth:
            raise OSError(err, os.strerror(err))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    code = main(["train", "--run-dir", str(run), "--epochs", "2"])
    monkeypatch.setattr(os, "fsync", real_fsync)
    stderr = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in stderr
    [line] = [ln for ln in stderr.splitlines() if ln.startswith("emnist-cnn: error:")]
    assert message in line, line
    # The first failed write stops the command, and its message names that file.
    assert len(calls) == nth, calls
    assert EPOCH_2_WRITES[nth - 1] in calls[-1] and EPOCH_2_WRITES[nth - 1] in line, (calls, line)
    assert no_temporaries(run)
    # config.json is whole: the old one if its own write failed, else the resumed command's.
    assert json.loads((run / "config.json").read_text())["config"]["epochs"] == (1 if nth == 1 else 2)
    # The last state that landed still loads: epoch 1's (kept as .prev while epoch 2's was being written),
    # or epoch 2's once it was written, holding exactly the uninterrupted run's arrays.
    saved = 2 if nth > STATE_PUT_AFTER else 1
    assert read_state_epoch(state) == saved
    reference = (runs["clean"] if saved == 2 else runs["epoch1"]) / "dropout_0.2" / "state" / "model_0.npz"
    kept = state if state.exists() else state.with_name("model_0.prev.npz")
    assert_same_arrays(arrays(kept), arrays(reference), f"state after a fault at write {nth}")

    # Once the disk is fine again, the same command finishes the run, as if nothing had happened.
    assert main(["train", "--run-dir", str(run), "--epochs", "2"]) == 0
    assert read_state_epoch(state) == 2
    clean = runs["clean"] / "dropout_0.2"
    assert_same_arrays(arrays(state), arrays(clean / "state" / "model_0.npz"), "final state")
    hist = (run / "dropout_0.2" / "history" / "model_0.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in hist[1:]] == ["1", "2"]
    for name in ("errors.csv", "test_errors_epoch_001.txt", "test_errors_epoch_002.txt"):
        assert (run / "dropout_0.2" / "history" / name).read_bytes() == (clean / "history" / name).read_bytes()
    assert no_temporaries(run)
