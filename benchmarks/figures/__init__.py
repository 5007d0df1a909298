"""One module per figure group of `make bench`; `GROUPS` maps a group's name to the function measuring it."""

from __future__ import annotations

from typing import Callable

from ..harness import Results, Sizes
from .augmentation import bench_aug
from .bf16 import bench_bf16
from .compile import bench_compile
from .ensemble import bench_ensemble
from .fixed_work import bench_fixed
from .flops import bench_flops
from .load import bench_load
from .memory import bench_memory
from .predict import bench_predict
from .step import bench_step
from .torch_baseline import bench_torch
from .training import bench_train

GROUPS: dict[str, Callable[[Results, Sizes, dict], None]] = {
    "aug": bench_aug, "train": bench_train, "torch": bench_torch, "bf16": bench_bf16, "flops": bench_flops,
    "ensemble": bench_ensemble, "predict": bench_predict, "step": bench_step, "fixed": bench_fixed,
    "compile": bench_compile, "load": bench_load, "memory": bench_memory,
}
