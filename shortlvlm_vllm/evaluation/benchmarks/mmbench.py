"""MMBench (English dev) with its circular evaluation: a question counts only if every rotation of its options is
answered right, which takes the luck out of guessing a letter.

lmms-eval's MMBench table (as VLMEvalKit's) stores the circular copies of question i as rows with index i + k * 1e6,
options rotated and answer moved; lmms-eval's scorer groups rows by index % 1e6. Where a question's stored copies are
present they are what is asked (the table's own rotations); a question stored without copies gets its rotations
built here, in the same order (in rotation k, letter i shows option i + k).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.benchmarks.base import Item
from shortlvlm_vllm.evaluation.benchmarks.choice import (
    LETTER_INSTRUCTION,
    LETTERS,
    ChoiceBenchmark,
    choice_item,
    option_lines,
)
from shortlvlm_vllm.evaluation.benchmarks.loading import draw, missing_text, text_columns, to_image
from shortlvlm_vllm.evaluation.benchmarks.metrics import hits, mean

log = logging.getLogger(__name__)

OPTION_COLUMNS = ("A", "B", "C", "D")
L2_COLUMNS = ("L2-category", "l2-category")  # lmms-eval reads "L2-category"; some copies spell it in lower case
# The stored circular copies of question i: rows with index i + k * 1e6 (k = 1, 2, ...).
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
    hub_id = "lmms-lab-encoder/MMBench"
    legacy_hub_ids = ("lmms-lab/MMBench",)
    config = "en"
    split = "dev"
    columns = ("index", "question", "hint", "A", "B", "answer", "category", "image")
    breakdown = "category"

    def load(self, source: str | None = None, limit: int | None = None, seed: int = 0) -> list[Item]:
        """The main questions (index below CIRCULAR_OFFSET), each with its stored circular copies where the table
        holds them, else with rotations built here; `limit` draws main questions."""
        table = self.open(source)
        indices = [int(row["index"]) for row in text_columns(table, ["index"])]
        main = [position for position, index in enumerate(indices) if index < CIRCULAR_OFFSET]
        copies: dict[int, list[tuple[int, int]]] = {}  # main index -> (k, position) of each stored copy
        for position, index in enumerate(indices):
            if index >= CIRCULAR_OFFSET:
                copies.setdefault(index % CIRCULAR_OFFSET, []).append((index // CIRCULAR_OFFSET, position))
        chosen = [main[i] for i in draw(len(main), limit, seed)]
        stored = sum(1 for position in chosen if indices[position] in copies)
        log.info("MMBench: %d questions, %d with their stored circular copies, %d rotated here", len(chosen), stored,
                 len(chosen) - stored)
        items = []
        for position, row in zip(chosen, table.select(chosen), strict=True):
            index = indices[position]
            if index in copies:
                rotations = sorted(copies[index])
                rows = [(0, row), *zip([k for k, _ in rotations], table.select([p for _, p in rotations]),
                                       strict=True)]
                items += self.stored_items(index, rows)
            else:
                items += self.items(position, row)
        return items

    def items(self, position: int, row: Mapping[str, Any]) -> list[Item]:
        """The question once per rotation of its options: in rotation k, letter i shows option i + k."""
        texts = _options(row)
        index = int(row["index"])
        gold = LETTERS.index(_answer(row, len(texts)))
        image = to_image(row["image"], f"MMBench question {index}")  # once: the rotations share it
        return [self._item(row, index, k, image, {LETTERS[i]: texts[(i + k) % len(texts)] for i in range(len(texts))},
                           LETTERS[(gold - k) % len(texts)]) for k in range(len(texts))]

    def stored_items(self, index: int, rows: Sequence[tuple[int, Mapping[str, Any]]]) -> list[Item]:
        """The question as the table stores it: rotation k is the row with index `index` + k * 1e6 (k = 0: itself)."""
        image = to_image(rows[0][1]["image"], f"MMBench question {index}")  # the copies hold the same image
        items = []
        for k, row in rows:
            texts = _options(row)
            items.append(self._item(row, index, k, image, dict(zip(LETTERS, texts, strict=False)),
                                    _answer(row, len(texts))))
        return items

    def _item(self, row: Mapping[str, Any], index: int, k: int, image, options: dict[str, str], answer: str) -> Item:
        hint = None if missing_text(row["hint"]) else row["hint"]
        l2_category = next((row[column] for column in L2_COLUMNS if column in row), "")
        return choice_item(f"{index}@{k}", image, mmbench_prompt(row["question"], hint, options), options, answer,
                           group=str(index), rotation=k, category=row["category"], l2_category=l2_category)

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


    def units(self, items: Sequence[Item], parsed: Mapping[str, str]) -> list[tuple[str, str, bool]]:
        """One unit per question, right when every rotation is: what the circular accuracy averages."""
        right: dict[str, bool] = {}
        category: dict[str, str] = {}
        for item, hit in zip(items, hits(self, items, parsed), strict=True):
            group = item.meta["group"]
            right[group] = right.get(group, True) and hit
            category.setdefault(group, str(item.meta["category"]))
        return [(group, category[group], hit) for group, hit in right.items()]


def _options(row: Mapping[str, Any]) -> list[str]:
    return [row[column] for column in OPTION_COLUMNS if column in row and not missing_text(row[column])]


def _answer(row: Mapping[str, Any], num_options: int) -> str:
    answer = str(row["answer"]).strip()
    if answer not in LETTERS[:num_options]:
        raise ShortLVLMError(f"MMBench question {row['index']} has answer {answer!r} but options "
                             f"{', '.join(LETTERS[:num_options])}; check that the data is in the hub schema.")
    return answer


def mmbench_prompt(question: str, hint: str | None, options: Mapping[str, str]) -> str:
    """lmms-eval tasks/mmbench/en_utils.py (mmbench_doc_to_text) with the default post_prompt.

    The blank line before the instruction is lmms-eval's: it joins a post_prompt that starts with a newline by
    another newline.
    """
    query = f"{question} {OPTIONS_HEADER}\n{option_lines(options)}"
    if hint:
        query = f"{hint} {query}"
    return f"{query}\n\n{LETTER_INSTRUCTION}"
