"""Training, the run directory, resume, fixed-LR continuation and refusals (in-process, tiny data)."""

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, trains_a_model
from oracles import read_csv
from emnist_cnn.demos import make_tiny_digits, write_mnist_idx

import emnist_cnn  # noqa: F401  (selects the backend before keras is imported)
import keras
from emnist_cnn.config import DATASETS, PRECISIONS, RECIPES, RESUMABLE_CHANGES, DataSource, TrainConfig, TrainOptions
from emnist_cnn.io.datasets import load_dataset
from emnist_cnn.errors import ConfigError, RunDirError
from emnist_cnn.core.model import build_model
from emnist_cnn.io.files import RunLock
from emnist_cnn.io.state import load_member_state
from emnist_cnn.training.members import build_member_model
from emnist_cnn.training.prepare import prepare_data
from emnist_cnn.training.train import train_and_evaluate
from emnist_cnn.io.rundir import RunDir

TINY = TrainConfig(dataset="mnist", dropouts=(0.2,), models=2, epochs=2, checkpoint_every=1, batch_size=64,
                   val_fraction=0.2, bn_recalibration_images=200)


@pytest.fixture
def tiny(tiny_mnist_dir):
    return load_dataset("mnist", tiny_mnist_dir)


def copy_of_tiny_run(tiny_run, tmp_path) -> Path:
    """A copy of conftest's shared tiny run: TINY's experiment, trained once per test process."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    assert RunDir(run).read_config() == TINY
    return run


def test_run_directory_layout_and_tables(tiny_run, tmp_path, tiny):
    run = copy_of_tiny_run(tiny_run, tmp_path)  # trained by train_and_evaluate(TINY, ...), as here
    rows = train_and_evaluate(TINY, run, DataSource(dataset=tiny),
                              TrainOptions(verbose=0)).errors  # nothing left: the last results
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
    # Synthetic classes are easy: after two epochs a working implementation gets every one of the 120
    # validation and 200 test images right, each member and the ensemble (measured: 0 errors everywhere).
    # Margin: 1 error per model and split. Without BatchNormalization recalibration
    # (bn_recalibration_images=0) the same run makes 9 and 3 test errors (members) and 2 (ensemble).
    got = {(r.model, r.split): r.rate.n_errors for r in rows[0.2]}
    assert set(got) == {(m, s) for m in ("0", "1", "ensemble") for s in ("val", "test")}
    assert max(got.values()) <= 1, got


def test_resume_recomputes_nothing_and_raising_epochs_continues(tiny_run, tmp_path, tiny):
    run = copy_of_tiny_run(tiny_run, tmp_path)
    hist = run / "dropout_0.2" / "history" / "model_0.csv"
    state = RunDir(run).state_path(0.2, 0)
    before = (hist.read_text(), state.stat().st_mtime_ns)
    train_and_evaluate(TINY, run, DataSource(dataset=tiny), TrainOptions(verbose=0))
    assert (hist.read_text(), state.stat().st_mtime_ns) == before
    train_and_evaluate(TINY.replace(epochs=3), run, DataSource(dataset=tiny), TrainOptions(verbose=0))
    assert [int(r["epoch"]) for r in read_csv(hist)] == [1, 2, 3]
    errors = read_csv(run / "dropout_0.2" / "history" / "errors.csv")
    assert sorted({int(r["epoch"]) for r in errors}) == [1, 2, 3]
    with pytest.raises(ConfigError, match="--epochs 2 is lower than the 3 epochs"):
        train_and_evaluate(TINY, run, DataSource(dataset=tiny), TrainOptions(verbose=0))
    # The refused command left the run as it was: a plain resume still works.
    assert json.loads((run / "config.json").read_text())["config"]["epochs"] == 3
    train_and_evaluate(TINY.replace(epochs=3), run, DataSource(dataset=tiny), TrainOptions(verbose=0))


@pytest.mark.trains
def test_fixed_learning_rate_reaches_the_optimizer(tmp_path, tiny):
    cfg = TINY.replace(models=1, epochs=1)
    base = tmp_path / "base"
    train_and_evaluate(cfg, base, DataSource(dataset=tiny), TrainOptions(verbose=0))
    fixed, default = tmp_path / "fixed", tmp_path / "default"
    shutil.copytree(base, fixed)
    shutil.copytree(base, default)
    train_and_evaluate(cfg.replace(epochs=2), fixed, DataSource(dataset=tiny), TrainOptions(fixed_lr=1e-5, verbose=0))
    train_and_evaluate(cfg.replace(epochs=2), default, DataSource(dataset=tiny), TrainOptions(verbose=0))
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


@pytest.fixture(scope="module")
@trains_a_model
def finished_run(tmp_path_factory):
    """(run, data folder, config): one member trained for one epoch, to copy and resume in tests."""
    base = tmp_path_factory.mktemp("finished-run")
    data = write_mnist_idx(base / "data", *make_tiny_digits())
    cfg = TINY.replace(models=1, epochs=1)
    train_and_evaluate(cfg, base / "run", DataSource(dataset=load_dataset("mnist", data, cache=False)),
                       TrainOptions(verbose=0))
    return base / "run", data, cfg


def _copy_run(finished_run, tmp_path):
    run, data, cfg = finished_run
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", data, cfg


def _snapshot(run) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _experiment_settings() -> list[str]:
    """Every setting outside RESUMABLE_CHANGES, from the dataclass fields (nested ones as "augment.shift_frac")."""
    names = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUMABLE_CHANGES:
            continue
        value = getattr(TINY, f.name)
        if dataclasses.is_dataclass(value):
            names += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)]
        else:
            names.append(f.name)
    return names


_OTHER_STRINGS = (*DATASETS, *PRECISIONS, *RECIPES, "constant", "reflect", "wrap", "nearest", "bilinear")


def _candidates(value):
    """Values of the same kind as `value` and different from it (the first valid one is used)."""
    if value is None:  # an optional count (limit_train)
        return [100, 1000]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, 2 * value + 10]
    if isinstance(value, float):
        return [value / 2, value + 0.05, 0.1, 0.5]
    if isinstance(value, str):
        return [v for v in _OTHER_STRINGS if v != value]
    if isinstance(value, tuple):
        return [tuple(round(x + 0.1, 6) for x in value), (0.5,)]
    raise AssertionError(f"no rule to change a setting of type {type(value).__name__}: extend _candidates")


def _changed_config(cfg: TrainConfig, setting: str) -> TrainConfig:
    """`cfg` with one setting changed to another valid value."""
    top, _, sub = setting.partition(".")
    current = getattr(getattr(cfg, top), sub) if sub else getattr(cfg, top)
    for value in _candidates(current):
        try:
            if sub:
                return cfg.replace(**{top: dataclasses.replace(getattr(cfg, top), **{sub: value})})
            return cfg.replace(**{top: value})
        except ConfigError:
            continue
    raise AssertionError(f"found no valid other value for {setting}={current!r}: extend _candidates")


def test_resumable_changes_are_the_documented_two():
    """README: "--epochs and --checkpoint-every may change"; everything else is refused (next test)."""
    assert set(RESUMABLE_CHANGES) == {"epochs", "checkpoint_every"}
    assert {"seed", "limit_train", "bn_recalibration_images", "model.precision", "augment.enabled",
            "dataset", "models", "dropouts", "batch_size", "val_fraction"} <= set(_experiment_settings())


@pytest.mark.parametrize("setting", _experiment_settings())
def test_incompatible_resume_is_refused(finished_run, tmp_path, setting):
    run, _, cfg = _copy_run(finished_run, tmp_path)
    changed = _changed_config(cfg, setting)
    assert changed != cfg
    before = _snapshot(run)
    with pytest.raises(ConfigError, match=f"different experiment \\({setting.split('.')[0]}: "):
        train_and_evaluate(changed, run, DataSource(dataset=load_dataset("mnist", finished_run[1], cache=False)),
                           TrainOptions(verbose=0))
    assert _snapshot(run) == before  # refused before anything was written


def test_checkpoint_every_may_change_and_changes_the_checkpoints(finished_run, tmp_path):
    """Epoch 1 was trained with a checkpoint every epoch; continuing to 3 with every 3 writes 3, not 2."""
    run, data, cfg = _copy_run(finished_run, tmp_path)
    train_and_evaluate(cfg.replace(epochs=3, checkpoint_every=3), run, DataSource(data_dir=data),
                       TrainOptions(verbose=0))
    d = run / "dropout_0.2"
    assert sorted(p.name for p in (d / "weights").iterdir()) == [
        "001epochs_weights_model_0.weights.h5", "003epochs_weights_model_0.weights.h5"]
    assert sorted({int(r["epoch"]) for r in read_csv(d / "history" / "errors.csv")}) == [1, 3]
    assert [int(r["epoch"]) for r in read_csv(d / "history" / "model_0.csv")] == [1, 2, 3]
    assert sorted(p.name for p in (d / "history").glob("test_errors_epoch_*.txt")) == [
        "test_errors_epoch_001.txt", "test_errors_epoch_003.txt"]
    saved = json.loads((run / "config.json").read_text())["config"]
    assert (saved["epochs"], saved["checkpoint_every"]) == (3, 3)


def test_resume_on_different_data_is_refused(finished_run, tmp_path):
    """The loader fingerprints the files' content: one changed pixel is another experiment, a copy is not."""
    run, data, cfg = _copy_run(finished_run, tmp_path)
    x_train, y_train, x_test, y_test = make_tiny_digits()
    x_train[0, 0, 0] ^= 1
    changed = write_mnist_idx(tmp_path / "changed", x_train, y_train, x_test, y_test)
    same = shutil.copytree(data, tmp_path / "same")
    fingerprints = {name: load_dataset("mnist", folder, cache=False).fingerprint
                    for name, folder in (("original", data), ("changed", changed), ("same", same))}
    assert fingerprints["same"] == fingerprints["original"] != fingerprints["changed"]
    before = _snapshot(run)
    with pytest.raises(ConfigError, match="different data"):
        train_and_evaluate(cfg, run, DataSource(data_dir=changed), TrainOptions(verbose=0))
    assert _snapshot(run) == before
    # The same content in another folder resumes (here: nothing left to train).
    train_and_evaluate(cfg, run, DataSource(data_dir=same), TrainOptions(verbose=0))
    assert [int(r["epoch"]) for r in read_csv(run / "dropout_0.2" / "history" / "model_0.csv")] == [1]


