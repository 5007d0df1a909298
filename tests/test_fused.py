"""Fused ensemble training and one-pass ensemble inference give the same numbers as one member at a time."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, trains_a_model
from oracles import assert_same_run, planned_steps
from emnist_cnn.demos import make_tiny_digits, write_mnist_idx

import emnist_cnn  # noqa: F401  (selects the backend before keras is imported)
import keras
from emnist_cnn.config import AugmentConfig, DataSource, ModelConfig, TrainConfig, TrainOptions
from emnist_cnn.errors import ConfigError
from emnist_cnn.io.datasets import load_dataset
from emnist_cnn.core import trainer as trainer_module
from emnist_cnn.core.model import (build_model, compile_model, copy_optimizer_state, predict_members,
                                   predict_probabilities)
from emnist_cnn.core.trainer import DeviceImages, build_device_trainer, read_member_logs, train_epoch
from emnist_cnn.training.train import train_and_evaluate
from emnist_cnn.io.rundir import RunDir

pytestmark = pytest.mark.cpu_facts  # to the bit (and the CPU chosen): CPU facts

TINY = TrainConfig(dataset="mnist", dropouts=(0.3,), models=2, epochs=2, checkpoint_every=1, batch_size=64,
                   val_fraction=0.2, bn_recalibration_images=200)


@pytest.fixture
def tiny(tiny_mnist_dir):
    return load_dataset("mnist", tiny_mnist_dir)


def read_rows(path: Path, drop=("seconds",)):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def state_arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "meta"}


def members(n, seed0=100, dropout=0.3, label_smoothing=0.0):
    out = []
    for i in range(n):
        keras.utils.set_random_seed(seed0 + i)
        m = compile_model(build_model(10, dropout), 1e-3, label_smoothing)
        m.optimizer.build(m.trainable_variables)
        out.append(m)
    return out


@pytest.mark.trains
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_step_equals_one_step_per_member(smoothing):
    """Summed losses give each member exactly its own gradient; augmentation, dropout and Adam stay per
    member. 100 images in batches of 32: the last step is a smaller batch. With label smoothing (a recipe
    ingredient) the targets are one-hot."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 100)
    images = DeviceImages(rng.integers(0, 256, (100, 28, 28), dtype=np.uint8))
    orders = [rng.permutation(100).astype(np.int32) for _ in range(3)]
    targets = [labels[o] if not smoothing else np.eye(10, dtype=np.float32)[labels[o]] for o in orders]
    one_by_one, logs_seq = members(3, label_smoothing=smoothing), []
    for k, m in enumerate(one_by_one):
        alone = build_device_trainer([m], images, AugmentConfig(), 32, 1e-3, smoothing)
        copy_optimizer_state(m.optimizer, alone.optimizer, m.trainable_variables)
        alone.get_layer("augment_0").set_key(1000 + k)
        logs_seq += read_member_logs(train_epoch(alone, [orders[k]], [targets[k]], 32), 1)
        copy_optimizer_state(alone.optimizer, m.optimizer, m.trainable_variables)
    together = members(3, label_smoothing=smoothing)
    fused = build_device_trainer(together, images, AugmentConfig(), 32, 1e-3, smoothing)
    for k in range(3):
        fused.get_layer(f"augment_{k}").set_key(1000 + k)
    logs = read_member_logs(train_epoch(fused, orders, targets, 32), 3)
    assert logs == logs_seq
    assert len({loss for loss, _ in logs}) == 3  # members differ, so the comparisons have teeth
    for a, b in zip(one_by_one, together):
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(wa, wb)
        # The fused optimizer's moments, handed back, are the member's own.
        copy_optimizer_state(fused.optimizer, b.optimizer, b.trainable_variables)
        assert int(b.optimizer.iterations.numpy()) == int(a.optimizer.iterations.numpy()) == 4
        for va, vb in zip(a.optimizer.variables, b.optimizer.variables):
            np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_mnist_idx(tmp_path_factory.mktemp("fused-data"), *make_tiny_digits())


@pytest.fixture(scope="module")
@trains_a_model
def straight(tmp_path_factory, data_dir):
    """TINY trained without interruption: one member at a time in ROOT/seq, fused in ROOT/fused."""
    root = tmp_path_factory.mktemp("fused-straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMNIST_CNN_CACHE", str(root / "cache"))
        ds = load_dataset("mnist", data_dir)
        train_and_evaluate(TINY, root / "seq", DataSource(dataset=ds), TrainOptions(verbose=0, fused=False))
        train_and_evaluate(TINY, root / "fused", DataSource(dataset=ds), TrainOptions(verbose=0, fused=True))
    return root


