"""Served throughput of the stacking grid on a model large enough for speed to mean something, in one run,
set against the toy model's accuracy on the same grid.

    .venv/bin/python eval/bench_stacking_throughput.py      # after: shortlvlm matrix eval/configs/stacking_tokens.yaml

The toy model is too small for its throughput to move with its size (the server's fixed costs dominate). This
script builds a random-weight LLaVA with the toy's image geometry (72 px, patch 8: 81 tokens per image), the toy's
word tokenizer and chat template (so every prompt has the toy's token count), the toy's 16 decoder layers and
vision tower, and a decoder of hidden 1024 that dominates the cost. It runs the stacking grid on it with the
matrix runner (TIS+SCP 0/30/40% x none/GPTQ W4A16 x 100/50/25/12.5% of the visual tokens, one vLLM server per
arm, one after the other, the same requests for each): the synthetic benchmark's prompts (prefill-heavy: 81
image tokens and a short question) with 2 output tokens each, as the benchmarks' one-word answers and their
end of sequence. The random model's accuracy is meaningless and not reported.

It then joins each arm's throughput multiple over the full model with the toy's accuracy on the same arm
(`--accuracy`, the stacking matrix's results.json) into `stacking.md` / `stacking.json` / `stacking.png`:
accuracy against throughput with the Pareto front, and the best multiple at which at least 97% of the full
toy model's accuracy is kept.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from shortlvlm_vllm.evaluation.matrix import Matrix, load_config, pareto_front
from shortlvlm_vllm.plots import plot_accuracy_vs_throughput
from shortlvlm_vllm.tiny_models import make_llava, save_hub_checkpoint
from shortlvlm_vllm.toy.training import ToyTrainingConfig, build_word_tokenizer

KEEP = 0.97  # the share of the full model's accuracy an arm must keep to count


def build_model(out: Path, hidden: int) -> Path:
    """A random-weight LLaVA with the toy's tokenizer, image geometry, vision tower and layer count."""
    if (out / "config.json").is_file():
        return out
    toy = ToyTrainingConfig()
    model, processor = make_llava(
        build_word_tokenizer(), num_layers=toy.num_layers, hidden_size=hidden, intermediate_size=3 * hidden,
        vision_hidden_size=toy.vision_hidden_size, vision_layers=toy.vision_layers, image_size=toy.image_size,
        patch_size=toy.patch_size, initializer_range=0.02, seed=0,
    )
    return save_hub_checkpoint(model, processor, out, dtype=torch.bfloat16, overwrite=True)


def join(speed: list[dict], accuracy: list[dict]) -> list[dict]:
    """Per arm of both runs: the toy's accuracy (and its share of the full model's) and the random model's
    served throughput (and its multiple of the full model's)."""
    toy = {r["arm"]: r for r in accuracy}
    fast = {r["arm"]: r for r in speed}
    full_accuracy = toy["full"]["accuracy"]["accuracy"]
    full_speed = fast["full"]["throughput"]["request_throughput"]
    rows = []
    for name, r in fast.items():
        if name not in toy:
            continue
        acc = toy[name]["accuracy"]["accuracy"]
        rows.append({
            "arm": name, "layers": toy[name]["layers"], "quantize": r["quantize"],
            "visual_tokens": toy[name].get("visual_tokens") or "all", "toy_accuracy": round(acc, 4),
            "accuracy_kept": round(acc / full_accuracy, 4),
            "req_per_s": round(r["throughput"]["request_throughput"], 3),
            "ttft_p50_ms": round(r["throughput"]["median_ttft_ms"], 1),
            "throughput_multiple": round(r["throughput"]["request_throughput"] / full_speed, 3),
        })
    return rows


def write_stacking(rows: list[dict], out: Path, model: str) -> dict:
    points = [(r["toy_accuracy"], r["throughput_multiple"]) for r in rows]
    front = set(pareto_front(points))
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    kept = [r for r in rows if r["accuracy_kept"] >= KEEP]
    best = max(kept, key=lambda r: r["throughput_multiple"])
    summary = {"model": model, "keep": KEEP, "best_multiple_keeping": best, "rows": rows}
    (out / "stacking.json").write_text(json.dumps(summary, indent=1) + "\n")
    columns = list(rows[0])
    lines = [f"Toy accuracy (whole test split) against served throughput on {model}; multiple of the full model's "
             f"requests/s. Best multiple keeping >= {KEEP:.0%} of the full accuracy: **{best['arm']}, "
             f"{best['throughput_multiple']}x** ({best['accuracy_kept']:.1%} of the accuracy).", "",
             "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(("**yes**" if v else "") if isinstance(v, bool) else str(v) for v in r.values()) + " |"
              for r in rows]
    (out / "stacking.md").write_text("\n".join(lines) + "\n")
    (out / "stacking.png").write_bytes(plot_accuracy_vs_throughput(
        [r["arm"] for r in rows], [r["quantize"] for r in rows],
        [(r["toy_accuracy"], r["req_per_s"] * 2) for r in rows], front))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("eval/configs/stacking_tokens.yaml"),
                        help="the stacking matrix whose grid is measured")
    parser.add_argument("--accuracy", type=Path, default=Path("eval/results/stacking_tokens/results.json"),
                        help="the toy model's results on that grid")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--output", type=Path, default=Path("eval/results/stacking_throughput"))
    parser.add_argument("--build-only", action="store_true",
                        help="build (and cache) every arm's checkpoint, measure nothing: the slow part, which "
                             "needs no quiet machine")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    model_dir = build_model(args.output / "checkpoints" / "random-llava", args.hidden)  # git-ignored
    config = load_config(args.config)
    config.model = model_dir.relative_to(Path.cwd()).as_posix() if model_dir.is_relative_to(Path.cwd()) else (
        str(model_dir))
    config.calibration = {"source": "synthetic", "num_samples": 32}
    config.quantize = {**config.quantize, "num_samples": 16}
    config.benchmark = {"name": "synthetic", "limit": 8}  # a random model's answers: only served, not scored
    config.throughput = {"num_prompts": args.num_prompts, "concurrency": args.concurrency, "output_len": 2}
    matrix = Matrix(config, args.output)
    if args.build_only:
        matrix.check_source()
        for arm in config.arms:
            matrix.checkpoint(arm)
        return
    speed = matrix.run()
    name = (f"a random LLaVA with the toy's geometry (81 tokens per image, 16 layers), decoder hidden {args.hidden}, "
            f"bfloat16; {args.num_prompts} synthetic prompts at concurrency {args.concurrency}, 2 output tokens")
    summary = write_stacking(join(speed, json.loads(args.accuracy.read_text())), args.output, name)
    print(json.dumps(summary["best_multiple_keeping"], indent=1))


if __name__ == "__main__":
    main()
