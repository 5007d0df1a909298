"""RunDir: the one owner of a run directory's layout and of typed reads of its records."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from oracles import read_csv
from emnist_cnn.config import DataSource, TrainConfig, TrainOptions
from emnist_cnn.core.metrics import ErrorRate
from emnist_cnn.errors import ConfigError, RunDirError
from emnist_cnn.io.rundir import ErrorRecord, RunDir, collect_versions


def test_layout_is_the_documented_one(tmp_path):
    run = RunDir(tmp_path)
    rel = {
        "config": run.config_path, "invocations": run.invocations_path,
        "weights": run.weights_path(0.2, 16, 3), "state": run.state_path(0.25, 0),
        "history": run.history_path(0.5, 9), "errors": run.errors_path(0.3),
        "text": run.text_table_path(0.2, 256), "evaluation": run.evaluation_dir(0.2, "val", 4, tta=8),
        "plots": run.plots_dir, "report": run.report_path, "export": run.export_dir,
    }
    assert {k: str(p.relative_to(tmp_path)) for k, p in rel.items()} == {
        "config": "config.json", "invocations": "invocations.jsonl",
        "weights": "dropout_0.2/weights/016epochs_weights_model_3.weights.h5",
        "state": "dropout_0.25/state/model_0.npz", "history": "dropout_0.5/history/model_9.csv",
        "errors": "dropout_0.3/history/errors.csv", "text": "dropout_0.2/history/test_errors_epoch_256.txt",
        "evaluation": "dropout_0.2/evaluation/val_epoch_004_tta8", "plots": "plot_history",
        "report": "report.html", "export": "export_json_h5",
    }


def test_error_tables_round_trip_typed_and_sorted(tmp_path):
    run = RunDir(tmp_path)
    records = [ErrorRecord(2, "0", "test", ErrorRate(3, 200)), ErrorRecord(1, "ensemble", "val", ErrorRate(1, 120)),
               ErrorRecord(2, "ensemble", "test", ErrorRate(2, 200))]
    run.write_errors(0.2, records)
    rows = read_csv(run.errors_path(0.2))
    assert [r["epoch"] for r in rows] == ["1", "2", "2"]  # by epoch, stable within one
    assert rows[1] == {"epoch": "2", "model": "0", "split": "test", "error_pct": "1.5000", "n_errors": "3", "n": "200"}
    back = run.read_errors(0.2)
    assert sorted(back, key=lambda r: (r.epoch, r.model)) == sorted(records, key=lambda r: (r.epoch, r.model))
    assert run.evaluated_epochs(0.2) == {1, 2}
    # The percentage is recomputed from the counts, never parsed back from text.
    assert back[1].rate.pct == 100 * 3 / 200
    run.write_text_table(0.2, 2, [r for r in records if r.epoch == 2])
    assert run.text_table_path(0.2, 2).read_text() == "epoch: 2 test error on ensemble: 1.0\n1.5\n"


def test_a_malformed_error_row_names_the_file_and_line(tmp_path):
    run = RunDir(tmp_path)
    run.errors_path(0.2).parent.mkdir(parents=True)
    run.errors_path(0.2).write_text("epoch,model,split,error_pct,n_errors,n\n1,0,val,1.0,one,100\n")
    with pytest.raises(RunDirError, match=r"errors\.csv:2: malformed row"):
        run.read_errors(0.2)


def test_histories_are_typed_columns(tmp_path):
    run = RunDir(tmp_path)
    row = {"epoch": 1, "loss": "0.5", "accuracy": "0.9", "val_loss": "nan", "val_accuracy": "nan",
           "learning_rate": "0.001", "seconds": "1.50"}
    run.write_history_rows(0.2, 1, [row, {**row, "epoch": 2, "loss": "0.25"}])
    hist = run.read_histories(0.2, 3)
    assert list(hist) == [1]  # members without a history are left out
    assert hist[1]["epoch"].tolist() == [1.0, 2.0] and hist[1]["loss"].tolist() == [0.5, 0.25]
    run.write_history_rows(0.2, 0, [{**row, "loss": "x"}])
    with pytest.raises(RunDirError, match="model_0.csv: malformed value"):
        run.read_histories(0.2, 1)


def test_checkpoints_complete_only_with_every_member(tmp_path):
    run = RunDir(tmp_path)
    for epoch, index in ((1, 0), (1, 1), (2, 0), (3, 1), (3, 0)):
        path = run.weights_path(0.2, epoch, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    (run.weights_path(0.2, 4, 0).parent / "notes.txt").write_text("not a checkpoint")
    assert run.checkpoints(0.2) == {1: {0, 1}, 2: {0}, 3: {0, 1}}
    assert run.complete_checkpoints(0.2, 2) == [1, 3]
    assert run.has_all_weights(0.2, 3, 2) and not run.has_all_weights(0.2, 2, 2)
    assert run.complete_checkpoints(0.5, 2) == []


def test_config_record_reads_and_refusals(tmp_path):
    run = RunDir(tmp_path)
    assert not run.exists()
    with pytest.raises(RunDirError, match="not found; is .* a run directory"):
        run.read_config()
    config = TrainConfig(dataset="mnist", models=3)
    run.write_record({"config": config.to_dict(), "data": {"fingerprint": "abc"}})
    assert run.exists() and run.read_config() == config
    run.write_record({"config": config.to_dict(), "data": "?"})
    with pytest.raises(RunDirError, match="no data record"):
        run.read_record()
    run.config_path.write_text("{not json")
    with pytest.raises(RunDirError, match="unreadable run configuration"):
        run.read_config()
    # A recorded setting out of range is a configuration error (exit 2) that names the file.
    run.write_record({"config": {**config.to_dict(), "models": 0}, "data": {"fingerprint": "abc"}})
    with pytest.raises(ConfigError, match=r"config\.json: --models must be >= 1"):
        run.read_config()


def test_invocations_append_and_skip_damaged_lines(tmp_path):
    run = RunDir(tmp_path)
    run.append_invocation({"argv": ["a"], "epochs": 1})
    run.append_invocation({"argv": ["b"], "epochs": 2})
    with open(run.invocations_path, "a") as f:
        f.write("{half a line\n")
    assert [r["argv"] for r in run.read_invocations()] == [["a"], ["b"]]


def test_stale_temporaries_are_swept_and_results_kept(tmp_path):
    run = RunDir(tmp_path)
    keep = run.weights_path(0.2, 1, 0)
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"w")
    stale = [keep.parent / ".tmp-123-001epochs_weights_model_0.weights.h5", keep.parent / ".errors.csv.x1y2.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    run.remove_stale_temporaries()
    assert keep.exists() and not any(p.exists() for p in stale)


def test_a_checkpoint_file_finds_its_run(tmp_path):
    run = RunDir(tmp_path / "run")
    path = run.weights_path(0.25, 16, 3)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    assert RunDir.find_checkpoint(path) is None  # no config.json: not a run
    run.write_record({"config": TrainConfig().to_dict(), "data": {}})
    found = RunDir.find_checkpoint(path)
    assert found is not None and (found[0].path, *found[1:]) == (run.path.resolve(), 0.25, 16, 3)
    loose = tmp_path / "016epochs_weights_model_3.weights.h5"
    loose.write_bytes(b"")
    assert RunDir.find_checkpoint(loose) is None
    # Names the run would not give this checkpoint are other files, not this member at that epoch.
    for other in (path.with_name("16epochs_weights_model_3.weights.h5"),
                  run.path / "dropout_0.250" / "weights" / path.name):
        other.parent.mkdir(parents=True, exist_ok=True)
        other.write_bytes(b"")
        assert RunDir.find_checkpoint(other) is None, other


def test_normalization_and_dropout_rates_come_from_the_record(tmp_path):
    run = RunDir(tmp_path)
    config = TrainConfig(dataset="mnist", dropouts=(0.2, 0.35))
    run.write_record({"config": config.to_dict(), "data": {"classes": "0123456789", "mean": 0.13, "std": 0.3}})
    assert run.read_normalization() == ("0123456789", 0.13, 0.3)
    assert config.find_dropout(0.350) == 0.35
    with pytest.raises(ConfigError, match=r"--dropout 0.5 is not in this run \(it has 0.2, 0.35\)"):
        config.find_dropout(0.5)
    run.write_record({"config": config.to_dict(), "data": {"classes": "0123456789", "mean": 0.13}})
    with pytest.raises(RunDirError, match=r"config\.json: unreadable run configuration \(data 'std'\)"):
        run.read_normalization()


def test_latest_evaluation_is_the_newest_plain_test_one(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest_evaluation(0.2) is None
    for split, epoch, tta in (("test", 2, 0), ("test", 4, 0), ("test", 8, 4), ("val", 9, 0)):
        folder = run.evaluation_dir(0.2, split, epoch, tta)
        folder.mkdir(parents=True)
        (folder / "evaluation.json").write_text(json.dumps({"epoch": epoch, "n": 200, "ensemble": {"n_errors": epoch}}))
    latest = run.latest_evaluation(0.2)
    assert latest.epoch == 4 and latest.ensemble.error == ErrorRate(4, 200)
    # A damaged file is one clear error naming it. Catches: a KeyError left uncaught (a traceback).
    (run.evaluation_dir(0.2, "test", 4, 0) / "evaluation.json").write_text(json.dumps({"epoch": 4}))
    with pytest.raises(RunDirError, match=r"test_epoch_004/evaluation\.json: unreadable evaluation \(no 'n' entry\)"):
        run.latest_evaluation(0.2)


def test_a_member_lock_waits_for_its_holder_then_refuses_after_the_timeout(tmp_path):
    """A retried scale-out task waits for a stale attempt's lock on its members instead of failing at once."""
    import os
    import threading

    from emnist_cnn.io.files import LockBusyError

    run = RunDir(tmp_path / "run")
    holder = run.member_lock(0.2, (1,), timeout=0).__enter__()
    # Held for the whole wait: refused after the timeout, naming the members.
    with pytest.raises(LockBusyError, match=r"dropout 0.2 member\(s\) 1 still locked by another process"):
        with run.member_lock(0.2, (1,), timeout=0.3):
            pass
    # Other members are not blocked by it.
    with run.member_lock(0.2, (0,), timeout=0):
        pass
    # Released while the next one waits: it gets the lock.
    threading.Timer(0.5, holder.__exit__, (None, None, None)).start()
    with run.member_lock(0.2, (1,), timeout=60) as lock:
        assert lock.path.read_text().strip() == str(os.getpid())


