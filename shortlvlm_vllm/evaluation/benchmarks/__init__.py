"""The benchmarks the evaluation client runs, by name.

Scores are fractions in [0, 1], except MME's, which are points as MME defines them (up to 200 per subtask). Keys:
a bare name is a headline ("accuracy", "f1", "perception"); "metric/group" breaks it down ("accuracy/OCR",
"f1/adversarial").
"""

from __future__ import annotations

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.benchmarks.base import Benchmark, Item
from shortlvlm_vllm.evaluation.benchmarks.choice import AOKVQA, ScienceQA, SEEDBench
from shortlvlm_vllm.evaluation.benchmarks.mmbench import MMBench
from shortlvlm_vllm.evaluation.benchmarks.mme import MME
from shortlvlm_vllm.evaluation.benchmarks.pope import POPE
from shortlvlm_vllm.evaluation.benchmarks.synthetic import Synthetic

BENCHMARKS: dict[str, Benchmark] = {
    benchmark.name: benchmark
    for benchmark in (POPE(), MME(), MMBench(), ScienceQA(), SEEDBench(), AOKVQA(), Synthetic(), Synthetic(version=1))
}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called `name`; an unknown name is refused with the known ones."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ShortLVLMError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}.") from None


__all__ = [
    "AOKVQA", "BENCHMARKS", "MME", "MMBench", "POPE", "SEEDBench", "Benchmark", "Item", "ScienceQA", "Synthetic",
    "get_benchmark",
]
