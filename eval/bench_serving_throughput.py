"""Serving throughput of a 30%-pruned model against the full model, in one run, on the same requests.

    .venv/bin/python eval/bench_serving_throughput.py            # random LLaVA-shaped, hidden 2048, 16 layers

The model is a random-weight LLaVA-1.5-shaped checkpoint large enough that its decoder dominates the cost
(as in the real 7B: the vision tower and the byte-sized vocabulary cost next to nothing here). Both servers
get the same requests at the same concurrency with a fixed output length (ignore_eos), one after the other;
the throughput ratio is set against the ideal ratio of layer counts (full / kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.checkpoint.surgery import write_pruned_checkpoint
from shortlvlm_vllm.evaluation.throughput import replay_on_servers, synthetic_requests, write_summary
from shortlvlm_vllm.prune.localize import layers_to_prune
from shortlvlm_vllm.tiny_models import build_tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--output", type=Path, default=Path("eval/results/serving_throughput"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        full = build_tiny_llava(Path(tmp) / "full", num_layers=args.layers, hidden_size=args.hidden,
                                dtype=torch.bfloat16, initializer_range=0.02)
        src = open_checkpoint(full)
        n = layers_to_prune(args.ratio, src.num_layers, src.num_layers)
        start = (src.num_layers - n) // 2  # which layers does not matter for speed
        drop = list(range(start, start + n))
        pruned = write_pruned_checkpoint(src, Path(tmp) / "pruned", drop, {"method": "explicit", "ratio": args.ratio})
        requests = synthetic_requests(args.num_prompts, image_size=64)
        results = replay_on_servers({"full": full, "pruned": pruned}, requests, args.output,
                                    server_kwargs={"max_model_len": 512}, output_len=args.output_len,
                                    concurrency=args.concurrency)
    kept = src.num_layers - n
    ideal = src.num_layers / kept
    measured = {metric: results["pruned"][metric] / results["full"][metric]
                for metric in ("output_throughput", "request_throughput")}
    summary = {
        "model": f"random LLaVA-shaped, hidden {args.hidden}, {args.layers} layers, bfloat16",
        "pruned_layers": drop, "ideal_ratio": round(ideal, 4),
        "output_throughput_ratio": round(measured["output_throughput"], 4),
        "fraction_of_ideal": round(measured["output_throughput"] / ideal, 4),
        "request_throughput_ratio": round(measured["request_throughput"], 4),
        "tpot_ratio_full_over_pruned": round(
            results["full"]["median_tpot_ms"] / results["pruned"]["median_tpot_ms"], 4),
        "workload": {"num_prompts": args.num_prompts, "concurrency": args.concurrency, "output_len": args.output_len},
        "results": results,
    }
    write_summary(summary, args.output)
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
