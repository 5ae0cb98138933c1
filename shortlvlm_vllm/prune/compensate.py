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

# option name -> ((adapter weight role, side of the weight that touches the residual stream), ...). "output": the
# weight writes into the residual stream ([out, in] with out = D); "input": it reads the RMS-normalised stream
# through the norm's gain ([out, in] with in = D), and the gain is folded with it (see `fold_input`).
SCP_TARGETS: dict[str, tuple[tuple[str, str], ...]] = {
    "down_proj": (("down_proj", "output"),),
    "down_proj+o_proj": (("down_proj", "output"), ("o_proj", "output")),
    "inputs": (("q_proj", "input"), ("k_proj", "input"), ("v_proj", "input"),
               ("gate_proj", "input"), ("up_proj", "input")),
}
# The norm whose output each input-side weight reads (adapter roles).
READS_NORM = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
              "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}
# The SCP target an unfused side path implements (it sits at the down-projection's output).
SIDE_PATH_SCP_TARGET = "down_proj"
# Which kept layer bridges which pruned layers (see `bridges`).
PAIRINGS = ("nearest", "unique", "block")
# How several gaps folded into one kept layer combine (see `SubspaceCompensation.transforms`).
SHARED_RULES = ("stack", "compose")


@dataclass
class CompensationSettings:
    """The recipe's compensation: which compensator, and its settings."""

    method: str = "scp"
    rank: int = 64  # SCP: the subspace rank k
    target: str = "down_proj"  # SCP: which kept-layer weights absorb it (SCP_TARGETS)
    pairing: str = "nearest"  # SCP: which kept layer bridges which pruned layers (PAIRINGS)
    shared: str = "stack"  # SCP: how the gaps of one kept layer combine (SHARED_RULES)


