"""95% percentile-bootstrap intervals for eval's rates and the report's run-vs-run comparisons.

Every function resamples *items* (generations, comparisons, prefixes) with replacement `n` times
with a seeded numpy generator, recomputes the statistic on each resample and returns the
(2.5%, 97.5%) percentiles (`level` = 0.95) as plain floats, in the units of the statistic itself
(multiply the inputs by 100 for a rate in %, or pass `scale=100`). The same inputs, `n` and `seed`
give the same interval on every call and machine. Missing values (None / NaN) are dropped; with
nothing left, or a statistic undefined on every resample, the interval is (None, None).

- `bootstrap_ci(values)`: the mean (or median, or any callable) of one sample.
- `ratio_ci(num, den)`: sum(num) / sum(den) of per-item counts (claim precision = true / claims,
  reference recall = recalled / reference facts), items resampled whole, so the interval accounts
  for items with many claims counting more.
- `paired_ci(a, b)`: mean(a) - mean(b) (or mean(a) / mean(b)) of two runs measured on the same
  items (the same sample_ids, aligned): both are resampled with the *same* indices, so the
  per-item correlation narrows the interval of the difference.
- `paired_ratio_ci(num_a, den_a, num_b, den_b)`: ratio_a - ratio_b (or ratio_a / ratio_b) with
  ratio = sum(num) / sum(den), the items resampled jointly (claim precision of SIPT vs NTP).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Interval = tuple  # (lo, hi): floats, or (None, None) when not computable
_NONE = (None, None)


def _array(values: Sequence) -> np.ndarray:
    return np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _indices(m: int, n: int, seed: int) -> np.ndarray:
    """n resamples of m item indices, with replacement (shape n x m)."""
    return np.random.default_rng(seed).integers(0, m, size=(n, m))


def _interval(stats: np.ndarray, level: float, scale: float) -> Interval:
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return _NONE
    a = (1.0 - level) / 2.0
    lo, hi = np.percentile(stats, [100.0 * a, 100.0 * (1.0 - a)])
    return float(lo * scale), float(hi * scale)


def bootstrap_ci(values: Sequence, statistic: str | Callable = "mean", n: int = 2000, seed: int = 0,
                 level: float = 0.95, scale: float = 1.0) -> Interval:
    """Percentile-bootstrap interval of `statistic` ("mean", "median" or a function of a 1-d array)
    of `values` (None / NaN dropped). For a rate in %, pass 0/1 values and `scale=100`."""
    x = _array(values)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return _NONE
    boot = x[_indices(x.size, n, seed)]
    if statistic == "mean":
        stats = boot.mean(axis=1)
    elif statistic == "median":
        stats = np.median(boot, axis=1)
    elif callable(statistic):
        stats = np.asarray([statistic(row) for row in boot], dtype=np.float64)
    else:
        raise ValueError(f"statistic: 'mean', 'median' or a function, not {statistic!r}")
    return _interval(stats, level, scale)


def _pairs(num: Sequence, den: Sequence) -> tuple[np.ndarray, np.ndarray]:
    a, b = _array(num), _array(den)
    if a.shape != b.shape:
        raise ValueError(f"num and den differ in length ({a.size} vs {b.size})")
    return a, b


def _ratios(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> np.ndarray:
    top, bottom = num[idx].sum(axis=1), den[idx].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.nan)


def ratio_ci(num: Sequence, den: Sequence, n: int = 2000, seed: int = 0, level: float = 0.95,
             scale: float = 1.0) -> Interval:
    """Interval of sum(num) / sum(den), resampling items (index i keeps num[i] and den[i] together).
    Items with a missing num or den are dropped; resamples whose den sums to 0 are left out."""
    a, b = _pairs(num, den)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size == 0 or b.sum() <= 0:
        return _NONE
    return _interval(_ratios(a, b, _indices(a.size, n, seed)), level, scale)


def _combine(x: np.ndarray, y: np.ndarray, statistic: str) -> np.ndarray:
    if statistic == "difference":
        return x - y
    if statistic == "ratio":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(y != 0, x / np.where(y != 0, y, 1.0), np.nan)
    raise ValueError(f"statistic: 'difference' or 'ratio', not {statistic!r}")


def paired_ci(a: Sequence, b: Sequence, statistic: str = "difference", n: int = 2000, seed: int = 0,
              level: float = 0.95, scale: float = 1.0) -> Interval:
    """Interval of mean(a) - mean(b) ("difference") or mean(a) / mean(b) ("ratio"), where a[i] and
    b[i] are two runs' values on the same item (aligned by sample_id); items missing either value
    are dropped, and the rest are resampled jointly."""
    x, y = _pairs(a, b)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size == 0:
        return _NONE
    idx = _indices(x.size, n, seed)
    return _interval(_combine(x[idx].mean(axis=1), y[idx].mean(axis=1), statistic), level, scale)


def paired_ratio_ci(num_a: Sequence, den_a: Sequence, num_b: Sequence, den_b: Sequence,
                    statistic: str = "difference", n: int = 2000, seed: int = 0, level: float = 0.95,
                    scale: float = 1.0) -> Interval:
    """Interval of ratio_a - ratio_b ("difference") or ratio_a / ratio_b ("ratio"), ratio_x =
    sum(num_x) / sum(den_x), for two runs on the same items (all four aligned by sample_id): item
    indices are resampled jointly. Items missing any value are dropped; resamples where a ratio is
    undefined (a den sums to 0) are left out."""
    na, da = _pairs(num_a, den_a)
    nb, db = _pairs(num_b, den_b)
    if na.shape != nb.shape:
        raise ValueError(f"runs a and b differ in length ({na.size} vs {nb.size})")
    keep = np.isfinite(na) & np.isfinite(da) & np.isfinite(nb) & np.isfinite(db)
    na, da, nb, db = na[keep], da[keep], nb[keep], db[keep]
    if na.size == 0 or da.sum() <= 0 or db.sum() <= 0:
        return _NONE
    idx = _indices(na.size, n, seed)
    return _interval(_combine(_ratios(na, da, idx), _ratios(nb, db, idx), statistic), level, scale)
