"""Figures people would rather look at than read."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence


def plot_layer_scores(
    scores: Mapping[str, Mapping[int, float]], pruned: Sequence[int], num_layers: int, title: str
) -> bytes:
    """PNG of per-layer redundancy scores, one line per method, pruned layers shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    for layer in pruned:
        ax.axvspan(layer - 0.5, layer + 0.5, color="tab:red", alpha=0.15, lw=0)
    for name, per_layer in scores.items():
        layers = sorted(per_layer)
        ax.plot(layers, [per_layer[i] for i in layers], marker="o", ms=3, label=name)
    ax.set_xlim(-0.5, num_layers - 0.5)
    ax.set_xlabel("decoder layer (original numbering); shaded = pruned")
    ax.set_ylabel("score (higher = more redundant)")
    ax.set_title(f"{title}: {len(pruned)} of {num_layers} layers pruned", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
