"""MMBench (English dev) with its circular evaluation: a question counts only if every rotation of its options is
answered right, which takes the luck out of guessing a letter."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.benchmarks.base import Item
from shortlvlm_vllm.evaluation.benchmarks.choice import (
    LETTER_INSTRUCTION,
    LETTERS,
    ChoiceBenchmark,
    choice_item,
    option_lines,
)
from shortlvlm_vllm.evaluation.benchmarks.loading import missing_text, text_columns, to_image
from shortlvlm_vllm.evaluation.benchmarks.metrics import hits, mean

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

OPTION_COLUMNS = ("A", "B", "C", "D")
L2_COLUMNS = ("L2-category", "l2-category")  # lmms-eval reads "L2-category"; some copies spell it in lower case
# VLMEvalKit's legacy MMBench tables (and so lmms-lab/MMBench) hold the circular copies of question i as rows with
# index i + k * 1e6; this module makes its own rotations from the main rows instead.
CIRCULAR_OFFSET = 1_000_000
# lmms-eval tasks/mmbench/mmbench.yaml metadata.sys_prompt, put before the options by create_options_prompt.
OPTIONS_HEADER = "There are several options:"


class MMBench(ChoiceBenchmark):
    """Circular accuracy overall, per category and per L2 category, and the plain accuracy of the first rotation.

    Each question is asked once per rotation of its options (as many rotations as options; rotation 0 is the
    original order); its items share `meta["group"]`. `limit` draws whole questions, so `limit` questions give
    2 to 4 times as many items.
    """

    name = "mmbench"
    hub_id = "lmms-lab/MMBench"
    config = "en"
    split = "dev"
    columns = ("index", "question", "hint", "A", "B", "answer", "category", "image")

    def keep(self, table: datasets.Dataset) -> list[int]:
        """The main questions: rows below CIRCULAR_OFFSET."""
        indices = [row["index"] for row in text_columns(table, ["index"])]
        main = [position for position, index in enumerate(indices) if int(index) < CIRCULAR_OFFSET]
        if len(main) < len(indices):
            log.info("MMBench: skipping %d stored circular copies; rotations are made from the %d questions",
                     len(indices) - len(main), len(main))
        return main

    def items(self, position: int, row: Mapping[str, Any]) -> list[Item]:
        """The question once per rotation of its options: in rotation k, letter i shows option i + k."""
        texts = [row[column] for column in OPTION_COLUMNS if column in row and not missing_text(row[column])]
        index = int(row["index"])
        answer = str(row["answer"]).strip()
        if answer not in LETTERS[:len(texts)]:
            raise ShortLVLMError(f"MMBench question {index} has answer {answer!r} but options "
                                 f"{', '.join(LETTERS[:len(texts)])}; check that the data is in the hub schema.")
        gold = LETTERS.index(answer)
        hint = None if missing_text(row["hint"]) else row["hint"]
        l2_category = next((row[column] for column in L2_COLUMNS if column in row), "")
        image = to_image(row["image"], f"MMBench question {index}")  # once: the rotations share it
        items = []
        for k in range(len(texts)):
            options = {LETTERS[i]: texts[(i + k) % len(texts)] for i in range(len(texts))}
            items.append(choice_item(
                f"{index}@{k}", image, mmbench_prompt(row["question"], hint, options),
                options, LETTERS[(gold - k) % len(texts)],
                group=str(index), rotation=k, category=row["category"], l2_category=l2_category,
            ))
        return items

    def score(self, items: Sequence[Item], parsed: Mapping[str, str]) -> dict[str, float]:
        circular: dict[str, bool] = {}  # by question: every rotation right
        first: dict[str, bool] = {}  # by question: rotation 0 right
        meta: dict[str, Mapping[str, Any]] = {}
        for item, hit in zip(items, hits(self, items, parsed), strict=True):
            group = item.meta["group"]
            circular[group] = circular.get(group, True) and hit
            if item.meta["rotation"] == 0:
                first[group] = hit
            meta.setdefault(group, item.meta)
        scores = {"accuracy": mean(list(circular.values())), "first_rotation_accuracy": mean(list(first.values()))}
        for key, prefix in (("category", "accuracy"), ("l2_category", "accuracy_l2")):
            by_value: dict[str, list[bool]] = {}
            for group, hit in circular.items():
                if meta[group][key]:
                    by_value.setdefault(meta[group][key], []).append(hit)
            scores.update({f"{prefix}/{value}": mean(values) for value, values in sorted(by_value.items())})
        return scores


def mmbench_prompt(question: str, hint: str | None, options: Mapping[str, str]) -> str:
    """lmms-eval tasks/mmbench/en_utils.py (mmbench_doc_to_text) with the default post_prompt.

    The blank line before the instruction is lmms-eval's: it joins a post_prompt that starts with a newline by
    another newline.
    """
    query = f"{question} {OPTIONS_HEADER}\n{option_lines(options)}"
    if hint:
        query = f"{hint} {query}"
    return f"{query}\n\n{LETTER_INSTRUCTION}"