def test_damaged_latest_state_falls_back_to_previous(tiny_run, tmp_path, tiny, caplog):
    run = copy_of_tiny_run(tiny_run, tmp_path)
    cfg = TINY
    state = RunDir(run).state_path(0.2, 0)
    state.write_bytes(state.read_bytes()[:100])  # a torn write
    # Temp files a killed process left mid-write are swept, never read.
    stale = [state.parent / ".model_0.npz.x1y2.tmp", run / "dropout_0.2" / "weights" / ".tmp-99-a.weights.h5"]
    for path in stale:
        path.write_bytes(b"half")
    before = read_csv(run / "dropout_0.2" / "history" / "model_0.csv")
    with caplog.at_level(logging.INFO):
        train_and_evaluate(cfg, run, DataSource(dataset=tiny), TrainOptions(verbose=0))
    assert "unreadable state" in caplog.text and "model_0.npz" in caplog.text
    assert not any(path.exists() for path in stale)
    hist = read_csv(run / "dropout_0.2" / "history" / "model_0.csv")
    assert [int(r["epoch"]) for r in hist] == [1, 2]  # epoch 2 was retrained, recorded once
    # From the previous state, not from scratch (issue 28, #5): only epoch 2 trained, epoch 1's row untouched
    # (a retrain from scratch gives the same weights on a CPU, but trains and records epoch 1 again).
    assert re.findall(r"dropout 0.2 model (\d) epoch (\d)/2: loss", caplog.text) == [("0", "2")]
    assert hist[0] == before[0]


