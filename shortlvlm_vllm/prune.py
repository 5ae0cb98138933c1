"""The pruning pipeline: calibrate -> localize -> compensate -> write the checkpoint."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from shortlvlm_vllm.checkpoint import (
    SourceCheckpoint,
    layer_renumbering,
    validate_drop_layers,
    write_pruned_checkpoint,
)
from shortlvlm_vllm.compensate import SCP_TARGETS, Compensation, compensate
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.localize import LOCALIZERS, LayerStatistics, layers_to_prune, localize, parse_candidates
from shortlvlm_vllm.measure import Drift, measure_drift
from shortlvlm_vllm.quantized import dequantized_copy, quantization_format
from shortlvlm_vllm.visual_tokens import image_token_count
from shortlvlm_vllm.vllm_plugin import SHORT_LLAVA_ARCHITECTURE, budget_architecture, side_path

log = logging.getLogger(__name__)

COMPENSATIONS = ("scp", "none")
# The --scp-target an unfused side path implements (it sits at the down-projection's output).
SIDE_PATH_SCP_TARGET = "down_proj"
SCORES_PLOT = "short_lvlm_scores.png"


@dataclass
class CalibrationSource:
    """Where calibration samples come from (see calibration_data.load_calibration)."""

    source: str
    num_samples: int = 256
    heldout: int = 16  # further samples, never calibrated on, for measuring the pruned model's drift
    seed: int = 0
    image_root: str | None = None
    split: str = "train"
    image_column: str = "image"
    question_column: str = "question"
    answer_column: str = "answer"


@dataclass
class PruneRecipe:
    """What to prune and how; `drop_layers` overrides localization."""

    ratio: float | None = None
    drop_layers: list[int] | None = None
    localize: str = "tis"
    candidates: str | None = None
    top_p: float = 0.10
    compensate: str = "scp"
    rank: int = 64
    scp_target: str = "down_proj"
    seed: int = 0
    force: bool = False
    calibration: CalibrationSource | None = None
    visual_tokens: int | None = None  # image tokens kept per image (served by the plugin's class)


@dataclass
class PrunePlan:
    """The decision, before any weight is written."""

    pruned: list[int]
    candidates: list[int]
    scores: dict[str, dict[int, float]] = field(default_factory=dict)
    statistics: LayerStatistics | None = None
    compensation: Compensation | None = None
    drift: dict[str, Drift] = field(default_factory=dict)  # "none" / "scp" -> drift on held-out samples


def check_recipe(recipe: PruneRecipe, num_layers: int, hidden_size: int) -> list[int]:
    """Validate everything that can be checked before loading the model; returns the candidates."""
    prunes_layers = recipe.ratio is not None or recipe.drop_layers is not None
    if recipe.ratio is not None and recipe.drop_layers is not None:
        raise ShortLVLMError("give either --ratio (find the layers) or --drop-layers (name them), not both.")
    if not prunes_layers and recipe.visual_tokens is None:
        raise ShortLVLMError("give --ratio (find the layers), --drop-layers (name them) or --visual-tokens K.")
    if recipe.drop_layers == []:
        raise ShortLVLMError("--drop-layers names no layers: name at least one.")
    if not prunes_layers and recipe.compensate == "scp":
        raise ShortLVLMError("SCP compensates removed layers and none are removed: pass --compensate none.")
    if recipe.localize not in LOCALIZERS:
        raise ShortLVLMError(f"unknown --localize {recipe.localize!r}; choose from {', '.join(LOCALIZERS)}.")
    if recipe.compensate not in COMPENSATIONS:
        raise ShortLVLMError(f"unknown --compensate {recipe.compensate!r}; choose from {', '.join(COMPENSATIONS)}.")
    if recipe.scp_target not in SCP_TARGETS:
        raise ShortLVLMError(f"unknown --scp-target {recipe.scp_target!r}; choose from {', '.join(SCP_TARGETS)}.")
    if not 0 < recipe.top_p <= 1:
        raise ShortLVLMError(f"--top-p must be in (0, 1], got {recipe.top_p}.")
    candidates = parse_candidates(recipe.candidates, num_layers)
    if recipe.drop_layers is not None:
        validate_drop_layers(recipe.drop_layers, num_layers)
    elif recipe.ratio is not None:
        layers_to_prune(recipe.ratio, num_layers, len(candidates), recipe.force)
    needs_calibration = recipe.ratio is not None or recipe.compensate == "scp"
    if needs_calibration and recipe.calibration is None:
        raise ShortLVLMError(
            "this needs calibration data: pass --calib (a LLaVA conversation file, a datasets source or path)"
            + (", or --compensate none with --drop-layers." if recipe.ratio is None else ".")
        )
    if recipe.compensate == "scp":
        n = recipe.calibration.num_samples
        if not 1 <= recipe.rank <= min(n, hidden_size):
            raise ShortLVLMError(
                f"--rank {recipe.rank} must be between 1 and min(N, D) = min({n} samples, hidden size "
                f"{hidden_size}); lower --rank or raise --num-samples."
            )
    return candidates


def load_model(path: Path, device: str = "auto", dtype: str = "auto"):
    """The unpruned model and processor for calibration, with SDPA attention."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict = {"attn_implementation": "sdpa", "dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
    if device == "auto":
        if torch.cuda.device_count() > 1:
            kwargs["device_map"] = "auto"
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval()
    if "device_map" not in kwargs:
        model.to(device)
    log.info("loaded %s (%s) on %s", path, next(model.parameters()).dtype, next(model.parameters()).device)
    return model, AutoProcessor.from_pretrained(path)


