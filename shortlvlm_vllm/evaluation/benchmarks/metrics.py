"""Metric pieces shared by the benchmarks: hits per item, accuracy broken down by a group, POPE's yes/no metrics."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence

from shortlvlm_vllm.evaluation.benchmarks.base import Benchmark, Item


def hits(benchmark: Benchmark, items: Sequence[Item], parsed: Mapping[str, str]) -> list[bool]:
    """Whether each item was answered right; an item without a parsed reply counts as wrong."""
    return [benchmark.correct(item, parsed.get(item.id, "")) for item in items]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def grouped(items: Sequence[Item], values: Sequence, key: Callable[[Item], Hashable]) -> dict:
    """`values` (one per item) gathered by `key(item)`, groups in order of first appearance."""
    groups: dict = defaultdict(list)
    for item, value in zip(items, values, strict=True):
        groups[key(item)].append(value)
    return dict(groups)


def yes_no_metrics(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """POPE's metrics with "yes" as the positive class: accuracy, precision, recall, F1 and the share of "yes" replies.

    A reply that makes no choice ("") is a negative prediction, wrong whatever the gold. This differs from
    lmms-eval's POPE aggregation in two ways, both towards the POPE paper: its recall leaves unparsed replies out
    of the false negatives, and its yes-ratio counts gold answers instead of predictions.
    """
    true_pos = sum(g == "yes" and p == "yes" for g, p in zip(golds, preds, strict=True))
    said_yes = sum(p == "yes" for p in preds)
    gold_yes = sum(g == "yes" for g in golds)
    precision = true_pos / said_yes if said_yes else 0.0
    recall = true_pos / gold_yes if gold_yes else 0.0
    return {
        "accuracy": mean([g == p for g, p in zip(golds, preds, strict=True)]),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": said_yes / len(preds) if preds else 0.0,
    }