def test_fused_run_equals_sequential_run(straight):
    """Same histories, errors, checkpoints and states, whichever way the members trained."""
    assert_same_run(straight / "fused", straight / "seq")
    # Members differ from each other (their own seeds), so the comparison above is not vacuous.
    h0 = read_rows(straight / "fused" / "dropout_0.3" / "history" / "model_0.csv")
    h1 = read_rows(straight / "fused" / "dropout_0.3" / "history" / "model_1.csv")
    assert h0[0]["loss"] != h1[0]["loss"]


CLI_TINY = ["--dataset", "mnist", "--dropout", "0.3", "--models", "2", "--checkpoint-every", "1", "--batch-size",
            "64", "--val-fraction", "0.2", "--bn-recalibration", "200", "--quiet"]


@pytest.mark.parametrize("first, then", [("--fused", "--no-fused")])
def test_switching_between_fused_and_one_at_a_time_on_resume(straight, data_dir, tmp_path, monkeypatch, first,
                                                             then):
    """Epoch 1 trained one way, the resume the other: the uninterrupted run's result, to the bit. (The other
    way round, one-at-a-time then fused, is the next test's laggard catching up.)"""
    steps = []
    real_step = trainer_module.train_step

    def counting_step(trainer, xs, ys, weights):
        steps.append(len(xs))
        return real_step(trainer, xs, ys, weights)

    monkeypatch.setattr(trainer_module, "train_step", counting_step)
    run = tmp_path / "run"
    assert run_cli(["train", "--run-dir", run, "--data-dir", data_dir, *CLI_TINY, "--epochs", "1", first]) == 0
    first_steps, steps[:] = len(steps), []
    assert run_cli(["train", "--run-dir", run, "--epochs", "2", "--quiet", then]) == 0
    # Each half really trained its way: fused, both members take each step in one call.
    per_epoch = planned_steps(run)[0]
    calls = {"--fused": per_epoch, "--no-fused": TINY.models * per_epoch}
    assert (first_steps, len(steps)) == (calls[first], calls[then])
    assert [r["fused"] for r in RunDir(run).read_invocations()] == [first == "--fused", then == "--fused"]
    assert RunDir(run).read_config() == TINY  # the experiment of the straight runs
    assert_same_run(run, straight / "seq")


def test_fused_resume_catches_up_a_member_left_behind(straight, tmp_path, tiny, monkeypatch):
    """An interruption can leave members at different epochs: the laggard trains alone, then all fuse again."""
    cfg = TINY.replace(epochs=3)
    # The uninterrupted 3-epoch result: the one-at-a-time run continued by a third epoch.
    shutil.copytree(straight / "seq", tmp_path / "straight")
    train_and_evaluate(cfg, tmp_path / "straight", DataSource(dataset=tiny), TrainOptions(verbose=0, fused=False))
    run = tmp_path / "resumed"
    shutil.copytree(straight / "fused", run)
    # Roll member 1 back to its epoch-1 state, as if it was killed before its epoch-2 state landed.
    latest = RunDir(run).state_path(0.3, 1)
    shutil.copy(latest.with_name("model_1.prev.npz"), latest)
    callers = []
    real_step = trainer_module.train_step

    def recording_step(trainer, xs, ys, weights):
        callers.append(id(trainer))
        return real_step(trainer, xs, ys, weights)

    monkeypatch.setattr(trainer_module, "train_step", recording_step)
    train_and_evaluate(cfg, run, DataSource(dataset=tiny), TrainOptions(verbose=0, fused=True))
    # Epoch 2 of member 1 alone (its own model), then epoch 3 of both in one fused step each.
    per_epoch = planned_steps(run)[0]
    assert len(callers) == 2 * per_epoch
    alone, together = set(callers[:per_epoch]), set(callers[per_epoch:])
    assert len(alone) == len(together) == 1 and alone != together
    for i in range(cfg.models):
        a = read_rows(tmp_path / "straight" / "dropout_0.3" / "history" / f"model_{i}.csv")
        b = read_rows(run / "dropout_0.3" / "history" / f"model_{i}.csv")
        assert [r["epoch"] for r in b] == ["1", "2", "3"]
        assert a == b
        sa = state_arrays(RunDir(tmp_path / "straight").state_path(0.3, i))
        sb = state_arrays(RunDir(run).state_path(0.3, i))
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=f"model {i} {k}")


