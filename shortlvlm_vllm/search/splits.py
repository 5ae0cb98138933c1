"""The search's two question sets: a dev set it chooses on, and a test set, never looked at while choosing, that
confirms the choice (both figures are reported, so that a choice fitted to the dev set's noise shows).

The synthetic benchmark has a split for each: `validation` (dev) and `test`, generated from their own random streams
with their own image ids. Another benchmark is divided in two by a hash of each question's unit (the circular group
of an MMBench question, whose rotations must stay together; the item otherwise): a fixed, seedless partition, so that
the same question always falls on the same side whatever the limit. Either way the two sets are checked to share no
question id before anything is measured.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.benchmarks import get_benchmark
from shortlvlm_vllm.evaluation.benchmarks.base import Benchmark, Item
from shortlvlm_vllm.evaluation.benchmarks.synthetic import Synthetic

DEV, TEST = "dev", "test"


class Half(Benchmark):
    """One side of a benchmark divided by the hash of each question's unit; scored by the benchmark's own metric."""

    def __init__(self, base: Benchmark, side: str) -> None:
        self.base, self.side = base, side
        self.name, self.hub_id = base.name, base.hub_id
        self.max_tokens, self.breakdown = base.max_tokens, base.breakdown

    def load(self, source: str | None = None, limit: int | None = None, seed: int = 0) -> list[Item]:
        items = [item for item in self.base.load(source, None, seed) if side_of(item) == self.side]
        return items[:limit]

    def parse(self, item: Item, reply: str) -> str:
        return self.base.parse(item, reply)

    def correct(self, item: Item, parsed: str) -> bool:
        return self.base.correct(item, parsed)

    def score(self, items: Sequence[Item], parsed: Mapping[str, str]) -> dict[str, float]:
        return self.base.score(items, parsed)

    def units(self, items: Sequence[Item], parsed: Mapping[str, str]) -> list[tuple[str, str, bool]]:
        return self.base.units(items, parsed)


def side_of(item: Item) -> str:
    unit = str(item.meta.get("group", item.id))
    return DEV if hashlib.sha256(unit.encode()).digest()[0] % 2 == 0 else TEST


def dev_and_test(name: str) -> tuple[Benchmark, Benchmark]:
    """The benchmark called `name` as its dev and its test set."""
    base = get_benchmark(name)
    if isinstance(base, Synthetic):
        return Synthetic(split="validation", version=base.version), Synthetic(split="test", version=base.version)
    return Half(base, DEV), Half(base, TEST)


def check_disjoint(dev: Sequence[Item], test: Sequence[Item]) -> None:
    """Refuse dev and test sets that share a question: the test figure would not be held out."""
    shared = sorted({item.id for item in dev} & {item.id for item in test})
    if shared:
        raise ShortLVLMError(f"the dev and test sets share {len(shared)} question ids ({', '.join(shared[:3])}, ...): "
                             f"the test figure would not be held out; give a benchmark whose splits are disjoint.")
