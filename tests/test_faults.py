"""Injected disk faults: a clear one-line error, a non-zero exit, and the previous checkpoint intact."""

import errno
import os

import pytest

import emnist_cnn.io.files as rundir
from emnist_cnn.cli import main
from emnist_cnn.io.state import read_state_epoch

ARGS = ["--dataset", "mnist", "--dropout", "0.2", "--models", "1", "--checkpoint-every", "1", "--batch-size", "64",
        "--val-fraction", "0.2", "--bn-recalibration", "200", "--quiet"]


@pytest.mark.parametrize("err, message", [
    (errno.ENOSPC, "no space left on device"),
    (errno.EACCES, "not writable"),
])
def test_disk_fault_mid_run_is_one_line_and_keeps_the_last_state(tmp_path, tiny_mnist_dir, monkeypatch, capsys,
                                                                  err, message):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--data-dir", str(tiny_mnist_dir), *ARGS, "--epochs", "1"]) == 0
    state = run / "dropout_0.2" / "state" / "model_0.npz"
    assert read_state_epoch(state) == 1
    capsys.readouterr()

    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd):
        # config.json and invocations.jsonl are written; then the disk fills up (or turns
        # read-only) while epoch 2's checkpoint is being written.
        calls.append(fd)
        if len(calls) > 2:
            raise OSError(err, os.strerror(err))
        real_fsync(fd)

    monkeypatch.setattr(rundir.os, "fsync", failing_fsync)
    code = main(["train", "--run-dir", str(run), "--epochs", "2"])
    monkeypatch.setattr(rundir.os, "fsync", real_fsync)
    stderr = capsys.readouterr().err
    assert code == 1
    [line] = [ln for ln in stderr.splitlines() if ln.startswith("emnist-cnn: error:")]
    assert message in line and "Traceback" not in stderr and len(calls) == 3
    assert "002epochs_weights_model_0" in line  # the epoch-2 checkpoint, after the epoch was trained
    # Nothing half-written is left, and the epoch-1 state still loads.
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".tmp-*"))
    assert read_state_epoch(state) == 1
    # Once the disk is fine again, the same command finishes the run.
    assert main(["train", "--run-dir", str(run), "--epochs", "2"]) == 0
    assert read_state_epoch(state) == 2
    hist = (run / "dropout_0.2" / "history" / "model_0.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in hist[1:]] == ["1", "2"]
