"""The pruning pipeline: calibrate -> localize -> compensate -> write the checkpoint, from one recipe."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from shortlvlm_vllm.adapters import adapter_for_config
from shortlvlm_vllm.checkpoint.reader import SourceCheckpoint, open_checkpoint
from shortlvlm_vllm.checkpoint.surgery import layer_renumbering, write_pruned_checkpoint
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.prune.compensate import CheckpointEdits, Compensation, compensator
from shortlvlm_vllm.prune.drift import Drift, FeatureGap, feature_gaps, measure_drift
from shortlvlm_vllm.prune.localize import LOCALIZERS, LayerStatistics, layers_to_prune, localize
from shortlvlm_vllm.prune.recipe import RECIPE_NAME, PruneRecipe, check_recipe
from shortlvlm_vllm.quantize.dequantize import dequantized_copy
from shortlvlm_vllm.serving.visual_tokens import budget_limit
from shortlvlm_vllm.serving.vllm_plugin import budget_architecture, side_path

log = logging.getLogger(__name__)

SCORES_PLOT = "short_lvlm_scores.png"
FEATURE_GAP_PLOT = "short_lvlm_feature_gap.png"
FEATURE_GAP_SAMPLES = 64  # at most this many samples for the figure (three forward passes each)


@dataclass
class PrunePlan:
    """The decision, before any weight is written."""

    pruned: list[int]
    candidates: list[int]
    scores: dict[str, dict[int, float]] = field(default_factory=dict)
    statistics: LayerStatistics | None = None
    compensation: Compensation | None = None
    drift: dict[str, Drift] = field(default_factory=dict)  # "none" / "scp" -> drift on held-out samples
    feature_gaps: list[FeatureGap] = field(default_factory=list)  # per bridged gap, on `gap_samples`
    gap_samples: str = ""  # which samples the feature gaps were measured on


def prune(recipe: PruneRecipe, output: str | Path, *, device: str = "auto", dtype: str = "auto",
          overwrite: bool = False, statistics_cache: Path | None = None) -> Path:
    """The one verb: open the recipe's model, plan, and write the checkpoint (with its resolved recipe).
    `statistics_cache`: a directory where calibration passes are cached (see `plan_pruning`)."""
    if recipe.model is None:
        raise ShortLVLMError("the recipe names no model: give MODEL or a `model:` entry.")
    src = open_checkpoint(recipe.model, recipe.revision)
    return write_plan(src, output, recipe, plan_pruning(src, recipe, device, dtype, statistics_cache),
                      overwrite=overwrite)


def calibration_devices(device: str) -> list[str]:
    """The devices `--device` names: one, several comma-separated, or auto (every GPU, else the CPU)."""
    if device != "auto":
        return [part.strip() for part in device.split(",") if part.strip()]
    count = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(count)] if count > 1 else ["cuda" if count else "cpu"]


def split_device_map(model: torch.nn.Module, layers_module: str, devices: Sequence[str]) -> dict[str, str]:
    """A transformers device map that splits the decoder layers (the ModuleList at `layers_module`) into contiguous
    groups, one per device in order, and puts everything else (vision tower, embeddings, norm, lm_head) on the
    first. `model` may be built on the meta device: only its module tree is read."""
    layers = model.get_submodule(layers_module)
    device_map: dict[str, str] = {}

    def place(module: torch.nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = prefix + name
            if path == layers_module:
                device_map.update({f"{path}.{i}": devices[i * len(devices) // len(layers)] for i in range(len(layers))})
            elif layers_module.startswith(path + "."):
                place(child, path + ".")
            else:
                device_map[path] = devices[0]
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            device_map[prefix + name] = devices[0]

    place(model, "")
    return device_map


def load_model(path: Path, device: str = "auto", dtype: str = "auto"):
    """The unpruned model and processor for calibration, with SDPA attention, on `device` (calibration_devices;
    several devices get split_device_map)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from shortlvlm_vllm.models import register_with_transformers

    register_with_transformers()
    kwargs: dict = {"attn_implementation": "sdpa", "dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
    devices = calibration_devices(device)
    if len(devices) > 1:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            skeleton = AutoModelForImageTextToText.from_config(config)
        kwargs["device_map"] = split_device_map(skeleton, adapter_for_config(config.to_dict()).decoder_layers_module,
                                                devices)
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval()
    if len(devices) == 1:
        model.to(devices[0])
    log.info("loaded %s (%s) on %s", path, next(model.parameters()).dtype, ", ".join(devices))
    return model, AutoProcessor.from_pretrained(path)


def plan_pruning(
    src: SourceCheckpoint, recipe: PruneRecipe, device: str = "auto", dtype: str = "auto",
    statistics_cache: Path | None = None,
) -> PrunePlan:
    """Decide which layers go; runs the calibration pass when localization or compensation needs it.

    With `statistics_cache` (a directory), the pass's statistics are read from it when a pass with the same source,
    calibration draw, candidates, top-p and numerics ran before, and written to it otherwise.
    """
    from shortlvlm_vllm.prune.calibrate import load_statistics, run_calibration, save_statistics, statistics_key

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
        drawn_settings = {name: value for name, value in asdict(cal).items() if name != "batch_size"}  # same stats
        key = statistics_key(src.fingerprint, drawn_settings, candidates, recipe.top_p, dtype, device)
        stats = load_statistics(statistics_cache, key) if statistics_cache else None
        if stats is None:
            stats = run_calibration(model, processor, src.adapter, samples, candidates, recipe.top_p, cal.batch_size)
            if statistics_cache:
                save_statistics(statistics_cache, key, stats)
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
        if plan.compensation is not None and plan.compensation.bridges:
            shown = (heldout or samples)[:FEATURE_GAP_SAMPLES]
            plan.gap_samples = f"{len(shown)} {'held-out' if heldout else 'calibration'} samples"
            plan.feature_gaps = feature_gaps(model, processor, src.adapter, shown, pruned,
                                             [(b.kept, b.gap_from) for b in plan.compensation.bridges],
                                             plan.compensation.replaced)
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
    if plan.feature_gaps:
        from shortlvlm_vllm.plots import plot_feature_gap

        panels = [(f"pruned layer {g.gap_from} -> kept layer {g.kept}: mean distance {d['before']:.3g} -> "
                   f"{d['after']:.3g}", g.target, g.before, g.after)
                  for g in plan.feature_gaps if (d := g.distances())]
        extra_files[FEATURE_GAP_PLOT] = plot_feature_gap(
            panels, f"{src.name}: features of each pruned layer and its kept partner ({plan.gap_samples})")
        record.setdefault("figures", {})["Feature gap (the paper's Fig. 6)"] = FEATURE_GAP_PLOT
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
        record["image_tokens"] = budget_limit(src.config)  # None: it varies with the image (Qwen2-VL)
    if plan.statistics is not None:
        record["calibration"] = asdict(recipe.calibration) | {"num_samples_used": plan.statistics.num_samples}
    if plan.drift:
        record["heldout_drift"] = {name: d.as_dict() for name, d in plan.drift.items()}
    if plan.feature_gaps:
        gaps = [{"kept": g.kept, "pruned": g.gap_from, **g.distances()} for g in plan.feature_gaps]
        record["feature_gap"] = {
            "samples": plan.gap_samples, "bridges": gaps,
            **{f"mean_{key}": round(sum(g[key] for g in gaps) / len(gaps), 6)
               for key in ("before", "after", "relative_before", "relative_after")}}
    record["scores"] = {name: {str(k): round(v, 6) for k, v in s.items()} for name, s in plan.scores.items()}
    return record


def _ranges(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
