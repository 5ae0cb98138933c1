"""Subspace-Compensated Pruning (SPEC.md section 3): fold what a pruned layer wrote into a kept neighbour.

SCP is a heuristic: it relies on adjacent layers writing into aligned subspaces of the residual
stream, which trained networks show and random weights do not. The pruned layer p's missing
contribution lives mostly in the top-k right singular subspace V_k of H = X^p - X^r; amplifying
that subspace in the kept neighbour r's weights (W' = (I + V_k V_k^T) W) puts it back. The edit
is linear, so it folds into the checkpoint and the pruned model keeps the stock architecture.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shortlvlm_vllm.checkpoint import SourceCheckpoint
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.safetensors_io import load_tensor

log = logging.getLogger(__name__)

# option name -> ((adapter weight role, side of the weight that touches the residual stream), ...)
SCP_TARGETS: dict[str, tuple[tuple[str, str], ...]] = {
    "down_proj": (("down_proj", "output"),),
    "down_proj+o_proj": (("down_proj", "output"), ("o_proj", "output")),
    "inputs": (("q_proj", "input"), ("k_proj", "input"), ("v_proj", "input"),
               ("gate_proj", "input"), ("up_proj", "input")),
}


@dataclass
class Compensation:
    """The edited weights of one SCP pass, and what produced them."""

    replaced: dict[str, torch.Tensor]  # source checkpoint key -> new tensor (source dtype and shape)
    pairs: dict[int, int | None]  # pruned layer -> kept layer it was folded into (None: uncompensated)
    bases: dict[int, torch.Tensor]  # kept layer r -> V_k (D x k float32), for a later unfused side path


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


def compensate(
    src: SourceCheckpoint, pruned: Sequence[int], features: torch.Tensor, rank: int, target: str = "down_proj"
) -> Compensation:
    """Edit the `target` weights of the kept layers paired with `pruned` (features: [L, N, D]).

    Only the tensors edited are read from the source checkpoint.
    """
    targets = SCP_TARGETS.get(target)
    if targets is None:
        raise ShortLVLMError(f"unknown SCP target {target!r}: choose one of {', '.join(SCP_TARGETS)}.")
    pairs = pair_layers(pruned, src.num_layers)
    keys = [info.name for info in src.tensors()]
    replaced: dict[str, torch.Tensor] = {}
    bases: dict[int, torch.Tensor] = {}
    for p, r in pairs.items():
        if r is None:
            continue
        basis = scp_basis(features[p], features[r], rank)
        bases[r] = basis
        for role, side in targets:
            try:
                key = src.adapter.layer_weight_key(keys, r, role)
            except KeyError:
                raise ShortLVLMError(
                    f"SCP target {target!r} edits {role}, which {src.name} lacks in decoder layer {r}: "
                    f"choose another --scp-target of {', '.join(SCP_TARGETS)}."
                ) from None
            replaced[key] = _FOLDS[side](load_tensor(src.tensor_info(key)), basis)
        log.info("SCP: pruned layer %d folded into layer %d (rank %d, %s)", p, r, rank, target)
    return Compensation(replaced, pairs, bases)
