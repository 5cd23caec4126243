"""Statistics for comparing runs evaluated on the same images (numpy and the standard library only).

What each one answers for someone looking at two runs, A and B, scored on one test split:

- `mcnemar_exact(b, c)`: "is B's accuracy really different from A's, or could the images they
  disagree on have split this way by chance?" Only the discordant images count (b: A right, B wrong;
  c: the reverse); a small p-value means the difference is unlikely to be luck of the split.
- `paired_bootstrap(correct_a, correct_b)`: "how large is the difference, give or take?" A percentile
  interval for accuracy(B) - accuracy(A). Both runs are resampled on the same image indices, so the
  interval reflects their disagreement, not the (shared) difficulty of the split.
- `accuracy_interval(correct, n)`: "how precisely does this split pin down one accuracy?" The Wilson
  score interval; its width is what a data card quotes for the split size.
- `flipped(paths, correct_a, correct_b)`: "which images changed?" The b and c images, by path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

# The bootstrap's index block is int64 plus its gathered int8 differences: 9 bytes per (resample, image).
_BOOTSTRAP_BYTES = 64 * 2**20
_BYTES_PER_DRAW = 9


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    estimate: float

    @property
    def width(self) -> float:
        return self.high - self.low


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: min(1, 2 P(X <= min(b, c))) for X ~ Binomial(b + c, 1/2).

    Evaluated in floating point in O(min(b, c)) time: 5 ms at b + c = 100k, where exact integers take 2 s.
    Relative error against exact fractions: 2e-14 for b, c <= 200, 4e-12 at b + c = 100k.
    Below 1e-308 it loses digits and below 5e-324 it underflows to 0.0 (b = 0 and c >= 1076, say).
    """
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: b={b} and c={c} are image counts and must be >= 0")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    up = (n - np.arange(k)) / np.arange(1, k + 1)  # up[i] = P(X = i + 1) / P(X = i)
    # log2 keeps the 2^-n factor exact; fsum keeps k rounded logs from adding up their errors.
    log2_pmf_k = math.fsum(np.log2(up)) - n
    # Walking down from k each ratio is < 1 (k <= n/2), so the terms shrink and underflow harmlessly.
    tail_over_pmf_k = 1.0 + float(np.cumprod(1.0 / up[::-1]).sum())
    return min(1.0, 2.0 ** (1.0 + log2_pmf_k + math.log2(tail_over_pmf_k)))


def _paired(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(correct_a), np.asarray(correct_b)
    for name, x in (("correct_a", a), ("correct_b", b)):
        # Not a cast: labels or scores passed by mistake would silently become "correct" flags.
        if x.ndim != 1 or x.dtype != np.bool_:
            raise ValueError(f"{name} must be a 1-D bool array (one flag per image), got {x.dtype} of shape {x.shape}")
    if a.shape != b.shape:
        raise ValueError(f"correct_a has {a.size} images and correct_b {b.size}: both runs must score the same images")
    return a, b


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must be strictly between 0 and 1 (e.g. 0.95)")


def paired_bootstrap(
    correct_a: np.ndarray, correct_b: np.ndarray, *, resamples: int = 10000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Percentile bootstrap interval for accuracy(B) - accuracy(A), resampling images for both runs at once.

    Draws are resample-major: resample r uses draws r*n .. r*n + n - 1 of np.random.default_rng(seed)
    .integers(0, n). numpy's integer stream does not depend on how a request is split, so the result is
    the same for any chunk size, i.e. for any memory budget, and equals a loop drawing one row at a time.
    """
    a, b = _paired(correct_a, correct_b)
    n = a.size
    if n == 0:
        raise ValueError("paired_bootstrap: no images; both runs must have scored at least one image")
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be >= 1")
    _check_level(level)
    diff = b.astype(np.int8) - a.astype(np.int8)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_BYTES // (_BYTES_PER_DRAW * n))
    # Integer sums divided by n: every resample's value is exact up to one rounding, as is the estimate.
    sums = np.empty(resamples, dtype=np.int64)
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        sums[start : start + rows] = diff[rng.integers(0, n, size=(rows, n))].sum(axis=1, dtype=np.int64)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(sums / n, [tail, 1.0 - tail])
    return Interval(float(low), float(high), int(diff.sum(dtype=np.int64)) / n)


def accuracy_interval(correct: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval for an accuracy of correct/n: unlike the normal (Wald) interval it stays
    inside [0, 1] and keeps its coverage near 0% and 100%, where good classifiers live."""
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"accuracy_interval: need 0 <= correct <= n and n >= 1, got correct={correct}, n={n}")
    _check_level(level)
    z = NormalDist().inv_cdf((1.0 + level) / 2.0)
    p, z2 = correct / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At 0% or 100% the matching bound is exactly p; the formula gets it only up to rounding.
    low = 0.0 if correct == 0 else max(0.0, center - half)
    high = 1.0 if correct == n else min(1.0, center + half)
    return Interval(low, high, p)


def flipped(paths: list[str], correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[list[str], list[str]]:
    """(images A got right and B wrong, images B got right and A wrong): McNemar's b and c, by path."""
    a, b = _paired(correct_a, correct_b)
    if len(paths) != a.size:
        raise ValueError(f"flipped: {len(paths)} paths for {a.size} scored images; they must pair one to one")
    a_only = [path for path, x, y in zip(paths, a, b) if x and not y]
    b_only = [path for path, x, y in zip(paths, a, b) if y and not x]
    return a_only, b_only
