"""How far a pruned model drifts from the full one, measured on held-out samples.

SCP is a heuristic, so its effect is measured, not assumed: the KL divergence between the full
and the pruned model's next-token distributions and the relative distance between their last
hidden states, on the text after the image (question and teacher-forced answer). The pruned
model is a view of the loaded full model (layers skipped, edited weights swapped in), so one
model in memory serves every variant.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shortlvlm_vllm.adapters import ArchitectureAdapter
from shortlvlm_vllm.data.calibration import CalibrationSample, calibration_inputs
from shortlvlm_vllm.prune.calibrate import TokenLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Drift:
    kl: float  # mean KL(full || pruned) per text position, nats
    hidden_distance: float  # mean ||h_full - h_pruned|| / ||h_full|| of the last hidden state
    # the same per held-out sample (mean over its text positions): what a paired comparison of two variants resamples
    kl_per_sample: tuple[float, ...] = field(default=(), compare=False, repr=False)
    distance_per_sample: tuple[float, ...] = field(default=(), compare=False, repr=False)

    def as_dict(self) -> dict[str, float]:
        return {"kl": round(self.kl, 6), "hidden_distance": round(self.hidden_distance, 6)}


@dataclass
class Reference:
    """The full model's outputs on held-out samples, computed once."""

    inputs: list[dict[str, torch.Tensor]]
    positions: list[torch.Tensor]
    log_probs: list[torch.Tensor]
    hidden: list[torch.Tensor]


