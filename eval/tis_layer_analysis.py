"""Why does TIS rank one layer more redundant than another? Per question family: the cosine each token set gives each
candidate layer, what TIS keeps, and what dropping the layer alone costs.

    .venv/bin/python eval/tis_layer_analysis.py toy-v1 --data synthetic-v1 --layers 10,14 [--num-samples 256]
        [--heldout 128] [--questions 1000] [--output eval/results/tis_layer_analysis]

Over the calibration samples (the same draw `shortlvlm prune --calib DATA` uses) it records, for every candidate
layer and every sample, cos(x_in, x_out) on each token set: every token (all-tokens), the tokens before the first
image (system prompt and BOS, outside the pool), the pool V u T averaged uniformly, V alone, the question text, the
teacher-forced answer, TIS's top-p selection, and the pool weighted by TIS score; and what TIS kept (how many tokens
per sample, and how many of them are image, question or answer tokens). So it separates the three candidates for a
ranking that does not match what a layer carries: the pool rule (all tokens against the pool), the weighting (the
pool uniform against TIS's top-p) or the model (every token set agrees, yet the layer matters). For the layers named
with --layers it then drops each alone and measures the held-out drift per family (KL, samples the pass never saw)
and the accuracy per family on the first --questions test questions (transformers, greedy).
"""

from __future__ import annotations

import argparse
import itertools
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from shortlvlm_vllm.chat import template_image_turn
from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.data.calibration import CalibrationSource, calibration_inputs
from shortlvlm_vllm.data.synthetic import FAMILIES, SOURCE_VERSIONS
from shortlvlm_vllm.evaluation.benchmarks import get_benchmark
from shortlvlm_vllm.evaluation.reference import generate_replies
from shortlvlm_vllm.evaluation.statistics import accuracy, paired_bootstrap
from shortlvlm_vllm.evaluation.throughput import write_summary
from shortlvlm_vllm.files import portable_name
from shortlvlm_vllm.prune.calibrate import TokenLayout, layer_hooks, select_top_tokens, token_importance_chunked
from shortlvlm_vllm.prune.drift import drift, pruned_view, reference_outputs
from shortlvlm_vllm.prune.localize import parse_candidates
from shortlvlm_vllm.prune.pipeline import load_model

TOKEN_SETS = ("all-tokens", "pre-image", "pool (uniform)", "visual", "question", "answer", "tis top-p",
              "pool (TIS-weighted)")


class Recorder:
    """Per layer and sample: the cosine of each token set, and TIS's selection."""

    def __init__(self, candidates: list[int], top_p: float) -> None:
        self.candidates, self.top_p = set(candidates), top_p
        self.cosines: dict[int, dict[str, list[float]]] = {layer: defaultdict(list) for layer in candidates}
        self.kept: dict[int, list[dict]] = {layer: [] for layer in candidates}
        self.inputs: dict[int, torch.Tensor] = {}
        self.scores: dict[int, torch.Tensor] = {}

    def start(self, layout: TokenLayout, answer_start: int) -> None:
        self.layout, self.answer_start = layout, answer_start

    def on_attention(self, layer, query, key, scaling):
        if layer in self.candidates:
            self.scores[layer] = token_importance_chunked(query[0], key[0], scaling, self.layout)

    def on_layer_input(self, layer, hidden):
        if layer in self.candidates:
            self.inputs[layer] = hidden

    def on_layer_output(self, layer, hidden):
        if layer not in self.candidates:
            return
        cos = F.cosine_similarity(self.inputs.pop(layer)[0].float(), hidden[0].float(), dim=-1).cpu().double()
        layout, scores = self.layout, self.scores.pop(layer)
        pool = layout.pool
        text = layout.text
        question, answer = text[text < self.answer_start], text[text >= self.answer_start]
        selected = select_top_tokens(scores, pool, self.top_p)
        weights = scores / scores.sum()
        sets = {"all-tokens": cos, "pre-image": cos[: int(layout.visual[0])], "pool (uniform)": cos[pool],
                "visual": cos[layout.visual], "question": cos[question], "answer": cos[answer],
                "tis top-p": cos[selected]}
        for name, values in sets.items():
            self.cosines[layer][name].append(float(values.mean()) if values.numel() else float("nan"))
        self.cosines[layer]["pool (TIS-weighted)"].append(float((weights * cos[pool]).sum()))
        is_visual = torch.isin(selected, layout.visual)
        is_answer = selected >= self.answer_start
        self.kept[layer].append({"kept": selected.numel(), "pool": pool.numel(), "visual": int(is_visual.sum()),
                                 "answer": int(is_answer.sum()),
                                 "question": int((~is_visual & ~is_answer).sum())})


