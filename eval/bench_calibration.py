"""Calibration-pass cost against a plain forward pass, measured in one run on the same samples.

    .venv/bin/python eval/bench_calibration.py                      # a LLaVA-shaped random model
    .venv/bin/python eval/bench_calibration.py --model DIR --samples 32

Without --model it builds a random-weight LLaVA-1.5-shaped model whose decoder dominates the
cost (hidden 1024, 16 layers, 336 px images -> 576 image tokens), as the real 7B does.
Reports the time ratio (target <= 1.5x), peak resident memory, and the memory SCP's features need.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from shortlvlm_vllm.chat import demo_image
from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.data.calibration import CalibrationSample, calibration_inputs
from shortlvlm_vllm.prune.calibrate import run_calibration
from shortlvlm_vllm.prune.localize import parse_candidates
from shortlvlm_vllm.prune.pipeline import load_model


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: build a LLaVA-shaped random model)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds; each times both on every sample")
    parser.add_argument("--warmup", type=int, help="samples of the untimed warm-up forward (default: all)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--output", type=Path, default=Path("eval/results/bench_calibration.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from shortlvlm_vllm.tiny_models import build_tiny_llava

            model_dir = build_tiny_llava(Path(tmp) / "model", num_layers=args.layers, hidden_size=args.hidden,
                                         image_size=336, patch_size=14, dtype=torch.bfloat16, initializer_range=0.02)
        src = open_checkpoint(model_dir)
        model, processor = load_model(src.path, "auto", "auto")
        samples = [CalibrationSample(str(i), "What is in the image? Describe every object and its colour.",
                                     "A red circle at the top left and a blue square at the bottom right.",
                                     demo_image(336 + i)) for i in range(args.samples)]
        candidates = parse_candidates(None, src.num_layers)
        device = next(model.parameters()).device

        @torch.no_grad()
        def plain(batch) -> None:
            """The same samples through the same processor, without hooks: what calibration adds is the rest."""
            for sample in batch:
                model(**calibration_inputs(processor, sample).to(device), use_cache=False)

        def calibrate(batch) -> None:
            run_calibration(model, processor, src.adapter, batch, candidates)

        rss_before = _peak_rss_mb()
        times: dict[str, list[float]] = {"plain": [], "calibration": []}
        per_sample: list[float] = []  # calibration / plain on each sample, for the spread
        plain(samples[: args.warmup])
        for _ in range(args.repeats):
            total = dict.fromkeys(times, 0.0)
            for sample in samples:  # alternating on each sample, so a change in machine load hits both alike
                seconds = {}
                for name, fn in (("plain", plain), ("calibration", calibrate)):
                    start = time.perf_counter()
                    fn([sample])
                    seconds[name] = time.perf_counter() - start
                    total[name] += seconds[name]
                per_sample.append(seconds["calibration"] / seconds["plain"])
            for name in times:
                times[name].append(total[name])
        best = {k: min(v) for k, v in times.items()}
        d = model.config.get_text_config().hidden_size
        shape = f"random LLaVA-shaped, hidden {args.hidden}, {args.layers} layers"
        result = {
            "model": str(model_dir) if args.model else shape,
            "dtype": str(next(model.parameters()).dtype),
            "samples": args.samples,
            "sequence_length": int(calibration_inputs(processor, samples[0])["input_ids"].shape[1]),
            "plain_forward_s": round(best["plain"], 3),
            "calibration_s": round(best["calibration"], 3),
            "ratio": round(best["calibration"] / best["plain"], 3),
            "ratio_per_sample": [round(r, 3) for r in per_sample],
            "ratio_per_sample_mean_std": [round(statistics.mean(per_sample), 3),
                                          round(statistics.stdev(per_sample), 3) if len(per_sample) > 1 else None],
            "peak_rss_mb_before": round(rss_before, 1),
            "peak_rss_mb_after": round(_peak_rss_mb(), 1),
            "scp_features_mb": round(src.num_layers * args.samples * d * 4 / 2**20, 2),
            "all_times_s": times,
        }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
