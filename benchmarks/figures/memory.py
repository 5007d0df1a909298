"""memory: the peak resident memory of an EMNIST-sized training process, measured in a process of its own."""

from __future__ import annotations

import json
import logging
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


from ..harness import Results, Sizes
from .load import synthetic_mat

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[2]  # where `python -m benchmarks...` finds the benchmarks


def bench_memory(res: Results, s: Sizes, ctx: dict) -> None:
    d = synthetic_mat(ctx, s)
    cache = Path(ctx["tmp"]) / "rss-cache"
    env = dict(os.environ, EMNIST_CNN_CACHE=str(cache))
    cmd = [sys.executable, "-m", __name__, str(d), str(s.rss_steps)]
    # Linux keeps a process's ru_maxrss across exec, and a child started straight from this
    # (large) process starts with our peak (vfork shares our memory until exec; fork copies
    # its page counts). A shell that forks the child from its own small image gives the
    # child a clean count; the trailing `exit` stops sh from exec'ing python in place.
    cmd = ["/bin/sh", "-c", shlex.join(cmd) + "; exit $?"]
    log.info("peak RSS: subprocess with %d training steps (cold .mat load, empty cache)", s.rss_steps)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-RSS subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    for phase, (mib, secs) in child["phases"].items():
        log.info("  %-12s max RSS %6.0f MiB, %5.1f s", phase, mib, secs)
    phases = ", ".join(f"{k} {v[0]:,.0f}" for k, v in child["phases"].items())
    res.set("peak_rss_mb", child["peak_rss_mb"], f"ru_maxrss of a subprocess: load_dataset (.mat, empty cache) + "
            f"prepare_data(TrainConfig()) + {s.rss_steps} steps + BN recalibration + val predict "
            f"({time.perf_counter() - t0:.0f} s); max MiB after {phases}; VmHWM {child['vmhwm_mb']:,.0f}")

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


if __name__ == "__main__":  # the measured process: python -m benchmarks.figures.memory DIR STEPS
    rss_child(sys.argv[1], int(sys.argv[2]))
