"""Where training runs, said and recorded; the compiled step reads nothing back from the device until the epoch ends.

No GPU here: the GPU cases fake the backend's device list (`accelerator_available` and the GPU descriptions),
so the decisions and what is recorded are real, and the step then runs on the CPU as it would on the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

import emnist_cnn  # noqa: F401  (selects the backend before keras is imported)
import keras
from emnist_cnn.config import AugmentConfig, TrainConfig
from emnist_cnn.core import device, model as model_module
from emnist_cnn.core.device import describe_runtime, format_runtime
from emnist_cnn.core.model import build_model, compile_model
from emnist_cnn.core.trainer import DeviceImages, build_device_trainer, train_epoch
from emnist_cnn.engine.train import train_and_evaluate
from emnist_cnn.io.datasets import load_dataset
from emnist_cnn.io.rundir import RunDir

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
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
    assert line.startswith("training on /physical_device:GPU:0 Tesla T4 (7.5); fused; XLA on; mixed_bfloat16")


def test_a_run_says_and_records_where_it_trained(fake_gpu, tmp_path, tiny_mnist_dir, caplog):
    """The start-up line, config.json and the invocation record agree; `auto` chose XLA for the GPU, and the
    XLA-compiled step (gathering warp) trained."""
    cfg = TrainConfig(dataset="mnist", dropouts=(0.2,), models=2, epochs=1, checkpoint_every=1, batch_size=64,
                      val_fraction=0.2, bn_recalibration_images=100, limit_train=200)
    with caplog.at_level(logging.INFO, logger="emnist_cnn"):
        train_and_evaluate(cfg, tmp_path / "run", dataset=load_dataset("mnist", tiny_mnist_dir), verbose=0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training on ")]
    assert lines == ["training on /physical_device:GPU:0 Tesla T4 (7.5); fused; XLA on; float32; "
                     f"{keras.backend.backend()} backend"]
    run = RunDir(tmp_path / "run")
    recorded = json.loads(run.config_path.read_text())["runtime"]
    assert recorded == run.read_invocations()[-1]["runtime"]
    assert recorded["gpus"] == [T4] and recorded["xla"] is True and recorded["fused"] is True
    rows = run.read_history_rows(0.2, 0)
    assert len(rows) == 1 and float(rows[0]["loss"]) > 0


def _count_device_reads(fn) -> int:
    """`make bench`'s counter of blocking device reads (numpy(), float(), bool(), np.array of a tensor)."""
    spec = importlib.util.spec_from_file_location("bench_for_device_reads", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench.count_device_reads(fn)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the direct step loop is TensorFlow's")
def test_an_epoch_reads_from_the_device_once_not_every_step():
    """4 steps or 16 steps: the same few reads, all at the epoch's end (one per logged metric)."""
    rng = np.random.default_rng(0)
    images = DeviceImages(rng.integers(0, 256, (512, 28, 28), dtype=np.uint8))
    labels = rng.integers(0, 10, 512)
    reads = {}
    for batch in (128, 32):
        keras.utils.set_random_seed(0)
        members = [compile_model(build_model(), 1e-3) for _ in range(2)]
        trainer = build_device_trainer(members, images, AugmentConfig(), batch, 1e-3)
        orders = [rng.permutation(512).astype(np.int32) for _ in members]
        train_epoch(trainer, orders, [labels[o] for o in orders], batch)  # traces outside the count
        logs = {}
        targets = [labels[o] for o in orders]

        def epoch(trainer=trainer, orders=orders, targets=targets, batch=batch, logs=logs):
            logs.update(train_epoch(trainer, orders, targets, batch))

        reads[batch] = _count_device_reads(epoch)
        assert reads[batch] == len(logs)  # each metric once, when the epoch ends
    assert reads[128] == reads[32] <= 8


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's op determinism")
def test_op_determinism_turns_xla_off_and_the_record_says_so(fake_gpu, monkeypatch, caplog):
    """Keras runs a TensorFlow model without XLA when op determinism is on, whatever jit_compile asks."""
    monkeypatch.setenv("TF_DETERMINISTIC_OPS", "1")
    with caplog.at_level(logging.WARNING):
        assert describe_runtime("on", True, "float32")["xla"] is False
    assert "TF_DETERMINISTIC_OPS" in caplog.text
