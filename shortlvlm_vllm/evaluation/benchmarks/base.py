"""What every benchmark is to the evaluation client: items to ask, a parser for replies, the official metric."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Item:
    """One request: the image and text turn sent, the gold answer, and what the metric groups by."""

    id: str
    image: Image.Image
    prompt: str  # the text turn sent after the image, instructions included
    answer: str  # gold, in the form `Benchmark.parse` returns ("yes", "B", ...)
    meta: Mapping[str, Any] = field(default_factory=dict)  # e.g. category, POPE setting, circular group


class Benchmark(ABC):
    """One benchmark: loaded from its hub id or a local copy in the same schema, scored by its official metric."""

    name: str
    hub_id: str
    max_tokens: int = 16  # enough for a short answer; the parser reads the choice out of it
    breakdown: str | None = None  # the item meta key the scores are broken down by ("family", "category", ...)

    @abstractmethod
    def load(self, source: str | None = None, limit: int | None = None, seed: int = 0) -> list[Item]:
        """Items from `source` (default: the hub id); `limit` draws a seeded subset."""

    @abstractmethod
    def parse(self, item: Item, reply: str) -> str:
        """The choice a reply makes, comparable with `item.answer`; "" when it makes none."""

    def correct(self, item: Item, parsed: str) -> bool:
        return parsed == item.answer

    @abstractmethod
    def score(self, items: Sequence[Item], parsed: Mapping[str, str]) -> dict[str, float]:
        """The official metric from each item's parsed choice (by item id); missing ids count as wrong."""

    def units(self, items: Sequence[Item], parsed: Mapping[str, str]) -> list[tuple[str, str, bool]]:
        """What the headline accuracy averages, as (unit id, group, right), in item order: one unit per item by
        default, its group the item's `breakdown` value ("" without one). Intervals and paired tests between arms
        are computed over these units."""
        return [(item.id, str(item.meta.get(self.breakdown, "")) if self.breakdown else "",
                 self.correct(item, parsed.get(item.id, ""))) for item in items]
