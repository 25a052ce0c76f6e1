"""Paired statistics: is a child better than a parent on the same questions, and does a proxy rank like fitness."""

from __future__ import annotations

from collections.abc import Sequence

from scipy.stats import binomtest, spearmanr


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value for two models' correctness on the same questions.

    Only the discordant questions carry information: under the null each one favours a or b with probability
    1/2, so the count favouring a is Binomial(discordant, 1/2).
    """
    if len(a) != len(b):
        raise ValueError(f"paired results differ in length: {len(a)} and {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    if a_only + b_only == 0:
        return 1.0
    return float(binomtest(a_only, a_only + b_only, 0.5).pvalue)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (nan when either side is constant)."""
    if len(x) != len(y):
        raise ValueError(f"rankings differ in length: {len(x)} and {len(y)}")
    return float(spearmanr(x, y).statistic)
