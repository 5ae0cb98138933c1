"""Accuracy on the synthetic test split: the full model through vLLM and transformers, and 30% TIS
pruning with and without SCP (transformers), on the same questions.

    .venv/bin/python eval/toy_accuracy.py MODEL [--questions 1000] [--output eval/results/toy_accuracy]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shortlvlm_vllm.benchmarks import get_benchmark
from shortlvlm_vllm.checkpoint import open_checkpoint
from shortlvlm_vllm.client import Endpoint, run_benchmark
from shortlvlm_vllm.evaluate import ask_transformers
from shortlvlm_vllm.prune import CalibrationSource, PruneRecipe, plan_pruning, write_plan
from shortlvlm_vllm.serve import VLLMServer
from shortlvlm_vllm.throughput import write_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--output", type=Path, default=Path("eval/results/toy_accuracy"))
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    benchmark = get_benchmark("synthetic")
    items = benchmark.load(limit=args.questions)

    def transformers_scores(model: str | Path) -> dict[str, float]:
        replies = ask_transformers(model, items, benchmark.max_tokens)
        return benchmark.score(items, {i.id: benchmark.parse(i, r) for i, r in zip(items, replies, strict=True)})

    results: dict = {"model": args.model, "questions": len(items), "ratio": args.ratio}
    with VLLMServer(args.model, log_path=args.output / "vllm.log", served_model_name="model") as server:
        results["full_vllm"] = run_benchmark(Endpoint(server.base_url, "model", server.api_key), benchmark,
                                             args.output / "vllm-records", limit=args.questions)
    results["full_transformers"] = transformers_scores(args.model)
    src = open_checkpoint(args.model)
    for compensation in ("none", "scp"):
        recipe = PruneRecipe(ratio=args.ratio, compensate=compensation, calibration=CalibrationSource("synthetic"))
        plan = plan_pruning(src, recipe)
        pruned = write_plan(src, args.output / f"pruned-{compensation}", recipe, plan, overwrite=True)
        results[f"pruned_{compensation}_transformers"] = transformers_scores(pruned)
        results["pruned_layers"] = plan.pruned
    write_summary(results, args.output)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