def test_second_process_on_same_run_is_refused(tmp_path, tiny):
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(RunDirError, match="another emnist-cnn process"):
            train_and_evaluate(TINY, run, DataSource(dataset=tiny), TrainOptions(verbose=0))
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


# ----------------------------------------------------------------------------- README promises


@pytest.mark.trains
def test_bn_recalibration_0_keeps_keras_moving_averages(tmp_path):
    """`--bn-recalibration 0`: checkpoints carry Keras' own moving averages, and the evaluation used them.

    Keras updates moving_variance = 0.99 * moving_variance + 0.01 * batch_variance from 1.0, so after k
    steps every entry is at least 0.99**k; the exact statistics that recalibration would set are far
    from that (a working run keeps the averages; one that recalibrates anyway fails both checks).
    """
    data = write_mnist_idx(tmp_path / "data", *make_tiny_digits(n_train=300, n_test=100))
    cfg = TINY.replace(models=1, epochs=1, bn_recalibration_images=0)
    run = tmp_path / "run"
    train_and_evaluate(cfg, run, DataSource(data_dir=data), TrainOptions(verbose=0))
    prepared = prepare_data(cfg, load_dataset("mnist", data))
    steps = -(-len(prepared.y_train) // cfg.batch_size)
    model = build_member_model(cfg, prepared, 0.2, 0, compiled=False)
    model.load_weights(RunDir(run).weights_path(0.2, 1, 0))
    x = prepared.x_train.astype(np.float32)[..., None] / 255
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 5
    for layer in bns:
        variance = np.asarray(layer.moving_variance.numpy())
        assert variance.min() >= 0.99**steps - 1e-5, (layer.name, variance.min())
        inputs = keras.ops.convert_to_numpy(keras.Model(model.inputs[0], layer.input)(x, training=False))
        exact = inputs.astype(np.float64).reshape(-1, inputs.shape[-1]).var(axis=0)
        assert np.abs(variance - exact).max() > 0.1, layer.name  # not recalibrated
    # errors.csv was computed with exactly these statistics.
    probs = model(prepared.x_test.astype(np.float32)[..., None] / 255, training=False)
    pred = np.argmax(keras.ops.convert_to_numpy(probs), axis=1)
    rows = read_csv(run / "dropout_0.2" / "history" / "errors.csv")
    recorded = next(int(r["n_errors"]) for r in rows if (r["model"], r["split"]) == ("0", "test"))
    assert recorded == int(np.sum(pred != prepared.y_test))


def _writer_digits(n_train: int, n_writers: int, seed: int = 0) -> dict:
    """Synthetic EMNIST Digits with writer ids: every writer's images scattered through the training set."""
    x_train, y_train, x_test, y_test = make_tiny_digits(n_train=n_train, n_test=50, seed=seed)
    writers = 500 + np.random.default_rng(seed).permutation(np.arange(n_train) % n_writers)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "writers": writers,
            "mapping": np.array([[i, 48 + i] for i in range(10)])}