@dataclass(frozen=True)
class Bridge:
    """One gap SCP closes: kept layer `kept` absorbs H = X^gap_from - X^kept, standing in for `pruned`."""

    kept: int
    pruned: tuple[int, ...]
    gap_from: int


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
    bases: dict[int, tuple[torch.Tensor, ...]]  # kept layer r -> its V_k (D x k float32), applied in this order
    rank: int
    bridges: list[Bridge] = field(default_factory=list)  # the gaps closed, in ascending order of the pruned layers

    def edits(self, src: SourceCheckpoint, renumber: Mapping[int, int]) -> CheckpointEdits:
        """Folded into the weights, or as side paths where the source is quantized."""
        return self.side_paths(src, renumber) if src.quantization else CheckpointEdits(replaced=self.replaced)

    def side_paths(self, src: SourceCheckpoint, renumber: Mapping[int, int]) -> CheckpointEdits:
        """Each kept layer's basis V as a checkpoint tensor (source key layout and numbering), served by the plugin."""
        prefix = next(m[0] for info in src.tensors() if (m := src.adapter.match_layer_key(info.name)))
        key = side_path.basis_key(src.adapter.side_path_target)
        added = {f"{prefix}{layer}.{key}": basis.to(side_path.BASIS_DTYPE).contiguous()
                 for layer, (basis,) in self.bases.items()}
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
    """SCP: V_k of each bridged gap, folded into the weights of the kept layer that bridges it."""

    name = "scp"

    def __init__(self, settings: CompensationSettings) -> None:
        for value, known, flag in ((settings.target, SCP_TARGETS, "--scp-target"),
                                   (settings.pairing, PAIRINGS, "--scp-pairing"),
                                   (settings.shared, SHARED_RULES, "--scp-shared")):
            if value not in known:
                raise ShortLVLMError(f"unknown {flag} {value!r}; choose from {', '.join(known)}.")
        super().__init__(settings)

    def check(self, src: SourceCheckpoint, num_samples: int, drawn: bool = False) -> None:
        rank, target = self.settings.rank, self.settings.target
        if src.quantization and target != SIDE_PATH_SCP_TARGET:
            raise ShortLVLMError(
                f"SCP on a quantized source is kept unfused at the down-projection output, which is --scp-target "
                f"{SIDE_PATH_SCP_TARGET}, not {target!r}; drop --scp-target or prune the full-precision model."
            )
        if src.quantization and self.settings.shared != "stack":
            raise ShortLVLMError("SCP on a quantized source is kept as one side path per kept layer, which is "
                                 "--scp-shared stack; drop --scp-shared compose or prune the full-precision model.")
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

    def transforms(self, bridges: Sequence[Bridge], features: torch.Tensor) -> dict[int, tuple[torch.Tensor, ...]]:
        """Kept layer -> the bases of its transform T = (I + V_m V_m^T) ... (I + V_1 V_1^T), V_1 applied first.

        A kept layer with one bridge gets its V_k. With several, `stack` takes one V_k from their stacked gaps
        [H_1; ...; H_m] (one amplification of the subspace they share, the gain of each direction bounded by 2);
        `compose` applies each bridge's own V_k in turn (a direction they share is amplified up to 2^m times).
        """
        by_kept: dict[int, list[Bridge]] = {}
        for bridge in bridges:
            by_kept.setdefault(bridge.kept, []).append(bridge)
        rank = self.settings.rank
        result = {}
        for kept, group in sorted(by_kept.items()):
            gaps = [features[b.gap_from].float() - features[kept].float() for b in group]
            if self.settings.shared == "stack" or len(gaps) == 1:
                result[kept] = (top_right_singular_vectors(torch.cat(gaps), rank),)
            else:
                result[kept] = tuple(top_right_singular_vectors(gap, rank) for gap in gaps)
        return result

    def compensate(self, src: SourceCheckpoint, pruned: Sequence[int], features: torch.Tensor) -> Compensation:
        """Edit the target weights of the kept layers that bridge `pruned`; only the edited tensors are read."""
        settings = self.settings
        links = bridges(pruned, src.num_layers, settings.pairing)
        keys = [info.name for info in src.tensors()]
        replaced: dict[str, torch.Tensor] = {}
        bases = self.transforms(links, features)

        def key(layer: int, role: str) -> str:
            try:
                return src.adapter.layer_weight_key(keys, layer, role)
            except KeyError:
                raise ShortLVLMError(
                    f"SCP target {settings.target!r} edits {role}, which {src.name} lacks in decoder layer {layer}: "
                    f"choose another --scp-target of {', '.join(SCP_TARGETS)}."
                ) from None

        for r, basis in bases.items():
            for role, side in SCP_TARGETS[settings.target]:
                if side == "output":
                    replaced[key(r, role)] = fold_output(load_tensor(src.tensor_info(key(r, role))), basis)
                    continue
                norm = key(r, READS_NORM[role])
                gain = load_tensor(src.tensor_info(norm))
                replaced[key(r, role)] = fold_input(load_tensor(src.tensor_info(key(r, role))), basis, gain)
                replaced[norm] = torch.ones_like(gain)
        for link in links:
            log.info("SCP: pruned layer(s) %s bridged by layer %d (gap of layer %d, rank %d, %s)",
                     ", ".join(map(str, link.pruned)), link.kept, link.gap_from, settings.rank, settings.target)
        pairs: dict[int, int | None] = dict.fromkeys(sorted(pruned))
        pairs.update({p: link.kept for link in links for p in link.pruned})
        return Compensation(replaced, pairs, bases, settings.rank, links)

    def record(self) -> dict:
        s = self.settings
        return {"compensation": self.name, "rank": s.rank, "scp_target": s.target, "scp_pairing": s.pairing,
                "scp_shared": s.shared}


COMPENSATORS: dict[str, type[Compensator]] = {c.name: c for c in (SubspaceCompensation, NoCompensation)}


def compensator(settings: CompensationSettings) -> Compensator:
    """The compensator the settings name; an unknown name is refused with the known ones."""
    try:
        return COMPENSATORS[settings.method](settings)
    except KeyError:
        raise ShortLVLMError(
            f"unknown --compensate {settings.method!r}; choose from {', '.join(COMPENSATORS)}.") from None


