"""Synthetic digits and instruments for the tests, the benchmarks and the notebooks' tests (as
`lightning.pytorch.demos`): classes a model learns in an epoch or two, written as MNIST's files; EMNIST-like
noise for timing; a counter of blocking device reads."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from .config import IMAGE_SIDE

__all__ = ["make_tiny_digits", "write_mnist_idx", "synthetic_images", "count_device_reads"]


def make_tiny_digits(n_train: int = 600, n_test: int = 200, seed: int = 0):
    """Ten learnable synthetic classes: a fixed random stroke pattern per class, jittered."""
    rng = np.random.default_rng(seed)
    templates = np.zeros((10, 28, 28), np.float32)
    for c in range(10):
        for _ in range(3):
            r, col = rng.integers(6, 22, size=2)
            dr, dc = rng.integers(-1, 2, size=2)
            for t in range(8):
                rr, cc = np.clip(r + t * dr, 2, 25), np.clip(col + t * dc, 2, 25)
                templates[c, rr - 1 : rr + 2, cc - 1 : cc + 2] = 1.0

    def draw(n):
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = templates[y]
        shifts = rng.integers(-2, 3, size=(n, 2))
        x = np.stack([np.roll(img, tuple(s), axis=(0, 1)) for img, s in zip(x, shifts)])
        x = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
        return (x * 255).astype(np.uint8), y.astype(np.int64)

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return x_train, y_train, x_test, y_test


def write_mnist_idx(folder: Path, x_train, y_train, x_test, y_test) -> Path:
    """Write arrays as classic MNIST gzip idx files (upright images)."""
    folder.mkdir(parents=True, exist_ok=True)

    def images(path, x):
        with gzip.open(path, "wb") as f:
            f.write(struct.pack(">IIII", 2051, len(x), 28, 28) + np.ascontiguousarray(x, np.uint8).tobytes())

    def labels(path, y):
        with gzip.open(path, "wb") as f:
            f.write(struct.pack(">II", 2049, len(y)) + np.asarray(y, np.uint8).tobytes())

    images(folder / "train-images-idx3-ubyte.gz", x_train)
    labels(folder / "train-labels-idx1-ubyte.gz", y_train)
    images(folder / "t10k-images-idx3-ubyte.gz", x_test)
    labels(folder / "t10k-labels-idx1-ubyte.gz", y_test)
    return folder


def synthetic_images(n: int, seed: int = 0) -> np.ndarray:
    """Sparse 0/255 strokes with roughly EMNIST Digits' ink fraction, uint8 (n, 28, 28)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, IMAGE_SIDE, IMAGE_SIDE), np.uint8)
    for start in range(0, n, 50_000):
        part = rng.integers(0, 256, (min(50_000, n - start), IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
        out[start : start + len(part)] = (part > 212).astype(np.uint8) * 255
    return out


def count_device_reads(fn: Callable[[], None]) -> int:
    """Blocking reads of device values while `fn` runs: TensorFlow tensors turned into host values (`numpy()`,
    `float()`, `bool()`, `np.array`/`np.asarray` of a tensor). TensorFlow backend only."""
    import tensorflow as tf
    from tensorflow.python.framework import ops as tf_ops

    count = [0]
    real_numpy, real_array, real_asarray = tf_ops._EagerTensorBase._numpy, np.array, np.asarray

    def counting_numpy(self):
        count[0] += 1
        return real_numpy(self)

    def counting(real):
        def convert(obj, *args, **kwargs):
            count[0] += isinstance(obj, tf.Tensor)
            return real(obj, *args, **kwargs)
        return convert

    tf_ops._EagerTensorBase._numpy, np.array, np.asarray = counting_numpy, counting(real_array), counting(real_asarray)
    try:
        fn()
    finally:
        tf_ops._EagerTensorBase._numpy, np.array, np.asarray = real_numpy, real_array, real_asarray
    return count[0]
