"""Which decoder layers to prune: localization methods behind one interface (SPEC.md section 2).

Each method is a small `Localizer` registered by name in `LOCALIZERS`; the calibration pass
measures everything once (`LayerStatistics`) and any method reads what it needs from it.
"""

from __future__ import annotations

import random
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shortlvlm_vllm.errors import ShortLVLMError


@dataclass
class LayerStatistics:
    """What one calibration pass measured, per decoder layer (original numbering)."""

    num_layers: int
    num_samples: int
    # token set name -> candidate layer -> mean over samples of mean cos(x_in, x_out) over that set;
    # names: "tis", "all-tokens", "text-only", "visual-only"
    cosine: dict[str, dict[int, float]]
    # [L, L] float64: angular[l, m] = mean over samples of arccos(cos(x_in^l, x_out^m)) / pi on the
    # LAST token, defined for l <= m (nan elsewhere)
    angular: torch.Tensor
    # [L, N, D] float32: row i of features[l] = mean of x_out^l over sample i's pool tokens (SCP's X^l)
    features: torch.Tensor


class Localizer(ABC):
    """A way to choose the layers to prune; scores are per candidate layer, higher = more redundant."""

    name: str

    def scores(self, stats: LayerStatistics, candidates: Sequence[int]) -> dict[int, float]:
        """Per-candidate score recorded in config.json and plotted; {} where none is meaningful."""
        return {}

    @abstractmethod
    def select(self, stats: LayerStatistics, n: int, candidates: Sequence[int], seed: int) -> list[int]:
        """The n candidate layers to prune, sorted ascending."""


class CosineLocalizer(Localizer):
    """Prune the n candidates whose output is most similar to their input on one token set.

    A layer with cos(x_in, x_out) near 1 barely changes the residual stream, so removing it
    changes little. Layers are chosen individually (not necessarily contiguous). Ties go to the
    later layer, since later layers are the more redundant ones in trained networks.
    """

    def __init__(self, token_set: str) -> None:
        self.name = token_set

    def scores(self, stats: LayerStatistics, candidates: Sequence[int]) -> dict[int, float]:
        return {layer: stats.cosine[self.name][layer] for layer in candidates}

    def select(self, stats: LayerStatistics, n: int, candidates: Sequence[int], seed: int) -> list[int]:
        scores = self.scores(stats, candidates)
        ranked = sorted(scores, key=lambda layer: (scores[layer], layer), reverse=True)
        return sorted(ranked[:n])


class AngularBlockLocalizer(Localizer):
    """Gromov et al. / PruneMe: the contiguous block of n candidates whose input and output
    (last token) are closest in angle; ties go to the later block.

    Its per-layer score is the single-layer version, 1 - angular[l, l], so that higher means more
    redundant as for the other methods.
    """

    name = "angular-block"

    def scores(self, stats: LayerStatistics, candidates: Sequence[int]) -> dict[int, float]:
        return {layer: 1.0 - float(stats.angular[layer, layer]) for layer in candidates}

    def select(self, stats: LayerStatistics, n: int, candidates: Sequence[int], seed: int) -> list[int]:
        allowed = set(candidates)
        starts = [s for s in sorted(allowed) if all(s + i in allowed for i in range(n))]
        if not starts:
            raise ShortLVLMError(
                f"angular-block needs {n} contiguous candidate layers, and the candidates "
                f"{sorted(allowed)} hold no such run: widen --candidates or prune fewer layers."
            )
        best = min(starts, key=lambda s: (float(stats.angular[s, s + n - 1]), -s))
        return list(range(best, best + n))


class RandomLocalizer(Localizer):
    """n distinct candidates drawn with `random.Random(seed)`: the floor any method must beat."""

    name = "random"

    def select(self, stats: LayerStatistics, n: int, candidates: Sequence[int], seed: int) -> list[int]:
        return sorted(random.Random(seed).sample(sorted(candidates), n))


class LastLocalizer(Localizer):
    """The last n candidates: the naive guess that the deepest layers matter least."""

    name = "last"

    def select(self, stats: LayerStatistics, n: int, candidates: Sequence[int], seed: int) -> list[int]:
        return sorted(candidates)[len(candidates) - n:]


LOCALIZERS: dict[str, Localizer] = {
    loc.name: loc
    for loc in (
        CosineLocalizer("tis"),
        CosineLocalizer("all-tokens"),
        CosineLocalizer("text-only"),
        CosineLocalizer("visual-only"),
        AngularBlockLocalizer(),
        RandomLocalizer(),
        LastLocalizer(),
    )
}


def localize(
    method: str, stats: LayerStatistics, n: int, candidates: Sequence[int], seed: int = 0
) -> tuple[list[int], dict[int, float]]:
    """(sorted layers to prune, per-candidate scores) by the localization method named `method`."""
    localizer = LOCALIZERS.get(method)
    if localizer is None:
        raise ShortLVLMError(f"unknown localization method {method!r}: choose one of {', '.join(LOCALIZERS)}.")
    return localizer.select(stats, n, candidates, seed), localizer.scores(stats, candidates)


def layers_to_prune(ratio: float, num_layers: int, num_candidates: int, force: bool = False) -> int:
    """n = round(ratio * num_layers), refused where the paper's method was not meant to go."""
    if ratio <= 0:
        raise ShortLVLMError(f"ratio must be > 0 (got {ratio}): it is the fraction of decoder layers to prune.")
    if ratio >= 1:
        raise ShortLVLMError(f"ratio must be < 1 (got {ratio}): pruning every decoder layer leaves no model.")
    if ratio > 0.5 and not force:
        raise ShortLVLMError(
            f"ratio {ratio} prunes more than half of the decoder layers; the paper keeps ratio <= 0.5. "
            f"Pass --force to do it anyway."
        )
    n = round(ratio * num_layers)
    if n == 0:
        raise ShortLVLMError(
            f"ratio {ratio} of {num_layers} decoder layers rounds to 0 layers: a ratio of at least "
            f"1/{num_layers} = {1 / num_layers:.4g} removes one layer."
        )
    if n >= num_layers:
        raise ShortLVLMError(f"ratio {ratio} prunes all {num_layers} decoder layers: choose a smaller ratio.")
    if n > num_candidates:
        raise ShortLVLMError(
            f"ratio {ratio} prunes {n} of {num_layers} layers but only {num_candidates} are candidates: "
            f"widen --candidates or choose a smaller ratio."
        )
    return n


def parse_candidates(text: str | None, num_layers: int) -> list[int]:
    """Candidate layers from "16-31", "3,5,7" or "3,10-12"; None means the second half, L//2 .. L-1."""
    if text is None:
        return list(range(num_layers // 2, num_layers))
    layers: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ShortLVLMError(
                f"cannot read candidate layers {text!r}: use layer numbers and ranges, e.g. \"16-31\" or \"3,10-12\"."
            )
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else first
        if first > last:
            raise ShortLVLMError(f"candidate range {part.strip()!r} is backwards: write it low-high.")
        if last >= num_layers:
            raise ShortLVLMError(
                f"candidate layer {last} is out of range: the model has {num_layers} decoder layers "
                f"(0..{num_layers - 1})."
            )
        layers.update(range(first, last + 1))
    return sorted(layers)
