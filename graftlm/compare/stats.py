"""Intervals and paired tests for comparing systems on the same held-out examples.

* `wilson_interval`: the Wilson score interval of a proportion (accuracy over n questions).
* `mcnemar_exact`: the exact (binomial) McNemar test of two systems' correctness on the same questions.
* `paired_bootstrap`: a percentile bootstrap over examples of the mean paired difference (any per-example
  score, e.g. correctness averaged over training seeds, or per-block NLL), with a two-sided p-value.
* `bootstrap_interval`: the percentile bootstrap interval of a mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval (default 95%) of ``successes`` out of ``n``; (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def mcnemar_exact(reference: Sequence[bool], other: Sequence[bool]) -> dict[str, float]:
    """The exact two-sided McNemar test: under H0 the discordant pairs split 50/50.

    Returns ``only_other`` (questions only ``other`` answers correctly), ``only_reference`` and ``p``.
    """
    if len(reference) != len(other):
        raise ValueError(f"paired samples of different sizes: {len(reference)} and {len(other)}")
    only_other = sum(1 for r, o in zip(reference, other) if o and not r)
    only_reference = sum(1 for r, o in zip(reference, other) if r and not o)
    discordant = only_other + only_reference
    smaller = min(only_other, only_reference)
    tail = sum(math.comb(discordant, k) for k in range(smaller + 1)) / 2**discordant if discordant else 1.0
    return {"only_other": only_other, "only_reference": only_reference, "p": min(1.0, 2 * tail)}


def _resample_means(values: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(values), (samples, len(values)), generator=generator)
    return values[index].mean(1)


def bootstrap_interval(values: Sequence[float], samples: int = 10_000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values``."""
    data = torch.as_tensor(list(values), dtype=torch.float64)
    if len(data) == 0:
        raise ValueError("bootstrap_interval of no values")
    means = _resample_means(data, samples, seed)
    low, high = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(low), float(high)


def paired_bootstrap(reference: Sequence[float], other: Sequence[float], samples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of ``other - reference`` over paired examples, its percentile bootstrap interval, and the
    two-sided bootstrap p-value ``2 min(P(d* <= 0), P(d* >= 0))`` (1.0 when every difference is 0)."""
    if len(reference) != len(other):
        raise ValueError(f"paired samples of different sizes: {len(reference)} and {len(other)}")
    differences = torch.as_tensor(list(other), dtype=torch.float64) - torch.as_tensor(list(reference),
                                                                                       dtype=torch.float64)
    if len(differences) == 0:
        raise ValueError("paired_bootstrap of no pairs")
    means = _resample_means(differences, samples, seed)
    low, high = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    if bool((differences == 0).all()):
        p = 1.0
    else:
        p = min(1.0, 2 * min(float((means <= 0).double().mean()), float((means >= 0).double().mean())))
    return {"mean": float(differences.mean()), "low": float(low), "high": float(high), "p": p}
