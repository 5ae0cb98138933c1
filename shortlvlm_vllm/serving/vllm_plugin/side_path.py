"""SCP kept unfused: a rank-k side path at a kept layer's down-projection output.

Folding SCP into a 4-bit weight would mean requantizing it, so for a quantized source the
compensation stays a separate term, out + (out V) V^T, with V (D x k, orthonormal columns) stored
in bfloat16 as a buffer of each compensated layer. Mathematically it is the folded edit
W' = (I + V V^T) W applied after the product instead of before.

The side path runs as a forward hook on the layer's MLP, whose output is the down-projection's
(after the tensor-parallel all-reduce), not on the down-projection itself: vLLM's LoRA replaces
`down_proj` by a wrapper that never calls the original module, so a hook there would silently stop
firing under --enable-lora. With a LoRA adapter the side path corrects the adapted output,
(I + V V^T)(W + s B A) x, in vLLM and in transformers alike. The basis stays a buffer of
the down-projection (its checkpoint name, `...mlp.down_proj.scp_side_path.basis`, is unchanged; Qwen-VL-Chat's
down-projection is `mlp.c_proj`, so its basis is `...mlp.c_proj.scp_side_path.basis`).

Which layers carry one and at what rank is declared in config.json (`short_lvlm.side_paths`, new
layer numbering), so a model class creates the buffers before its weights load (DeclaredSidePaths, shared by
the registered classes). Pure torch: the same code attaches to vLLM's decoder layers and to transformers' (for
checks against the folded form).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from shortlvlm_vllm.errors import ShortLVLMError

log = logging.getLogger(__name__)

# config.json `short_lvlm` entry: {"layers": [...], "rank": k, "dtype": "bfloat16"}
CONFIG_KEY = "side_paths"
# The decoder-layer submodule that holds the basis (the down-projection; an adapter's `side_path_target` where its
# name differs), and the one whose output the side path corrects (the MLP returns the down-projection's output): the
# same in transformers and vLLM.
TARGET_MODULE = "mlp.down_proj"
HOOKED_MODULE = "mlp"
ATTRIBUTE = "scp_side_path"


def basis_key(target: str = TARGET_MODULE) -> str:
    """Checkpoint name of V inside a decoder layer (after "layers.N."): the buffer's own module path."""
    return f"{target}.{ATTRIBUTE}.basis"


BASIS_KEY = basis_key()
BASIS_DTYPE = torch.bfloat16


class SubspaceSidePath(nn.Module):
    """out + (out V) V^T, computed in the activations' dtype; V is the `basis` buffer (D x k)."""

    def __init__(self, hidden_size: int, rank: int) -> None:
        super().__init__()
        self.register_buffer("basis", torch.zeros(hidden_size, rank))

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        basis = self.basis.to(out.dtype)
        return out + (out @ basis) @ basis.T


def _apply_side_path(side_path: SubspaceSidePath, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the MLP (bound to its side path): its output, a tensor in transformers and vLLM."""
    return side_path(output)


def side_path_spec(short_lvlm: Mapping | None) -> dict | None:
    """The side-path entry of a config's `short_lvlm` section, or None when the checkpoint has none."""
    return (short_lvlm or {}).get(CONFIG_KEY)


def attach_side_paths(layers: Sequence[nn.Module], spec: Mapping, hidden_size: int,
                      target: str = TARGET_MODULE) -> dict[int, SubspaceSidePath]:
    """Give each layer named in `spec` a side path at its MLP's (= down-projection's) output, its basis a buffer of
    `target` (the down-projection's name in the layer); returns them by layer.

    `layers` is the decoder's layer list; entries without the target module (vLLM's placeholders for
    layers another pipeline stage holds) are skipped.
    """
    attached = {}
    for index in spec["layers"]:
        if not 0 <= index < len(layers):
            raise ShortLVLMError(
                f"config.json names a side path for decoder layer {index}, but the model has {len(layers)} layers."
            )
        try:
            projection = layers[index].get_submodule(target)
        except AttributeError:
            continue
        side_path = SubspaceSidePath(hidden_size, spec["rank"])
        side_path.to(next(projection.parameters()).device)
        projection.add_module(ATTRIBUTE, side_path)
        layers[index].get_submodule(HOOKED_MODULE).register_forward_hook(functools.partial(_apply_side_path, side_path))
        attached[index] = side_path
    log.info("SCP side paths (rank %d) at the down-projection of decoder layers %s", spec["rank"], sorted(attached))
    return attached


def check_side_paths_loaded(model: nn.Module, loaded: Iterable[str]) -> None:
    """Fail loudly when a side path's basis was not in the weights (it would silently stay zero)."""
    expected = {f"{name}.basis" for name, module in model.named_modules() if isinstance(module, SubspaceSidePath)}
    missing = sorted(expected - set(loaded))
    if missing:
        raise ShortLVLMError(
            f"the checkpoint lacks {len(missing)} SCP side-path bases that config.json declares, e.g. {missing[0]}; "
            f"it is incomplete: prune the source again."
        )


def load_stacked_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                         stacked: Sequence[tuple[str, str, int]], *, skip: tuple[str, ...] = (),
                         within: str = "") -> set[str]:
    """The loader of a plugin class that defines its own (no stock class to wrap): each checkpoint tensor into the
    parameter or buffer of its name, those named by `stacked` (vLLM parameter, checkpoint name, shard), under
    `within`, into their shard of the fused parameter; names ending in `skip` (buffers the class computes) are
    left out. The side paths' bases must be among what loaded (check_side_paths_loaded)."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    loaded: set[str] = set()
    for name, tensor in weights:
        if skip and name.endswith(skip):
            continue
        for target, source, shard in stacked:
            if name.startswith(within) and f".{source}." in name:
                name = name.replace(f".{source}.", f".{target}.")
                param = params[name]
                param.weight_loader(param, tensor, shard)
                break
        else:
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        loaded.add(name)
    check_side_paths_loaded(model, loaded)
    return loaded


class DeclaredSidePaths:
    """The side paths config.json declares, for a registered vLLM class: a mixin first in its bases, whose __init__
    calls attach_declared_side_paths once the layers exist; its load_weights checks the bases after the stock
    class's loader (a class that defines its own loader uses load_stacked_weights, which checks them)."""

    def attach_declared_side_paths(self, layers: Sequence[nn.Module], short_lvlm: Mapping | None,
                                   hidden_size: int, target: str = TARGET_MODULE) -> None:
        spec = side_path_spec(short_lvlm)
        if spec:
            attach_side_paths(layers, spec, hidden_size, target)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        check_side_paths_loaded(self, loaded)
        return loaded
