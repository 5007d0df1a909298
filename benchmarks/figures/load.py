"""load: decoding an EMNIST-sized .mat, and reopening the decoded cache."""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from emnist_cnn.demos import synthetic_images

from ..harness import NUM_CLASSES, Results, Sizes, alternate

log = logging.getLogger("bench")


def synthetic_mat(ctx: dict, s: Sizes) -> Path:
    """An EMNIST-Digits-sized emnist-digits.mat laid out as NIST's (written once per run)."""
    if "mat_dir" in ctx:
        return ctx["mat_dir"]
    import scipy.io

    d = Path(ctx["tmp"]) / "data"
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def stored(upright: np.ndarray) -> np.ndarray:
        # EMNIST's layout: a 784-pixel row is the upright image read column by column.
        return np.ascontiguousarray(upright.transpose(0, 2, 1)).reshape(len(upright), 784)

    rng = np.random.default_rng(9)
    per_writer = 100
    train = {
        "images": stored(synthetic_images(s.n_train, 10)),
        "labels": (np.arange(s.n_train) % NUM_CLASSES).astype(np.uint8).reshape(-1, 1),
        "writers": (np.arange(s.n_train) // per_writer).astype(np.uint16).reshape(-1, 1),
    }
    test = {
        "images": stored(synthetic_images(s.n_test, 11)),
        "labels": rng.permutation(np.arange(s.n_test) % NUM_CLASSES).astype(np.uint8).reshape(-1, 1),
        "writers": np.zeros((s.n_test, 1), np.uint16),
    }
    mapping = np.array([[i, 48 + i] for i in range(NUM_CLASSES)], np.uint8)
    scipy.io.savemat(d / "emnist-digits.mat", {"dataset": {"train": train, "test": test, "mapping": mapping}})
    del train, test
    size = (d / "emnist-digits.mat").stat().st_size
    log.info("wrote a synthetic emnist-digits.mat (%d + %d images, %.0f MB) in %.1f s", s.n_train, s.n_test,
             size / 1e6, time.perf_counter() - t0)
    ctx["mat_dir"] = d
    return d

def bench_load(res: Results, s: Sizes, ctx: dict) -> None:
    from emnist_cnn.io.datasets import load_dataset

    d = synthetic_mat(ctx, s)
    caches = Path(ctx["tmp"]) / "load-caches"
    old = os.environ.get("EMNIST_CNN_CACHE")
    counter = iter(range(10**6))
    first_cache: list[Path] = []

    def cold():
        cache = caches / f"cold-{next(counter)}"  # empty every time: decode, fingerprint, write the cache
        os.environ["EMNIST_CNN_CACHE"] = str(cache)
        ds = load_dataset("emnist-digits", d)
        assert not isinstance(ds.x_train, np.memmap)
        if not first_cache:
            first_cache.append(cache)
        else:
            shutil.rmtree(cache, ignore_errors=True)

    def warm():
        os.environ["EMNIST_CNN_CACHE"] = str(first_cache[0])
        ds = load_dataset("emnist-digits", d)
        assert isinstance(ds.x_train, np.memmap), "reopen did not come from the cache"

    try:
        log.info("load: %d cold .mat loads and %d cache reopens", s.load_reps, s.load_reps)
        tc = alternate({"cold .mat": cold}, s.load_reps)
        tw = alternate({"cache reopen": warm}, max(s.load_reps, 5))
    finally:
        if old is None:
            os.environ.pop("EMNIST_CNN_CACHE", None)
        else:
            os.environ["EMNIST_CNN_CACHE"] = old
        shutil.rmtree(caches, ignore_errors=True)
    what = f"{s.n_train:,} + {s.n_test:,} images"
    res.set("mat_load_s", statistics.median(tc["cold .mat"]),
            f"load_dataset, empty EMNIST_CNN_CACHE: loadmat + upright + fingerprint + cache write, {what} "
            "(file in the OS page cache)")
    res.set("cache_load_s", statistics.median(tw["cache reopen"]),
            "load_dataset again: memory-mapped .npy from the decoded cache (pages are read on first use)")
