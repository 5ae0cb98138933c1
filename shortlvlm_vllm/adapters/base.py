"""The adapter interface: architecture facts declared as data."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# llm-compressor AWQ mappings of a Llama decoder layer: (smoothing module, modules it balances), by module name
LLAMA_AWQ_MAPPINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("q_proj", "k_proj", "v_proj")),
    ("v_proj", ("o_proj",)),
    ("post_attention_layernorm", ("gate_proj", "up_proj")),
    ("up_proj", ("down_proj",)),
)


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where one architecture keeps its decoder layers.

    layer_key_patterns: regexes over checkpoint tensor names with groups (prefix, index, rest)
        that match the language model's decoder layers, in every key layout the hub uses.
    text_config_paths: the config.json sections (dotted, "" for the top level) that may hold
        num_hidden_layers and the per-layer settings of those decoder layers.
    hub_key_renames: (transformers state_dict regex, hub name) pairs that turn the names
        transformers uses in memory into the hub layout that stock vLLM loads.
    per_layer_config_lists: config keys holding one entry per decoder layer.
    layer_boundary_config_keys: config keys holding a layer index that splits the decoder in two
        (layers below it behave one way, the rest another), e.g. Qwen2's max_window_layers.
    decoder_layers_module: dotted path of the decoder layers' ModuleList in the transformers model.
    image_token_config_key: the config.json key holding the image placeholder token id.
    layer_weights: role -> weight name inside a decoder layer (after "layers.N."), for the
        linear weights that compensation edits (and quantization quantizes).
    layer_norms: role -> weight name of the RMSNorm gains (y = gain * x / rms(x)) that q/k/v and
        gate/up read the residual stream through; SCP's input-side fold moves them into those weights.
    quantization_ignore: llm-compressor `ignore` patterns (transformers' module names) for everything outside
        the decoder layers' linear weights: the vision side and lm_head stay unquantized.
    decoder_module_regex: regex that transformers' module names inside a decoder layer start with (AWQ's
        mappings are kept inside them: vision towers have q/k/v projections too).
    awq_mappings: AWQ's (smoothing module, balanced modules) pairs inside a decoder layer.
    side_path_architecture: the registered vLLM class that applies unfused SCP side paths (a quantized source
        pruned with SCP); None where there is none yet.
    saved_buffers: name endings of tensors the original code saves but a loaded model recomputes (fixed
        position tables): copied from the source where a pass rewrites the weights, skipped by loaders.
    image_tokens: how many tokens an image gives the language model, the N a visual-token fraction takes its share
        of: "vision_grid" (fixed, (image_size / patch_size)^2 of config.json's vision_config), "max_pixels" (it grows
        with the image: the most an image gets under the processor's pixel limit, in merged patches), or None where
        visual-token pruning does not apply.
    """

    model_type: str
    architectures: tuple[str, ...]
    layer_key_patterns: tuple[str, ...]
    text_config_paths: tuple[str, ...]
    hub_key_renames: tuple[tuple[str, str], ...]
    per_layer_config_lists: tuple[str, ...] = ("layer_types",)
    layer_boundary_config_keys: tuple[str, ...] = ()
    decoder_layers_module: str = "model.language_model.layers"
    image_token_config_key: str = "image_token_index"
    layer_weights: tuple[tuple[str, str], ...] = (
        ("q_proj", "self_attn.q_proj.weight"),
        ("k_proj", "self_attn.k_proj.weight"),
        ("v_proj", "self_attn.v_proj.weight"),
        ("o_proj", "self_attn.o_proj.weight"),
        ("gate_proj", "mlp.gate_proj.weight"),
        ("up_proj", "mlp.up_proj.weight"),
        ("down_proj", "mlp.down_proj.weight"),
    )
    layer_norms: tuple[tuple[str, str], ...] = (
        ("input_layernorm", "input_layernorm.weight"),
        ("post_attention_layernorm", "post_attention_layernorm.weight"),
    )
    quantization_ignore: tuple[str, ...] = ()
    decoder_module_regex: str = r".*language_model\.layers\.\d+\."
    awq_mappings: tuple[tuple[str, tuple[str, ...]], ...] = LLAMA_AWQ_MAPPINGS
    side_path_architecture: str | None = None
    saved_buffers: tuple[str, ...] = ()
    image_tokens: str | None = None

    def match_layer_key(self, key: str) -> tuple[str, int, str] | None:
        """(prefix, layer index, rest) if `key` belongs to a decoder layer, else None."""
        for pattern in self.layer_key_patterns:
            m = re.match(pattern, key)
            if m:
                return m.group(1), int(m.group(2)), m.group(3)
        return None

    def hub_key(self, state_dict_key: str) -> str:
        """The hub-layout name of a transformers state_dict key."""
        for pattern, replacement in self.hub_key_renames:
            new, n = re.subn(pattern, replacement, state_dict_key, count=1)
            if n:
                return new
        return state_dict_key

    def layer_weight_key(self, keys: Iterable[str], layer: int, role: str) -> str:
        """The checkpoint key of weight `role` (e.g. "down_proj") of decoder layer `layer`."""
        rest = "." + dict(self.layer_weights + self.layer_norms)[role]
        for key in keys:
            m = self.match_layer_key(key)
            if m and m[1] == layer and m[2] == rest:
                return key
        raise KeyError(f"no {role} weight for decoder layer {layer}")

    @property
    def side_path_target(self) -> str:
        """The down-projection's module name inside a decoder layer: where an unfused SCP side path keeps its basis."""
        return dict(self.layer_weights)["down_proj"].removesuffix(".weight")

    def decoder_layers(self, model) -> list:
        """The decoder layers of a loaded transformers model, in order."""
        module = model
        for part in self.decoder_layers_module.split("."):
            module = getattr(module, part)
        return list(module)

    def text_configs(self, config: dict) -> list[dict]:
        """The config.json sections that describe the decoder layers.

        Every listed section present that declares num_hidden_layers; if none does, the first listed
        section present (created if none is), where the layer count is to be written. A section that
        is absent is never created beside one that is present: transformers reads a Qwen2-VL config's
        flat text fields only when it has no `text_config`.
        """
        present = [s for path in self.text_config_paths if (s := _section(config, path)) is not None]
        declaring = [s for s in present if "num_hidden_layers" in s]
        if declaring:
            return declaring
        if present:
            return present[:1]
        section = config
        for part in filter(None, self.text_config_paths[0].split(".")):
            section = section.setdefault(part, {})
        return [section]


def _section(config: dict, path: str) -> dict | None:
    section = config
    for part in filter(None, path.split(".")):
        section = section.get(part)
        if not isinstance(section, dict):
            return None
    return section
