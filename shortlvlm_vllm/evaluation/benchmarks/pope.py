"""POPE: object hallucination as yes/no questions, in three settings of negative sampling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.benchmarks.base import Item
from shortlvlm_vllm.evaluation.benchmarks.extract import extract_yes_no
from shortlvlm_vllm.evaluation.benchmarks.loading import HubBenchmark, draw, to_image
from shortlvlm_vllm.evaluation.benchmarks.metrics import grouped, mean, yes_no_metrics

# lmms-eval tasks/pope/utils.py (pope_doc_to_text) with its default post_prompt, as for LLaVA-1.5.
SHORT_ANSWER = "Answer the question using a single word or phrase."


class POPE(HubBenchmark):
    """Accuracy, precision, recall, F1 and yes-ratio per setting, and their means over the settings asked.

    The mean F1 over the three settings is what LLaVA-1.5 reports as its POPE score.
    """

    name = "pope"
    hub_id = "lmms-lab-encoder/POPE"
    legacy_hub_ids = ("lmms-lab/POPE",)
    breakdown = "setting"
    split = "test"
    columns = ("question_id", "question", "answer", "image", "category")

    def load(self, source: str | None = None, limit: int | None = None, seed: int = 0) -> list[Item]:
        table = self.open(source)
        return [
            Item(
                id=f"{row['category']}-{row['question_id']}",
                image=to_image(row["image"], f"POPE question {row['question_id']}"),
                prompt=f"{row['question'].strip()}\n{SHORT_ANSWER}",
                answer=yes_no_gold(row["answer"], f"POPE question {row['question_id']}"),
                meta={"setting": row["category"]},
            )
            for row in table.select(draw(len(table), limit, seed))
        ]

    def parse(self, item: Item, reply: str) -> str:
        return extract_yes_no(reply)

    def score(self, items: Sequence[Item], parsed: Mapping[str, str]) -> dict[str, float]:
        preds = [parsed.get(item.id, "") for item in items]
        by_setting = grouped(items, list(zip([item.answer for item in items], preds, strict=True)),
                             lambda item: item.meta["setting"])
        per_setting = {
            setting: yes_no_metrics([g for g, _ in pairs], [p for _, p in pairs])
            for setting, pairs in sorted(by_setting.items())
        }
        scores = {
            metric: mean([metrics[metric] for metrics in per_setting.values()])
            for metric in ("accuracy", "precision", "recall", "f1", "yes_ratio")
        }
        for setting, metrics in per_setting.items():
            scores.update({f"{metric}/{setting}": value for metric, value in metrics.items()})
        return scores


def yes_no_gold(value: str, where: str) -> str:
    """A gold "Yes"/"no" as the parser's "yes"/"no"; anything else is a data error."""
    gold = str(value).strip().lower().rstrip(".")
    if gold not in ("yes", "no"):
        raise ShortLVLMError(f"{where} has answer {value!r}, not yes/no; check that the data is in the hub schema.")
    return gold
