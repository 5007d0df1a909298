"""Wall time of one training epoch on EMNIST-Digits-sized data, with and without augmentation.

Uses a synthetic stand-in of EMNIST Digits' size (240,000 training images, 10%
held out for validation as by default), and runs the real epoch code: batches,
augmentation, optimizer steps, BatchNormalization recalibration, validation,
checkpoint state. By default it times `--steps` optimizer steps and scales to a
full epoch; `--full` times a whole epoch.

    .venv/bin/python -m benchmarks.epoch_time [--steps 60] [--full] [--batch-size 512]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np

import emnist_cnn  # noqa: F401  (selects the backend)
from emnist_cnn.config import AugmentConfig, TrainConfig
from emnist_cnn.core.augment import augment_batch
from emnist_cnn.io.rundir import RunDir
from emnist_cnn.training.members import TrainContext, open_member, train_members_to
from emnist_cnn.training.prepare import PreparedData


def synthetic_data(n_train: int, n_val: int, n_test: int, seed: int = 0) -> PreparedData:
    rng = np.random.default_rng(seed)
    # Sparse strokes like digits, so the data has EMNIST's ink statistics roughly.
    def images(n):
        x = (rng.random((n, 28, 28)) > 0.83).astype(np.uint8) * 255
        return x

    return PreparedData(
        name="emnist-digits", classes=tuple("0123456789"),
        x_train=images(n_train), y_train=rng.integers(0, 10, n_train),
        x_val=images(n_val), y_val=rng.integers(0, 10, n_val),
        x_test=images(n_test), y_test=rng.integers(0, 10, n_test),
        mean=0.173, std=0.332, fingerprint="synthetic", source="synthetic",
    )


def time_epoch(augment: bool, args) -> dict:
    n_val = 24_000
    n_train = 240_000 - n_val
    steps_full = math.ceil(n_train / args.batch_size)
    n_timed = n_train if args.full else min(n_train, args.steps * args.batch_size)
    data = synthetic_data(n_timed, n_val, 0)
    cfg = TrainConfig(dataset="emnist-digits", dropouts=(0.2,), models=1, epochs=3, checkpoint_every=100,
                      batch_size=args.batch_size, augment=AugmentConfig(enabled=augment))
    calib = data.x_train[: cfg.bn_recalibration_images]
    with tempfile.TemporaryDirectory() as run:
        member = open_member(RunDir(run), cfg, data, 0.2, 0, cfg.lr)
        # Warm-up: trace the train step on a small slice so tracing is not timed.
        warm = PreparedData(**{**data.__dict__, "x_train": data.x_train[: 2 * args.batch_size],
                               "y_train": data.y_train[: 2 * args.batch_size]})
        train_members_to([member], 1, TrainContext(RunDir(run), cfg, warm, calib[:1000], verbose=0))
        t0 = time.perf_counter()
        train_members_to([member], 2, TrainContext(RunDir(run), cfg, data, calib, verbose=0))
        timed = time.perf_counter() - t0
    # Split the timed epoch into the per-step part and the fixed per-epoch part.
    fixed = time_fixed_part(member, data, calib, cfg)
    per_step = (timed - fixed) / math.ceil(n_timed / args.batch_size)
    epoch = per_step * steps_full + fixed
    return {"augment": augment, "timed_images": n_timed, "timed_s": timed, "epoch_s": epoch,
            "train_img_s": (n_timed / (timed - fixed)), "fixed_s": fixed}


def time_fixed_part(member, data, calib, cfg) -> float:
    from emnist_cnn.core.model import predict_probabilities, recalibrate_batchnorm

    t0 = time.perf_counter()
    recalibrate_batchnorm(member.model, calib)
    predict_probabilities(member.model, data.x_val)
    return time.perf_counter() - t0


def time_augmentation(batch_size: int, n_batches: int = 30) -> float:
    rng = np.random.default_rng(0)
    x = (rng.random((batch_size, 28, 28)) > 0.83).astype(np.uint8) * 255
    augment_batch(x, rng, AugmentConfig())
    t0 = time.perf_counter()
    for _ in range(n_batches):
        np.asarray(augment_batch(x, rng, AugmentConfig()))
    return n_batches * batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps to time per setting (default: 60)")
    p.add_argument("--full", action="store_true", help="time a whole epoch instead (default: off)")
    p.add_argument("--batch-size", type=int, default=512, help="images per step (default: 512)")
    args = p.parse_args()
    print(f"augmentation alone: {time_augmentation(args.batch_size):,.0f} images/s")
    rows = [time_epoch(True, args), time_epoch(False, args)]
    print(f"EMNIST-Digits-sized epoch (216,000 train + 24,000 val images), batch {args.batch_size}:")
    print(f"{'augmentation':<13} {'timed images':>12} {'train img/s':>12} {'per-epoch fixed s':>18} "
          f"{'epoch wall s':>13}")
    for r in rows:
        print(f"{'on' if r['augment'] else 'off':<13} {r['timed_images']:>12,} {r['train_img_s']:>12,.0f} "
              f"{r['fixed_s']:>18.1f} {r['epoch_s']:>13.1f}")
    print(f"augmentation cost: {100 * (1 - rows[0]['train_img_s'] / rows[1]['train_img_s']):.1f}% of "
          "training throughput")


if __name__ == "__main__":
    main()