def bridges(pruned: Sequence[int], num_layers: int, pairing: str = "nearest") -> list[Bridge]:
    """Which kept layer bridges which pruned layers (SPEC.md section 3), in ascending order of the pruned layers.

    nearest: each pruned p gets the kept layer r = argmin |r - p| (ties: r < p), and several pruned layers may share
        one (the paper's rule); H = X^p - X^r.
    unique: the same walk in ascending p, but each kept layer takes one pruned layer, so that one compensation does not
        overwrite another; a pruned layer with none left goes uncompensated (with a warning).
    block: each maximal run of consecutive pruned layers is bridged once, by the kept layer just before the run (just
        after it, for a run at the start), with H = X^last - X^r: the whole gap the run leaves.
    """
    dropped = sorted(set(pruned))
    kept = [r for r in range(num_layers) if r not in dropped]
    if not kept:
        raise ShortLVLMError("every decoder layer is pruned: no kept layer is left to compensate into.")
    if pairing == "block":
        runs: list[list[int]] = []
        for p in dropped:
            if runs and runs[-1][-1] == p - 1:
                runs[-1].append(p)
            else:
                runs.append([p])
        return [Bridge(run[0] - 1 if run[0] > 0 else run[-1] + 1, tuple(run), run[-1]) for run in runs]
    if pairing not in ("nearest", "unique"):
        raise ShortLVLMError(f"unknown --scp-pairing {pairing!r}; choose from {', '.join(PAIRINGS)}.")
    used: set[int] = set()
    links = []
    for p in dropped:
        free = [r for r in kept if r not in used] if pairing == "unique" else kept
        if not free:
            log.warning("pruned layer %d has no unused kept layer to fold into: it goes uncompensated", p)
            continue
        r = min(free, key=lambda r: (abs(r - p), r))
        if pairing == "unique":
            used.add(r)
        links.append(Bridge(r, (p,), p))
    return links


def pair_layers(pruned: Sequence[int], num_layers: int, pairing: str = "nearest") -> dict[int, int | None]:
    """Pruned layer -> the kept layer that bridges it (None: uncompensated), by `bridges`."""
    pairs: dict[int, int | None] = dict.fromkeys(sorted(set(pruned)))
    pairs.update({p: link.kept for link in bridges(pruned, num_layers, pairing) for p in link.pruned})
    return pairs


def scp_basis(features_pruned: torch.Tensor, features_kept: torch.Tensor, rank: int) -> torch.Tensor:
    """V_k (D x k float32): the top-k right singular vectors of H = X^p - X^r (N x D)."""
    return top_right_singular_vectors(features_pruned.float() - features_kept.float(), rank)


def top_right_singular_vectors(h: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-`rank` right singular vectors of `h` (M x D) as a D x rank float32 matrix."""
    n, d = h.shape
    if not 1 <= rank <= min(n, d):
        raise ShortLVLMError(
            f"--rank {rank} is out of range: SCP's rank must lie in 1..min(N, D) = min({n}, {d}). "
            f"Pass a smaller --rank or raise --num-samples."
        )
    _, _, vh = torch.linalg.svd(h.float(), full_matrices=False)
    return vh[:rank].T.contiguous()


def fold_output(weight: torch.Tensor, bases: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """W' = T W for W in [out, in] layout with out = D: T = (I + V_m V_m^T) ... (I + V_1 V_1^T) applied to what W
    writes; float32 math, weight's dtype back."""
    w = weight.float()
    for v in _as_bases(bases):
        w = w + v @ (v.T @ w)
    return w.to(weight.dtype)


def fold_input(weight: torch.Tensor, bases: torch.Tensor | Sequence[torch.Tensor],
               gain: torch.Tensor | None = None) -> torch.Tensor:
    """W' = W diag(gain) T for W in [out, in] layout with in = D; float32 math, weight's dtype back.

    W reads RMSNorm(x) = gain * x / rms(x), not the residual stream x in which V lives. The paper's projected forward
    x (I + V V^T) W (row vectors) puts T = I + V V^T on the stream; with n = x / rms(x) (rms a scalar per token, so n
    points where x does) the layer would read gain * (T n), and W (gain * (T n)) = (W diag(gain) T) n. So the fold
    moves the gain into the weight and the norm's own gain becomes 1 (the caller writes it): the layer then computes
    exactly W diag(gain) T (x / rms(x)). What it does not reproduce is the norm of the projected stream: rms(T x)
    differs from rms(x), a per-token scale that no weight can hold; the fold keeps the stream's own rms. Without the
    gain (gain None) this is W T, the projection applied to the gain-scaled vector.
    """
    w = weight.float() if gain is None else weight.float() * gain.float()[None, :]
    for v in reversed(_as_bases(bases)):
        w = w + (w @ v) @ v.T
    return w.to(weight.dtype)


def _as_bases(bases: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [bases.float()] if isinstance(bases, torch.Tensor) else [v.float() for v in bases]
