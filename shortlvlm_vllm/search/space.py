"""What a search explores: its settings, and the arms of its axes as the matrix names and builds them.

An arm is a `matrix.Arm`; the axes are the matrix's (ratio, localization, compensation, quantization, visual-token
fraction). Arms are screened line by line: a line is one way of pruning (localizer, compensation, quantization,
visual tokens) at rising ratios, so that a line whose ratio r fell clearly below the target is not tried at ratios
above r.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.matrix import THROUGHPUT_DEFAULTS, Arm, normalise_arm

FULL = Arm(0.0, "-", "-", "none")
PAPER_DEFAULT = normalise_arm(Arm(0.3, "tis", "scp", "none"))  # the paper's recipe: TIS + SCP at 30%
CONFIG_NAME = "search.json"


@dataclass
class SearchConfig:
    """Everything a search's results depend on (saved as DIR/search.json; a rerun resumes only the same config)."""

    model: str = "toy"
    keep: float = 0.98
    dev: str = "synthetic"  # the benchmark; its dev and test splits come from `splits.dev_and_test`
    data: str | None = None  # a local copy of it
    dev_limit: int | None = 300
    test_limit: int | None = 500
    calib: str = "synthetic"
    num_samples: int = 256
    heldout: int = 16
    rank: int = 64
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4])
    localize: list[str] = field(default_factory=lambda: ["tis", "all-tokens", "angular-block"])
    compensate: list[str] = field(default_factory=lambda: ["none", "scp"])
    quantize: list[str] = field(default_factory=lambda: ["none"])
    token_fraction: list[float] = field(default_factory=lambda: [1.0])
    max_ratio: float = 0.5
    finalists: int = 3
    repeats: int = 2  # throughput rounds per serving shape
    throughput: dict[str, Any] = field(default_factory=lambda: {k: v for k, v in THROUGHPUT_DEFAULTS.items()
                                                                if k not in ("repeats", "per")})
    server: dict[str, Any] = field(default_factory=dict)  # VLLMServer keyword arguments
    replicas: int = 1
    batch_size: int = 64  # transformers screening: questions per batch
    seed: int = 0  # the benchmark's draw
    max_minutes: float | None = None  # screening stops starting arms after this long

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ShortLVLMError(f"--keep {self.keep} must be a fraction of the full model's accuracy in (0, 1].")
        if not 0 < self.max_ratio < 1:
            raise ShortLVLMError(f"--max-ratio {self.max_ratio} must be in (0, 1).")
        high = [r for r in self.ratios if r > self.max_ratio]
        if high:
            raise ShortLVLMError(f"ratios {high} exceed --max-ratio {self.max_ratio}: drop them or raise the cap.")
        if not self.ratios or any(r <= 0 for r in self.ratios):
            raise ShortLVLMError(f"--ratios {self.ratios}: give one or more fractions of the layers to prune, > 0.")
        if self.repeats < 1:
            raise ShortLVLMError("--repeats must be at least 1: the winner is chosen by its served throughput.")
        if self.finalists < 1:
            raise ShortLVLMError("--finalists must be at least 1.")
        if any(not 0 < f <= 1 for f in self.token_fraction):
            raise ShortLVLMError(f"--token-fractions {self.token_fraction}: fractions of visual tokens in (0, 1].")

    def fingerprint(self) -> dict:
        """The settings the results depend on. The time cap, the number of finalists and of throughput rounds only
        decide how far a run goes (every arm's result and every round stands on its own), so a rerun may change them
        and keep what was measured."""
        return {k: v for k, v in asdict(self).items() if k not in ("max_minutes", "finalists", "repeats")}

    def arms(self) -> list[Arm]:
        """Every pruned arm of the axes (the unpruned model is the reference, not an arm), with the paper's default
        recipe among them when its ratio is allowed: the report compares the winner with it."""
        grid = itertools.product(self.ratios, self.localize, self.compensate, self.quantize, self.token_fraction)
        arms = [normalise_arm(Arm(r, loc, comp, quant, frac)) for r, loc, comp, quant, frac in grid]
        arms += [normalise_arm(Arm(0.0, "-", "-", q, f)) for q, f in itertools.product(self.quantize,
                                                                                         self.token_fraction)
                 if (q, f) != ("none", 1.0)]
        if PAPER_DEFAULT.ratio <= self.max_ratio:
            arms.append(PAPER_DEFAULT)
        return list(dict.fromkeys(arms))


def lines(arms: list[Arm]) -> list[list[Arm]]:
    """The arms grouped by everything but the ratio, each line by rising ratio; lines that transformers can screen
    (full precision, every visual token) first, since the others are judged by them."""
    grouped: dict[tuple, list[Arm]] = {}
    for arm in arms:
        grouped.setdefault(_line_key(arm), []).append(arm)
    ordered = sorted(grouped.values(), key=lambda line: not screenable(line[0]))
    return [sorted(line, key=lambda a: a.ratio) for line in ordered]


def _line_key(arm: Arm) -> tuple:
    values = asdict(arm)
    values.pop("ratio")
    return tuple(values.items())


def screenable(arm: Arm) -> bool:
    """Whether stock transformers can answer for the arm (it serves neither W4A16 checkpoints nor token budgets)."""
    return arm.quantize == "none" and arm.token_fraction == 1


def base_arm(arm: Arm) -> Arm:
    """The full-precision, every-token arm that `arm` stacks quantization or a token budget on."""
    if not arm.ratio:
        return FULL
    return replace(arm, quantize="none", token_fraction=1.0, token_selection="visionzip")


def load_config(text: str) -> SearchConfig:
    raw = json.loads(text)
    known = {f.name for f in fields(SearchConfig)}
    return SearchConfig(**{k: v for k, v in raw.items() if k in known})
