"""Multiple-choice benchmarks answered with an option letter: ScienceQA-IMG, SEED-Bench (image), A-OKVQA.

They share the prompt shape (question, lettered options, LLaVA-1.5's instruction to answer with the letter), the
parser (`extract_choice` over the item's own options, kept in `meta["options"]`) and the metric (accuracy).
lmms-eval reads SEED-Bench's reply by its first character and ScienceQA's as "B" or "B. ..."; the shared parser
gives the same letter for replies in those forms and also reads "(B)", "The answer is B" and the option's text.
"""

from __future__ import annotations

import string
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.benchmarks.base import Item
from shortlvlm_vllm.evaluation.benchmarks.extract import extract_choice
from shortlvlm_vllm.evaluation.benchmarks.loading import HubBenchmark, draw, text_columns, to_image
from shortlvlm_vllm.evaluation.benchmarks.metrics import grouped, hits, mean

if TYPE_CHECKING:
    import datasets

LETTERS = string.ascii_uppercase
# LLaVA-1.5's multiple-choice response prompt (paper, Table 7), which lmms-eval's ScienceQA, SEED-Bench and MMBench
# tasks append for it.
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def lettered(texts: Sequence[str]) -> dict[str, str]:
    """Options keyed by letter in the order given: A, B, C, ..."""
    return dict(zip(LETTERS, texts, strict=False))


def option_lines(options: Mapping[str, str]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in options.items())


def choice_prompt(question: str, options: Mapping[str, str]) -> str:
    """The question, one "A. text" line per option, and LLaVA-1.5's letter instruction."""
    return f"{question}\n{option_lines(options)}\n{LETTER_INSTRUCTION}"


def choice_item(item_id: str, image: Any, prompt: str, options: dict[str, str], answer: str, **meta: Any) -> Item:
    """An item whose gold is an option letter; a gold outside the options is a data error."""
    if answer not in options:
        raise ShortLVLMError(
            f"item {item_id} has answer {answer!r} outside its options {', '.join(options)}; "
            "check that the data is in the hub schema."
        )
    return Item(id=item_id, image=to_image(image, f"item {item_id}"), prompt=prompt, answer=answer,
                meta={"options": options, **meta})


class ChoiceBenchmark(HubBenchmark):
    """Items from each kept row (one, or MMBench's rotations); accuracy overall and per `breakdown` meta value."""

    def load(self, source: str | None = None, limit: int | None = None, seed: int = 0) -> list[Item]:
        table = self.open(source)
        kept = self.keep(table)
        chosen = [kept[i] for i in draw(len(kept), limit, seed)]
        return [item for position, row in zip(chosen, table.select(chosen), strict=True)
                for item in self.items(position, row)]

    def keep(self, table: datasets.Dataset) -> list[int]:
        """Positions of the rows that are items; all of them unless a benchmark filters."""
        return list(range(len(table)))

    @abstractmethod
    def items(self, position: int, row: Mapping[str, Any]) -> list[Item]:
        """The items asked about the table row at `position`."""

    def parse(self, item: Item, reply: str) -> str:
        return extract_choice(reply, item.meta["options"])

    def score(self, items: Sequence[Item], parsed: Mapping[str, str]) -> dict[str, float]:
        right = hits(self, items, parsed)
        scores = {"accuracy": mean(right)}
        if self.breakdown:
            by_group = grouped(items, right, lambda item: item.meta[self.breakdown])
            scores.update({f"accuracy/{group}": mean(values) for group, values in sorted(by_group.items())})
        return scores


class ScienceQA(ChoiceBenchmark):
    """ScienceQA, the questions with an image; 2 to 5 options. Prompt: lmms-eval tasks/scienceqa/utils.py
    (sqa_doc_to_text, default format): "Context: {hint}\\n" when there is a hint, the question, the options."""

    name = "scienceqa"
    hub_id = "lmms-lab-encoder/ScienceQA"
    legacy_hub_ids = ("lmms-lab/ScienceQA",)
    config = "ScienceQA-IMG"
    split = "test"
    columns = ("image", "question", "choices", "answer", "hint")

    def items(self, position: int, row: Mapping[str, Any]) -> list[Item]:
        options = lettered(row["choices"])
        context = f"Context: {row['hint']}\n" if row["hint"] else ""
        prompt = choice_prompt(f"{context}{row['question']}", options)
        answer = LETTERS[row["answer"]] if 0 <= row["answer"] < len(options) else str(row["answer"])
        return [choice_item(f"sqa-{position}", row["image"], prompt, options, answer)]


# SEED-Bench's question_type_id values for its image dimensions (SEED-Bench question_type.json).
SEED_QUESTION_TYPES = {
    1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes", 4: "Instance Location",
    5: "Instances Counting", 6: "Spatial Relation", 7: "Instance Interaction", 8: "Visual Reasoning",
    9: "Text Understanding",
}


class SEEDBench(ChoiceBenchmark):
    """SEED-Bench's image questions (video rows are dropped), accuracy overall and per question type.

    Prompt: lmms-eval tasks/seedbench/utils.py (seed_doc_to_text). The `image` column holds a list of images; an
    image question has one.
    """

    name = "seedbench"
    hub_id = "lmms-lab-encoder/SEED-Bench"
    legacy_hub_ids = ("lmms-lab/SEED-Bench",)
    split = "test"
    columns = ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "data_type",
               "image", "question_type_id")
    breakdown = "question_type"

    def keep(self, table: datasets.Dataset) -> list[int]:
        return [i for i, row in enumerate(text_columns(table, ["data_type"])) if row["data_type"] == "image"]

    def items(self, position: int, row: Mapping[str, Any]) -> list[Item]:
        options = lettered([row[f"choice_{letter}"] for letter in "abcd"])
        prompt = choice_prompt(row["question"], options)
        images = row["image"] or [None]
        type_id = row["question_type_id"]  # an integer on the hub; some copies store it as a string ("5")
        type_id = int(type_id) if str(type_id).strip().isdigit() else type_id
        return [choice_item(str(row["question_id"]), images[0], prompt, options, str(row["answer"]).strip(),
                            question_type=SEED_QUESTION_TYPES.get(type_id, str(type_id)))]


class AOKVQA(ChoiceBenchmark):
    """A-OKVQA's multiple-choice task (four options), accuracy.

    lmms-eval has no A-OKVQA task; the prompt is LLaVA-1.5's own format for it (its training mix asks A-OKVQA as
    the question, lettered options and the letter instruction), the same shape as SEED-Bench's.
    """

    name = "aokvqa"
    hub_id = "HuggingFaceM4/A-OKVQA"
    split = "validation"
    columns = ("image", "question_id", "question", "choices", "correct_choice_idx")

    def items(self, position: int, row: Mapping[str, Any]) -> list[Item]:
        options = lettered(row["choices"])
        prompt = choice_prompt(row["question"], options)
        index = row["correct_choice_idx"]
        answer = LETTERS[index] if 0 <= index < len(options) else str(index)
        return [choice_item(str(row["question_id"]), row["image"], prompt, options, answer)]