class _Captured(Exception):
    """Stops `train` once the data it would train on is captured."""


@pytest.mark.trains
@pytest.mark.parametrize("limit", [None, 150])
def test_training_validates_on_writers_it_never_trains_on(tmp_path, monkeypatch, limit):
    """`train` on an EMNIST .mat with writer ids: the split handed to the training loop is disjoint by
    writer, also after --limit-train (a split by class would put most writers on both sides). With
    --limit-train the members really train, and validate on exactly those images."""
    from test_data import write_emnist_mat

    from emnist_cnn.training import train as train_module

    split = _writer_digits(n_train=200, n_writers=20)
    write_emnist_mat(tmp_path / "data", "emnist-digits", split)
    writer_of = {img.tobytes(): w for img, w in zip(split["x_train"], split["writers"])}
    assert len(writer_of) == 200  # every image distinct: an image names its writer
    seen = []
    real = train_module.train_ensembles

    def spy(config, run_dir, data, options=None, on_checkpoint=None):
        seen.append(data)
        if limit is None:
            raise _Captured  # the split without --limit-train: no need to train on it
        return real(config, run_dir, data, options, on_checkpoint)

    monkeypatch.setattr(train_module, "train_ensembles", spy)
    run = tmp_path / "run"
    argv = ["train", "--run-dir", run, "--data-dir", tmp_path / "data", "--no-download", "--dropout", "0.2",
            "--models", "1", "--epochs", "1", "--batch-size", "64", "--val-fraction", "0.2",
            "--bn-recalibration", "50", "--quiet"]
    if limit is None:
        with pytest.raises(_Captured):
            run_cli(argv)
    else:
        assert run_cli(argv + ["--limit-train", limit]) == 0
    [data] = seen
    train_writers = {writer_of[img.tobytes()] for img in data.x_train}
    val_writers = {writer_of[img.tobytes()] for img in data.x_val}
    assert train_writers and val_writers and not train_writers & val_writers
    n = limit or 200
    assert len(data.y_train) + len(data.y_val) == n
    assert abs(len(data.y_val) - 0.2 * n) <= 10  # whole writers of 10 (or ~7.5 after the limit) images
    if limit is not None:
        recorded = json.loads((run / "config.json").read_text())["data"]
        assert (recorded["n_train"], recorded["n_val"]) == (len(data.y_train), len(data.y_val))
        val_rows = [r for r in read_csv(run / "dropout_0.2" / "history" / "errors.csv") if r["split"] == "val"]
        assert val_rows and {int(r["n"]) for r in val_rows} == {len(data.y_val)}


