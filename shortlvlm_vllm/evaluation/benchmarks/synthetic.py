"""The project's synthetic VQA set (`shortlvlm_vllm.data.synthetic`) as a benchmark: what the toy model is judged on."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shortlvlm_vllm.data.synthetic import (
    FAMILIES,
    POPE_SETTINGS,
    SOURCE_VERSIONS,
    SPLITS,
    SyntheticConfig,
    generate_split,
)
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.benchmarks.base import Benchmark, Item
from shortlvlm_vllm.evaluation.benchmarks.loading import open_table, to_image
from shortlvlm_vllm.evaluation.benchmarks.metrics import grouped, hits, mean, yes_no_metrics

log = logging.getLogger(__name__)


def normalize_answer(reply: str | None) -> str:
    """The first word of a reply, lower-cased, without punctuation ("Yes." -> "yes")."""
    match = re.search(r"\w+", reply or "")
    return match.group(0).lower() if match else ""


COLUMNS = ("id", "image", "question", "answer", "family", "pope_setting")


class Synthetic(Benchmark):
    """Accuracy per question family and overall, and POPE's metrics for the existence questions per setting.

    `source` None generates `split` (the test split by default; `validation` is the development split beside it) in
    memory with seed `seed` (`images` images); a local path is a directory written by `synthetic.write_synthetic` (its
    `dataset/` subdirectory, or that directory itself), whose own seed holds and `seed` is unused. `limit` takes the
    first `limit` questions: families interleave, so a prefix mixes them. The prompt is the question alone, as the toy
    model was trained; replies are read as `normalize_answer` reads them (first word, lower case). `version`: the
    scenes' (SyntheticConfig.version), named as SOURCE_VERSIONS names it ("synthetic" for 2, "synthetic-v1" for 1).
    """

    hub_id = "shortlvlm_vllm.data.synthetic"  # no hub copy: generated in memory
    max_tokens = 4  # every answer is one word
    breakdown = "family"

    def __init__(self, images: int = SyntheticConfig.test_images, split: str = "test",
                 version: int = SyntheticConfig.version) -> None:
        if split not in SPLITS:
            raise ShortLVLMError(f"unknown synthetic split {split!r}; the set has {', '.join(SPLITS)}.")
        names = {v: name for name, v in SOURCE_VERSIONS.items()}
        if version not in names:
            raise ShortLVLMError(f"unknown synthetic version {version!r}; use one of {', '.join(map(str, names))}.")
        self.images = images
        self.split = split
        self.version = version
        self.name = names[version]

    def load(self, source: str | None = None, limit: int | None = None, seed: int = 0) -> list[Item]:
        if limit is not None and limit < 1:
            raise ShortLVLMError(f"limit {limit} asks for no items; use a limit of at least 1, or none for all.")
        if source is None:
            config = SyntheticConfig(version=self.version, seed=seed, **{f"{self.split}_images": self.images})
            rows: Sequence[Mapping[str, Any]] = generate_split(self.split, config)[:limit]
        else:
            path = Path(source)
            table = open_table(str(path / "dataset" if (path / "dataset").is_dir() else path), benchmark=self.name,
                               hub_id=self.hub_id, config=None, split=self.split, columns=COLUMNS)
            rows = table.select(range(min(limit or len(table), len(table))))
        return [
            Item(
                id=row["id"], image=to_image(row["image"], f"synthetic question {row['id']}"), prompt=row["question"],
                answer=row["answer"].lower(), meta={"family": row["family"], "setting": row["pope_setting"]},
            )
            for row in rows
        ]

    def parse(self, item: Item, reply: str) -> str:
        return normalize_answer(reply)

    def score(self, items: Sequence[Item], parsed: Mapping[str, str]) -> dict[str, float]:
        right = hits(self, items, parsed)
        scores = {"accuracy": mean(right)}
        by_family = grouped(items, right, lambda item: item.meta["family"])
        scores.update({f"accuracy/{family}": mean(by_family[family]) for family in FAMILIES if family in by_family})
        existence = [item for item in items if item.meta["family"] == "existence"]
        by_setting = grouped(existence, existence, lambda item: item.meta["setting"])
        for setting in POPE_SETTINGS:
            if setting in by_setting:
                asked = by_setting[setting]
                metrics = yes_no_metrics([item.answer for item in asked], [parsed.get(item.id, "") for item in asked])
                scores.update({f"pope_{metric}/{setting}": value for metric, value in metrics.items()})
        return scores
