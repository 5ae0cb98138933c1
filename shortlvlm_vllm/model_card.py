"""The model card (README.md) written beside a pruned checkpoint."""

from __future__ import annotations

from collections.abc import Mapping


def render_model_card(record: Mapping, extra_markdown: str = "") -> str:
    pruned = record["pruned_layers"]
    total = record["source_num_layers"]
    source = record["source"]
    lines = [
        "---",
        "tags: [short-lvlm, layer-pruning, vision-language]",
        "---",
        f"# {source}, {len(pruned)} of {total} decoder layers removed",
        "",
        f"This checkpoint is `{source}` with decoder layers {', '.join(map(str, pruned))} "
        f"(original numbering) removed and the remaining {total - len(pruned)} renumbered, "
        f"written by shortlvlm-vllm {record['tool_version']}. "
        "It keeps the source architecture and key names: stock transformers and vLLM load it.",
        "",
        "Method: Short-LVLM (Ma, Suo, Wang, Zhang, ACM MM 2025, arXiv 2507.23362) as implemented "
        "by shortlvlm-vllm; the `short_lvlm` section of config.json records every setting.",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    for key, value in record.items():
        if key not in ("previous",) and not isinstance(value, Mapping):
            lines.append(f"| {key} | {value} |")
    if extra_markdown:
        lines += ["", extra_markdown.rstrip()]
    return "\n".join(lines) + "\n"