def test_versions_record_the_accelerator_stack(monkeypatch):
    """XLA flags, TF32, the CUDA build and the GPU models: what makes a GPU rerun differ in the last bits."""
    import keras

    from emnist_cnn.training.device import describe_runtime

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    versions = collect_versions(threads=False)
    assert versions["env"]["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
    assert "NVIDIA_TF32_OVERRIDE" not in versions["env"]  # unset: not recorded
    # The GPUs by model name ([] on a CPU), the ones the start-up line names.
    assert versions["gpus"] == [d["name"] for d in describe_runtime("auto", False, "float32")["gpus"]]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        assert ("cuda_version" in versions) == tf.test.is_built_with_cuda()
        before = tf.config.experimental.tensor_float_32_execution_enabled()
        assert versions["tf32"] is before
        try:
            tf.config.experimental.enable_tensor_float_32_execution(not before)  # read when recorded
            assert collect_versions()["tf32"] is (not before)
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(before)


@pytest.mark.trains
def test_a_resume_under_other_xla_flags_warns_that_it_is_not_bit_identical(tiny_mnist_dir, tmp_path, monkeypatch,
                                                                          caplog):
    from emnist_cnn.training.train import train_and_evaluate
    from emnist_cnn.io.datasets import load_dataset

    tiny = load_dataset("mnist", tiny_mnist_dir)
    config = TrainConfig(dataset="mnist", dropouts=(0.2,), models=1, epochs=1, batch_size=64, val_fraction=0.2,
                         bn_recalibration_images=100)
    run = tmp_path / "run"
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    train_and_evaluate(config, run, DataSource(dataset=tiny), TrainOptions(verbose=0))
    with caplog.at_level(logging.WARNING, logger="emnist_cnn"):
        train_and_evaluate(config, run, DataSource(dataset=tiny), TrainOptions(verbose=0))
    assert "to the bit" not in caplog.text  # the same process and settings: no warning
    # Only recorded here (XLA reads XLA_FLAGS once, at start-up), as a resume in a new process would see it.
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    with caplog.at_level(logging.WARNING, logger="emnist_cnn"):
        train_and_evaluate(dataclasses.replace(config, epochs=2), run, DataSource(dataset=tiny),
                           TrainOptions(verbose=0))
    warned = [r.getMessage() for r in caplog.records if "to the bit" in r.getMessage()]
    assert len(warned) == 1 and "resumed with different env than the run started with" in warned[0]
    assert RunDir(run).read_invocations()[-1]["versions"]["env"]["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
