"""Figures people would rather look at than read."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence


def plot_layer_scores(
    scores: Mapping[str, Mapping[int, float]], pruned: Sequence[int], num_layers: int, title: str
) -> bytes:
    """PNG of per-layer redundancy scores, one line per method, pruned layers shaded."""
    fig, ax = _figure((8, 4))
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
    return _png(fig)


def plot_accuracy_vs_throughput(
    names: Sequence[str], quantization: Sequence[str], points: Sequence[tuple[float, float]], front: set[int]
) -> bytes:
    """PNG of (accuracy, output tokens/s) per arm, marker by quantization, the Pareto front in red."""
    fig, ax = _figure((7, 4.5))
    markers = {"none": "o", "gptq": "s", "awq": "^", "rtn": "D"}
    for i, (name, method, (accuracy, speed)) in enumerate(zip(names, quantization, points, strict=True)):
        ax.scatter(speed, accuracy, marker=markers.get(method, "o"), s=40, c="tab:red" if i in front else "tab:blue")
        ax.annotate(name, (speed, accuracy), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ordered = sorted((points[i] for i in front), key=lambda p: p[1])
    ax.plot([p[1] for p in ordered], [p[0] for p in ordered], color="tab:red", lw=1, ls="--", label="Pareto front")
    ax.set_xlabel("output tokens/s (same requests, one server per arm)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _figure(size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=110)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
