"""MME: 14 yes/no subtasks, two questions per image, scored by accuracy plus accuracy+ (both questions right)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from shortlvlm_vllm.evaluation.benchmarks.base import Item
from shortlvlm_vllm.evaluation.benchmarks.extract import extract_yes_no
from shortlvlm_vllm.evaluation.benchmarks.loading import HubBenchmark, draw, text_columns, to_image
from shortlvlm_vllm.evaluation.benchmarks.metrics import grouped, hits, mean
from shortlvlm_vllm.evaluation.benchmarks.pope import SHORT_ANSWER, yes_no_gold

log = logging.getLogger(__name__)

# Subtask names as the `category` column and lmms-eval tasks/mme/utils.py (eval_type_dict) spell them.
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
# lmms-eval's mme_doc_to_text drops the dataset's own instruction before adding its default post_prompt.
DATASET_INSTRUCTION = " Please answer yes or no."


class MME(HubBenchmark):
    """Per subtask: accuracy, accuracy+ and score = (accuracy + accuracy+) x 100; perception and cognition sum them.

    Subsets (`limit`) draw whole images, so both questions of an image are always asked together.
    """

    name = "mme"
    hub_id = "lmms-lab-encoder/MME"
    legacy_hub_ids = ("lmms-lab/MME",)
    breakdown = "category"
    split = "test"
    columns = ("question_id", "image", "question", "answer", "category")

    def load(self, source: str | None = None, limit: int | None = None, seed: int = 0) -> list[Item]:
        table = self.open(source)
        images = grouped_rows(text_columns(table, ["category", "question_id"]))
        unknown = {category for category, _ in images} - set(PERCEPTION) - set(COGNITION)
        if unknown:
            log.warning("MME subtasks %s are not among the 14 of MME; scored alone, left out of perception and "
                        "cognition", ", ".join(sorted(unknown)))
        keys = list(images)
        rows = [(keys[i], n, position)
                for i in draw(len(keys), limit, seed) for n, position in enumerate(images[keys[i]])]
        items = []
        for ((category, image_name), n, _), row in zip(rows, table.select([p for _, _, p in rows]), strict=True):
            where = f"MME {category} question {n} on {image_name}"
            items.append(Item(
                id=f"{category}:{image_name}:{n}",
                image=to_image(row["image"], where),
                prompt=f"{row['question'].strip().replace(DATASET_INSTRUCTION, '')}\n{SHORT_ANSWER}",
                answer=yes_no_gold(row["answer"], where),
                meta={"category": category, "group": f"{category}:{image_name}"},
            ))
        return items

    def parse(self, item: Item, reply: str) -> str:
        return extract_yes_no(reply)

    def score(self, items: Sequence[Item], parsed: Mapping[str, str]) -> dict[str, float]:
        right = hits(self, items, parsed)
        by_image = grouped(items, right, lambda item: (item.meta["category"], item.meta["group"]))
        by_category: dict[str, list[list[bool]]] = {}
        for (category, _), image_hits in by_image.items():
            by_category.setdefault(category, []).append(image_hits)
        scores: dict[str, float] = {}
        for category, images in by_category.items():
            accuracy = mean([hit for image in images for hit in image])
            accuracy_plus = mean([all(image) for image in images])
            scores[f"accuracy/{category}"] = accuracy
            scores[f"accuracy_plus/{category}"] = accuracy_plus
            scores[f"score/{category}"] = (accuracy + accuracy_plus) * 100
        scores["perception"] = sum(scores.get(f"score/{category}", 0.0) for category in PERCEPTION)
        scores["cognition"] = sum(scores.get(f"score/{category}", 0.0) for category in COGNITION)
        return scores


def grouped_rows(rows: Sequence[Mapping[str, str]]) -> dict[tuple[str, str], list[int]]:
    """Row positions by (subtask, image): the unit MME's accuracy+ is computed over."""
    images: dict[tuple[str, str], list[int]] = {}
    for position, row in enumerate(rows):
        images.setdefault((row["category"], row["question_id"]), []).append(position)
    return images