def test_train_prints_the_member_best_on_validation(tiny_run, tmp_path, capsys):
    """The printed "best member on validation" is the lowest validation error in errors.csv, not the lowest
    test error (the copied run's table is edited so that the two disagree)."""
    source, data = tiny_run
    run = tmp_path / "run"
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("export*", "evaluation"))
    table = run / "dropout_0.2" / "history" / "errors.csv"
    rows = read_csv(table)
    edits = {("0", "val"): 9, ("1", "val"): 2, ("0", "test"): 1, ("1", "test"): 7}
    for r in rows:
        if r["epoch"] == "2" and (r["model"], r["split"]) in edits:
            r["n_errors"] = str(edits[r["model"], r["split"]])
            r["error_pct"] = f"{100 * int(r['n_errors']) / int(r['n']):.4f}"
    with open(table, "w", newline="") as f:
        f.write(",".join(rows[0]) + "\n" + "".join(",".join(r.values()) + "\n" for r in rows))
    capsys.readouterr()
    assert run_cli(["train", "--run-dir", run, "--data-dir", data, "--quiet"]) == 0  # finished: nothing to train
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if line.startswith("best member on validation")]
    member, test_errors = re.fullmatch(r"best member on validation: model (\d+), test error [\d.]+% \((\d+)\D.*",
                                       line).groups()
    assert (member, int(test_errors)) == ("1", 7)


def _all_layers(model) -> list:
    """Every layer of `model`, those of nested models included."""
    return [inner for layer in model.layers for inner in [layer, *_all_layers(layer)]] \
        if hasattr(model, "layers") else []


