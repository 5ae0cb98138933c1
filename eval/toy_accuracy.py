"""Accuracy on the synthetic test split: the full model through vLLM and transformers, and 30% TIS
pruning with and without SCP (transformers), on the same questions.

    .venv/bin/python eval/toy_accuracy.py MODEL [--data synthetic] [--questions 1000] [--no-pruned]
        [--output eval/results/toy_accuracy]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.data.calibration import CalibrationSource
from shortlvlm_vllm.data.synthetic import SOURCE_VERSIONS
from shortlvlm_vllm.evaluation.benchmarks import get_benchmark
from shortlvlm_vllm.evaluation.client import Endpoint, run_benchmark
from shortlvlm_vllm.evaluation.matrix import weights_sha256
from shortlvlm_vllm.evaluation.reference import ask_transformers
from shortlvlm_vllm.evaluation.throughput import write_summary
from shortlvlm_vllm.files import portable_name
from shortlvlm_vllm.prune.compensate import CompensationSettings
from shortlvlm_vllm.prune.pipeline import plan_pruning, write_plan
from shortlvlm_vllm.prune.recipe import PruneRecipe
from shortlvlm_vllm.serving.launcher import VLLMServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="checkpoint directory, or toy (the shipped toy model)")
    parser.add_argument("--data", default="synthetic", choices=sorted(SOURCE_VERSIONS),
                        help="the synthetic set scored and calibrated on (synthetic-v1: the first toy's)")
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--no-pruned", dest="pruned", action="store_false",
                        help="only the full model (the pruned arms are also in the stacking matrix)")
    parser.add_argument("--output", type=Path, default=Path("eval/results/toy_accuracy"))
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    benchmark = get_benchmark(args.data)
    items = benchmark.load(limit=args.questions)

    def transformers_scores(model: str | Path) -> dict[str, float]:
        replies = ask_transformers(model, items, benchmark.max_tokens, batch_size=50)  # batched answers = one at a time
        return benchmark.score(items, {i.id: benchmark.parse(i, r) for i, r in zip(items, replies, strict=True)})

    src = open_checkpoint(args.model)
    results: dict = {"model": portable_name(args.model), "questions": len(items), "ratio": args.ratio}
    with VLLMServer(src.path, log_path=args.output / "vllm.log", served_model_name="model") as server:
        results["full_vllm"] = run_benchmark(Endpoint(server.base_url, "model", server.api_key), benchmark,
                                             # resumable, and only for the same weights
                                             args.output / f"vllm-records-{weights_sha256(src.path)[:12]}",
                                             limit=args.questions)
    results["full_transformers"] = transformers_scores(src.path)
    for compensation in ("none", "scp") if args.pruned else ():
        recipe = PruneRecipe(ratio=args.ratio, compensation=CompensationSettings(compensation),
                             calibration=CalibrationSource(args.data))
        plan = plan_pruning(src, recipe)
        pruned = write_plan(src, args.output / f"pruned-{compensation}", recipe, plan, overwrite=True)
        results[f"pruned_{compensation}_transformers"] = transformers_scores(pruned)
        results["pruned_layers"] = plan.pruned
    write_summary(results, args.output)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