def plan_pruning(
    src: SourceCheckpoint, recipe: PruneRecipe, device: str = "auto", dtype: str = "auto"
) -> PrunePlan:
    """Decide which layers go; runs the calibration pass when localization or SCP needs it."""
    from shortlvlm_vllm.calibrate import run_calibration
    from shortlvlm_vllm.calibration_data import load_calibration

    quantized = quantization_format(src.config, src.name)
    if side_path.side_path_spec(src.config.get("short_lvlm")):
        raise ShortLVLMError(f"{src.name} already carries unfused SCP side paths and cannot be pruned again: prune "
                             f"its source with the layers of both passes instead.")
    if quantized and recipe.compensate == "scp":
        _check_side_path_target(recipe)
    candidates = check_recipe(recipe, src.num_layers, src.hidden_size)
    if recipe.visual_tokens is not None:
        budget_architecture(src.config, recipe.visual_tokens)
    if recipe.calibration is None or (recipe.ratio is None and recipe.drop_layers is None):
        return PrunePlan(sorted(recipe.drop_layers or []), candidates)
    cal = recipe.calibration
    drawn = load_calibration(
        cal.source, num_samples=cal.num_samples + cal.heldout, seed=cal.seed, image_root=cal.image_root,
        split=cal.split, image_column=cal.image_column, question_column=cal.question_column,
        answer_column=cal.answer_column,
    )
    samples, heldout = drawn[: cal.num_samples], drawn[cal.num_samples:]
    if cal.heldout and len(heldout) < cal.heldout:
        log.warning("only %d held-out samples left after %d calibration samples", len(heldout), len(samples))
    if recipe.compensate == "scp" and recipe.rank > len(samples):
        raise ShortLVLMError(
            f"--rank {recipe.rank} is larger than the {len(samples)} calibration samples available; lower --rank."
        )
    # A quantized source is calibrated on its dequantized weights: the function the quantized model computes.
    with dequantized_copy(src) if quantized else contextlib.nullcontext(src) as calibrated:
        model, processor = load_model(calibrated.path, device, dtype)
        stats = run_calibration(model, processor, src.adapter, samples, candidates, recipe.top_p)
        scores = {name: loc.scores(stats, candidates) for name, loc in LOCALIZERS.items()}
        scores = {name: s for name, s in scores.items() if s}
        if recipe.drop_layers is not None:
            pruned = sorted(recipe.drop_layers)
        else:
            n = layers_to_prune(recipe.ratio, src.num_layers, len(candidates), recipe.force)
            pruned, _ = localize(recipe.localize, stats, n, candidates, recipe.seed)
        plan = PrunePlan(pruned, candidates, scores, stats)
        if recipe.compensate == "scp":
            plan.compensation = compensate(calibrated, pruned, stats.features, recipe.rank, recipe.scp_target)
        if heldout:
            variants = {"none": None} | ({"scp": plan.compensation.replaced} if plan.compensation else {})
            plan.drift = measure_drift(model, processor, src.adapter, heldout, pruned, variants)
    return plan


def describe_plan(src: SourceCheckpoint, recipe: PruneRecipe, plan: PrunePlan) -> str:
    method = "explicit" if recipe.drop_layers is not None else recipe.localize
    lines = [f"{src.name}: {src.num_layers} decoder layers; candidates {_ranges(plan.candidates)}",
             f"prune {len(plan.pruned)} layers by {method}: {plan.pruned}" if plan.pruned else "no layers pruned"]
    if recipe.visual_tokens is not None:
        lines.append(f"keep {recipe.visual_tokens} visual tokens per image")
    if method in plan.scores:
        lines.append(f"  {method} scores (higher = more redundant):")
        for layer, score in sorted(plan.scores[method].items()):
            mark = "  <- pruned" if layer in plan.pruned else ""
            lines.append(f"    layer {layer:3d}: {score:.4f}{mark}")
    if plan.drift:
        lines.append("  held-out drift from the full model (lower is better):")
        lines += [f"    compensation {name:4s}: KL {d.kl:.5f} nats/token, hidden distance {d.hidden_distance:.4f}"
                  for name, d in plan.drift.items()]
    return "\n".join(lines)


