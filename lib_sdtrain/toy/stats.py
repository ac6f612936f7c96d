"""95 % confidence intervals for the toy quality figures (no scipy: the formulas are short).

- `wilson(k, n)`: a proportion (fidelity, class share, ceiling): Wilson's score interval, which stays inside
  [0, 1] and is honest at 0 and 1, unlike the normal approximation.
- `paired_difference(a, b)`: the difference of two proportions measured on the SAME prompts and seeds
  (binding = token share - class share; bleeding = class share after - before; effect = token share after -
  before): Newcombe's score interval for paired binary data (Newcombe 1998, Stat. Med. 17:2635, method 10),
  built from the two Wilson intervals and the phi correlation of the pairs.
- `bootstrap_ratio(...)`: a ratio of two means (retention = world accuracy after / before on the same
  prompts; fidelity / ceiling): percentile bootstrap, resampling prompts (paired when the two lists pair up),
  2,000 resamples with a fixed seed, so the same data give the same interval.

- `mean_t(values)`: the mean of a few independent replicates (e.g. one figure from each of several training
  seeds): Student's t interval, so the spread between whole training runs, which no within-run interval sees,
  is what the interval measures.

Every function returns an `Interval` (value, lo, hi, n, method); `Interval.to_dict()` is what the bench's JSON
holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import UserError

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    value: float
    lo: float
    hi: float
    n: int
    method: str

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> dict:
        return {"value": round(self.value, 4), "lo": round(self.lo, 4), "hi": round(self.hi, 4), "n": self.n,
                "method": self.method}

    def text(self, percent: bool = False, signed: bool = False) -> str:
        f = 100.0 if percent else 1.0
        fmt = "{:+.0f}" if (percent and signed) else "{:.0f}" if percent else "{:+.2f}" if signed else "{:.2f}"
        return f"{fmt.format(self.value * f)} [{fmt.format(self.lo * f)}, {fmt.format(self.hi * f)}]"


def _check_counts(k: int, n: int) -> None:
    if n <= 0 or k < 0 or k > n:
        raise UserError(f"a proportion needs 0 <= k <= n and n > 0, not k={k}, n={n}")


def wilson_bounds(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    _check_counts(k, n)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact at the edges (rounding could put the bound a hair inside)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def wilson(k: int, n: int, z: float = Z95) -> Interval:
    """Share k/n with Wilson's score interval."""
    lo, hi = wilson_bounds(k, n, z)
    return Interval(k / n, lo, hi, n, "wilson")


def share(hits: Sequence[bool]) -> Interval:
    """`wilson` of a list of yes/no outcomes."""
    hits = [bool(h) for h in hits]
    if not hits:
        raise UserError("no outcomes to count")
    return wilson(sum(hits), len(hits))


def paired_difference(a: Sequence[bool], b: Sequence[bool], z: float = Z95) -> Interval:
    """P(a) - P(b) for paired yes/no outcomes (a[i] and b[i] share prompt and seed): Newcombe's method 10."""
    if len(a) != len(b) or not a:
        raise UserError(f"paired outcomes need two lists of the same non-zero length, not {len(a)} and {len(b)}")
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    n = len(a)
    both, only_a = int(np.sum(a & b)), int(np.sum(a & ~b))
    only_b, neither = int(np.sum(~a & b)), int(np.sum(~a & ~b))
    k1, k2 = both + only_a, both + only_b
    p1, p2 = k1 / n, k2 / n
    l1, u1 = wilson_bounds(k1, n, z)
    l2, u2 = wilson_bounds(k2, n, z)
    denom = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = 0.0
    if denom > 0:
        # Newcombe's phi: a positive ad - bc is first reduced by n/2 (never below zero)
        num = both * neither - only_a * only_b
        if num > 0:
            num = max(num - n / 2, 0.0)
        phi = num / math.sqrt(denom)
    d = p1 - p2
    dl = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    du = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return Interval(d, max(-1.0, d - dl), min(1.0, d + du), n, "newcombe-paired")


def bootstrap_ratio(num: Sequence[float], den: Sequence[float], *, paired: bool, resamples: int = 2000,
                    seed: int = 0) -> Interval:
    """mean(num) / mean(den) with a 95 % percentile-bootstrap interval (prompts resampled; together when
    `paired`, each list on its own otherwise). Resamples whose denominator is 0 are dropped."""
    x = np.asarray(num, dtype=np.float64)
    y = np.asarray(den, dtype=np.float64)
    if not len(x) or not len(y) or (paired and len(x) != len(y)):
        raise UserError(f"cannot bootstrap a ratio of {len(x)} and {len(y)} values"
                        + (" (paired lists must be the same length)" if paired else ""))
    if y.mean() == 0:
        raise UserError("the denominator of the ratio is 0")
    rng = np.random.default_rng(seed)
    ix = rng.integers(0, len(x), (resamples, len(x)))
    iy = ix if paired else rng.integers(0, len(y), (resamples, len(y)))
    top, bottom = x[ix].mean(1), y[iy].mean(1)
    ok = bottom > 0
    ratios = top[ok] / bottom[ok]
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return Interval(float(x.mean() / y.mean()), float(lo), float(hi), len(x),
                    "bootstrap-paired" if paired else "bootstrap")


# two-sided 95 % quantiles of Student's t, by degrees of freedom (1-30); beyond 30 the normal value is close
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_t(values: Sequence[float]) -> Interval:
    """Mean of independent replicates with Student's t 95 % interval (n - 1 degrees of freedom; n >= 2)."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) < 2 or not np.all(np.isfinite(x)):
        raise UserError("mean_t needs at least two finite values")
    df = len(x) - 1
    t = T95[df - 1] if df <= len(T95) else Z95
    half = t * float(x.std(ddof=1)) / math.sqrt(len(x))
    m = float(x.mean())
    return Interval(m, m - half, m + half, len(x), "t-replicates")


def separated(a: Interval, b: Interval) -> bool:
    """True when the two intervals do not overlap."""
    return a.hi < b.lo or b.hi < a.lo
