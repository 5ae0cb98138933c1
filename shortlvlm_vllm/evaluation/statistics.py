"""How sure a comparison is: accuracy with a 95% interval, two arms compared on the same questions, and the spread
of repeated speed measurements.

Every figure the project reports comes with one of these, and a difference inside the noise is reported as no
difference. Accuracy is a binomial proportion: the Wilson score interval holds its coverage at the edges (0 or 100%
right) and on small samples where the normal approximation does not. Two arms asked the same questions are paired:
what tells them apart is only the questions one gets right and the other wrong, which the exact McNemar test
counts; the paired bootstrap gives the interval of the difference (and works for any per-item score, such as a
held-out sample's KL divergence). Many comparisons at once: Holm's step-down adjustment keeps the chance of any false
difference at the level asked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

CONFIDENCE = 0.95


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion `successes` / `n`."""
    if n <= 0:
        raise ValueError("an interval needs at least one trial")
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n} trials")
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: `only_a` questions right for A alone, `only_b` for B alone.

    Under "no difference" each discordant question is a fair coin, so min(only_a, only_b) is binomial(n, 1/2):
    p = min(1, 2 P(X <= min)).
    """
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0,
                     confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean(a - b), low, high): the percentile interval of the mean paired difference, items resampled together."""
    import numpy as np

    if len(a) != len(b) or not len(a):
        raise ValueError("a paired comparison needs two equally long, non-empty sequences")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.sort(d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1))
    tail = (1 - confidence) / 2
    low = means[max(0, math.floor(tail * resamples))]
    high = means[min(resamples - 1, math.ceil((1 - tail) * resamples) - 1)]
    return float(d.mean()), float(low), float(high)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given: reject where adjusted p < alpha to keep the family-wise error
    rate at alpha over all the comparisons."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Accuracy:
    """A proportion right with its interval."""

    correct: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.correct / self.n

    def as_dict(self) -> dict:
        return {"value": round(self.value, 6), "correct": self.correct, "n": self.n, "low": round(self.low, 6),
                "high": round(self.high, 6)}


def accuracy(correct: Sequence[bool], confidence: float = CONFIDENCE) -> Accuracy:
    hits = sum(map(bool, correct))
    return Accuracy(hits, len(correct), *wilson_interval(hits, len(correct), confidence))


@dataclass(frozen=True)
class PairedComparison:
    """Arm A against arm B on the same questions."""

    difference: float  # accuracy(A) - accuracy(B)
    low: float  # paired-bootstrap interval of the difference
    high: float
    only_a: int  # right for A, wrong for B
    only_b: int
    p_value: float  # exact McNemar, two-sided

    def as_dict(self) -> dict:
        return {key: round(value, 6) if isinstance(value, float) else value for key, value in asdict(self).items()}


def compare_paired(correct_a: Sequence[bool], correct_b: Sequence[bool], resamples: int = 2000,
                   seed: int = 0) -> PairedComparison:
    """McNemar's test and the bootstrap interval of the accuracy difference of two arms on the same questions."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired arms answered {len(correct_a)} and {len(correct_b)} questions: not the same ones")
    only_a = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if y and not x)
    difference, low, high = paired_bootstrap([float(x) for x in correct_a], [float(y) for y in correct_b],
                                             resamples, seed)
    return PairedComparison(difference, low, high, only_a, only_b, mcnemar_exact(only_a, only_b))


@dataclass(frozen=True)
class Spread:
    """Repeated measurements of one quantity: median and range (and the values themselves)."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        ordered = sorted(self.values)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def separated_from(self, other: Spread) -> bool:
        """The ranges do not overlap: the difference is outside the run-to-run noise measured."""
        return self.high < other.low or other.high < self.low

    def as_dict(self) -> dict:
        return {"median": round(self.median, 4), "low": round(self.low, 4), "high": round(self.high, 4),
                "values": [round(v, 4) for v in self.values]}


def mean_and_spread(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation, min and max: e.g. accuracy over random seeds, as the paper's Fig. 3 shows."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": round(mean, 6), "sd": round(sd, 6), "min": round(min(values), 6), "max": round(max(values), 6),
            "n": n}
