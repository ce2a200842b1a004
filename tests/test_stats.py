"""sipt.stats: seeded percentile-bootstrap intervals."""

import numpy as np
import pytest

from sipt import stats


def test_bootstrap_ci_contains_the_mean_narrows_and_is_seeded():
    rng = np.random.default_rng(1)
    small = rng.normal(10.0, 2.0, size=50)
    large = rng.normal(10.0, 2.0, size=2000)
    lo, hi = stats.bootstrap_ci(small)
    assert lo < small.mean() < hi and 9.0 < lo < hi < 11.0
    lo2, hi2 = stats.bootstrap_ci(large)
    assert lo2 < large.mean() < hi2 and (hi2 - lo2) < (hi - lo) / 4  # ~ 1/sqrt(40) as wide
    assert stats.bootstrap_ci(small, seed=0) == stats.bootstrap_ci(list(small), seed=0)  # same seed, same interval
    assert stats.bootstrap_ci(small, seed=1) != stats.bootstrap_ci(small, seed=0)
    # a rate in %: 0/1 values scaled; missing values dropped; a constant sample has no spread
    rate = [1.0] * 30 + [0.0] * 70 + [None] * 5
    lo, hi = stats.bootstrap_ci(rate, scale=100)
    assert lo < 30.0 < hi and 15 < lo and hi < 45
    assert stats.bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    assert stats.bootstrap_ci([]) == stats.bootstrap_ci([None]) == (None, None)
    lo, hi = stats.bootstrap_ci(small, statistic="median")
    assert lo < np.median(small) < hi


def test_ratio_ci_is_around_the_pooled_ratio():
    rng = np.random.default_rng(2)
    den = rng.integers(0, 6, size=400)
    num = rng.binomial(den, 0.3)
    lo, hi = stats.ratio_ci(num, den, scale=100)
    assert lo < 100 * num.sum() / den.sum() < hi and lo < 30.0 < hi and hi - lo < 10
    assert stats.ratio_ci(num, den) == stats.ratio_ci(list(num), list(den))
    assert stats.ratio_ci([0, 0], [0, 0]) == (None, None)
    with pytest.raises(ValueError):
        stats.ratio_ci([1, 2], [3])


def test_paired_intervals_resample_items_jointly():
    rng = np.random.default_rng(3)
    # two runs on the same 300 items: b = a plus a small item-level shift, so pairing removes the item noise
    a = rng.normal(0.0, 5.0, size=300)
    b = a - 1.0 + rng.normal(0.0, 0.5, size=300)
    lo, hi = stats.paired_ci(a, b)
    assert lo < (a - b).mean() < hi and lo > 0.8 and hi < 1.2
    unpaired = stats.bootstrap_ci(a)[1] - stats.bootstrap_ci(a)[0]
    assert hi - lo < unpaired / 5
    lo, hi = stats.paired_ci([2.0] * 20, [1.0] * 20, statistic="ratio")
    assert (lo, hi) == (2.0, 2.0)
    # claim precision of run a (0.6) vs run b (0.4) on the same generations
    den = rng.integers(1, 6, size=500)
    num_a, num_b = rng.binomial(den, 0.6), rng.binomial(den, 0.4)
    lo, hi = stats.paired_ratio_ci(num_a, den, num_b, den, scale=100)
    diff = 100 * (num_a.sum() - num_b.sum()) / den.sum()
    assert lo < diff < hi and lo < 20.0 < hi and lo > 0
    lo, hi = stats.paired_ratio_ci(num_a, den, num_b, den, statistic="ratio")
    assert lo < num_a.sum() / num_b.sum() < hi and lo < 1.5 < hi and lo > 1
    assert stats.paired_ratio_ci(num_a, den, num_b, den) == stats.paired_ratio_ci(num_a, den, num_b, den)
