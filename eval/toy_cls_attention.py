"""Where the toy's vision tower looks: the share of its [CLS] attention at the feature layer (what VisionZip's
selection keeps) on the patches that hold an object, against the share of patches that do, on the synthetic test
split; with the same share during training (from the checkpoint's training history) and example images.

    .venv/bin/python eval/toy_cls_attention.py [MODEL] [--images 1000] [--output eval/results/toy_cls_attention]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from shortlvlm_vllm.checkpoint.hub import resolve_model_dir
from shortlvlm_vllm.data.synthetic import SyntheticConfig, generate_split
from shortlvlm_vllm.evaluation.reference import load_reference
from shortlvlm_vllm.evaluation.statistics import mean_and_spread
from shortlvlm_vllm.evaluation.throughput import write_summary
from shortlvlm_vllm.files import portable_name, write_atomic
from shortlvlm_vllm.plots import plot_cls_attention
from shortlvlm_vllm.toy.training import cls_attention_maps, object_attention_shares, vision_targets

EXAMPLES = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="toy", help="checkpoint directory, or toy (the shipped toy)")
    parser.add_argument("--images", type=int, default=1000, help="test images (the whole split is 1000)")
    parser.add_argument("--output", type=Path, default=Path("eval/results/toy_cls_attention"))
    args = parser.parse_args()
    model_dir, _ = resolve_model_dir(args.model)
    model, processor = load_reference(model_dir)
    model.float()
    toy = model.config.short_lvlm_toy
    data = SyntheticConfig(version=2, test_images=args.images)
    rows = generate_split("test", data)
    images = list({r["image_id"]: r["image"] for r in rows}.values())
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    covered = vision_targets(rows, data.image_size, side).patches[..., 0] > 0
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    attention = cls_attention_maps(model, pixels)
    shares, top = object_attention_shares(attention, covered)
    patch_shares = covered.float().mean(-1)
    summary = {
        "model": portable_name(args.model), "images": len(images), "patches_per_image": side * side,
        "attention_on_objects": mean_and_spread(shares.tolist()),
        "attention_on_objects_95ci": [round(v, 4) for v in (
            shares.mean().item() + k * 1.96 * shares.std().item() / len(shares) ** 0.5 for k in (-1, 1))],
        "object_patch_share": mean_and_spread(patch_shares.tolist()),
        "concentration": round(shares.mean().item() / patch_shares.mean().item(), 2),
        "top_k_object_share": mean_and_spread(top.tolist()),
        "images_with_more_attention_than_patches": round((shares > patch_shares).float().mean().item(), 4),
        "during_training": [{k: h[k] for k in ("step", "cls_attention_on_objects")} for h in toy.get("history", [])
                        if "cls_attention_on_objects" in h],  # the first toy (toy-v1) did not record it
        "after_training_calibration_split": toy.get("cls_attention"),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    examples = [(np.asarray(images[i]), attention[i].reshape(side, side), covered[i].reshape(side, side))
                for i in range(EXAMPLES)]
    write_atomic(args.output / "cls_attention.png", plot_cls_attention(
        summary["during_training"], shares.tolist(), patch_shares.tolist(), examples))
    write_summary(summary, args.output)
    print(json.dumps({k: v for k, v in summary.items() if k != "during_training"}, indent=2))


if __name__ == "__main__":
    with torch.no_grad():
        main()
