"""Where training runs, said and recorded; the compiled step reads nothing back from the device until the epoch ends.

No GPU here: the GPU cases fake the backend's device list (`accelerator_available` and the GPU descriptions),
so the decisions and what is recorded are real, and the step then runs on the CPU as it would on the GPU.
"""

from __future__ import annotations

import gc
import json
import logging
import weakref

import numpy as np
import pytest

from conftest import run_cli

import emnist_cnn  # noqa: F401  (selects the backend before keras is imported)
import keras
from emnist_cnn.config import AugmentConfig, DataSource, TrainConfig, TrainOptions
from emnist_cnn.core import model as model_module
from emnist_cnn.demos import count_device_reads
from emnist_cnn.training import device
from emnist_cnn.training.device import STEPS_PER_CALL_GPU, describe_runtime, format_runtime
from emnist_cnn.core.model import (build_member_predictor, build_model, compile_model, copy_optimizer_state,
                                   predict_members, predict_probabilities, recalibrate_batchnorm, upload_images)
from emnist_cnn.core.trainer import DeviceImages, build_device_trainer, read_member_logs, train_epoch
from emnist_cnn.training.train import train_and_evaluate
from emnist_cnn.io.datasets import load_dataset
from emnist_cnn.io.rundir import RunDir

# TensorFlow's direct step loop runs several steps per call on a GPU.
PER_CALL = f"; {STEPS_PER_CALL_GPU} steps per call" if keras.backend.backend() == "tensorflow" else ""
T4 = {"name": "Tesla T4", "id": "/physical_device:GPU:0", "compute_capability": [7, 5]}


@pytest.fixture
def fake_gpu(monkeypatch):
    """The backend reports one Tesla T4 (compute capability 7.5)."""
    monkeypatch.setattr(model_module, "accelerator_available", lambda: True)
    monkeypatch.setattr(device, "_list_devices", lambda backend: [dict(T4)])


@pytest.mark.skipif(model_module.accelerator_available(), reason="this machine has a GPU")
def test_device_gpu_without_one_stops_at_once_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", "--run-dir", run, "--dataset", "mnist", "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--device gpu" in err and "no usable GPU" in err and "Traceback" not in err
    assert not run.exists()  # refused before any data or run directory


@pytest.mark.cpu_facts
def test_runtime_on_this_cpu_is_said_plainly():
    runtime = describe_runtime("auto", False, "float32")
    assert runtime["device"] == "CPU" and runtime["gpus"] == []
    assert runtime["xla"] is (keras.backend.backend() == "jax")  # XLA measured slower on a CPU
    assert format_runtime(runtime).startswith("training on CPU (no GPU is used); one member at a time; XLA ")


def test_xla_decision_with_a_gpu(fake_gpu, caplog):
    assert describe_runtime("auto", True, "float32")["xla"] is True
    assert describe_runtime("off", True, "float32")["xla"] is (keras.backend.backend() == "jax")
    with caplog.at_level(logging.WARNING):
        runtime = describe_runtime("on", True, "mixed_bfloat16")
    assert "mixed_bfloat16" in caplog.text and "Tesla T4" in caplog.text  # bfloat16 is slow before Ampere
    line = format_runtime(runtime)
    assert line.startswith(f"training on /physical_device:GPU:0 Tesla T4 (7.5); fused; XLA on{PER_CALL}; "
                           "mixed_bfloat16")


@pytest.mark.trains
def test_a_run_says_and_records_where_it_trained(fake_gpu, tmp_path, tiny_mnist_dir, caplog):
    """The start-up line, config.json and the invocation record agree; `auto` chose XLA for the GPU, and the
    XLA-compiled step (gathering warp) trained."""
    cfg = TrainConfig(dataset="mnist", dropouts=(0.2,), models=2, epochs=1, checkpoint_every=1, batch_size=64,
                      val_fraction=0.2, bn_recalibration_images=100, limit_train=200)
    with caplog.at_level(logging.INFO, logger="emnist_cnn"):
        train_and_evaluate(cfg, tmp_path / "run", DataSource(dataset=load_dataset("mnist", tiny_mnist_dir)),
                           TrainOptions(verbose=0))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training on ")]
    assert lines == [f"training on /physical_device:GPU:0 Tesla T4 (7.5); fused; XLA on{PER_CALL}; float32; "
                     f"{keras.backend.backend()} backend"]
    run = RunDir(tmp_path / "run")
    recorded = json.loads(run.config_path.read_text())["runtime"]
    assert recorded == run.read_invocations()[-1]["runtime"]
    assert recorded["gpus"] == [T4] and recorded["xla"] is True and recorded["fused"] is True
    # 3 steps an epoch (160 images): one call of the steps loop, compiled by XLA.
    assert recorded["steps_per_call"] == (STEPS_PER_CALL_GPU if keras.backend.backend() == "tensorflow" else 1)
    rows = run.read_history_rows(0.2, 0)
    assert len(rows) == 1 and float(rows[0]["loss"]) > 0


