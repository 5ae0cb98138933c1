"""SCP ablation: held-out drift of the pruned model for each --scp-target and rank, one calibration pass.

    .venv/bin/python eval/scp_ablation.py MODEL --calib CALIB [--ratio 0.3] [--ranks 8,32,64]

Every variant is a view of the one loaded model (layers skipped, folded weights swapped in),
measured on held-out samples against the full model: KL of the next-token distributions and the
relative distance of the last hidden states (lower is better). Writes a markdown table and JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.data.calibration import load_calibration
from shortlvlm_vllm.evaluation.throughput import write_summary
from shortlvlm_vllm.files import portable_name
from shortlvlm_vllm.prune.calibrate import run_calibration
from shortlvlm_vllm.prune.compensate import SCP_TARGETS, CompensationSettings, SubspaceCompensation
from shortlvlm_vllm.prune.drift import measure_drift
from shortlvlm_vllm.prune.localize import layers_to_prune, localize, parse_candidates
from shortlvlm_vllm.prune.pipeline import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--localize", default="tis")
    parser.add_argument("--ranks", default="8,32,64")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("eval/results/scp_ablation"))
    args = parser.parse_args()

    src = open_checkpoint(args.model)
    drawn = load_calibration(args.calib, num_samples=args.num_samples + args.heldout, seed=args.seed)
    samples, heldout = drawn[: args.num_samples], drawn[args.num_samples:]
    candidates = parse_candidates(None, src.num_layers)
    model, processor = load_model(src.path)
    stats = run_calibration(model, processor, src.adapter, samples, candidates)
    n = layers_to_prune(args.ratio, src.num_layers, len(candidates))
    pruned, _ = localize(args.localize, stats, n, candidates, args.seed)
    hidden = stats.features.shape[-1]
    ranks = [r for r in map(int, args.ranks.split(",")) if r <= min(len(samples), hidden)]
    variants = {"none": None}
    for target in SCP_TARGETS:
        for rank in ranks:
            scp = SubspaceCompensation(CompensationSettings(rank=rank, target=target))
            variants[f"{target} k={rank}"] = scp.compensate(src, pruned, stats.features).replaced
    drifts = measure_drift(model, processor, src.adapter, heldout, pruned, variants)

    lines = [f"# SCP ablation: {portable_name(src.name)}, {args.localize} {args.ratio:.0%} -> layers {pruned}",
             "", f"{len(samples)} calibration samples, {len(heldout)} held-out samples, source {args.calib}.",
             "", "| compensation | KL (nats/token) | last hidden state distance |", "| --- | --- | --- |"]
    lines += [f"| {name} | {d.kl:.5f} | {d.hidden_distance:.4f} |" for name, d in drifts.items()]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "table.md").write_text("\n".join(lines) + "\n")
    write_summary({
        "model": portable_name(src.name), "ratio": args.ratio, "localize": args.localize, "pruned": pruned,
        "num_samples": len(samples), "heldout": len(heldout), "calib": args.calib,
        "drift": {name: d.as_dict() for name, d in drifts.items()},
    }, args.output)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
