"""Compensation for removed layers: pluggable pieces behind one interface, registered by name like the localizers.

A `Compensator` turns the calibration features into a `Compensation`; how that is written is the
compensation's business, not a flag of the pipeline: folded into the kept layers' weights, or, for a quantized
source whose 4-bit weights cannot absorb an edit without requantizing, kept as side paths that the plugin's
registered class applies.

Subspace-Compensated Pruning (SPEC.md section 3) is a heuristic: it relies on adjacent layers writing into
aligned subspaces of the residual stream, which trained networks show and random weights do not. The pruned
layer p's missing contribution lives mostly in the top-k right singular subspace V_k of H = X^p - X^r;
amplifying that subspace in the kept neighbour r's weights (W' = (I + V_k V_k^T) W) puts it back. The edit is
linear, so it folds into the checkpoint and the pruned model keeps the stock architecture.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from shortlvlm_vllm.checkpoint.reader import SourceCheckpoint
from shortlvlm_vllm.checkpoint.safetensors_io import load_tensor
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.serving.vllm_plugin import side_path

log = logging.getLogger(__name__)

# option name -> ((adapter weight role, side of the weight that touches the residual stream), ...)
SCP_TARGETS: dict[str, tuple[tuple[str, str], ...]] = {
    "down_proj": (("down_proj", "output"),),
    "down_proj+o_proj": (("down_proj", "output"), ("o_proj", "output")),
    "inputs": (("q_proj", "input"), ("k_proj", "input"), ("v_proj", "input"),
               ("gate_proj", "input"), ("up_proj", "input")),
}
# The SCP target an unfused side path implements (it sits at the down-projection's output).
SIDE_PATH_SCP_TARGET = "down_proj"


@dataclass
class CompensationSettings:
    """The recipe's compensation: which compensator, and its settings."""

    method: str = "scp"
    rank: int = 64  # SCP: the subspace rank k
    target: str = "down_proj"  # SCP: which kept-layer weights absorb it (SCP_TARGETS)


@dataclass
class CheckpointEdits:
    """What a pipeline step changes in the written checkpoint (surgery's arguments)."""

    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # source key -> new value
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors the source lacks, source numbering
    architectures: list[str] | None = None  # config.json's architectures, when a registered class is needed
    record: dict = field(default_factory=dict)  # entries of config.json's short_lvlm section


@dataclass
class Compensation:
    """The edited weights of one SCP pass, and what produced them."""

    replaced: dict[str, torch.Tensor]  # source checkpoint key -> new tensor (source dtype and shape)
    pairs: dict[int, int | None]  # pruned layer -> kept layer it was folded into (None: uncompensated)
    bases: dict[int, torch.Tensor]  # kept layer r -> V_k (D x k float32), for an unfused side path
    rank: int

    def edits(self, src: SourceCheckpoint, renumber: Mapping[int, int]) -> CheckpointEdits:
        """Folded into the weights, or as side paths where the source is quantized."""
        return self.side_paths(src, renumber) if src.quantization else CheckpointEdits(replaced=self.replaced)

    def side_paths(self, src: SourceCheckpoint, renumber: Mapping[int, int]) -> CheckpointEdits:
        """Each kept layer's basis V as a checkpoint tensor (source key layout and numbering), served by the plugin."""
        prefix = next(m[0] for info in src.tensors() if (m := src.adapter.match_layer_key(info.name)))
        added = {f"{prefix}{layer}.{side_path.BASIS_KEY}": basis.to(side_path.BASIS_DTYPE).contiguous()
                 for layer, basis in self.bases.items()}
        spec = {"layers": sorted(renumber[r] for r in self.bases), "rank": self.rank,
                "dtype": str(side_path.BASIS_DTYPE).removeprefix("torch.")}
        return CheckpointEdits(added=added, architectures=[src.adapter.side_path_architecture],
                               record={side_path.CONFIG_KEY: spec})


class Compensator(ABC):
    """A way to put back what the pruned layers wrote, from the calibration pass's features."""

    name: str
    needs_features: bool = True  # whether it reads the calibration features (so needs calibration data)

    def __init__(self, settings: CompensationSettings) -> None:
        self.settings = settings

    def check(self, src: SourceCheckpoint, num_samples: int, drawn: bool = False) -> None:
        """Refuse, before any work, what this compensator cannot do for `src` with `num_samples` samples (as asked
        for, or `drawn`: as the source had them)."""
        return None

    @abstractmethod
    def compensate(self, src: SourceCheckpoint, pruned: Sequence[int], features: torch.Tensor) -> Compensation | None:
        """The compensation of `pruned` (features: [L, N, D], the calibration pass's pooled layer outputs)."""

    def record(self) -> dict:
        """What config.json records of it."""
        return {"compensation": self.name}


class NoCompensation(Compensator):
    """Plain removal."""

    name = "none"
    needs_features = False

    def compensate(self, src: SourceCheckpoint, pruned: Sequence[int], features: torch.Tensor) -> None:
        return None