def _count_device_reads(fn) -> int:
    """`make bench`'s counter of blocking device reads (numpy(), float(), bool(), np.array of a tensor)."""
    return count_device_reads(fn)


@pytest.mark.trains
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the direct step loop is TensorFlow's")
def test_an_epoch_reads_from_the_device_once_not_every_step():
    """4 steps, 16 steps, 16 steps in calls of 5: the same few reads, all at the epoch's end (one per logged
    metric)."""
    rng = np.random.default_rng(0)
    images = DeviceImages(rng.integers(0, 256, (512, 28, 28), dtype=np.uint8))
    labels = rng.integers(0, 10, 512)
    reads = {}
    for batch, calls in ((128, (1,)), (32, (1, 5))):
        keras.utils.set_random_seed(0)
        members = [compile_model(build_model(), 1e-3) for _ in range(2)]
        trainer = build_device_trainer(members, images, AugmentConfig(), batch, 1e-3)
        orders = [rng.permutation(512).astype(np.int32) for _ in members]
        targets = [labels[o] for o in orders]
        for per_call in calls:  # one trainer, two ways of calling its step
            train_epoch(trainer, orders, targets, batch, steps_per_call=per_call)  # traces
            logs = {}

            def epoch(trainer=trainer, orders=orders, targets=targets, batch=batch, logs=logs, per_call=per_call):
                logs.update(train_epoch(trainer, orders, targets, batch, steps_per_call=per_call))

            reads[batch, per_call] = _count_device_reads(epoch)
            assert reads[batch, per_call] == len(logs)  # each metric once, when the epoch ends
    assert reads[128, 1] == reads[32, 1] == reads[32, 5] <= 8


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's op determinism")
def test_op_determinism_turns_xla_off_and_the_record_says_so(fake_gpu, monkeypatch, caplog):
    """Keras runs a TensorFlow model without XLA when op determinism is on, whatever jit_compile asks."""
    monkeypatch.setenv("TF_DETERMINISTIC_OPS", "1")
    with caplog.at_level(logging.WARNING):
        assert describe_runtime("on", True, "float32")["xla"] is False
    assert "TF_DETERMINISTIC_OPS" in caplog.text


def _members_like(n: int, seed: int = 5) -> list:
    out = []
    for _ in range(n):
        keras.utils.set_random_seed(seed)
        m = compile_model(build_model(10, 0.0), 1e-3)  # no dropout: the two ways draw no masks
        m.optimizer.build(m.trainable_variables)
        out.append(m)
    return out


@pytest.mark.trains
def test_the_short_last_batch_is_padded_and_padding_counts_nowhere():
    """8 images in a batch of 32 (24 padding rows): the step equals a plain Keras step on the 8 images alone.
    Adam's first moment after one step is 0.1 x the gradient, so it checks the loss; the moving statistics
    check BatchNormalization's batch statistics; the logs check the metrics. Padding that entered any of them
    (the padding rows are real images, image 0 with label 0) would move them by far more than rounding."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (8, 28, 28), dtype=np.uint8), rng.integers(1, 10, 8)
    padded, plain = _members_like(2)
    trainer = build_device_trainer([padded], DeviceImages(x), AugmentConfig(enabled=False), 32, 1e-3)
    (loss, acc), = read_member_logs(train_epoch(trainer, [np.arange(8, dtype=np.int32)], [y], 32), 1)
    expected = plain.train_on_batch(x.astype(np.float32)[..., None] / 255, y, return_dict=True)
    assert loss == pytest.approx(expected["loss"], rel=1e-6) and acc == pytest.approx(expected["accuracy"])
    copy_optimizer_state(trainer.optimizer, padded.optimizer, padded.trainable_variables)
    for v, ma, mb in zip(padded.trainable_variables, padded.optimizer._momentums, plain.optimizer._momentums):
        ma, mb = np.asarray(ma), np.asarray(mb)
        np.testing.assert_allclose(ma, mb, rtol=0, atol=1e-4 * np.abs(mb).max(), err_msg=v.path)
    for va, vb in zip(padded.non_trainable_variables, plain.non_trainable_variables):
        np.testing.assert_allclose(np.asarray(va), np.asarray(vb), rtol=1e-6, atol=1e-8, err_msg=va.path)


def _count_traces(n: int, batch: int, epochs: int = 2) -> int:
    """How often Python runs Keras' step body (only while tracing) over `epochs` epochs of `n` images."""
    rng = np.random.default_rng(0)
    images, labels = DeviceImages(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)), rng.integers(0, 10, n)
    trainer = build_device_trainer(_members_like(1), images, AugmentConfig(), batch, 1e-3)
    traced, keras_step = [], trainer.train_step

    def counting(data):
        traced.append(1)
        return keras_step(data)

    trainer.train_step = counting
    for _ in range(epochs):
        order = rng.permutation(n).astype(np.int32)
        train_epoch(trainer, [order], [labels[order]], batch)
    return len(traced)


