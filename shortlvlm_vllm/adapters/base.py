"""The adapter interface: architecture facts declared as data."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where one architecture keeps its decoder layers.

    layer_key_patterns: regexes over checkpoint tensor names with groups (prefix, index, rest)
        that match the language model's decoder layers, in every key layout the hub uses.
    text_config_paths: the config.json sections (dotted, "" for the top level) whose
        num_hidden_layers and per-layer lists describe those decoder layers.
    hub_key_renames: (transformers state_dict regex, hub name) pairs that turn the names
        transformers uses in memory into the hub layout that stock vLLM loads.
    per_layer_config_lists: config keys holding one entry per decoder layer.
    """

    model_type: str
    architectures: tuple[str, ...]
    layer_key_patterns: tuple[str, ...]
    text_config_paths: tuple[str, ...]
    hub_key_renames: tuple[tuple[str, str], ...]
    per_layer_config_lists: tuple[str, ...] = ("layer_types",)

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

    def text_configs(self, config: dict) -> list[dict]:
        """The config.json sections that describe the decoder layers (created if absent)."""
        sections = []
        for path in self.text_config_paths:
            section = config
            for part in filter(None, path.split(".")):
                section = section.setdefault(part, {})
            sections.append(section)
        return sections
