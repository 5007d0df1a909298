"""Intervals and paired tests against known values: what tells a user whether two error rates differ."""

from __future__ import annotations

import numpy as np
import pytest

from emnist_cnn.core.metrics import ErrorRate
from emnist_cnn.core.stats import mcnemar_exact, standard_error_images, wilson_interval
from emnist_cnn.engine.evaluate import evaluate_ensemble


@pytest.mark.parametrize("k, n, low, high", [
    (0, 10, 0.0, 0.2775),  # Wilson (1927), the textbook case of no errors: still up to 28%
    (5, 10, 0.2366, 0.7634),
    (64, 40_000, 0.001253, 0.002042),  # the reference's 0.16% ensemble: 0.125% to 0.204%
])
def test_wilson_interval_known_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=5e-5 if n == 10 else 5e-7)


def test_one_standard_error_of_the_reference_result_is_about_8_images():
    assert standard_error_images(64, 40_000) == pytest.approx(7.99, abs=0.01)
    assert standard_error_images(0, 100) == 0.0


def test_error_rate_cells_carry_their_interval():
    assert str(ErrorRate(64, 40_000)) == "0.160% (64/40000; 95% CI 0.125-0.204%)"
    assert str(ErrorRate(0, 120)) == "0.000% (0/120; 95% CI 0.000-3.102%)"
    assert str(ErrorRate(0, 0)) == "-"


def test_mcnemar_exact_known_values():
    # 1 image wrong only in A, 6 only in B: p = 2 * (1 + 7) / 2**7 = 0.125; shared mistakes do not count.
    a = np.array([1, 0, 0, 0, 0, 0, 0, 1, 1, 0], bool)
    b = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool)
    r = mcnemar_exact(a, b)
    assert (r.only_a, r.only_b) == (1, 6) and r.p_value == pytest.approx(0.125)
    assert mcnemar_exact(b, a).p_value == pytest.approx(0.125)
    # 0 against 10 discordant images: p = 2 / 2**10.
    assert mcnemar_exact(np.zeros(10, bool), np.ones(10, bool)).p_value == pytest.approx(2 / 1024)
    assert mcnemar_exact(a, a).p_value == 1.0  # the same mistakes: no evidence of a difference
    with pytest.raises(ValueError, match="same images"):
        mcnemar_exact(a, b[:5])


def one_hot(predictions, n_classes=3):
    p = np.full((len(predictions), n_classes), 0.1 / (n_classes - 1), np.float32)
    p[np.arange(len(predictions)), predictions] = 0.9
    return p


def test_evaluation_tests_the_ensemble_against_its_best_member_on_the_same_images():
    labels = np.zeros(20, int)
    # Member 0 is best on validation; on the evaluated images it is wrong on 0-5, member 1 on 10-17,
    # member 2 on 0-1 and 10-11: the mean is wrong where two members agree on a wrong class (0-1, 10-11).
    wrong = {0: range(0, 6), 1: range(10, 18), 2: [0, 1, 10, 11]}
    probs = []
    for m in range(3):
        pred = np.zeros(20, int)
        pred[list(wrong[m])] = 1
        probs.append(one_hot(pred))
    val_labels = np.zeros(4, int)
    val = [one_hot([0, 0, 0, 0]), one_hot([1, 0, 0, 0]), one_hot([1, 1, 0, 0])]
    result = evaluate_ensemble(probs, labels, ["0", "1", "2"], val, val_labels).to_json()
    assert result["best_member"]["name"] == "0"
    assert result["ensemble"]["n_errors"] == 4
    t = result["ensemble_vs_best_member"]
    # Ensemble wrong on 0, 1, 10, 11; member 0 on 0-5: only the ensemble on 10, 11; only the member on 2-5.
    assert (t["only_ensemble_wrong"], t["only_member_wrong"]) == (2, 4)
    assert t["p_value"] == pytest.approx(2 * (1 + 6 + 15) / 64)
    assert result["ensemble"]["error_ci_pct"] == pytest.approx([100 * x for x in wilson_interval(4, 20)])