def write_plan(
    src: SourceCheckpoint, output: Path, recipe: PruneRecipe, plan: PrunePlan, overwrite: bool = False,
    unfused: bool | None = None,
) -> Path:
    """Apply the compensation to the kept layers and write the checkpoint, plot and card.

    The compensation is folded into the weights, or, when `unfused` (default: when the source is quantized,
    whose 4-bit weights cannot absorb it without requantizing), kept as side paths that the plugin's model
    class applies; the checkpoint then names that class in `architectures`.
    """
    compensation = plan.compensation
    record = _record(recipe, plan, compensation)
    extra_files, card = {}, ""
    replaced, added, architectures = compensation and compensation.replaced, None, None
    if unfused is None:
        unfused = quantization_format(src.config, src.name) is not None
    if compensation and unfused:
        _check_side_path_target(recipe)
        replaced, added, architectures = None, _side_path_tensors(src, compensation.bases), [SHORT_LLAVA_ARCHITECTURE]
        renumber = layer_renumbering(src.num_layers, plan.pruned)
        layers = sorted(renumber[r] for r in compensation.bases)
        record[side_path.CONFIG_KEY] = {"layers": layers, "rank": recipe.rank,
                                        "dtype": str(side_path.BASIS_DTYPE).removeprefix("torch.")}
        card = (f"## Compensation kept unfused\n\nSCP is applied as rank-{recipe.rank} side paths (bfloat16 bases) at "
                f"the down-projection output of decoder layers {layers}; vLLM serves them with the plugin's "
                f"`{SHORT_LLAVA_ARCHITECTURE}`. Stock transformers loads the weights without them.\n\n")
    if recipe.visual_tokens is not None:
        architectures = [budget_architecture(src.config, recipe.visual_tokens)]
        card += (f"## Visual-token budget\n\n{recipe.visual_tokens} of the {image_token_count(src.config)} tokens of "
                 f"each image reach the language model (VisionZip-style selection). vLLM serves this with the "
                 f"plugin's `{architectures[0]}` (the shortlvlm-vllm package installed); stock transformers "
                 f"loads the weights and uses every token.\n\n")
    if plan.scores:
        from shortlvlm_vllm.plots import plot_layer_scores

        extra_files[SCORES_PLOT] = plot_layer_scores(plan.scores, plan.pruned, src.num_layers, str(src.name))
        card += f"## Layer scores\n\n![per-layer scores, pruned layers marked]({SCORES_PLOT})\n"
    if plan.drift:
        n = recipe.calibration.heldout
        card += (f"\n## Drift from the full model on held-out samples\n\nMeasured on up to {n} calibration-source "
                 "samples not used for calibration (text positions after the image).\n\n"
                 "| compensation | KL (nats/token) | last hidden state distance |\n| --- | --- | --- |\n")
        card += "".join(f"| {name} | {d.kl:.5f} | {d.hidden_distance:.4f} |\n" for name, d in plan.drift.items())
    return write_pruned_checkpoint(
        src, output, plan.pruned, record, replaced=replaced, added=added, extra_files=extra_files,
        card_extra=card, architectures=architectures, overwrite=overwrite,
    )


def _check_side_path_target(recipe: PruneRecipe) -> None:
    if recipe.scp_target != SIDE_PATH_SCP_TARGET:
        raise ShortLVLMError(
            f"SCP on a quantized source is kept unfused at the down-projection output, which is --scp-target "
            f"{SIDE_PATH_SCP_TARGET}, not {recipe.scp_target!r}; drop --scp-target or prune the full-precision model."
        )


def _side_path_tensors(src: SourceCheckpoint, bases: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each kept layer's basis V as a checkpoint tensor, in the source's key layout and numbering."""
    prefix = next(m[0] for info in src.tensors() if (m := src.adapter.match_layer_key(info.name)))
    return {f"{prefix}{layer}.{side_path.BASIS_KEY}": basis.to(side_path.BASIS_DTYPE).contiguous()
            for layer, basis in bases.items()}


def _record(recipe: PruneRecipe, plan: PrunePlan, compensation: Compensation | None) -> dict:
    record: dict = {
        "method": "explicit" if recipe.drop_layers is not None else recipe.localize if recipe.ratio else None,
        "ratio": recipe.ratio,
        "candidates": plan.candidates,
        "top_p": recipe.top_p,
        "compensation": recipe.compensate,
    }
    if compensation is not None:
        record |= {
            "rank": recipe.rank,
            "scp_target": recipe.scp_target,
            "compensation_pairs": {str(p): r for p, r in compensation.pairs.items()},
        }
    if recipe.localize == "random":
        record["seed"] = recipe.seed
    if recipe.visual_tokens is not None:
        record["visual_tokens"] = recipe.visual_tokens
    if recipe.calibration is not None:
        record["calibration"] = asdict(recipe.calibration) | {"num_samples_used": plan.statistics.num_samples}
    if plan.drift:
        record["heldout_drift"] = {name: d.as_dict() for name, d in plan.drift.items()}
    record["scores"] = {name: {str(k): round(v, 6) for k, v in s.items()} for name, s in plan.scores.items()}
    return record


def _ranges(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