class SubspaceCompensation(Compensator):
    """SCP: V_k of each pruned layer's feature gap to its paired kept layer, folded into that layer's weights."""

    name = "scp"

    def __init__(self, settings: CompensationSettings) -> None:
        if settings.target not in SCP_TARGETS:
            raise ShortLVLMError(f"unknown SCP target {settings.target!r} (--scp-target); choose from "
                                 f"{', '.join(SCP_TARGETS)}.")
        super().__init__(settings)

    def check(self, src: SourceCheckpoint, num_samples: int, drawn: bool = False) -> None:
        rank, target = self.settings.rank, self.settings.target
        if src.quantization and target != SIDE_PATH_SCP_TARGET:
            raise ShortLVLMError(
                f"SCP on a quantized source is kept unfused at the down-projection output, which is --scp-target "
                f"{SIDE_PATH_SCP_TARGET}, not {target!r}; drop --scp-target or prune the full-precision model."
            )
        if src.quantization and src.adapter.side_path_architecture is None:
            raise ShortLVLMError(
                f"SCP on a quantized source is kept as side paths, which no registered vLLM class applies for "
                f"model type {src.adapter.model_type!r} yet; pass --compensate none or prune the full-precision model."
            )
        if drawn and rank > num_samples:
            raise ShortLVLMError(f"--rank {rank} is larger than the {num_samples} calibration samples available; "
                                 f"lower --rank.")
        if not 1 <= rank <= min(num_samples, src.hidden_size):
            raise ShortLVLMError(f"--rank {rank} must be between 1 and min(N, D) = min({num_samples} samples, hidden "
                                 f"size {src.hidden_size}); lower --rank or raise --num-samples.")

    def compensate(self, src: SourceCheckpoint, pruned: Sequence[int], features: torch.Tensor) -> Compensation:
        """Edit the target weights of the kept layers paired with `pruned`; only the edited tensors are read."""
        rank, target = self.settings.rank, self.settings.target
        pairs = pair_layers(pruned, src.num_layers)
        keys = [info.name for info in src.tensors()]
        replaced: dict[str, torch.Tensor] = {}
        bases: dict[int, torch.Tensor] = {}
        for p, r in pairs.items():
            if r is None:
                continue
            basis = scp_basis(features[p], features[r], rank)
            bases[r] = basis
            for role, side in SCP_TARGETS[target]:
                try:
                    key = src.adapter.layer_weight_key(keys, r, role)
                except KeyError:
                    raise ShortLVLMError(
                        f"SCP target {target!r} edits {role}, which {src.name} lacks in decoder layer {r}: "
                        f"choose another --scp-target of {', '.join(SCP_TARGETS)}."
                    ) from None
                replaced[key] = _FOLDS[side](load_tensor(src.tensor_info(key)), basis)
            log.info("SCP: pruned layer %d folded into layer %d (rank %d, %s)", p, r, rank, target)
        return Compensation(replaced, pairs, bases, rank)

    def record(self) -> dict:
        return {"compensation": self.name, "rank": self.settings.rank, "scp_target": self.settings.target}


COMPENSATORS: dict[str, type[Compensator]] = {c.name: c for c in (SubspaceCompensation, NoCompensation)}


def compensator(settings: CompensationSettings) -> Compensator:
    """The compensator the settings name; an unknown name is refused with the known ones."""
    try:
        return COMPENSATORS[settings.method](settings)
    except KeyError:
        raise ShortLVLMError(
            f"unknown --compensate {settings.method!r}; choose from {', '.join(COMPENSATORS)}.") from None


def pair_layers(pruned: Sequence[int], num_layers: int) -> dict[int, int | None]:
    """Pair each pruned layer, in ascending order, with the nearest kept layer not yet used.

    Ties go to the earlier kept layer (r < p). Each kept layer takes one pruned layer, so that
    one compensation does not overwrite another; a pruned layer with none left is uncompensated.
    """
    dropped = set(pruned)
    kept = [r for r in range(num_layers) if r not in dropped]
    used: set[int] = set()
    pairs: dict[int, int | None] = {}
    for p in sorted(pruned):
        free = [r for r in kept if r not in used]
        if not free:
            log.warning("pruned layer %d has no unused kept layer to fold into: it goes uncompensated", p)
            pairs[p] = None
            continue
        r = min(free, key=lambda r: (abs(r - p), r))
        used.add(r)
        pairs[p] = r
    return pairs


def scp_basis(features_pruned: torch.Tensor, features_kept: torch.Tensor, rank: int) -> torch.Tensor:
    """V_k (D x k float32): the top-k right singular vectors of H = X^p - X^r (N x D)."""
    n, d = features_pruned.shape
    if not 1 <= rank <= min(n, d):
        raise ShortLVLMError(
            f"--rank {rank} is out of range: SCP's rank must lie in 1..min(N, D) = min({n}, {d}). "
            f"Pass a smaller --rank or raise --num-samples."
        )
    h = features_pruned.float() - features_kept.float()
    _, _, vh = torch.linalg.svd(h, full_matrices=False)
    return vh[:rank].T.contiguous()


def fold_output(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """W' = (I + V V^T) W for W in [out, in] layout with out = D; float32 math, weight's dtype back."""
    w, v = weight.float(), basis.float()
    return (w + v @ (v.T @ w)).to(weight.dtype)


def fold_input(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """W' = W (I + V V^T) for W in [out, in] layout with in = D; float32 math, weight's dtype back."""
    w, v = weight.float(), basis.float()
    return (w + (w @ v) @ v.T).to(weight.dtype)


_FOLDS = {"output": fold_output, "input": fold_input}
