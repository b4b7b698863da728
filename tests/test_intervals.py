"""utils.intervals: Wilson intervals against the closed form by hand, seeded bootstraps, the two-group
bootstrap of the MIA AUC."""
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from utils.intervals import auc_ci, bootstrap_ci, f1_ci, weighted_f1, wilson

Z = 1.959964


def test_wilson_matches_the_closed_form_by_hand():
    # k = 8, n = 10: p = 0.8, z^2 = 3.841459; centre = (0.8 + 0.1920729) / 1.3841459 = 0.7167495,
    # half = z * sqrt(0.016 + 0.0096036) / 1.3841459 = 0.2266025
    z2 = Z * Z
    centre = (0.8 + z2 / 20) / (1 + z2 / 10)
    half = Z * math.sqrt(0.8 * 0.2 / 10 + z2 / 400) / (1 + z2 / 10)
    lo, hi = wilson(8, 10)
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-6)
    assert (lo, hi) == pytest.approx((0.4901625, 0.9433178), abs=1e-6)
    # k = 0, n = 5: p = 0, the interval is [0, z^2/n / (1 + z^2/n)] = [0, 0.4344825]
    lo, hi = wilson(0, 5)
    assert lo == pytest.approx(0.0, abs=1e-12)
    assert hi == pytest.approx((z2 / 5) / (1 + z2 / 5), abs=1e-6)
    assert hi == pytest.approx(0.4344825, abs=1e-6)
    # k = n mirrors k = 0; no rows, no interval
    assert wilson(5, 5) == pytest.approx((1 - hi, 1.0), abs=1e-9)
    assert wilson(0, 0) is None
    with pytest.raises(ValueError):
        wilson(6, 5)


def test_bootstrap_is_seeded_and_contains_the_estimate():
    x = np.random.default_rng(3).normal(10.0, 2.0, 200)
    a = bootstrap_ci(np.mean, x, n_boot=500, seed=1)
    assert a == bootstrap_ci(np.mean, x, n_boot=500, seed=1)
    assert a != bootstrap_ci(np.mean, x, n_boot=500, seed=2)
    assert a[0] < x.mean() < a[1]
    # the standard error of a mean of 200 rows with sd 2 is 0.14: the 95 % interval is about +-0.28
    assert 0.4 < a[1] - a[0] < 0.75
    # vectorised and per-resample calls draw the same rows, so they agree exactly
    assert bootstrap_ci(lambda b: b.mean(1), x, n_boot=500, seed=1, vectorised=True) == pytest.approx(a)
    assert bootstrap_ci(np.mean, np.array([]), n_boot=10) is None


def test_bootstrap_resamples_rows_jointly():
    # y == x on every row: any joint resample keeps them equal, so the difference never moves
    x = np.arange(50.0)
    assert bootstrap_ci(lambda a, b: np.mean(a - b), x, x.copy(), n_boot=200) == (0.0, 0.0)
    with pytest.raises(ValueError):
        bootstrap_ci(np.mean, x, x[:10])


def test_f1_interval_is_sklearns_f1_resampled():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, 300)
    y_pred = np.where(rng.random(300) < 0.8, y_true, rng.integers(-1, 4, 300))  # answers beyond the labels too
    assert weighted_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="weighted", zero_division=0))
    slow = bootstrap_ci(lambda t, p: f1_score(t, p, average="weighted", zero_division=0), y_true, y_pred,
                        n_boot=200, seed=5)
    assert f1_ci(y_true, y_pred, n_boot=200, seed=5) == pytest.approx(slow, abs=1e-12)


def test_auc_interval_covers_the_auc_and_narrows_with_rows():
    rng = np.random.default_rng(1)

    def sample(m, k):
        return np.round(rng.normal(0.5, 1, m), 1), np.round(rng.normal(0.0, 1, k), 1)  # ties included

    widths = []
    for m, k in ((40, 30), (400, 300), (4000, 3000)):
        mem, non = sample(m, k)
        auc = roc_auc_score(np.r_[np.ones(m), np.zeros(k)], np.r_[mem, non])
        lo, hi = auc_ci(mem, non, n_boot=400, seed=0)
        assert lo < auc < hi
        widths.append(hi - lo)
        assert auc_ci(mem, non, n_boot=400, seed=0) == (lo, hi)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]
    assert auc_ci([], [1.0]) is None
