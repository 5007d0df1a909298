"""The recipes' learning rate per optimizer step, and the rate a run's history records per epoch."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..config import TrainConfig

__all__ = ["WARMUP_START", "steps_per_epoch", "learning_rate_at", "build_step_rates", "build_epoch_rates"]

WARMUP_START = 0.1  # warm-up starts at this fraction of the peak rate


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps per epoch: every training image once, the last batch possibly smaller."""
    return max(1, math.ceil(n_train / batch_size))


def learning_rate_at(config: TrainConfig, epoch: int, step: int, n_steps: int, span: int | None = None) -> float:
    """The rate of `step` (0-based) of `epoch` (1-based) in a schedule of `span` (default `config.epochs`)
    epochs of `n_steps` steps.

    Warm-up rises linearly from WARMUP_START x peak to the peak; a linear decay
    then falls to zero at the step after the run's last (so the last step still
    moves the weights). Steps past the run's length (never taken) get the last rate.
    """
    recipe = config.recipe_spec
    peak = config.lr * recipe.lr_scale
    if not recipe.scheduled:
        return peak
    total = (span or config.epochs) * n_steps
    t = min((epoch - 1) * n_steps + step, total - 1)  # steps taken before this one
    warm = round(recipe.warmup_frac * total)
    if t < warm:
        return peak * (WARMUP_START + (1 - WARMUP_START) * t / warm)
    if recipe.decay == "linear":
        return peak * (total - t) / (total - warm)
    return peak


def build_step_rates(config: TrainConfig, n_train: int) -> np.ndarray:
    """float32 rate of every optimizer step of the run (step count t: epoch t // n_steps + 1, step t % n_steps):
    `learning_rate_at`'s, in one pass (a step at a time took seconds for the reference-fast preset)."""
    recipe = config.recipe_spec
    peak = config.lr * recipe.lr_scale
    total = config.epochs * steps_per_epoch(n_train, config.batch_size)
    if not recipe.scheduled:
        return np.full(total, peak, np.float32)
    # The same float64 operations, in the same order, as learning_rate_at: the same rates to the bit.
    t = np.arange(total)
    warm = round(recipe.warmup_frac * total)
    rates = peak * (total - t) / (total - warm) if recipe.decay == "linear" else np.full(total, peak)
    rates[:warm] = peak * (WARMUP_START + (1 - WARMUP_START) * t[:warm] / warm)
    return rates.astype(np.float32)


def build_epoch_rates(config: TrainConfig, n_train: int, span: int | None = None) -> Callable[[int], float]:
    """epoch -> the rate a history row records for it (that of the epoch's last step) in a schedule of
    `span` epochs (default `config.epochs`)."""
    n_steps = steps_per_epoch(n_train, config.batch_size)
    return lambda epoch: learning_rate_at(config, epoch, n_steps - 1, n_steps, span)
