"""Is the visual-token loss the dropping, or what is dropped? Keeps each image's K tokens that [CLS] attends to most
(VisionZip's dominant choice, no contextual tokens) by masking the other image tokens from the decoder, positions
intact, in transformers; and the same K at consecutive positions, the text after moved back, as the served class
lays them out (K tokens in K placeholders); set beside the served numbers of eval/results/tokens_random. Also: the
share of objects none of whose patches is among the K, and the accuracy with only the object patches visible (the
decoder's own tolerance of losing the background).

    .venv/bin/python eval/toy_token_masking.py [MODEL] [--images 400] [--output eval/results/toy_token_masking]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from shortlvlm_vllm.checkpoint.hub import resolve_model_dir
from shortlvlm_vllm.data.synthetic import SyntheticConfig, generate_split, object_patches
from shortlvlm_vllm.evaluation.reference import load_reference
from shortlvlm_vllm.evaluation.throughput import write_summary
from shortlvlm_vllm.files import portable_name
from shortlvlm_vllm.toy.training import answer_accuracy, cls_attention_maps, encode_split

BUDGETS = (40, 20, 10)  # 50 / 25 / 12.5% of the toy's 81 tokens, as tokens_random.yaml serves them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="toy")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--output", type=Path, default=Path("eval/results/toy_token_masking"))
    args = parser.parse_args()
    model, processor = load_reference(resolve_model_dir(args.model)[0])
    model.float()
    pad = processor.tokenizer.pad_token_id
    data = SyntheticConfig(test_images=args.images)
    rows = generate_split("test", data)
    split = encode_split(rows, processor.tokenizer, processor.image_processor, model.config.image_seq_length)
    attention = cls_attention_maps(model, split.pixels)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    owner = torch.stack([torch.from_numpy(object_patches(scene, data.image_size, side)).flatten()
                         for scene in {r["image_id"]: r["scene"] for r in rows}.values()])
    results = {"model": portable_name(args.model), "images": args.images, "questions": len(split.prompts),
               "all_tokens": answer_accuracy(model, split, pad),
               "object_tokens_only": answer_accuracy(model, split, pad, hidden=owner == 0),
               "top_k_by_cls_masked": {}, "top_k_by_cls_compacted": {}, "objects_outside_top_k": {}}
    objects = [(image, k) for image in range(len(owner)) for k in owner[image].unique().tolist() if k]
    for budget in BUDGETS:
        keep = torch.zeros_like(attention, dtype=torch.bool).scatter_(1, attention.topk(budget, dim=-1).indices, True)
        results["top_k_by_cls_masked"][budget] = answer_accuracy(model, split, pad, hidden=~keep)
        results["top_k_by_cls_compacted"][budget] = answer_accuracy(model, split, pad, hidden=~keep, compact=True)
        # an object none of whose patches is kept: what no decoder can answer about
        results["objects_outside_top_k"][budget] = sum(
            not (keep[image] & (owner[image] == k)).any() for image, k in objects) / len(objects)
    args.output.mkdir(parents=True, exist_ok=True)
    write_summary(results, args.output)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    with torch.no_grad():
        main()
