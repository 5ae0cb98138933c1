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


def plot_feature_gap(gaps: Sequence[tuple[str, object, object, object]], title: str) -> bytes:
    """PNG of the paper's Fig. 6: per bridged gap, a 2-D PCA of the pruned layer's features and its kept partner's,
    before and after compensation. `gaps`: (label, target, before, after), each an [N, D] tensor of per-sample
    pooled features; one PCA per panel, fitted on all three sets together."""
    import torch

    cols = min(3, len(gaps))
    rows = -(-len(gaps) // cols)
    fig, axes = _figure((4.0 * cols, 3.6 * rows + 0.4), rows, cols)
    flat = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax, (label, target, before, after) in zip(flat, gaps, strict=False):
        points = torch.cat([target, before, after]).double()
        centred = points - points.mean(0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        xy = (centred @ vh[:2].T).numpy()
        n = len(target)
        for part, (name, colour) in enumerate((("pruned layer (full model)", "tab:red"),
                                               ("kept layer, no compensation", "tab:grey"),
                                               ("kept layer, compensated", "tab:blue"))):
            chunk = xy[part * n:(part + 1) * n]
            ax.scatter(chunk[:, 0], chunk[:, 1], s=10, alpha=0.7, c=colour, label=name, lw=0)
        _label_panel(ax, label, "PC 1", "PC 2", 8, 7, 6)
    fig.suptitle(title, fontsize=9)
    return _finish_panels(fig, flat, len(gaps), bottom=0.05, top=0.97)


def plot_accuracy_vs_throughput(rows: Sequence[Mapping], speeds: Sequence[Mapping], max_labels: int = 24) -> bytes:
    """PNG of accuracy (Wilson 95% interval) against output tokens/s (median, range of the rounds) per arm, marker
    by quantization, the Pareto front in red. Arms sharing a throughput shape share an x; their labels are stacked
    beside the column without overlapping, and with more than `max_labels` arms only the front is labelled. Shapes
    whose ranges overlap are named on the plot as inside the noise (counted, when naming them would cover the plot)."""
    fig, ax = _figure((8.5, 5.5))
    markers = {"none": "o", "gptq": "s", "awq": "^", "rtn": "D"}
    measured = [r for r in rows if "output_tok_per_s" in r]
    for r in measured:
        colour = "tab:red" if r.get("pareto") else "tab:blue"
        x, y = r["output_tok_per_s"], 100 * r["accuracy"]
        ax.errorbar(x, y, xerr=[[x - r["output_tok_per_s_low"]], [r["output_tok_per_s_high"] - x]],
                    yerr=[[y - 100 * r["accuracy_low"]], [100 * r["accuracy_high"] - y]], fmt=markers.get(
                        r["quantize"], "o"), ms=4, color=colour, ecolor=colour, elinewidth=0.6, alpha=0.8, capsize=1.5)
    front = sorted((r for r in measured if r.get("pareto")), key=lambda r: r["output_tok_per_s"])
    ax.plot([r["output_tok_per_s"] for r in front], [100 * r["accuracy"] for r in front], color="tab:red", lw=1,
            ls="--", label="Pareto front (medians)")
    labelled = measured if len(measured) <= max_labels else front
    _stacked_labels(ax, [(r["output_tok_per_s"], 100 * r["accuracy"], r["arm"]) for r in labelled])
    overlapping = sorted({" ~ ".join(sorted((s["key"], other))) for s in speeds for other in s["inside_noise_of"]})
    note = ("throughput inside the noise (ranges overlap): " + "; ".join(overlapping)) if overlapping else \
        "every throughput shape's range is separated from the others"
    lines = _wrap(note, 110)
    if len(lines) > 2:  # a long list would cover the points: the table beside the plot names the pairs
        lines = [f"{len(overlapping)} pairs of serving shapes are inside the noise (ranges overlap): throughput.md "
                 "names them"]
    ax.text(0.01, 0.01, "\n".join(lines), transform=ax.transAxes, fontsize=6.5, va="bottom",
            bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
    ax.set_xlabel("output tokens/s: median and range of the interleaved rounds, per serving shape")
    ax.set_ylabel("accuracy % (95% interval)")
    title = "labels: Pareto front only" if labelled is not measured else ""
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return _png(fig)


def plot_accuracy_by_ratio(rows: Sequence[Mapping], seeds: Sequence[Mapping], groups: Sequence[str]) -> bytes:
    """PNG in the manner of the paper's Fig. 3: accuracy against the pruned fraction, one line per localizer and
    compensation (95% intervals), the random localizer as the mean over its seeds with its range shaded; one panel
    overall and one per group."""
    names = ["accuracy", *sorted(set(groups) - {""})]
    cols = min(3, len(names))
    fig, axes = _figure((4.2 * cols, 3.4 * -(-len(names) // cols) + 0.5), -(-len(names) // cols), cols)
    flat = list(axes.flat) if hasattr(axes, "flat") else [axes]
    full = next((r for r in rows if not r["ratio"]), None)
    lines: dict[tuple[str, str], list[Mapping]] = {}
    for r in rows:
        if r["ratio"] and r["localize"] != "random":
            lines.setdefault((r["localize"], r["compensate"]), []).append(r)
    # one colour per localizer, one line style and marker per compensation: a dozen lines stay readable
    colours = {loc: f"C{i}" for i, loc in enumerate(sorted({loc for loc, _ in lines}))}
    styles = {comp: (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"))[i % 4]
              for i, comp in enumerate(sorted({comp for _, comp in lines}))}
    for ax, name in zip(flat, names, strict=False):
        key = "accuracy" if name == "accuracy" else name
        for (localize, compensate), arms in sorted(lines.items()):
            arms = sorted(arms, key=lambda r: r["ratio"])
            xs = [100 * r["ratio"] for r in arms]
            ys = [100 * r[key] for r in arms]
            ls, marker = styles[compensate]
            style = {"color": colours[localize], "ls": ls, "marker": marker, "ms": 3, "lw": 1,
                     "label": f"{localize}+{compensate}"}
            if name == "accuracy":
                err = [[y - 100 * r["accuracy_low"] for y, r in zip(ys, arms, strict=True)],
                       [100 * r["accuracy_high"] - y for y, r in zip(ys, arms, strict=True)]]
                ax.errorbar(xs, ys, yerr=err, capsize=2, **style)
            else:
                ax.plot(xs, ys, **style)
        for compensate in sorted({s["compensate"] for s in seeds}):
            chosen = sorted((s for s in seeds if s["compensate"] == compensate), key=lambda s: s["ratio"])
            stats = [s if name == "accuracy" else s[f"group/{name}"] for s in chosen]
            xs = [100 * s["ratio"] for s in chosen]
            colour = "grey" if compensate == "none" else "black"
            ax.plot(xs, [100 * s["mean"] for s in stats], color=colour, ls=":", marker="x", ms=4, lw=1,
                    label=f"random+{compensate} (mean of {len(chosen[0]['seeds'])} seeds, range shaded)")
            ax.fill_between(xs, [100 * s["min"] for s in stats], [100 * s["max"] for s in stats],
                            color=colour, alpha=0.1, lw=0)
        if full is not None:
            ax.axhline(100 * full[key], color="black", lw=0.8, ls="--", label="full model")
        _label_panel(ax, name if name != "accuracy" else "overall (95% intervals)", "decoder layers pruned (%)",
                     "accuracy %", 9, 8, 7)
    legend_rows = -(-(len(lines) + 2 * bool(seeds) + (full is not None)) // 3)
    return _finish_panels(fig, flat, len(names), bottom=min(0.3, 0.02 + 0.02 * legend_rows), top=1)


def _label_panel(ax, title: str, xlabel: str, ylabel: str, title_size: int, label_size: int, tick_size: int) -> None:
    ax.set_title(title, fontsize=title_size)
    ax.set_xlabel(xlabel, fontsize=label_size)
    ax.set_ylabel(ylabel, fontsize=label_size)
    ax.tick_params(labelsize=tick_size)
    ax.grid(alpha=0.3)


def _finish_panels(fig, flat, used: int, *, bottom: float, top: float) -> bytes:
    """A grid of panels: the unused ones hidden, one legend (the first panel's) under them, as PNG bytes."""
    for ax in flat[used:]:
        ax.axis("off")
    handles, labels = flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, top))
    return _png(fig, layout=False)


def _stacked_labels(ax, points: Sequence[tuple[float, float, str]]) -> None:
    """Labels to the right of their points, pushed apart vertically where points share a column (same x, as arms
    of one throughput shape do), each joined to its point by a thin line."""
    if not points:
        return
    xs = [x for x, _, _ in points]
    dx = 0.03 * ((max(xs) - min(xs)) or max(xs) or 1.0)
    low, high = ax.get_ylim()
    gap = (high - low) / 40
    columns: dict[float, list[tuple[float, str]]] = {}
    for x, y, text in points:
        columns.setdefault(x, []).append((y, text))
    top = high
    for x, entries in columns.items():
        entries.sort()
        placed: list[float] = []
        for y, _ in entries:
            placed.append(max(y, placed[-1] + gap) if placed else y)
        for (y, text), label_y in zip(entries, placed, strict=True):
            ax.annotate(text, xy=(x, y), xytext=(x + dx, label_y), fontsize=6, va="center",
                        arrowprops={"arrowstyle": "-", "lw": 0.3, "color": "grey", "shrinkA": 0, "shrinkB": 2})
        top = max(top, placed[-1] + gap)
    ax.set_ylim(low, top)
    ax.set_xlim(min(xs) - 2 * dx, max(xs) + 9 * dx)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def _figure(size: tuple[float, float], rows: int = 1, cols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, dpi=110, squeeze=False) if rows * cols > 1 else \
        plt.subplots(figsize=size, dpi=110)


def _png(fig, layout: bool = True) -> bytes:
    import matplotlib.pyplot as plt

    if layout:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_search(points: Sequence[Mapping], target: float | None) -> bytes:
    """PNG of a search: dev accuracy (Wilson 95% interval) against output tokens/s of every arm tried. Served arms
    (vLLM accuracy, measured throughput) filled, the front of the served ones in red, the winner starred;
    screened-only arms (transformers accuracy) hollow, at their serving shape's measured throughput, or marked x at an
    ideal-scaling estimate where no arm of their shape was served; the target as a dashed line."""
    fig, ax = _figure((8.5, 5.5))
    styles = {"served": ("o", "tab:blue", "served (vLLM accuracy, measured throughput)"),
              "screened": ("o", "none", "screened only (transformers accuracy), throughput of its shape"),
              "estimated": ("x", "tab:grey", "screened only, throughput estimated (full x L / kept layers)")}
    labelled = set()
    for p in points:
        marker, face, label = styles[p["kind"]]
        colour = "tab:red" if p.get("front") else "tab:blue" if p["kind"] == "served" else "tab:grey"
        x, y = p["throughput"], 100 * p["accuracy"]
        ax.errorbar(x, y, xerr=[[x - p["throughput_low"]], [p["throughput_high"] - x]],
                    yerr=[[y - 100 * p["low"]], [100 * p["high"] - y]], fmt=marker, ms=5, mfc=face if face != "none"
                    else "white", color=colour, ecolor=colour, elinewidth=0.6, alpha=0.85, capsize=1.5,
                    label=None if p["kind"] in labelled else label)
        labelled.add(p["kind"])
        if p.get("winner"):
            ax.plot(x, y, marker="*", ms=14, color="gold", mec="black", label="chosen", ls="none")
    front = sorted((p for p in points if p.get("front")), key=lambda p: p["throughput"])
    ax.plot([p["throughput"] for p in front], [100 * p["accuracy"] for p in front], color="tab:red", lw=1, ls="--",
            label="front of the served arms")
    if target is not None:
        ax.axhline(100 * target, color="black", lw=0.8, ls=":", label="target (keep x full, served dev)")
    _stacked_labels(ax, [(p["throughput"], 100 * p["accuracy"], p["arm"]) for p in points])
    ax.set_xlabel("output tokens/s (median and range of the rounds, per serving shape)")
    ax.set_ylabel("dev accuracy % (95% interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return _png(fig)


def plot_cls_attention(history: Sequence[Mapping], shares: Sequence[float], patches: Sequence[float],
                       examples: Sequence[tuple[object, object, object]]) -> bytes:
    """PNG of where the vision tower's [CLS] looks at the feature layer (what VisionZip keeps): its attention mass on
    object patches during training (history rows: step, cls_attention_on_objects; the share of object patches as the
    chance line), per test image against that image's share of object patches, and example images
    (image [H, W, 3], attention [side, side], covered [side, side]) with the attention over them and the object
    patches outlined."""
    import numpy as np

    columns = max(3, len(examples))
    fig, axes = _figure((3.0 * columns, 6.4), rows=2, cols=columns)
    chance = float(np.mean(patches))
    curve, scatter = axes[0][0], axes[0][1]
    if history:
        curve.plot([h["step"] for h in history], [h["cls_attention_on_objects"] for h in history], marker="o",
                   markersize=3, label="[CLS] attention on them")
    curve.axhline(chance, color="tab:grey", linestyle="--", label=f"object patches ({chance:.1%})")
    curve.set(xlabel="training step", ylabel="[CLS] attention on object patches", ylim=(0, 1),
              title="during training (calibration split)")
    curve.legend(fontsize=7, loc="lower right")
    scatter.scatter(patches, shares, s=6, alpha=0.5)
    scatter.plot([0, 1], [0, 1], color="tab:grey", linestyle="--", linewidth=1, label="attention = patch share")
    limit = max(0.3, float(np.max(patches)) * 1.2)
    scatter.set(xlim=(0, limit), ylim=(0, 1), xlabel="share of patches holding an object",
                ylabel="[CLS] attention on them", title=f"per test image (mean {np.mean(shares):.1%})")
    scatter.legend(fontsize=7, loc="lower right")
    for ax in axes[0][2:]:
        ax.axis("off")
    for ax, (image, attention, covered) in zip(axes[1], examples, strict=False):
        image, attention, covered = np.asarray(image), np.asarray(attention, dtype=float), np.asarray(covered)
        side, size = attention.shape[0], image.shape[0]
        ax.imshow(image)
        ax.imshow(np.kron(attention / attention.max(), np.ones((size // side, size // side))), cmap="inferno",
                  alpha=0.55, extent=(0, size, size, 0))
        for row, col in zip(*np.nonzero(covered), strict=True):
            ax.add_patch(_rectangle(col * size / side, row * size / side, size / side))
        ax.set_title(f"{float((attention * covered).sum() / attention.sum()):.0%} on {covered.mean():.0%} of patches",
                     fontsize=8)
        ax.axis("off")
    for ax in axes[1][len(examples):]:
        ax.axis("off")
    return _png(fig)


def _rectangle(x: float, y: float, side: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), side, side, fill=False, edgecolor="cyan", linewidth=0.8)
