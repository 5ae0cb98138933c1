"""The pruning pipeline: calibrate -> localize -> compensate -> write the checkpoint, from one recipe."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from shortlvlm_vllm.checkpoint.reader import SourceCheckpoint, open_checkpoint
from shortlvlm_vllm.checkpoint.surgery import layer_renumbering, write_pruned_checkpoint
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.prune.compensate import CheckpointEdits, Compensation, compensator
from shortlvlm_vllm.prune.drift import Drift, measure_drift
from shortlvlm_vllm.prune.localize import LOCALIZERS, LayerStatistics, layers_to_prune, localize
from shortlvlm_vllm.prune.recipe import RECIPE_NAME, PruneRecipe, check_recipe
from shortlvlm_vllm.quantize.dequantize import dequantized_copy
from shortlvlm_vllm.serving.visual_tokens import image_token_count
from shortlvlm_vllm.serving.vllm_plugin import budget_architecture, side_path

log = logging.getLogger(__name__)

SCORES_PLOT = "short_lvlm_scores.png"


@dataclass
class PrunePlan:
    """The decision, before any weight is written."""

    pruned: list[int]
    candidates: list[int]
    scores: dict[str, dict[int, float]] = field(default_factory=dict)
    statistics: LayerStatistics | None = None
    compensation: Compensation | None = None
    drift: dict[str, Drift] = field(default_factory=dict)  # "none" / "scp" -> drift on held-out samples


def prune(recipe: PruneRecipe, output: str | Path, *, device: str = "auto", dtype: str = "auto",
          overwrite: bool = False) -> Path:
    """The one verb: open the recipe's model, plan, and write the checkpoint (with its resolved recipe)."""
    if recipe.model is None:
        raise ShortLVLMError("the recipe names no model: give MODEL or a `model:` entry.")
    src = open_checkpoint(recipe.model, recipe.revision)
    return write_plan(src, output, recipe, plan_pruning(src, recipe, device, dtype), overwrite=overwrite)


def load_model(path: Path, device: str = "auto", dtype: str = "auto"):
    """The unpruned model and processor for calibration, with SDPA attention."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from shortlvlm_vllm.models import register_with_transformers

    register_with_transformers()
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
    """Decide which layers go; runs the calibration pass when localization or compensation needs it."""
    from shortlvlm_vllm.prune.calibrate import run_calibration

    if side_path.side_path_spec(src.config.get("short_lvlm")):
        raise ShortLVLMError(f"{src.name} already carries unfused SCP side paths and cannot be pruned again: prune "
                             f"its source with the layers of both passes instead.")
    candidates = check_recipe(recipe, src.num_layers)
    compensating = compensator(recipe.compensation)
    if recipe.calibration is not None:
        compensating.check(src, recipe.calibration.num_samples)
    if recipe.visual_tokens is not None:
        budget_architecture(src.config, recipe.visual_tokens)
    if recipe.calibration is None or not recipe.prunes_layers:
        return PrunePlan(sorted(recipe.drop_layers or []), candidates)
    cal = recipe.calibration
    drawn = cal.load(cal.num_samples + cal.heldout)
    samples, heldout = drawn[: cal.num_samples], drawn[cal.num_samples:]
    if cal.heldout and len(heldout) < cal.heldout:
        log.warning("only %d held-out samples left after %d calibration samples", len(heldout), len(samples))
    compensating.check(src, len(samples), drawn=True)
    # A quantized source is calibrated on its dequantized weights: the function the quantized model computes.
    with dequantized_copy(src) if src.quantization else contextlib.nullcontext(src) as calibrated:
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
        plan.compensation = compensating.compensate(calibrated, pruned, stats.features)
        if heldout:
            variants = {"none": None} | ({recipe.compensation.method: plan.compensation.replaced}
                                         if plan.compensation else {})
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
    src: SourceCheckpoint, output: str | Path, recipe: PruneRecipe, plan: PrunePlan, overwrite: bool = False
) -> Path:
    """Write the checkpoint with the compensation's and the visual-token budget's edits, its figures and the
    resolved recipe (the source as the user named it, and the revision it resolved to)."""
    renumber = layer_renumbering(src.num_layers, plan.pruned)
    edits = plan.compensation.edits(src, renumber) if plan.compensation else CheckpointEdits()
    if recipe.visual_tokens is not None:
        edits.architectures = [budget_architecture(src.config, recipe.visual_tokens)]
    resolved = replace(recipe, model=src.name, revision=src.revision)
    extra_files = {RECIPE_NAME: resolved.to_yaml().encode()}
    record = _record(src, recipe, plan) | edits.record
    if plan.scores:
        from shortlvlm_vllm.plots import plot_layer_scores

        extra_files[SCORES_PLOT] = plot_layer_scores(plan.scores, plan.pruned, src.num_layers, str(src.name))
        record["figures"] = {"Layer scores": SCORES_PLOT}
    return write_pruned_checkpoint(
        src, output, plan.pruned, record, replaced=edits.replaced, added=edits.added, extra_files=extra_files,
        architectures=edits.architectures, overwrite=overwrite,
    )


def _record(src: SourceCheckpoint, recipe: PruneRecipe, plan: PrunePlan) -> dict:
    record: dict = {
        "method": "explicit" if recipe.drop_layers is not None else recipe.localize if recipe.ratio else None,
        "ratio": recipe.ratio,
        "candidates": plan.candidates,
        "top_p": recipe.top_p,
        **compensator(recipe.compensation).record(),
    }
    if plan.compensation is not None:
        record["compensation_pairs"] = {str(p): r for p, r in plan.compensation.pairs.items()}
    if recipe.localize == "random":
        record["seed"] = recipe.seed
    if recipe.visual_tokens is not None:
        record["visual_tokens"] = recipe.visual_tokens
        record["image_tokens"] = image_token_count(src.config)
    if plan.statistics is not None:
        record["calibration"] = asdict(recipe.calibration) | {"num_samples_used": plan.statistics.num_samples}
    if plan.drift:
        record["heldout_drift"] = {name: d.as_dict() for name, d in plan.drift.items()}
    record["scores"] = {name: {str(k): round(v, 6) for k, v in s.items()} for name, s in plan.scores.items()}
    return record


def _ranges(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
