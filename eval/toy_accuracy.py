"""Accuracy on the synthetic test split: the full model through vLLM and transformers, and 30% TIS
pruning with and without SCP (transformers), on the same questions.

    .venv/bin/python eval/toy_accuracy.py MODEL [--questions 300] [--output eval/results/toy_accuracy]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shortlvlm_vllm.checkpoint import open_checkpoint
from shortlvlm_vllm.evaluate import accuracy, ask_server, ask_transformers, synthetic_questions
from shortlvlm_vllm.prune import CalibrationSource, PruneRecipe, plan_pruning, write_plan
from shortlvlm_vllm.serve import VLLMServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--output", type=Path, default=Path("eval/results/toy_accuracy"))
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    questions = synthetic_questions("test", limit=args.questions)
    results: dict = {"model": args.model, "questions": len(questions), "ratio": args.ratio}
    with VLLMServer(args.model, log_path=args.output / "vllm.log", served_model_name="model") as server:
        results["full_vllm"] = accuracy(questions, ask_server(server.base_url, "model", questions, server.api_key))
    results["full_transformers"] = accuracy(questions, ask_transformers(args.model, questions))
    src = open_checkpoint(args.model)
    for compensation in ("none", "scp"):
        recipe = PruneRecipe(ratio=args.ratio, compensate=compensation, calibration=CalibrationSource("synthetic"))
        plan = plan_pruning(src, recipe)
        pruned = write_plan(src, args.output / f"pruned-{compensation}", recipe, plan, overwrite=True)
        results[f"pruned_{compensation}_transformers"] = accuracy(questions, ask_transformers(pruned, questions))
        results["pruned_layers"] = plan.pruned
    (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
