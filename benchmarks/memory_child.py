"""The process `make bench`'s memory figure measures: one member's epoch on EMNIST-sized data, its peak RSS.

    python -m benchmarks.memory_child DIR STEPS   # DIR holds emnist-digits.mat; prints one JSON line

Kept apart from benchmarks/figures/ so that starting it imports nothing else of the benchmarks.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def rss_child(mat_dir: str, steps: int) -> None:
    """Runs in the peak-RSS subprocess: the memory path of one member's epoch on EMNIST-sized data."""
    started = time.perf_counter()
    from emnist_cnn.config import TrainConfig
    from emnist_cnn.core.trainer import DeviceImages, build_device_trainer, train_epoch
    from emnist_cnn.io.datasets import load_dataset
    from emnist_cnn.core.model import build_model, compile_model, predict_probabilities, recalibrate_batchnorm
    from emnist_cnn.training.prepare import prepare_data

    def maxrss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    phases: dict[str, tuple[float, float]] = {}
    clock = [started]

    def mark(name: str) -> None:
        now = time.perf_counter()
        phases[name] = (maxrss_mb(), now - clock[0])
        clock[0] = now

    mark("import")
    config = TrainConfig(dataset="emnist-digits")
    dataset = load_dataset("emnist-digits", mat_dir)
    mark("load")
    data = prepare_data(config, dataset)
    del dataset
    mark("prepare")
    model = build_model(data.num_classes, config.dropouts[0], data.mean, data.std, config.model)
    compile_model(model, config.lr)
    trainer = build_device_trainer([model], DeviceImages(data.x_train), config.augment, config.batch_size, config.lr)
    order = np.random.default_rng(0).permutation(len(data.y_train))[: steps * config.batch_size].astype(np.int32)
    train_epoch(trainer, [order], [data.y_train[order]], config.batch_size)
    mark("train")
    n_cal = min(config.bn_recalibration_images, len(data.y_train))
    calib = data.x_train[np.sort(np.random.default_rng(1).choice(len(data.y_train), n_cal, replace=False))]
    recalibrate_batchnorm(model, calib)
    mark("recalibrate")
    predict_probabilities(model, data.x_val)
    mark("val predict")
    try:  # the kernel's high-water mark of this process image, as a cross-check
        status = Path("/proc/self/status").read_text()
        vmhwm = float(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        vmhwm = float("nan")
    print(json.dumps({"peak_rss_mb": maxrss_mb(), "vmhwm_mb": vmhwm, "phases": phases}))


if __name__ == "__main__":
    rss_child(sys.argv[1], int(sys.argv[2]))