@pytest.mark.trains
def test_what_each_epoch_trains_on_and_how(tmp_path, monkeypatch, tiny_mnist_dir, tiny):
    """`train --precision mixed_bfloat16`, 1 member, 2 epochs, as the command runs it, watched where the
    training loop hands over its pieces:
    - the images BatchNormalization is recalibrated on are training images, never validation ones,
      and as many as asked;
    - each epoch's image order is the documented rule, (member seed, epoch), so it differs across epochs;
    - each epoch's augmentation key is `augment_key(member seed, epoch)`, a new one every epoch;
    - the trainer computes in bfloat16 (the flag reaches the model) and keeps float32 variables.
    Catches (issue 28): recalibration on the validation split, a key or an order that ignores the epoch,
    and --precision silently dropped."""
    from emnist_cnn.core import model as model_module
    from emnist_cnn.core import trainer as trainer_module
    from emnist_cnn.core.trainer import augment_key
    from emnist_cnn.training.members import member_seed

    calibrations, orders, keys, dtypes = [], [], [], []
    real_recalibrate, real_epoch, real_set_key = (model_module.recalibrate_batchnorm, trainer_module.train_epoch,
                                                  trainer_module.AugmentImages.set_key)

    def recalibrate(model, images, *args, **kwargs):
        calibrations.append(np.rint(keras.ops.convert_to_numpy(images)[..., 0] * 255).astype(np.uint8))
        return real_recalibrate(model, images, *args, **kwargs)

    def train_epoch(trainer, epoch_orders, *args, **kwargs):
        orders.append([np.array(o) for o in epoch_orders])
        convs = [layer for layer in _all_layers(trainer) if isinstance(layer, keras.layers.Conv2D)]
        assert convs
        dtypes.append({layer.compute_dtype for layer in convs} | {v.dtype for v in trainer.trainable_variables})
        return real_epoch(trainer, epoch_orders, *args, **kwargs)

    def set_key(self, key):
        keys.append(int(key))
        return real_set_key(self, key)

    monkeypatch.setattr(model_module, "recalibrate_batchnorm", recalibrate)
    monkeypatch.setattr(trainer_module, "train_epoch", train_epoch)
    monkeypatch.setattr(trainer_module.AugmentImages, "set_key", set_key)
    assert run_cli(["train", "--run-dir", tmp_path / "run", "--data-dir", tiny_mnist_dir, "--dataset", "mnist",
                    "--no-download", "--dropout", "0.2", "--models", "1", "--epochs", "2", "--batch-size", "64",
                    "--val-fraction", "0.2", "--bn-recalibration", "150", "--precision", "mixed_bfloat16",
                    "--quiet"]) == 0
    data = prepare_data(TINY.replace(models=1), tiny)
    train_rows = {img.tobytes() for img in data.x_train}
    val_rows = {img.tobytes() for img in data.x_val}
    assert len(calibrations) == 2  # once per epoch
    for images in calibrations:
        assert len(images) == 150 and len({img.tobytes() for img in images}) == 150
        assert {img.tobytes() for img in images} <= train_rows and not {img.tobytes() for img in images} & val_rows
    seed = member_seed(0, 0.2, 0)
    assert len(orders) == 2 and all(len(o) == 1 for o in orders)
    for epoch, [order] in enumerate(orders, start=1):
        np.testing.assert_array_equal(order, np.random.default_rng([seed, epoch]).permutation(len(data.y_train)))
    assert not np.array_equal(orders[0][0], orders[1][0])
    assert keys == [augment_key(seed, 1), augment_key(seed, 2)] and keys[0] != keys[1]
    assert dtypes == [{"bfloat16", "float32"}] * 2


def _train_args(run: Path, data: Path, epochs: int) -> list:
    return ["train", "--run-dir", run, "--data-dir", data, "--dataset", "mnist", "--no-download", "--dropout", "0.2",
            "--models", "2", "--fused", "--epochs", epochs, "--checkpoint-every", "1", "--batch-size", "64",
            "--val-fraction", "0.2", "--bn-recalibration", "100", "--quiet"]


