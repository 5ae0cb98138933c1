"""SCP ablation: held-out drift of every SCP variant (pairing x target x shared rule) against plain removal, for
each localizer and ratio, from one calibration pass.

    .venv/bin/python eval/scp_ablation.py MODEL --calib CALIB [--ratios 0.1,0.2,0.3,0.4]
        [--localizers tis,all-tokens,angular-block] [--num-samples 256] [--heldout 128] [--rank 64]

Every variant is a view of the one loaded model (layers skipped, folded weights swapped in), measured on the same
held-out samples against the full model: KL of the next-token distributions and the relative distance of the last
hidden states (lower is better), with the paired-bootstrap 95% interval of each variant's KL minus plain removal's
and minus the best variant's, per sample. "inputs, gain not folded" is the input-side fold applied to the weights
alone (W (I + V V^T)), kept here to show what folding the norms' gains changes. Writes table.md and results.json.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import asdict
from pathlib import Path

from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.checkpoint.safetensors_io import load_tensor
from shortlvlm_vllm.data.calibration import CalibrationSource
from shortlvlm_vllm.evaluation.statistics import paired_bootstrap
from shortlvlm_vllm.evaluation.throughput import write_summary
from shortlvlm_vllm.files import portable_name
from shortlvlm_vllm.prune.calibrate import load_statistics, run_calibration, save_statistics, statistics_key
from shortlvlm_vllm.prune.compensate import (
    PAIRINGS,
    SCP_TARGETS,
    SHARED_RULES,
    CompensationSettings,
    SubspaceCompensation,
    fold_input,
)
from shortlvlm_vllm.prune.drift import drift, pruned_view, reference_outputs
from shortlvlm_vllm.prune.localize import layers_to_prune, localize, parse_candidates
from shortlvlm_vllm.prune.pipeline import load_model

NO_GAIN = "inputs, gain not folded"


def variants(src, pruned, features, rank) -> dict[str, dict]:
    """name -> replaced tensors, for every pairing x target x shared rule that differs (and the no-gain fold)."""
    found: dict[str, dict] = {}
    for pairing, target, shared in itertools.product(PAIRINGS, SCP_TARGETS, SHARED_RULES):
        comp = SubspaceCompensation(CompensationSettings("scp", rank, target, pairing, shared)).compensate(
            src, pruned, features)
        if shared == "compose" and all(len(b) == 1 for b in comp.bases.values()):
            continue  # no kept layer bridges two gaps: the same weights as stack
        found[f"{pairing}/{target}/{shared}"] = comp.replaced
        if target == "inputs":
            keys = [info.name for info in src.tensors()]
            no_gain = {}
            for r, bases in comp.bases.items():
                for role, _ in SCP_TARGETS["inputs"]:
                    key = src.adapter.layer_weight_key(keys, r, role)
                    no_gain[key] = fold_input(load_tensor(src.tensor_info(key)), bases)
            found[f"{pairing}/{NO_GAIN}/{shared}"] = no_gain
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    parser.add_argument("--localizers", default="tis,all-tokens,angular-block")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("eval/results/scp_ablation"))
    parser.add_argument("--cache", type=Path, default=Path("runs/calibration-cache"),
                        help="where the calibration pass's statistics are cached")
    args = parser.parse_args()

    src = open_checkpoint(args.model)
    calibration = CalibrationSource(args.calib, num_samples=args.num_samples, heldout=args.heldout, seed=args.seed)
    drawn = calibration.load(args.num_samples + args.heldout)
    samples, heldout = drawn[: args.num_samples], drawn[args.num_samples:]
    candidates = parse_candidates(None, src.num_layers)
    model, processor = load_model(src.path)
    key = statistics_key(src.fingerprint, asdict(calibration), candidates, 0.10, "auto", "auto")
    stats = load_statistics(args.cache, key)
    if stats is None:
        stats = run_calibration(model, processor, src.adapter, samples, candidates)
        save_statistics(args.cache, key, stats)
    reference = reference_outputs(model, processor, src.adapter, heldout)
    settings = []
    for localizer, ratio in itertools.product(args.localizers.split(","), map(float, args.ratios.split(","))):
        n = layers_to_prune(ratio, src.num_layers, len(candidates))
        pruned, _ = localize(localizer, stats, n, candidates, args.seed)
        measured = {}
        for name, replaced in {"none": None, **variants(src, pruned, stats.features, args.rank)}.items():
            with pruned_view(model, src.adapter, pruned, replaced):
                measured[name] = drift(model, reference)
        best = min((name for name in measured if name != "none"), key=lambda name: measured[name].kl)
        rows = {}
        for name, d in measured.items():
            rows[name] = {"kl": round(d.kl, 6), "hidden_distance": round(d.hidden_distance, 6)}
            for other, label in ((measured["none"], "vs_none"), (measured[best], "vs_best")):
                diff, low, high = paired_bootstrap(d.kl_per_sample, other.kl_per_sample)
                rows[name][label] = [round(diff, 6), round(low, 6), round(high, 6)]
        settings.append({"localize": localizer, "ratio": ratio, "pruned": pruned, "best": best, "variants": rows})
        print(f"{localizer} {ratio:.0%} {pruned}: none KL {measured['none'].kl:.4f}, best {best} "
              f"{measured[best].kl:.4f}", flush=True)

    names = list(settings[0]["variants"])
    worse = {name: sum(s["variants"][name]["vs_best"][1] > 0 for s in settings) for name in names}
    better = {name: sum(s["variants"][name]["vs_none"][2] < 0 for s in settings) for name in names}
    header = [f"{s['localize']} {round(100 * s['ratio'])}%" for s in settings]
    lines = [f"# SCP variants: held-out drift on {portable_name(src.name)}", "",
             f"{len(samples)} calibration samples, {len(heldout)} held-out samples ({args.calib}), rank {args.rank}. "
             "Cells: KL(full || pruned) in nats per text position (lower is better). 'worse than best': settings "
             "where the paired 95% interval of (variant - best variant) lies above 0; 'better than none': settings "
             "where the interval of (variant - plain removal) lies below 0.", "",
             "| variant (pairing/target/shared) | " + " | ".join(header) + " | worse than best | better than none |",
             "|" + " --- |" * (len(header) + 3)]
    for name in sorted(names, key=lambda n: sum(s["variants"][n]["kl"] for s in settings)):
        cells = [f"{s['variants'][name]['kl']:.4f}" + (" *" if s["best"] == name else "") for s in settings]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {worse[name]} of {len(settings)} | "
                     f"{better[name]} of {len(settings)} |")
    lines += ["", "Layers pruned: " + "; ".join(f"{h}: {s['pruned']}" for h, s in zip(header, settings, strict=True)),
              "* = the best variant of that setting."]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "table.md").write_text("\n".join(lines) + "\n")
    write_summary({"model": portable_name(src.name), "calib": args.calib, "num_samples": len(samples),
                   "heldout": len(heldout), "rank": args.rank, "settings": settings,
                   "worse_than_best": worse, "better_than_none": better}, args.output)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