def _interval(acc: dict) -> str:
    return f"{100 * acc['value']:.1f} [{100 * acc['low']:.1f}, {100 * acc['high']:.1f}]"


def family_of(sample_id: str) -> str:
    """The synthetic set's row ids end in their question family (f"{image_id}-{family}")."""
    return next(family for family in FAMILIES if sample_id.endswith(family))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", default="synthetic", choices=sorted(SOURCE_VERSIONS),
                        help="the synthetic set calibrated on and scored (synthetic-v1: the first toy's)")
    parser.add_argument("--layers", default="10,14", help="the layers to compare by dropping each alone")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=128)
    parser.add_argument("--top-p", type=float, default=0.10)
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--output", type=Path, default=Path("eval/results/tis_layer_analysis"))
    args = parser.parse_args()

    src = open_checkpoint(args.model)
    drawn = CalibrationSource(args.data, args.num_samples, args.heldout).load(args.num_samples + args.heldout)
    samples, heldout = drawn[: args.num_samples], drawn[args.num_samples:]
    candidates = parse_candidates(None, src.num_layers)
    compared = [int(x) for x in args.layers.split(",")]
    model, processor = load_model(src.path)
    image_token_id = getattr(model.config, src.adapter.image_token_config_key)
    recorder = Recorder(candidates, args.top_p)
    families = [family_of(s.id) for s in samples]
    with torch.no_grad(), layer_hooks(model, src.adapter, recorder):
        for sample in samples:
            inputs = calibration_inputs(processor, sample)
            prompt = processor.apply_chat_template([template_image_turn(sample.question)], add_generation_prompt=True)
            answer_start = processor(images=sample.load_image(), text=prompt, return_tensors="pt")["input_ids"].shape[1]
            recorder.start(TokenLayout.from_input_ids(inputs["input_ids"], image_token_id), answer_start)
            model(**inputs, use_cache=False)

    def mean(values):
        values = [v for v in values if v == v]
        return sum(values) / len(values) if values else float("nan")

    by_family = sorted(set(families))
    cosine = {layer: {name: {"all": mean(values), **{f: mean([v for v, g in zip(values, families, strict=True)
                                                              if g == f]) for f in by_family}}
                      for name, values in recorder.cosines[layer].items()} for layer in candidates}
    kept = {layer: {f: {key: mean([k[key] for k, g in zip(recorder.kept[layer], families, strict=True)
                                   if f in ("all", g)]) for key in ("kept", "pool", "visual", "question", "answer")}
                    for f in ["all", *by_family]} for layer in candidates}
    ranks = {name: sorted(candidates, key=lambda layer: -cosine[layer][name]["all"]) for name in TOKEN_SETS}

    reference = reference_outputs(model, processor, src.adapter, heldout)
    held_families = [family_of(s.id) for s in heldout]
    benchmark = get_benchmark(args.data)
    items = benchmark.load(limit=args.questions)
    dropped = {}
    for layer in [None, *compared]:
        with pruned_view(model, src.adapter, [] if layer is None else [layer]):
            d = drift(model, reference)
            replies = generate_replies(model, processor, items, benchmark.max_tokens, batch_size=64)
        right = [benchmark.correct(item, benchmark.parse(item, reply)) for item, reply in zip(items, replies,
                                                                                               strict=True)]
        dropped["none" if layer is None else str(layer)] = {"kl": d.kl, "kl_per_sample": d.kl_per_sample,
                                                            "right": right}
    drift_rows, accuracy_rows = {}, {}
    for name, entry in dropped.items():
        drift_rows[name] = {f: mean([k for k, g in zip(entry["kl_per_sample"], held_families, strict=True)
                                     if f in ("all", g)]) for f in ["all", *by_family]}
        accuracy_rows[name] = {f: accuracy([r for r, item in zip(entry["right"], items, strict=True)
                                            if f in ("all", item.meta["family"])]).as_dict() for f in
                               ["all", *by_family]}
    a, b = (str(x) for x in compared[:2])
    kl_difference = paired_bootstrap(dropped[a]["kl_per_sample"], dropped[b]["kl_per_sample"])

    header = ["token set", *(f"layer {layer}" for layer in candidates), f"ranks {a} vs {b}"]
    lines = [f"# What TIS sees: {portable_name(src.name)}, candidate layers {candidates[0]}-{candidates[-1]}", "",
             f"{len(samples)} calibration samples; cos(x_in, x_out) averaged per sample over each token set, then over "
             "samples (higher = more redundant). Last column: which of the two layers the set calls more redundant.",
             "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in TOKEN_SETS:
        more = a if cosine[int(a)][name]["all"] > cosine[int(b)][name]["all"] else b
        lines.append(f"| {name} | " + " | ".join(f"{cosine[layer][name]['all']:.5f}" for layer in candidates)
                     + f" | {more} more redundant |")
    lines += ["", f"## Per family, layers {a} and {b}", "", "| token set | family | " + f"layer {a} | layer {b} | "
              f"{a} - {b} |", "| --- | --- | --- | --- | --- |"]
    for name, family in itertools.product(("all-tokens", "pool (uniform)", "tis top-p", "pool (TIS-weighted)"),
                                          by_family):
        x, y = cosine[int(a)][name][family], cosine[int(b)][name][family]
        lines.append(f"| {name} | {family} | {x:.5f} | {y:.5f} | {x - y:+.5f} |")
    lines += ["", "## What TIS keeps (mean per sample)", "", "| layer | family | kept | of pool | image | question | "
              "answer |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for layer, family in itertools.product(compared, ["all", *by_family]):
        k = kept[layer][family]
        lines.append(f"| {layer} | {family} | {k['kept']:.2f} | {k['pool']:.1f} | {k['visual']:.2f} | "
                     f"{k['question']:.2f} | {k['answer']:.2f} |")
    lines += ["", f"## Dropping one layer alone: held-out KL ({len(heldout)} samples) and test accuracy (first "
              f"{len(items)} questions, transformers)", "",
              "| dropped | " + " | ".join(f"KL {f}" for f in ["all", *by_family]) + " | "
              + " | ".join(f"acc {f}" for f in ["all", *by_family]) + " |", "|" + " --- |" * (3 + 2 * len(by_family))]
    for name in dropped:
        cells = [f"{drift_rows[name][f]:.4f}" for f in ["all", *by_family]]
        cells += [_interval(accuracy_rows[name][f]) for f in ["all", *by_family]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"KL({a} dropped) - KL({b} dropped), paired over held-out samples: {kl_difference[0]:+.4f} "
              f"[{kl_difference[1]:+.4f}, {kl_difference[2]:+.4f}].",
              "", "Rank of the candidates by each token set (most redundant first): "
              + "; ".join(f"{name}: {' '.join(map(str, order))}" for name, order in ranks.items())]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "table.md").write_text("\n".join(lines) + "\n")
    write_summary({"model": portable_name(src.name), "num_samples": len(samples), "heldout": len(heldout),
                   "top_p": args.top_p, "cosine": cosine, "kept": kept, "ranks": ranks,
                   "drop_one": {"kl": drift_rows, "accuracy": accuracy_rows},
                   "kl_difference": kl_difference}, args.output)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
