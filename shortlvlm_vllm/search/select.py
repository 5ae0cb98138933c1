"""The search's rules, pure functions of measured figures: when an arm keeps enough accuracy, which screened arms go
on to be served, and which served arm wins.

"Keeps `keep` of the full model's accuracy with confidence" is read on paired questions: per question
d_i = right_i(arm) - keep * right_i(full), whose mean is accuracy(arm) - keep * accuracy(full); the arm meets the
target when the lower end of the paired-bootstrap 95% interval of that mean is at least 0 (equivalently, the arm's
accuracy over the full model's is at least `keep`), falls clearly below it when the upper end is under 0, and is
uncertain in between. The winner is the meeting arm with the highest served throughput (median of the rounds); arms
whose throughput range overlaps the best one's are inside its noise and count as tied with it, and ties go to fewer
decoder layers, then the larger dev margin's lower end, then the name, so that the choice never depends on the
order the arms were measured in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.statistics import Spread, paired_bootstrap

MEETS, UNCERTAIN, BELOW = "meets", "uncertain", "below"


@dataclass(frozen=True)
class Margin:
    """An arm's accuracy against `keep` times the full model's, on the same questions."""

    accuracy: float
    full: float
    keep: float
    margin: float  # accuracy - keep * full
    low: float  # paired-bootstrap 95% interval of the margin
    high: float
    n: int

    @property
    def ratio(self) -> float:
        """accuracy / full: the fraction of the full model's accuracy kept."""
        return self.accuracy / self.full if self.full else float("nan")

    @property
    def status(self) -> str:
        return MEETS if self.low >= 0 else BELOW if self.high < 0 else UNCERTAIN

    def as_dict(self) -> dict:
        return {"accuracy": round(self.accuracy, 6), "full": round(self.full, 6), "kept": round(self.ratio, 6),
                "keep": self.keep, "margin": round(self.margin, 6), "margin_low": round(self.low, 6),
                "margin_high": round(self.high, 6), "n": self.n, "status": self.status}


def margin(correct: Sequence[bool], full_correct: Sequence[bool], keep: float, seed: int = 0) -> Margin:
    """The arm's margin over `keep` x the full model, paired question by question."""
    if not 0 < keep <= 1:
        raise ShortLVLMError(f"--keep {keep} must be a fraction of the full model's accuracy in (0, 1].")
    arm = [float(c) for c in correct]
    scaled = [keep * float(c) for c in full_correct]
    mean, low, high = paired_bootstrap(arm, scaled, seed=seed)
    return Margin(sum(arm) / len(arm), sum(map(float, full_correct)) / len(arm), keep, mean, low, high, len(arm))


@dataclass(frozen=True)
class Candidate:
    """A screened arm: its serving cost as the screen can tell it (layers, visual tokens, quantization) and its dev
    margin through transformers (None: not screenable there, judged by the arm it stacks on)."""

    name: str
    layers: int
    margin: Margin | None
    token_fraction: float = 1.0
    quantized: bool = False
    kl: float | None = None  # held-out drift of the arm's pruned layers from the full model

    @property
    def cost(self) -> float:
        """What the decoder computes per request relative to one layer at every visual token: fewer is faster."""
        return self.layers * self.token_fraction


def finalists(candidates: Sequence[Candidate], count: int) -> list[Candidate]:
    """The `count` cheapest candidates that did not fall clearly below the target (cheapest first; ties to the
    quantized one, the larger margin, the smaller drift, the name), with the cheapest one that met it on the screen
    always among them, so that a served stage of only uncertain arms cannot leave nothing to choose."""
    if count < 1:
        raise ShortLVLMError(f"--finalists {count}: serve at least one finalist.")
    alive = sorted((c for c in candidates if c.margin is None or c.margin.status != BELOW), key=_cheapest)
    chosen = alive[:count]
    safe = next((c for c in alive if c.margin is not None and c.margin.status == MEETS), None)
    if safe is not None and safe not in chosen:
        chosen = [*chosen[:count - 1], safe]
    return chosen


def _cheapest(c: Candidate) -> tuple:
    low = c.margin.low if c.margin is not None else float("-inf")
    return c.cost, not c.quantized, -low, c.kl if c.kl is not None else float("inf"), c.name


@dataclass(frozen=True)
class Served:
    """A finalist as served: its dev margin through vLLM and its throughput rounds (output tokens/s)."""

    name: str
    layers: int
    margin: Margin
    throughput: tuple[float, ...]

    @property
    def speed(self) -> Spread:
        return Spread(self.throughput)


def choose(served: Sequence[Served], keep: float) -> tuple[Served, list[str]]:
    """The winner and the reasons, in order: which arms met the target, which were tied on throughput, and why the
    winner was taken among them. Nothing meeting the target is an error naming the closest arm."""
    if not served:
        raise ShortLVLMError("no finalist was served: nothing to choose from (every screened arm fell below the "
                             "target); lower --keep or widen the axes.")
    for arm in served:
        if not arm.throughput:
            raise ShortLVLMError(f"{arm.name} has no throughput measured: the search needs --repeats of at least 1.")
    meeting = [arm for arm in served if arm.margin.status == MEETS]
    if not meeting:
        closest = max(served, key=lambda a: (a.margin.low, -a.layers, a.name))
        m = closest.margin
        raise ShortLVLMError(
            f"no arm keeps {100 * keep:g}% of the full model's accuracy with confidence on the dev set. Closest: "
            f"{closest.name}, {100 * m.accuracy:.1f}% against the full model's {100 * m.full:.1f}% "
            f"({100 * m.ratio:.1f}% kept; margin over {100 * keep:g}% of full {100 * m.margin:+.1f} points, 95% "
            f"interval [{100 * m.low:+.1f}, {100 * m.high:+.1f}] on {m.n} questions). Lower --keep, add axes (more "
            f"localizers, compensations, lower ratios), or give more dev questions to narrow the interval.")
    best = max(meeting, key=lambda a: (a.speed.median, -a.layers, a.name))
    tied = sorted((a for a in meeting if not a.speed.separated_from(best.speed)),
                  key=lambda a: (a.layers, -a.margin.low, a.name))
    winner = tied[0]
    reasons = [f"{len(meeting)} of {len(served)} finalists meet the target on the dev set: "
               f"{', '.join(a.name for a in meeting)}",
               f"highest median throughput: {best.name} ({best.speed.median:.1f} tok/s, range "
               f"[{best.speed.low:.1f}, {best.speed.high:.1f}])"]
    if len(tied) > 1:
        reasons.append(f"inside its throughput noise (ranges overlap): {', '.join(a.name for a in tied)}; taken: "
                       f"{winner.name} (fewer layers, then the larger margin, then the name)")
    return winner, reasons
