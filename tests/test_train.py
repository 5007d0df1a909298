"""Training, the run directory, resume, fixed-LR continuation and refusals (in-process, tiny data)."""

import json
import logging
import shutil

import numpy as np
import pytest

from conftest import read_csv

import emnist_cnn  # noqa: F401  (selects the backend before keras is imported)
import keras
from emnist_cnn.config import AugmentConfig, TrainConfig
from emnist_cnn.io.datasets import load_dataset
from emnist_cnn.errors import ConfigError, RunDirError
from emnist_cnn.core.model import build_model
from emnist_cnn.io.files import RunLock
from emnist_cnn.io.state import load_member_state
from emnist_cnn.engine.members import build_member_model
from emnist_cnn.engine.prepare import prepare_data
from emnist_cnn.engine.train import train_and_evaluate
from emnist_cnn.io.rundir import RunDir

TINY = TrainConfig(dataset="mnist", dropouts=(0.2,), models=2, epochs=2, checkpoint_every=1, batch_size=64,
                   val_fraction=0.2, bn_recalibration_images=200)


@pytest.fixture
def tiny(tiny_mnist_dir):
    return load_dataset("mnist", tiny_mnist_dir)


def test_run_directory_layout_and_tables(tmp_path, tiny):
    run = tmp_path / "run"
    rows = train_and_evaluate(TINY, run, dataset=tiny, verbose=0)
    d = run / "dropout_0.2"
    for epoch in (1, 2):
        for i in (0, 1):
            assert (d / "weights" / f"{epoch:03d}epochs_weights_model_{i}.weights.h5").is_file()
    for i in (0, 1):
        hist = read_csv(d / "history" / f"model_{i}.csv")
        assert [int(r["epoch"]) for r in hist] == [1, 2]
        assert list(hist[0]) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate",
                                 "seconds"]
        assert float(hist[1]["loss"]) < float(hist[0]["loss"])
        assert float(hist[0]["learning_rate"]) == pytest.approx(1e-3)
    # Every member draws its own stream (init, shuffling, augmentation, dropout).
    losses = [read_csv(d / "history" / f"model_{i}.csv")[0]["loss"] for i in (0, 1)]
    assert losses[0] != losses[1]
    errors = read_csv(d / "history" / "errors.csv")
    keys = [(r["epoch"], r["model"], r["split"]) for r in errors]
    assert len(keys) == len(set(keys)) == 2 * 3 * 2  # epochs x (2 members + ensemble) x (val, test)
    test_rows = [r for r in errors if r["split"] == "test"]
    assert {int(r["n"]) for r in test_rows} == {200}
    for r in errors:
        assert float(r["error_pct"]) == pytest.approx(100 * int(r["n_errors"]) / int(r["n"]), abs=1e-3)
    # The reference's text format: ensemble line first, then one line per member.
    lines = (d / "history" / "test_errors_epoch_002.txt").read_text().splitlines()
    assert lines[0].startswith("epoch: 2 test error on ensemble: ")
    assert len(lines) == 3
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["models"] == 2 and cfg["data"]["fingerprint"] == tiny.fingerprint
    assert cfg["versions"]["keras"] == keras.__version__ and cfg["data"]["n_val"] == 120
    # The returned rows are the last checkpoint's.
    assert list(rows) == [0.2] and {r.epoch for r in rows[0.2]} == {2}
    # Synthetic classes are easy: a real model has learned them after two epochs.
    ens_test = next(r for r in rows[0.2] if r.model == "ensemble" and r.split == "test")
    assert ens_test.rate.pct < 20


