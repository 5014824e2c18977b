"""Statistics over seeds: mean ± sample std, and paired differences with a 95% CI.

* `mean_std`: the sample standard deviation (ddof = 1) is undefined for one seed and then
  returned as None (printed "n/a", never "± 0.00").
* `paired_difference`: runs of two upsamplers with the same seed share data and initialisation
  streams, so their difference per seed is the unit of comparison. The interval is the
  Student-t one, `mean(d) ± t_{0.975, n-1} * std(d) / sqrt(n)` (n = number of paired seeds);
  it assumes the per-seed differences are roughly normal, which small-sample bootstrap
  intervals would not fix (with 5 seeds a bootstrap interval is too narrow).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as _scipy_stats  # a dependency of jax itself

CONFIDENCE = 0.95


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample std with ddof=1); std is None for fewer than two values."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        raise ValueError("values must hold at least one number, got an empty sequence")
    std = float(np.std(values, ddof=1)) if values.size > 1 else None
    return float(np.mean(values)), std


def t_interval(differences: Sequence[float],
               confidence: float = CONFIDENCE) -> tuple[float, list[float] | None]:
    """(mean, [low, high]) Student-t interval of the mean; None for fewer than two values."""
    d = np.asarray(differences, np.float64)
    mean, std = mean_std(d)
    if std is None:
        return mean, None
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, d.size - 1)) * std / math.sqrt(d.size)
    return mean, [mean - half, mean + half]


def paired_difference(values: Mapping[int, float], baseline: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> dict | None:
    """`values - baseline` paired by seed (the keys): `{"mean", "ci95", "n"}`.

    Only seeds present in both count; None when there are none. `ci95` is None for one seed.
    """
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    mean, ci = t_interval([values[s] - baseline[s] for s in seeds], confidence)
    return {"mean": mean, "ci95": ci, "n": len(seeds)}


def verdict(diff: dict | None) -> str:
    """"better" / "worse" when the CI excludes 0, "tie" when it holds 0, "n/a" without a CI."""
    if diff is None or diff["ci95"] is None:
        return "n/a"
    low, high = diff["ci95"]
    return "better" if low > 0 else "worse" if high < 0 else "tie"


def format_mean_std(mean: float, std: float | None, scale: float = 100.0,
                    digits: int = 2) -> str:
    """`"79.61 ± 0.63"`, or `"79.61 ± n/a"` when the std is undefined (one seed)."""
    spread = "n/a" if std is None else f"{scale * std:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {spread}"


def format_difference(diff: dict | None, scale: float = 100.0, digits: int = 2) -> str:
    """`"+1.23 [+0.10, +2.36]"`; `"+1.23 [n/a]"` for one seed; `""` without a baseline."""
    if diff is None:
        return ""
    if diff["ci95"] is None:
        return f"{scale * diff['mean']:+.{digits}f} [n/a]"
    low, high = diff["ci95"]
    return f"{scale * diff['mean']:+.{digits}f} [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"