@pytest.mark.trains
def test_state_files_are_written_while_validating_and_put_in_place_after_the_history_row(tmp_path, monkeypatch,
                                                                                          tiny_mnist_dir):
    """2 fused members, 2 epochs, watched where the states are written and put in place. Each epoch's two state
    writes and its validation meet: a write (in a thread other than the main one) waits until that epoch's
    validation has started, and the validation waits until both writes have started, so they overlap. Each
    state is put in place after its member's history has the epoch's row; no temp file is left. Caught: the
    write made synchronous before validation (it never sees validation start) or after it (validation never
    sees it start), and a state put in place before its history row."""
    import threading

    from emnist_cnn.training import members as members_module

    run = tmp_path / "run"
    met = threading.Condition()
    started = {"writes": 0, "validations": 0}
    writes, validations, puts = [], [], []
    real_write, real_put, real_validate = (members_module.write_temp_file, members_module.put_member_state,
                                           members_module._validate)

    def write(path, data):
        with met:
            started["writes"] += 1
            epoch = (started["writes"] + 1) // 2  # 2 members an epoch
            met.notify_all()
            ok = met.wait_for(lambda: started["validations"] >= epoch, timeout=15)
        writes.append((Path(path).name, threading.current_thread() is threading.main_thread(), ok))
        return real_write(path, data)

    def validate(*args, **kwargs):
        with met:
            started["validations"] += 1
            epoch = started["validations"]
            met.notify_all()
            validations.append(met.wait_for(lambda: started["writes"] >= 2 * epoch, timeout=15))
        return real_validate(*args, **kwargs)

    def put(path, tmp):
        name = Path(path).stem
        rows = read_csv(run / "dropout_0.2" / "history" / f"{name}.csv")
        puts.append((name, [int(r["epoch"]) for r in rows], tmp.exists()))
        return real_put(path, tmp)

    monkeypatch.setattr(members_module, "write_temp_file", write)
    monkeypatch.setattr(members_module, "put_member_state", put)
    monkeypatch.setattr(members_module, "_validate", validate)
    assert run_cli(_train_args(run, tiny_mnist_dir, 2)) == 0
    assert sorted(writes) == [("model_0.npz", False, True)] * 2 + [("model_1.npz", False, True)] * 2
    assert validations == [True, True]
    assert puts == [("model_0", [1], True), ("model_1", [1], True), ("model_0", [1, 2], True),
                    ("model_1", [1, 2], True)]
    assert not list(run.rglob("*.tmp"))
    for i in (0, 1):
        with np.load(run / "dropout_0.2" / "state" / f"model_{i}.npz") as z:
            assert json.loads(bytes(z["meta"]).decode())["epoch"] == 2


@pytest.mark.trains
def test_a_failed_validation_leaves_the_states_of_the_last_recorded_epoch_and_no_temp_file(tmp_path, monkeypatch,
                                                                                           tiny_mnist_dir):
    """Validation fails in epoch 2 while the states are being written: the run stops with the error, each
    member's state is still epoch 1's (no history row or state of epoch 2), and the temp files the writer
    threads made are removed. Caught: the temp files left behind (no `_discard_unplaced`)."""
    from emnist_cnn.training import members as members_module

    run = tmp_path / "run"
    calls, real_validate = [], members_module._validate

    def validate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 2 (the members are fused: one validation per epoch)
            raise OSError(5, "injected device failure")
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(members_module, "_validate", validate)
    with pytest.raises(OSError, match="injected"):
        run_cli(_train_args(run, tiny_mnist_dir, 2))
    d = run / "dropout_0.2"
    assert [[int(r["epoch"]) for r in read_csv(d / "history" / f"model_{i}.csv")] for i in (0, 1)] == [[1], [1]]
    with np.load(d / "state" / "model_0.npz") as z:
        assert json.loads(bytes(z["meta"]).decode())["epoch"] == 1
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".tmp-*"))