def test_resume_recomputes_nothing_and_raising_epochs_continues(tmp_path, tiny):
    run = tmp_path / "run"
    train_and_evaluate(TINY, run, dataset=tiny, verbose=0)
    hist = run / "dropout_0.2" / "history" / "model_0.csv"
    state = RunDir(run).state_path(0.2, 0)
    before = (hist.read_text(), state.stat().st_mtime_ns)
    train_and_evaluate(TINY, run, dataset=tiny, verbose=0)
    assert (hist.read_text(), state.stat().st_mtime_ns) == before
    train_and_evaluate(TINY.replace(epochs=3), run, dataset=tiny, verbose=0)
    assert [int(r["epoch"]) for r in read_csv(hist)] == [1, 2, 3]
    errors = read_csv(run / "dropout_0.2" / "history" / "errors.csv")
    assert sorted({int(r["epoch"]) for r in errors}) == [1, 2, 3]
    with pytest.raises(ConfigError, match="--epochs 2 is lower than the 3 epochs"):
        train_and_evaluate(TINY, run, dataset=tiny, verbose=0)
    # The refused command left the run as it was: a plain resume still works.
    assert json.loads((run / "config.json").read_text())["config"]["epochs"] == 3
    train_and_evaluate(TINY.replace(epochs=3), run, dataset=tiny, verbose=0)