def _forward(model, inputs: dict[str, torch.Tensor], positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(**inputs, use_cache=False, output_hidden_states=True)
    log_probs = F.log_softmax(out.logits[0, positions].float(), dim=-1)
    return log_probs.cpu(), out.hidden_states[-1][0, positions].float().cpu()


@torch.no_grad()
def reference_outputs(
    model, processor, adapter: ArchitectureAdapter, samples: Sequence[CalibrationSample]
) -> Reference:
    image_token_id = getattr(model.config, adapter.image_token_config_key)
    device = next(model.parameters()).device
    ref = Reference([], [], [], [])
    for sample in samples:
        inputs = calibration_inputs(processor, sample).to(device)
        positions = TokenLayout.from_input_ids(inputs["input_ids"], image_token_id).text
        log_probs, hidden = _forward(model, inputs, positions.to(device))
        ref.inputs.append(inputs)
        ref.positions.append(positions)
        ref.log_probs.append(log_probs)
        ref.hidden.append(hidden)
    return ref


@torch.no_grad()
def drift(model, reference: Reference) -> Drift:
    """Drift of `model` (typically inside `pruned_view`) from the reference outputs."""
    device = next(model.parameters()).device
    kls, distances = [], []
    for inputs, positions, ref_lp, ref_h in zip(
        reference.inputs, reference.positions, reference.log_probs, reference.hidden, strict=True
    ):
        log_probs, hidden = _forward(model, inputs, positions.to(device))
        kls.append(F.kl_div(log_probs, ref_lp, log_target=True, reduction="none").sum(-1))
        distances.append((hidden - ref_h).norm(dim=-1) / ref_h.norm(dim=-1).clamp(min=1e-12))
    return Drift(float(torch.cat(kls).mean()), float(torch.cat(distances).mean()),
                 tuple(float(k.mean()) for k in kls), tuple(float(d.mean()) for d in distances))


@contextlib.contextmanager
def pruned_view(
    model, adapter: ArchitectureAdapter, pruned: Sequence[int], replaced: Mapping[str, torch.Tensor] | None = None
) -> Iterator[None]:
    """Temporarily run `model` without `pruned` layers and with `replaced` checkpoint tensors.

    The per-layer config lists (layer_types) shrink with the layers: the decoder picks each layer's
    attention mask by its position in the list, as the pruned checkpoint's config will.
    """
    layers = adapter.decoder_layers(model)
    parent_path, _, attr = adapter.decoder_layers_module.rpartition(".")
    parent = model.get_submodule(parent_path)
    original_list = getattr(parent, attr)
    config = parent.config
    per_layer = {key: values for key in adapter.per_layer_config_lists
                 if isinstance(values := getattr(config, key, None), list) and len(values) == len(layers)}
    saved = []
    for key, value in (replaced or {}).items():
        match = adapter.match_layer_key(key)
        if match is None:
            raise ValueError(f"{key} is not a decoder-layer weight")
        param = layers[match[1]].get_parameter(match[2].lstrip("."))
        saved.append((param, param.data))
        param.data = value.to(param.device, param.dtype)
    dropped = set(pruned)
    setattr(parent, attr, torch.nn.ModuleList(layer for i, layer in enumerate(layers) if i not in dropped))
    for key, values in per_layer.items():
        setattr(config, key, [v for i, v in enumerate(values) if i not in dropped])
    try:
        yield
    finally:
        setattr(parent, attr, original_list)
        for key, values in per_layer.items():
            setattr(config, key, values)
        for param, data in saved:
            param.data = data


def measure_drift(
    model,
    processor,
    adapter: ArchitectureAdapter,
    heldout: Sequence[CalibrationSample],
    pruned: Sequence[int],
    variants: Mapping[str, Mapping[str, torch.Tensor] | None],
) -> dict[str, Drift]:
    """Held-out drift from the full model of each variant: name -> replaced tensors (None: plain removal)."""
    reference = reference_outputs(model, processor, adapter, heldout)
    result = {}
    for name, replaced in variants.items():
        with pruned_view(model, adapter, pruned, replaced):
            result[name] = drift(model, reference)
        log.info("held-out drift of %s: KL %.5f, hidden distance %.4f (%d samples)",
                 name, result[name].kl, result[name].hidden_distance, len(heldout))
    return result


@dataclass
class FeatureGap:
    """One bridged gap on the same samples: the pooled output of pruned layer `gap_from` in the full model (what the
    kept layer stands in for) and that of kept layer `kept` in the pruned model, without and with compensation."""

    kept: int
    gap_from: int
    target: torch.Tensor  # [N, D] X^gap_from, full model
    before: torch.Tensor  # [N, D] X^kept, pruned model without compensation
    after: torch.Tensor  # [N, D] X^kept, pruned model with it

    def distances(self) -> dict[str, float]:
        """Mean ||X^kept - X^gap_from|| over the samples before and after, and both relative to mean ||X^gap_from||."""
        scale = float(self.target.norm(dim=-1).mean())
        before = float((self.before - self.target).norm(dim=-1).mean())
        after = float((self.after - self.target).norm(dim=-1).mean())
        return {"before": round(before, 6), "after": round(after, 6), "relative_before": round(before / scale, 6),
                "relative_after": round(after / scale, 6)}


@torch.no_grad()
def feature_gaps(
    model,
    processor,
    adapter: ArchitectureAdapter,
    samples: Sequence[CalibrationSample],
    pruned: Sequence[int],
    bridges: Sequence[tuple[int, int]],
    replaced: Mapping[str, torch.Tensor],
) -> list[FeatureGap]:
    """The paper's Fig. 6 measured: for each (kept, gap_from) bridge, pooled layer outputs (mean over the pool tokens
    V u T of each sample, as SCP's features) of the full model at `gap_from` and of the pruned model at `kept`."""
    image_token_id = getattr(model.config, adapter.image_token_config_key)
    device = next(model.parameters()).device
    encoded = []
    for sample in samples:
        inputs = calibration_inputs(processor, sample).to(device)
        encoded.append((inputs, TokenLayout.from_input_ids(inputs["input_ids"], image_token_id).pool.to(device)))
    layers = adapter.decoder_layers(model)  # the module objects: hooks on them fire inside the pruned view too

    def pooled(wanted: set[int]) -> dict[int, torch.Tensor]:
        rows: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
        pool: list[torch.Tensor] = []
        handles = [layers[i].register_forward_hook(
            lambda mod, args, out, i=i: rows[i].append(
                (out[0] if isinstance(out, tuple) else out)[0, pool[0]].float().mean(0).cpu()))
            for i in wanted]
        try:
            for inputs, positions in encoded:
                pool[:] = [positions]
                model(**inputs, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return {i: torch.stack(r) for i, r in rows.items()}

    kept = {r for r, _ in bridges}
    target = pooled({p for _, p in bridges})
    with pruned_view(model, adapter, pruned):
        before = pooled(kept)
    with pruned_view(model, adapter, pruned, replaced):
        after = pooled(kept)
    return [FeatureGap(r, p, target[p], before[r], after[r]) for r, p in bridges]
