"""How sure an error rate is, and whether two classifiers really differ: scipy.stats does the arithmetic.

With 64 errors in 40,000 images (the reference's ensemble) one standard error is
about 8 images, so differences of a few images between models are noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["CONFIDENCE", "McNemarResult", "wilson_interval", "standard_error_images", "mcnemar_exact"]

CONFIDENCE = 0.95  # of every interval this package prints


def wilson_interval(n_errors: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of the error fraction n_errors / n, as fractions in [0, 1]."""
    from scipy import stats  # deferred: readers of tables only rarely need scipy

    if n <= 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(int(n_errors), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def standard_error_images(n_errors: int, n: int) -> float:
    """One binomial standard error of the error count, in images: sqrt(n p (1 - p))."""
    if n <= 0:
        return float("nan")
    p = n_errors / n
    return math.sqrt(n * p * (1 - p))


@dataclass(frozen=True)
class McNemarResult:
    """Two classifiers on the same images: where exactly one of them is wrong, and the exact test's p-value."""

    only_a: int  # images A gets wrong and B gets right
    only_b: int  # images B gets wrong and A gets right
    p_value: float  # two-sided exact McNemar test (binomial on the discordant images, p = 1/2)

    def __str__(self) -> str:
        return f"{self.only_a} wrong only in A, {self.only_b} only in B, McNemar exact p = {self.p_value:.3g}"


def mcnemar_exact(wrong_a: np.ndarray, wrong_b: np.ndarray) -> McNemarResult:
    """McNemar's exact test on per-image wrong/right flags of two classifiers on the same images."""
    from scipy import stats

    wrong_a, wrong_b = np.asarray(wrong_a, bool), np.asarray(wrong_b, bool)
    if wrong_a.shape != wrong_b.shape:
        raise ValueError(f"McNemar needs the same images: {wrong_a.shape} and {wrong_b.shape} flags")
    only_a = int(np.count_nonzero(wrong_a & ~wrong_b))
    only_b = int(np.count_nonzero(wrong_b & ~wrong_a))
    if only_a + only_b == 0:  # identical mistakes: no evidence of any difference
        return McNemarResult(0, 0, 1.0)
    return McNemarResult(only_a, only_b, float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue))
