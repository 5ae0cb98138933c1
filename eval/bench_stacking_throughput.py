"""Served throughput of the stacking grid on a model large enough for speed to mean something, in one run,
set against the toy model's accuracy on the same grid.

    .venv/bin/python eval/bench_stacking_throughput.py      # after: shortlvlm matrix eval/configs/stacking_tokens.yaml

The toy model is too small for its throughput to move with its size (the server's fixed costs dominate). This
script builds a random-weight LLaVA with the toy's image geometry (72 px, patch 8: 81 tokens per image), the toy's
word tokenizer and chat template (so every prompt has the toy's token count), the toy's 16 decoder layers and
vision tower, and a decoder of hidden 1024 that dominates the cost. It runs the stacking grid on it with the
matrix's checkpoints and throughput rounds (TIS+SCP 0/30/40% x none/GPTQ W4A16 x 100/50/25/12.5% of the visual
tokens; per serving shape `--repeats` rounds of one vLLM server start and the same requests, the rounds interleaved
across shapes): the synthetic benchmark's prompts (prefill-heavy: 81 image tokens and a short question) with 2 output
tokens each, as the benchmarks' one-word answers and their end of sequence. The random model is not asked for
answers: its accuracy means nothing.

It then gives each of the toy's arms (`--accuracy`, the stacking matrix's directory) the random model's throughput
for the same serving shape and writes the matrix's tables and plot for the pair into `--output` (results.md, with
each arm's interval and paired test against the full model; accuracy_vs_throughput.png with the Pareto front),
and `best.md` / `best.json`: the highest throughput multiple over the full model at which at least 97% of the full
toy model's accuracy is kept, with the multiple's range over the interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from shortlvlm_vllm.evaluation.matrix import RESULT_NAME, UNITS_NAME, Matrix, load_config
from shortlvlm_vllm.evaluation.tables import arm_rows, write_tables
from shortlvlm_vllm.files import check_apart, write_atomic
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


def served_throughput(matrix: Matrix) -> list[dict]:
    """Each arm's serving shape and the random model's throughput rounds for it; its answers are not asked for (a
    random model's accuracy means nothing, and each arm would cost a server start)."""
    check_apart(matrix.out, matrix.protected())
    matrix.check_source()
    shapes = []
    for arm in matrix.config.arms:
        checkpoint = matrix.checkpoint(arm)
        config = json.loads((checkpoint / "config.json").read_text())
        _, visual_tokens = matrix.server_kwargs(arm, checkpoint)
        shapes.append({**asdict(arm), "arm": arm.name,
                       "throughput_key": matrix.throughput_key(arm, checkpoint, config, visual_tokens)})
    speeds = matrix.measure_throughput(shapes)
    return [{**shape, "throughput": speeds[shape["throughput_key"]]} for shape in shapes]


def join(accuracy_dir: Path, config, speed: list[dict]) -> list[dict]:
    """The toy's result for each arm of the grid, with the random model's throughput for the arm's serving shape."""
    fast = {r["arm"]: r for r in speed}
    joined = []
    for arm in config.arms:
        path = accuracy_dir / "arms" / arm.slug / RESULT_NAME
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run the stacking matrix first ({accuracy_dir}).")
        toy = json.loads(path.read_text())
        joined.append({**toy, "throughput_key": fast[arm.name]["throughput_key"],
                       "throughput": fast[arm.name]["throughput"]})
    return joined


def best_multiple(rows: list[dict]) -> dict:
    """The arm with the highest median throughput multiple over the full model among those keeping KEEP of its
    accuracy; the multiple's range pairs the extremes of the rounds (slowest arm round over fastest full round)."""
    full = next(r for r in rows if "vs_full" not in r)
    kept = [r for r in rows if r["accuracy"] >= KEEP * full["accuracy"]]
    best = max(kept, key=lambda r: r["output_tok_per_s"])
    return {"arm": best["arm"], "keep": KEEP, "accuracy": best["accuracy"], "full_accuracy": full["accuracy"],
            "accuracy_kept": round(best["accuracy"] / full["accuracy"], 4),
            "vs_full_points": [round(100 * best.get(k, 0.0), 1) for k in ("vs_full", "vs_full_low", "vs_full_high")],
            "multiple": round(best["output_tok_per_s"] / full["output_tok_per_s"], 3),
            "multiple_range": [round(best["output_tok_per_s_low"] / full["output_tok_per_s_high"], 3),
                               round(best["output_tok_per_s_high"] / full["output_tok_per_s_low"], 3)],
            "pareto_front": [r["arm"] for r in rows if r.get("pareto")]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("eval/configs/stacking_tokens.yaml"),
                        help="the stacking matrix whose grid is measured")
    parser.add_argument("--accuracy", type=Path, default=Path("eval/results/stacking_tokens"),
                        help="the stacking matrix's results on the toy model (its output directory)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved throughput rounds per serving shape")
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
    config.calibration = {"source": "synthetic", "num_samples": 64}  # rank 64 needs as many
    config.quantize = {**config.quantize, "num_samples": 16}
    config.benchmark = {"name": "synthetic"}  # the throughput workload's prompts
    config.throughput = {"num_prompts": args.num_prompts, "concurrency": args.concurrency, "output_len": 2,
                         "repeats": args.repeats, "per": "shape"}
    matrix = Matrix(config, args.output / "random-model", cache=args.output / "checkpoints")
    if args.build_only:
        matrix.check_source()
        for arm in config.arms:
            matrix.checkpoint(arm)
        return
    joined = join(args.accuracy, load_config(args.config), served_throughput(matrix))
    shutil.copyfile(args.accuracy / UNITS_NAME, args.output / UNITS_NAME)
    write_tables(joined, args.output)
    best = best_multiple(arm_rows(joined, json.loads((args.output / UNITS_NAME).read_text())["groups"]))
    best["throughput_measured_on"] = (
        f"a random LLaVA with the toy's geometry (81 tokens per image, 16 layers), decoder hidden {args.hidden}, "
        f"bfloat16; {args.num_prompts} synthetic prompts at concurrency {args.concurrency}, 2 output tokens, "
        f"{args.repeats} interleaved rounds per shape")
    write_atomic(args.output / "best.json", json.dumps(best, indent=1) + "\n")
    lo, hi = best["multiple_range"]
    write_atomic(args.output / "best.md",
        f"Best served-throughput multiple keeping >= {KEEP:.0%} of the full toy model's accuracy: **{best['arm']}, "
        f"{best['multiple']}x** (range {lo}-{hi}x over the rounds), accuracy {100 * best['accuracy']:.1f}% vs "
        f"{100 * best['full_accuracy']:.1f}% ({100 * best['accuracy_kept']:.1f}% kept; "
        "{:+.1f} points [{:+.1f}, {:+.1f}]). ".format(*best["vs_full_points"]) +
        f"Pareto front: {', '.join(best['pareto_front'])}. Throughput measured on {best['throughput_measured_on']}.\n")
    print(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
