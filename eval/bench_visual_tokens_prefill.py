"""Prefill time of an image prompt with 25% of the visual tokens against all of them, in one run, through the server.

    .venv/bin/python eval/bench_visual_tokens_prefill.py     # random LLaVA-1.5-shaped: 336 px / patch 14 = 576 tokens

The model is a random-weight LLaVA with LLaVA-1.5's image geometry (576 tokens per image) and a small vision
tower, so that the decoder dominates the prefill. The same checkpoint is served twice, one server after the
other: as written by `shortlvlm prune --visual-tokens K` (K = 25% of 576 = 144, the plugin's class), then with
every token (stock LLaVA). Each server gets the same distinct image prompts one at a time with one output token,
so time to first token is the prefill (vision tower, selection and decoder) of one request.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.evaluation.throughput import replay_on_servers, synthetic_requests, write_summary
from shortlvlm_vllm.prune.compensate import CompensationSettings
from shortlvlm_vllm.prune.pipeline import plan_pruning, write_plan
from shortlvlm_vllm.prune.recipe import PruneRecipe
from shortlvlm_vllm.serving.visual_tokens import image_token_count
from shortlvlm_vllm.tiny_models import build_tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--fraction", type=float, default=0.25, help="share of the visual tokens kept")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--output", type=Path, default=Path("eval/results/visual_tokens_prefill"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        full = build_tiny_llava(Path(tmp) / "full", num_layers=args.layers, hidden_size=args.hidden,
                                image_size=args.image_size, patch_size=args.patch_size, dtype=torch.bfloat16,
                                initializer_range=0.02)
        src = open_checkpoint(full)
        num_tokens, vision = image_token_count(src.config), src.config["vision_config"]
        budget = max(1, round(args.fraction * num_tokens))
        recipe = PruneRecipe(compensation=CompensationSettings("none"), visual_tokens=budget)
        pruned = write_plan(src, Path(tmp) / f"tokens-{budget}", recipe, plan_pruning(src, recipe))
        requests = synthetic_requests(args.num_prompts, image_size=args.image_size)
        results = replay_on_servers({f"tokens-{budget}": pruned, f"tokens-{num_tokens}": full}, requests, args.output,
                                    server_kwargs={"max_model_len": 1024, "startup_timeout": 1800}, output_len=1,
                                    concurrency=1)
    fewer, every = results[f"tokens-{budget}"], results[f"tokens-{num_tokens}"]
    summary = {
        "model": f"random LLaVA-shaped, decoder hidden {args.hidden} x {args.layers} layers, vision tower hidden "
                 f"{vision['hidden_size']} x {vision['num_hidden_layers']} layers, {args.image_size} px / patch "
                 f"{args.patch_size}, bfloat16",
        "visual_tokens": {"all": num_tokens, "kept": budget},
        "prompt_tokens_per_request": {"all": every["total_input_tokens"] / every["completed"],
                                      "kept": fewer["total_input_tokens"] / fewer["completed"]},
        "median_ttft_ms": {"all": round(every["median_ttft_ms"], 1), "kept": round(fewer["median_ttft_ms"], 1)},
        "prefill_speedup_all_over_kept": round(every["median_ttft_ms"] / fewer["median_ttft_ms"], 3),
        "workload": {"num_prompts": args.num_prompts, "concurrency": 1, "output_len": 1},
        "results": results,
    }
    write_summary(summary, args.output)
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
