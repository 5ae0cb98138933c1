"""config.json's `short_lvlm` section, and the model card (README.md) rendered from it alone.

Every checkpoint this tool writes records what was done in that section: pruning at its top level with the
source's own section kept as `previous`, quantization under `quantization`. The card shows the same record, so
the two never disagree; figures written beside the weights are listed in the section under `figures`.
"""

from __future__ import annotations

from collections.abc import Mapping

from shortlvlm_vllm import __version__

TOOL = "shortlvlm-vllm"
PAPER = "Short-LVLM (Ma, Suo, Wang, Zhang, ACM MM 2025, arXiv 2507.23362)"


def short_lvlm_section(source: str, revision: str | None, entries: Mapping, previous: Mapping | None = None) -> dict:
    """A new `short_lvlm` section: who wrote it, from which source (as the user named it), and `entries`."""
    section = {"tool": TOOL, "tool_version": __version__, "source": source, "source_revision": revision, **entries}
    if previous:
        section["previous"] = dict(previous)
    return section


def render_model_card(section: Mapping) -> str:
    """README.md for a checkpoint, from its `short_lvlm` section."""
    lines = ["---", f"tags: [{', '.join(_tags(section))}]", "---",
             f"# {section.get('source', 'model')}, {_summary(section)}", ""]
    if "pruned_layers" in section:
        lines += _pruning(section)
    lines += _settings(section)
    if section.get("side_paths"):
        spec = section["side_paths"]
        lines += ["## Compensation kept unfused", "",
                  f"SCP is applied as rank-{spec['rank']} side paths ({spec['dtype']} bases) at the down-projection "
                  f"output of decoder layers {spec['layers']}; vLLM serves them with the plugin's registered class. "
                  "Stock transformers loads the weights without them.", ""]
    if section.get("visual_tokens") is not None:
        of = f" of the {section['image_tokens']}" if section.get("image_tokens") else ""
        lines += ["## Visual-token budget", "",
                  f"{section['visual_tokens']}{of} tokens of each image reach the language model (VisionZip-style "
                  "selection). vLLM serves this with the plugin's registered class (the shortlvlm-vllm package "
                  "installed); stock transformers loads the weights and uses every token.", ""]
    for heading, file in (section.get("figures") or {}).items():
        lines += [f"## {heading}", "", f"![{heading}]({file})", ""]
    if section.get("feature_gap"):
        lines += _feature_gap(section["feature_gap"])
    if section.get("heldout_drift"):
        lines += ["## Drift from the full model on held-out samples", "",
                  f"Measured on up to {section['calibration']['heldout']} calibration-source samples not used for "
                  "calibration (text positions after the image).", "",
                  "| compensation | KL (nats/token) | last hidden state distance |", "| --- | --- | --- |",
                  *(f"| {name} | {d['kl']:.5f} | {d['hidden_distance']:.4f} |"
                    for name, d in section["heldout_drift"].items()), ""]
    if section.get("quantization"):
        lines += _quantization(section["quantization"])
    if section.get("previous"):
        previous = section["previous"]
        lines += ["## Source", "", f"The source was itself written by {TOOL}: `{previous.get('source', '?')}`, "
                  f"{_summary(previous)} (config.json: `short_lvlm.previous`).", ""]
    return "\n".join(lines).rstrip() + "\n"


def _tags(section: Mapping) -> list[str]:
    tags = ["short-lvlm", "vision-language"]
    if section.get("pruned_layers"):
        tags.insert(1, "layer-pruning")
    if section.get("quantization"):
        tags.append("w4a16")
    return tags


def _summary(section: Mapping) -> str:
    parts = []
    if section.get("pruned_layers"):
        parts.append(f"{len(section['pruned_layers'])} of {section['source_num_layers']} decoder layers removed")
    if section.get("visual_tokens") is not None:
        parts.append(f"{section['visual_tokens']} visual tokens per image")
    if section.get("quantization"):
        q = section["quantization"]
        parts.append(f"{q['scheme']} ({q['method']})")
    return ", ".join(parts) or "as written by " + TOOL


def _pruning(section: Mapping) -> list[str]:
    pruned, total = section["pruned_layers"], section["source_num_layers"]
    if not pruned:
        return [f"This checkpoint keeps every decoder layer of `{section['source']}`, written by {TOOL} "
                f"{section['tool_version']}.", ""]
    return [f"This checkpoint is `{section['source']}` with decoder layers {', '.join(map(str, pruned))} "
            f"(original numbering) removed and the remaining {total - len(pruned)} renumbered, written by "
            f"{TOOL} {section['tool_version']}. It keeps the source architecture and key names: stock transformers "
            "and vLLM load it.", "",
            f"Method: {PAPER} as implemented by {TOOL}; the `short_lvlm` section of config.json records every setting.",
            ""]


def _feature_gap(gap: Mapping) -> list[str]:
    rows = [f"| {g['pruned']} | {g['kept']} | {g['before']:.4g} ({g['relative_before']:.1%}) | "
            f"{g['after']:.4g} ({g['relative_after']:.1%}) |" for g in gap["bridges"]]
    return ["## Feature gap in numbers", "",
            f"Mean distance between the pruned layer's pooled output in the full model and its kept partner's in the "
            f"pruned model, without and with compensation ({gap['samples']}; in brackets: relative to the pruned "
            f"layer's mean norm). Mean over the gaps: {gap['mean_before']:.4g} -> {gap['mean_after']:.4g} "
            f"({gap['mean_relative_before']:.1%} -> "
            f"{gap['mean_relative_after']:.1%}).", "",
            "| pruned layer | kept layer | before | after |", "| --- | --- | --- | --- |", *rows, ""]


def _settings(section: Mapping) -> list[str]:
    rows = [f"| {key} | {value} |" for key, value in section.items() if not isinstance(value, Mapping)]
    return ["| setting | value |", "| --- | --- |", *rows, ""] if rows else []


def _quantization(record: Mapping) -> list[str]:
    calibration = record.get("calibration")
    used = f"{calibration['num_samples']} samples of {calibration['source']}" if calibration else "none (data-free)"
    rows = [f"| {key} | {value} |" for key, value in record.items()
            if value is not None and not isinstance(value, Mapping)]
    return ["## Quantization", "",
            f"Weights of the language model's decoder layers quantized to {record['scheme']} with llm-compressor "
            f"({record['method']}, group size {record['group_size']}; calibration: {used}); the vision tower, the "
            "projector and lm_head are unchanged. Format: compressed-tensors (pack-quantized), which vLLM loads. "
            f"The llm-compressor recipe is in {record['recipe']}.", "",
            "| setting | value |", "| --- | --- |", *rows, ""]
