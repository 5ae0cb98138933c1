"""The prune recipe: the one input of the pruning pipeline, saved beside every checkpoint it builds.

`shortlvlm prune`'s flags are a shorthand that builds a recipe; `shortlvlm prune --recipe FILE` reads one, and
the checkpoint it writes gets the resolved recipe as `short_lvlm_recipe.yaml` (the source as the user named it,
its hub revision, every default spelled out), so pruning again with that file gives the same weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shortlvlm_vllm.checkpoint.surgery import validate_drop_layers
from shortlvlm_vllm.data.calibration import CalibrationSource
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.prune.compensate import CompensationSettings, compensator
from shortlvlm_vllm.prune.localize import LOCALIZERS, layers_to_prune, parse_candidates

RECIPE_NAME = "short_lvlm_recipe.yaml"


@dataclass
class PruneRecipe:
    """What to prune and how; `drop_layers` overrides localization."""

    model: str | None = None  # a local directory, a hub id or a shipped model ("toy"), as the user names it
    revision: str | None = None  # hub revision (branch, tag or commit)
    ratio: float | None = None
    drop_layers: list[int] | None = None
    localize: str = "tis"
    candidates: str | None = None
    top_p: float = 0.10
    seed: int = 0  # --localize random
    force: bool = False
    compensation: CompensationSettings = field(default_factory=CompensationSettings)
    calibration: CalibrationSource | None = None
    visual_tokens: int | None = None  # image tokens kept per image (served by the plugin's class)

    @property
    def prunes_layers(self) -> bool:
        return self.ratio is not None or self.drop_layers is not None

    def to_yaml(self) -> str:
        import yaml

        header = "# shortlvlm prune recipe: `shortlvlm prune --recipe THIS_FILE -o DIR` builds the same checkpoint\n"
        return header + yaml.safe_dump(asdict(self), sort_keys=False)


def load_recipe(path: str | Path) -> PruneRecipe:
    """A recipe from YAML; unknown keys are refused by name, missing ones take the defaults."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ShortLVLMError(f"recipe {path} does not exist; `shortlvlm prune` writes one beside each checkpoint "
                             f"({RECIPE_NAME}).")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ShortLVLMError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ShortLVLMError(f"recipe {path} holds a YAML {type(raw).__name__}; expected a mapping of settings.")
    nested = {"compensation": CompensationSettings, "calibration": CalibrationSource}
    _check_keys(raw, PruneRecipe, path, "")
    values = dict(raw)
    for key, kind in nested.items():
        if isinstance(values.get(key), dict):
            _check_keys(values[key], kind, path, f"{key}.")
            try:
                values[key] = kind(**values[key])
            except TypeError as exc:
                raise ShortLVLMError(f"recipe {path}: {key}: {exc}") from exc
    if values.get("compensation") is None:
        values.pop("compensation", None)
    return PruneRecipe(**values)


def _check_keys(raw: dict, kind: type, path: Path, prefix: str) -> None:
    known = [f.name for f in dataclasses.fields(kind)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ShortLVLMError(f"recipe {path}: unknown keys {', '.join(prefix + k for k in unknown)}; the keys are "
                             f"{', '.join(prefix + k for k in known)}.")


def check_recipe(recipe: PruneRecipe, num_layers: int) -> list[int]:
    """Validate what can be checked before the source's weights are read; returns the candidate layers."""
    if recipe.ratio is not None and recipe.drop_layers is not None:
        raise ShortLVLMError("give either --ratio (find the layers) or --drop-layers (name them), not both.")
    if not recipe.prunes_layers and recipe.visual_tokens is None:
        raise ShortLVLMError("give --ratio (find the layers), --drop-layers (name them) or --visual-tokens K.")
    if recipe.drop_layers == []:
        raise ShortLVLMError("--drop-layers names no layers: name at least one.")
    compensating = compensator(recipe.compensation).needs_features
    if not recipe.prunes_layers and compensating:
        raise ShortLVLMError(f"{recipe.compensation.method} compensates removed layers and none are removed: pass "
                             f"--compensate none.")
    if recipe.localize not in LOCALIZERS:
        raise ShortLVLMError(f"unknown --localize {recipe.localize!r}; choose from {', '.join(LOCALIZERS)}.")
    if not 0 < recipe.top_p <= 1:
        raise ShortLVLMError(f"--top-p must be in (0, 1], got {recipe.top_p}.")
    candidates = parse_candidates(recipe.candidates, num_layers)
    if recipe.drop_layers is not None:
        validate_drop_layers(recipe.drop_layers, num_layers)
    elif recipe.ratio is not None:
        layers_to_prune(recipe.ratio, num_layers, len(candidates), recipe.force)
    if (recipe.ratio is not None or compensating) and recipe.calibration is None:
        raise ShortLVLMError(
            "this needs calibration data: pass --calib (a LLaVA conversation file, a datasets source or path)"
            + (", or --compensate none with --drop-layers." if recipe.ratio is None else ".")
        )
    if recipe.calibration is not None and recipe.calibration.num_samples < 1:
        raise ShortLVLMError(f"--num-samples must be at least 1, not {recipe.calibration.num_samples}.")
    if recipe.calibration is not None and recipe.calibration.batch_size < 1:
        raise ShortLVLMError(f"--calib-batch-size must be at least 1, not {recipe.calibration.batch_size}.")
    return candidates