@pytest.mark.trains
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="counts TensorFlow's traces of the step")
def test_a_short_last_batch_costs_no_trace_of_its_own():
    """40 images in batches of 32 trace the step once, as 64 (two full batches) do, and a second epoch not at
    all: the last batch has the full shape (under XLA, one compilation, not two). Once, not twice: the
    trainer's metrics exist before the first step (TensorFlow traces a first call that creates variables
    twice)."""
    assert _count_traces(64, 32, epochs=1) == _count_traces(40, 32, epochs=2) == 1


def test_inference_pads_its_last_batch_and_returns_only_real_rows():
    """50 images in batches of 32: one traced shape, and the same probabilities as one call on all 50."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    model, same = _members_like(2)  # `same` predicts all 50 at once: `model` sees only the padded batches
    whole = np.asarray(same.predict_on_batch(x.astype(np.float32)[..., None] / 255))
    shapes, keras_step = set(), model.predict_step

    def recording(data):
        shapes.add(tuple(keras.tree.flatten(data)[0].shape))
        return keras_step(data)

    model.predict_step = recording
    probs = predict_probabilities(model, x, batch_size=32)
    assert probs.shape == (50, 10) and shapes == {(32, 28, 28, 1)}
    np.testing.assert_allclose(probs, whole, atol=1e-6)
    np.testing.assert_allclose(predict_members([model], x, batch_size=32)[0], whole, atol=1e-6)


@pytest.mark.trains
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="counts TensorFlow tensors read back")
def test_a_member_epochs_fixed_work_reads_back_once_per_member_and_validation_batch():
    """Recalibration from images on the device: one read of every layer's statistics (prefix passes make one
    per layer and batch), the same statistics. Validation of 3 members on 4,100 images on the device: one
    read per batch of 2,000 for all members (one per member and batch before), padding dropped."""
    rng = np.random.default_rng(3)
    calib = rng.integers(0, 256, (1500, 28, 28), dtype=np.uint8)
    a, b = _members_like(2)
    for v in a.trainable_variables:  # weights away from the initial ones, so every layer's statistics matter
        v.assign(keras.ops.convert_to_numpy(v) + rng.normal(0, 0.05, v.shape).astype(np.float32))
    b.set_weights(a.get_weights())
    on_device = upload_images(calib, batch_size=None)
    recalibrate_batchnorm(a, on_device)  # traces
    assert _count_device_reads(lambda: recalibrate_batchnorm(a, on_device)) == 1
    recalibrate_batchnorm(b, calib, batch_size=500)
    bns = [[lay for lay in m.layers if isinstance(lay, keras.layers.BatchNormalization)] for m in (a, b)]
    for la, lb in zip(*bns):
        for va, vb in ((la.moving_mean, lb.moving_mean), (la.moving_variance, lb.moving_variance)):
            va, vb = keras.ops.convert_to_numpy(va), keras.ops.convert_to_numpy(vb)
            np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-5 * np.abs(vb).max(), err_msg=la.name)
    val = rng.integers(0, 256, (4100, 28, 28), dtype=np.uint8)
    members = _members_like(3, seed=6)
    stacked = build_member_predictor(members)
    val_on_device = upload_images(val)
    assert val_on_device.shape[0] == 6000  # padded once, to whole batches
    predict_members(stacked, val_on_device, count=len(val))  # traces
    probs = {}
    reads = _count_device_reads(lambda: probs.update(p=predict_members(stacked, val_on_device, count=len(val))))
    assert reads == 3 and probs["p"].shape == (3, 4100, 10)
    for i, m in enumerate(members):
        np.testing.assert_allclose(probs["p"][i], predict_probabilities(m, val), atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="counts TensorFlow's reads")
def test_a_members_state_is_read_from_the_device_in_one_read_per_dtype(tmp_path, caplog):
    """The state file's snapshot (78 weight and optimizer variables and the dropout RNG) reads float32 and int64
    in one read each (one per variable before: 79), and the file it makes restores every value exactly; a
    group of 6 members shares one trace, so TensorFlow warns of no retracing. Caught: `read_variables` reading
    variable by variable, packing them in another order, or a tf.function per model (the warning)."""
    from emnist_cnn.io.state import encode_member_state, load_member_state, snapshot_member_state

    rng = np.random.default_rng(4)
    a, b = (compile_model(build_model(10, 0.3, seed=s), 1e-3) for s in (5, 9))  # dropout: an RNG state too
    for m in (a, b):
        m.optimizer.build(m.trainable_variables)
    seeds = [layer.seed_generator.state for m in (a, b) for layer in m.layers if hasattr(layer, "seed_generator")]
    assert len(seeds) == 2
    seeds[0].assign(np.array([7, 11], dtype=str(seeds[0].dtype)))
    for v in list(a.weights) + list(a.optimizer.variables):
        if "float" in str(v.dtype) and v.shape:
            v.assign(rng.normal(0, 1, v.shape).astype(np.float32))
    a.optimizer.iterations.assign(1234)
    snapshot_member_state(a, 3)  # traces
    arrays = {}
    assert _count_device_reads(lambda: arrays.update(snapshot_member_state(a, 3))) == 2
    (tmp_path / "model_0.npz").write_bytes(encode_member_state(arrays))
    assert load_member_state(tmp_path / "model_0.npz", b)["epoch"] == 3
    a_vars, b_vars = (list(m.weights) + list(m.optimizer.variables) for m in (a, b))
    for va, vb in zip(a_vars + [seeds[0]], b_vars + [seeds[1]]):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(va), keras.ops.convert_to_numpy(vb), err_msg=va.path)
    with caplog.at_level(logging.WARNING):
        for m in _members_like(6, seed=11):
            snapshot_member_state(m, 1)
    assert "retracing" not in caplog.text


@pytest.mark.trains
@pytest.mark.cpu_facts
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the direct step loop is TensorFlow's")
def test_several_steps_per_call_are_the_same_steps_to_the_bit():
    """Two fused members, 2 epochs of 4 steps (the last padded): 3 steps per call (calls of 3 and 1) and 8
    (one call) give one step per call's logs, weights and optimizer step count, bit for bit."""
    rng = np.random.default_rng(0)
    images, labels = DeviceImages(rng.integers(0, 256, (100, 28, 28), dtype=np.uint8)), rng.integers(0, 10, 100)

    def train(per_call):
        members = []
        for i in range(2):
            keras.utils.set_random_seed(7 + i)
            members.append(compile_model(build_model(10, 0.3, seed=7 + i), 1e-3))
        trainer = build_device_trainer(members, images, AugmentConfig(), 32, 1e-3)
        logs = []
        for epoch in range(2):
            for k in range(2):
                trainer.get_layer(f"augment_{k}").set_key(100 + epoch + k)
            orders = [np.random.default_rng([epoch, k]).permutation(100).astype(np.int32) for k in range(2)]
            logs.append(read_member_logs(train_epoch(trainer, orders, [labels[o] for o in orders], 32,
                                                     steps_per_call=per_call), 2))
        freed.append(weakref.ref(trainer))
        return logs, [w for m in members for w in m.get_weights()], int(trainer.optimizer.iterations.numpy())

    freed = []
    one = train(1)
    assert one[2] == 8 and len({loss for epoch in one[0] for loss, _ in epoch}) == 4
    for per_call in (3, 8):
        logs, weights, steps = train(per_call)
        assert logs == one[0] and steps == one[2]
        for a, b in zip(weights, one[1]):
            np.testing.assert_array_equal(a, b)
    gc.collect()
    assert [ref() for ref in freed] == [None] * 3  # the compiled loop does not keep its trainer (and images)


def test_jax_ray_tasks_sharing_a_gpu_take_their_share_without_reserving_it_first():
    """JAX reserves 75% of a GPU on start: four tasks of --gpus-per-member 0.25 would run out of memory. Their
    environment turns that off and caps each at its share; TensorFlow's memory grows as needed already."""
    from emnist_cnn.training.scaleout import build_gpu_memory_env

    assert build_gpu_memory_env(0.25, "jax") == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                                                 "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.250",
                                                 "XLA_CLIENT_MEM_FRACTION": "0.250"}
    assert build_gpu_memory_env(0.0, "jax") == build_gpu_memory_env(0.5, "tensorflow") == {}