def test_predict_members_matches_member_by_member():
    models = members(3)
    images = np.random.default_rng(1).integers(0, 256, (130, 28, 28), dtype=np.uint8)
    stacked = predict_members(models, images, batch_size=50)
    assert stacked.shape == (3, 130, 10)
    for m, p in zip(models, stacked):
        np.testing.assert_allclose(p, predict_probabilities(m, images), rtol=0, atol=1e-6)
    assert predict_members(models, images[:0]).shape == (3, 0, 10)


@pytest.mark.trains
def test_mixed_bfloat16_trains_with_float32_weights(tmp_path, tiny):
    """bfloat16 compute keeps float32 variables: checkpoints load into a float32 model."""
    cfg = TINY.replace(models=1, epochs=1, model=ModelConfig(precision="mixed_bfloat16"))
    train_and_evaluate(cfg, tmp_path / "bf16", DataSource(dataset=tiny), TrainOptions(verbose=0))
    model = build_model(10, 0.3, cfg=ModelConfig(precision="mixed_bfloat16"))
    assert model.get_layer(index=2).compute_dtype == "bfloat16"
    assert all(w.dtype == np.float32 for w in model.get_weights())
    plain = build_model(10, 0.3)
    plain.load_weights(RunDir(tmp_path / "bf16").weights_path(0.3, 1, 0))
    rows = read_rows(tmp_path / "bf16" / "dropout_0.3" / "history" / "errors.csv")
    assert any(r["model"] == "ensemble" for r in rows)
    hist = read_rows(tmp_path / "bf16" / "dropout_0.3" / "history" / "model_0.csv")
    assert np.isfinite(float(hist[0]["loss"]))


@pytest.mark.trains
def test_mixed_float16_scales_the_loss_and_resumes_to_the_bit(tmp_path, tiny):
    """float16 compute with dynamic loss scaling: float32 weights, the loss scale kept in the member's state,
    an interrupted run (1 epoch, then 1 more) equal to a straight one. Never fused (one loss scale would be
    shared by the members); never with a step schedule (loss scaling skips steps)."""
    cfg = TINY.replace(epochs=2, model=ModelConfig(precision="mixed_float16"), limit_train=300)
    with pytest.raises(ConfigError, match="mixed_float16 does not work with the fast recipe"):
        cfg.replace(recipe="fast")
    train_and_evaluate(cfg, tmp_path / "straight", DataSource(dataset=tiny), TrainOptions(verbose=0, fused=True))
    assert [r["fused"] for r in RunDir(tmp_path / "straight").read_invocations()] == [False]
    train_and_evaluate(cfg.replace(epochs=1), tmp_path / "resumed", DataSource(dataset=tiny),
                       TrainOptions(verbose=0, fused=False))
    train_and_evaluate(cfg, tmp_path / "resumed", DataSource(dataset=tiny), TrainOptions(verbose=0, fused=True))
    model = build_model(10, 0.3, cfg=ModelConfig(precision="mixed_float16"))
    assert model.get_layer(index=2).compute_dtype == "float16"
    state = state_arrays(RunDir(tmp_path / "straight").state_path(0.3, 0))
    assert all(state[k].dtype == np.float32 for k in state if k.startswith("weight_"))
    # The LossScaleOptimizer's variables come first (iteration, learning rate, then its step counter and
    # the loss scale: 2**15 at the start, halved at an overflowing step, doubled after 2000 finite ones).
    # A resume that restarted them would differ from the straight run below.
    steps_since_change, scale = int(state["optimizer_2"]), float(state["optimizer_3"])
    assert steps_since_change > 0 and scale in {2.0 ** k for k in range(16)}
    for i in range(cfg.models):
        assert read_rows(tmp_path / "resumed" / "dropout_0.3" / "history" / f"model_{i}.csv") == \
            read_rows(tmp_path / "straight" / "dropout_0.3" / "history" / f"model_{i}.csv")
        a = state_arrays(RunDir(tmp_path / "resumed").state_path(0.3, i))
        b = state_arrays(RunDir(tmp_path / "straight").state_path(0.3, i))
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"model {i} {k}")