def test_interrupted_resume_matches_uninterrupted_run(tmp_path, tiny):
    """Two epochs in one go equal one epoch, a restart, and one more (same seed, CPU)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = TINY.replace(models=1)
    train_and_evaluate(cfg, straight, dataset=tiny, verbose=0)
    train_and_evaluate(cfg.replace(epochs=1), resumed, dataset=tiny, verbose=0)
    train_and_evaluate(cfg, resumed, dataset=tiny, verbose=0)
    a = read_csv(straight / "dropout_0.2" / "history" / "model_0.csv")
    b = read_csv(resumed / "dropout_0.2" / "history" / "model_0.csv")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    data = prepare_data(cfg, tiny)
    m1, m2 = build_member_model(cfg, data, 0.2, 0), build_member_model(cfg, data, 0.2, 0)
    m1.load_weights(RunDir(straight).weights_path(0.2, 2, 0))
    m2.load_weights(RunDir(resumed).weights_path(0.2, 2, 0))
    for w1, w2 in zip(m1.get_weights(), m2.get_weights()):
        np.testing.assert_allclose(w1, w2, rtol=0, atol=1e-6)


def test_same_seed_same_results_other_seed_differs(tmp_path, tiny):
    cfg = TINY.replace(models=1, epochs=1)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train_and_evaluate(cfg.replace(seed=seed), tmp_path / name, dataset=tiny, verbose=0)
    loss = {n: read_csv(tmp_path / n / "dropout_0.2" / "history" / "model_0.csv")[0]["loss"] for n in "abc"}
    assert loss["a"] == loss["b"]
    assert loss["a"] != loss["c"]
    errs = {n: (tmp_path / n / "dropout_0.2" / "history" / "errors.csv").read_text() for n in "ab"}
    assert errs["a"] == errs["b"]


def test_fixed_learning_rate_reaches_the_optimizer(tmp_path, tiny):
    cfg = TINY.replace(models=1, epochs=1)
    base = tmp_path / "base"
    train_and_evaluate(cfg, base, dataset=tiny, verbose=0)
    fixed, default = tmp_path / "fixed", tmp_path / "default"
    shutil.copytree(base, fixed)
    shutil.copytree(base, default)
    train_and_evaluate(cfg.replace(epochs=2), fixed, dataset=tiny, fixed_lr=1e-5, verbose=0)
    train_and_evaluate(cfg.replace(epochs=2), default, dataset=tiny, verbose=0)
    hist = read_csv(fixed / "dropout_0.2" / "history" / "model_0.csv")
    assert [float(r["learning_rate"]) for r in hist] == [pytest.approx(1e-3), pytest.approx(1e-5)]
    # The saved optimizer state holds the new rate ...
    data = prepare_data(cfg, tiny)
    model = build_member_model(cfg, data, 0.2, 0)
    load_member_state(RunDir(fixed).state_path(0.2, 0), model)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-5)

    # ... and the updates really used it: weights moved ~100x less than at 1e-3.
    def kernel_change(run):
        m0, m1 = build_member_model(cfg, data, 0.2, 0), build_member_model(cfg, data, 0.2, 0)
        m0.load_weights(RunDir(run).weights_path(0.2, 1, 0))
        m1.load_weights(RunDir(run).weights_path(0.2, 2, 0))
        k0 = [w for w in m0.trainable_weights if "kernel" in w.path]
        k1 = [w for w in m1.trainable_weights if "kernel" in w.path]
        return sum(float(np.abs(np.asarray(a) - np.asarray(b)).sum()) for a, b in zip(k0, k1))

    assert kernel_change(fixed) < 0.05 * kernel_change(default)


@pytest.mark.parametrize("change, match", [
    (dict(models=3), "models"),
    (dict(dropouts=(0.3,)), "dropouts"),
    (dict(batch_size=32), "batch_size"),
    (dict(augment=AugmentConfig(rotation_deg=5.0)), "augment"),
    (dict(val_fraction=0.1), "val_fraction"),
])
def test_incompatible_resume_is_refused(tmp_path, tiny, change, match):
    run = tmp_path / "run"
    cfg = TINY.replace(models=1, epochs=1)
    train_and_evaluate(cfg, run, dataset=tiny, verbose=0)
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(ConfigError, match=match):
        train_and_evaluate(cfg.replace(**change), run, dataset=tiny, verbose=0)
    assert sorted(p.name for p in run.rglob("*")) == before


def test_resume_on_different_data_is_refused(tmp_path, tiny, tiny_mnist_dir):
    run = tmp_path / "run"
    cfg = TINY.replace(models=1, epochs=1)
    train_and_evaluate(cfg, run, dataset=tiny, verbose=0)
    other = load_dataset("mnist", tiny_mnist_dir)
    import dataclasses

    x = np.array(other.x_train)
    x[0, 0, 0] ^= 1
    changed = dataclasses.replace(other, x_train=x, fingerprint="0" * 64)
    with pytest.raises(ConfigError, match="different data"):
        train_and_evaluate(cfg, run, dataset=changed, verbose=0)


def test_damaged_latest_state_falls_back_to_previous(tmp_path, tiny, caplog):
    run = tmp_path / "run"
    cfg = TINY.replace(models=1)
    train_and_evaluate(cfg, run, dataset=tiny, verbose=0)
    state = RunDir(run).state_path(0.2, 0)
    state.write_bytes(state.read_bytes()[:100])  # a torn write
    # Temp files a killed process left mid-write are swept, never read.
    stale = [state.parent / ".model_0.npz.x1y2.tmp", run / "dropout_0.2" / "weights" / ".tmp-99-a.weights.h5"]
    for path in stale:
        path.write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(cfg, run, dataset=tiny, verbose=0)
    assert "unreadable state" in caplog.text and "model_0.npz" in caplog.text
    assert not any(path.exists() for path in stale)
    hist = read_csv(run / "dropout_0.2" / "history" / "model_0.csv")
    assert [int(r["epoch"]) for r in hist] == [1, 2]  # epoch 2 was retrained, recorded once


def test_second_process_on_same_run_is_refused(tmp_path, tiny):
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(RunDirError, match="another emnist-cnn process"):
            train_and_evaluate(TINY, run, dataset=tiny, verbose=0)
    assert not (run / "config.json").exists()


def test_normalization_uses_training_split_statistics(tiny):
    data = prepare_data(TINY, tiny)
    x = data.x_train.astype(np.float64) / 255
    assert data.mean == pytest.approx(x.mean(), rel=1e-9)
    assert data.std == pytest.approx(x.std(), rel=1e-6)
    model = build_model(10, 0.2, data.mean, data.std)
    norm = model.get_layer("normalize")
    out = keras.ops.convert_to_numpy(norm(np.full((1, 28, 28, 1), data.mean, np.float32)))
    assert np.abs(out).max() < 1e-5


def test_validation_is_held_out_of_training(tiny):
    data = prepare_data(TINY, tiny)
    assert len(data.y_train) + len(data.y_val) == len(tiny.y_train)
    train_rows = {r.tobytes() for r in data.x_train}
    assert len(train_rows) == len(data.x_train)  # synthetic images are all distinct
    assert not any(r.tobytes() in train_rows for r in data.x_val)
    none = prepare_data(TINY.replace(val_fraction=0.0), tiny)
    assert len(none.y_val) == 0 and len(none.y_train) == len(tiny.y_train)
