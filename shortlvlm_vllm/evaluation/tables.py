"""The matrix's tables and plots, every figure with its uncertainty.

From the arms' results (each with the per-unit correctness of its answers, in the order of OUT/units.json): accuracy
with its 95% Wilson interval, overall and per group (the benchmark's breakdown, e.g. the synthetic set's families);
each arm against the unpruned model, and each pair of arms that differ in one thing only (the compensation, or the
localizer), by the exact McNemar test and the paired-bootstrap interval of the difference, Holm-adjusted over the
table; the random localizer over its seeds as mean, spread and range (the paper's Fig. 3); throughput as the median
and range of its interleaved rounds, with a difference called real only where the ranges do not overlap.

Files: results.{md,csv,json} (one row per arm; the JSON also holds the comparisons, seeds and throughput),
comparisons.md, groups.md, random_seeds.md (when the random localizer ran), throughput.md (when measured),
accuracy_vs_throughput.png and, with several ratios, accuracy_by_ratio.png.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from shortlvlm_vllm.evaluation.statistics import (
    Spread,
    accuracy,
    compare_paired,
    holm,
    mean_and_spread,
)
from shortlvlm_vllm.files import write_atomic

ALPHA = 0.05
UNITS_NAME = "units.json"


def correct_of(result: dict) -> list[bool]:
    return [c == "1" for c in result["units"]["correct"]]


def reference_arm(results: Sequence[dict]) -> dict | None:
    """The unpruned model at full precision with every visual token: what every arm is compared with."""
    return next((r for r in results if not r["ratio"] and r["quantize"] == "none"
                 and float(r.get("token_fraction", 1.0)) == 1.0), None)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both accuracy and throughput."""
    return [i for i, (a, t) in enumerate(points)
            if not any(a2 >= a and t2 >= t and (a2, t2) != (a, t) for a2, t2 in points)]


def compensation_name(result: dict) -> str:
    """"scp" with the default pairing and target, else "scp/PAIRING/TARGET"; other compensations by name (an arm's
    fields or its result)."""
    from shortlvlm_vllm.prune.compensate import CompensationSettings

    default = CompensationSettings()
    pairing, target = result.get("scp_pairing", default.pairing), result.get("scp_target", default.target)
    if result["compensate"] != "scp" or (pairing, target) == (default.pairing, default.target):
        return result["compensate"]
    return f"scp/{pairing}/{target}"


def _setting(result: dict) -> tuple:
    return result["ratio"], result["quantize"], float(result.get("token_fraction", 1.0))


def comparisons(results: Sequence[dict]) -> list[dict]:
    """Every pair of pruned arms that differ in the compensation only (same layers chosen the same way), or in a
    non-random localizer only (same compensation): A - B, with McNemar and Holm over the whole list."""
    pruned = [r for r in results if r["ratio"]]
    pairs = []
    for a, b in combinations(pruned, 2):
        if _setting(a) != _setting(b):
            continue
        same_localizer = (a["localize"], a.get("seed", 0)) == (b["localize"], b.get("seed", 0))
        if same_localizer and compensation_name(a) != compensation_name(b):
            # the uncompensated arm second, so the difference reads "what compensation adds"
            pairs.append(("compensation", *((b, a) if compensation_name(a) == "none" else (a, b))))
        elif (not same_localizer and compensation_name(a) == compensation_name(b)
              and "random" not in (a["localize"], b["localize"])):
            pairs.append(("localization", a, b))
    rows = []
    for kind, a, b in pairs:
        c = compare_paired(correct_of(a), correct_of(b))
        rows.append({"kind": kind, "a": a["arm"], "b": b["arm"], "same_weights": a["weights_key"] == b["weights_key"],
                     **c.as_dict()})
    for row, adjusted in zip(rows, holm([row["p_value"] for row in rows]), strict=True):
        row["p_holm"] = round(adjusted, 6)
        row["verdict"] = _verdict(row)
    return rows


def _verdict(row: dict) -> str:
    if row["p_holm"] >= ALPHA:
        return "no difference (inside the noise)"
    return f"{row['a'] if row['difference'] > 0 else row['b']} better"


def random_seeds(results: Sequence[dict], groups: Sequence[str]) -> list[dict]:
    """The random localizer over its seeds, per ratio and compensation: accuracy's mean, sd and range, per group too,
    and where each other localizer's arm at the same setting falls among the seeds."""
    by_setting: dict[tuple, list[dict]] = {}
    for r in results:
        if r["localize"] == "random":
            by_setting.setdefault((*_setting(r), compensation_name(r)), []).append(r)
    rows = []
    for (ratio, quantize, fraction, comp), arms in by_setting.items():
        values = [accuracy(correct_of(r)).value for r in arms]
        row = {"ratio": ratio, "compensate": comp, "quantize": quantize, "token_fraction": fraction,
               "seeds": sorted(r["seed"] for r in arms), **mean_and_spread(values)}
        for group in sorted(set(groups) - {""}):
            row[f"group/{group}"] = mean_and_spread([_group_accuracy(r, groups, group).value for r in arms])
        others = [r for r in results if r["localize"] != "random" and r["ratio"] == ratio
                  and (r["quantize"], float(r.get("token_fraction", 1.0))) == (quantize, fraction)
                  and compensation_name(r) == comp]
        row["localizers_vs_seeds"] = {
            r["localize"]: {"accuracy": round(accuracy(correct_of(r)).value, 6),
                            "seeds_below": sum(v < accuracy(correct_of(r)).value for v in values),
                            "seeds": len(values)} for r in others}
        rows.append(row)
    return rows


def _group_accuracy(result: dict, groups: Sequence[str], group: str):
    return accuracy([c for c, g in zip(correct_of(result), groups, strict=True) if g == group])


def throughput_table(results: Sequence[dict]) -> list[dict]:
    """One row per throughput measurement (shape or arm): the spread of its rounds, the arms it stands for, and which
    other measurements its output tokens/s range does not overlap (the only differences called real)."""
    keys: dict[str, dict] = {}
    for r in results:
        if r.get("throughput"):
            entry = keys.setdefault(r["throughput_key"], {**r["throughput"], "arms": []})
            entry["arms"].append(r["arm"])
    spreads = {k: Spread(tuple(v["output_throughput"]["values"])) for k, v in keys.items()}
    for key, entry in keys.items():
        entry["separated_from"] = [k for k in keys if k != key and spreads[key].separated_from(spreads[k])]
        entry["inside_noise_of"] = [k for k in keys if k != key and not spreads[key].separated_from(spreads[k])]
    return sorted(keys.values(), key=lambda e: -e["output_throughput"]["median"])


def arm_rows(results: Sequence[dict], groups: Sequence[str]) -> list[dict]:
    """One row per arm: accuracy with its interval, per group, against the unpruned model, drift and throughput."""
    full = reference_arm(results)
    versus = {r["arm"]: compare_paired(correct_of(r), correct_of(full)) for r in results
              if full is not None and r is not full}
    adjusted = dict(zip(versus, holm([c.p_value for c in versus.values()]), strict=True))
    speeds = [r["throughput"]["output_throughput"]["median"] if r.get("throughput") else None for r in results]
    measured = [i for i, s in enumerate(speeds) if s is not None]
    front = {measured[i] for i in pareto_front([(accuracy(correct_of(results[j])).value, speeds[j])
                                                for j in measured])}
    rows = []
    for i, r in enumerate(results):
        acc = accuracy(correct_of(r))
        row: dict[str, Any] = {
            "arm": r["arm"], "ratio": r["ratio"], "localize": r["localize"], "seed": r.get("seed", 0),
            "compensate": compensation_name(r), "quantize": r["quantize"], "visual_tokens": r.get("visual_tokens") or
            "all", "layers": r["layers"], "pruned_layers": " ".join(map(str, r.get("pruned_layers") or [])),
            "accuracy": round(acc.value, 4), "accuracy_low": round(acc.low, 4), "accuracy_high": round(acc.high, 4),
        }
        for group in sorted(set(groups) - {""}):
            row[group] = round(_group_accuracy(r, groups, group).value, 4)
        if r["arm"] in versus:
            c = versus[r["arm"]]
            row |= {"vs_full": round(c.difference, 4), "vs_full_low": round(c.low, 4),
                    "vs_full_high": round(c.high, 4), "vs_full_p": round(c.p_value, 6),
                    "vs_full_p_holm": round(adjusted[r["arm"]], 6)}
        drift = r.get("heldout_drift") or {}
        own = drift.get(r["compensate"]) if r["compensate"] in drift else None
        row["heldout_kl"] = own["kl"] if own else ""
        if r.get("throughput"):
            t = r["throughput"]
            row |= {"throughput_shape": r["throughput_key"], "output_tok_per_s": t["output_throughput"]["median"],
                    "output_tok_per_s_low": t["output_throughput"]["low"],
                    "output_tok_per_s_high": t["output_throughput"]["high"],
                    "ttft_p50_ms": t["median_ttft_ms"]["median"], "pareto": i in front}
        if r.get("same_weights_as"):
            row["same_weights_as"] = r["same_weights_as"]
        rows.append(row)
    return rows


def write_tables(results: list[dict], out_dir: Path) -> None:
    """Every table and plot of the results so far under `out_dir` (see the module's docstring)."""
    from shortlvlm_vllm.plots import plot_accuracy_by_ratio, plot_accuracy_vs_throughput

    out_dir.mkdir(parents=True, exist_ok=True)
    units = out_dir / UNITS_NAME
    groups = json.loads(units.read_text())["groups"] if units.is_file() else [""] * len(correct_of(results[0]))
    rows = arm_rows(results, groups)
    compared = comparisons(results)
    seeds = random_seeds(results, groups)
    speeds = throughput_table(results)
    write_atomic(out_dir / "results.json", json.dumps(
        {"arms": rows, "comparisons": compared, "random_seeds": seeds, "throughput": speeds,
         "confidence": 0.95, "alpha": ALPHA}, indent=1, default=str) + "\n")
    _write_csv(out_dir / "results.csv", rows)
    write_atomic(out_dir / "results.md", _results_markdown(rows, groups))
    write_atomic(out_dir / "groups.md", _groups_markdown(results, groups))
    if compared:
        write_atomic(out_dir / "comparisons.md", _comparisons_markdown(compared))
    if seeds:
        write_atomic(out_dir / "random_seeds.md", _seeds_markdown(seeds))
    if speeds:
        write_atomic(out_dir / "throughput.md", _throughput_markdown(speeds))
        write_atomic(out_dir / "accuracy_vs_throughput.png", plot_accuracy_vs_throughput(rows, speeds))
    if len({r["ratio"] for r in results}) > 2:
        write_atomic(out_dir / "accuracy_by_ratio.png", plot_accuracy_by_ratio(rows, seeds, groups))


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _interval(value: float, low: float, high: float) -> str:
    return f"{_pct(value)} [{_pct(low)}, {_pct(high)}]"


def markdown_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(str(c) for c in line) + " |" for line in body)]


def _results_markdown(rows: list[dict], groups: Sequence[str]) -> str:
    names = sorted(set(groups) - {""})
    header = ["arm", "layers", "pruned", "accuracy % [95% CI]", *names, "vs full (points) [95% CI]", "p (Holm)",
              "held-out KL", "output tok/s median [range]", "shape", "Pareto"]
    body = []
    for row in rows:
        versus = (f"{100 * row['vs_full']:+.1f} [{100 * row['vs_full_low']:+.1f}, {100 * row['vs_full_high']:+.1f}]"
                  if "vs_full" in row else "")
        p = f"{row['vs_full_p_holm']:.3g}" if "vs_full" in row else ""
        speed = (f"{row['output_tok_per_s']:.0f} [{row['output_tok_per_s_low']:.0f}, "
                 f"{row['output_tok_per_s_high']:.0f}]" if "output_tok_per_s" in row else "")
        body.append([row["arm"] + (f" (= {row['same_weights_as']})" if row.get("same_weights_as") else ""),
                     row["layers"], row["pruned_layers"] or "-",
                     _interval(row["accuracy"], row["accuracy_low"], row["accuracy_high"]),
                     *(_pct(row[n]) for n in names), versus, p, row["heldout_kl"], speed,
                     row.get("throughput_shape", ""), "**yes**" if row.get("pareto") else ""])
    notes = ["", "Accuracy: Wilson 95% interval. vs full: paired on the same questions (bootstrap interval, exact "
             "McNemar p, Holm-adjusted over the table); p >= 0.05 means no difference at this sample size. "
             "(= arm): byte-identical weights to that arm, so its answers are the same. "
             "Throughput: measured once per serving shape (layer count, quantization, visual tokens), since which "
             "layers went does not change the work; median and range of the interleaved rounds (throughput.md)."]
    return "\n".join(markdown_table(header, body) + notes) + "\n"


def _groups_markdown(results: Sequence[dict], groups: Sequence[str]) -> str:
    names = sorted(set(groups) - {""})
    if not names:
        return "No groups: the benchmark has no breakdown.\n"
    body = [[r["arm"], *(_interval(a.value, a.low, a.high) for a in (_group_accuracy(r, groups, n) for n in names))]
            for r in results]
    counts = ", ".join(f"{n}: {groups.count(n)}" for n in names)
    return "\n".join(markdown_table(["arm", *names], body) + ["", f"Accuracy % [Wilson 95% interval]; units per group: "
                                                           f"{counts}."]) + "\n"


def _comparisons_markdown(rows: list[dict]) -> str:
    body = [[row["kind"], row["a"], row["b"], f"{100 * row['difference']:+.1f}",
             f"[{100 * row['low']:+.1f}, {100 * row['high']:+.1f}]", f"{row['only_a']} / {row['only_b']}",
             f"{row['p_value']:.3g}", f"{row['p_holm']:.3g}",
             "same weights" if row["same_weights"] else row["verdict"]] for row in rows]
    real = sum(row["p_holm"] < ALPHA for row in rows)
    header = ["kind", "A", "B", "A - B (points)", "95% CI", "right only for A / B", "p (McNemar)", "p (Holm)",
              "verdict"]
    return "\n".join(markdown_table(header, body)
                     + ["", f"{real} of {len(rows)} differences are real at the 5% level after Holm's adjustment "
                        "over this table; the others are inside the noise of this sample."]) + "\n"


def _seeds_markdown(rows: list[dict]) -> str:
    body = []
    for row in rows:
        others = ", ".join(f"{name} {_pct(v['accuracy'])} (above {v['seeds_below']} of {v['seeds']} seeds)"
                           for name, v in row["localizers_vs_seeds"].items())
        body.append([f"{round(100 * row['ratio'])}%", row["compensate"], len(row["seeds"]),
                     f"{_pct(row['mean'])} +- {_pct(row['sd'])}", f"{_pct(row['min'])} - {_pct(row['max'])}", others])
    return "\n".join(["Random layers over their seeds (the paper's Fig. 3): accuracy mean, sample sd and range, and "
                      "where each other localizer falls among the seeds.", "",
                      *markdown_table(["ratio", "compensation", "seeds", "mean +- sd (%)", "range (%)",
                                       "other localizers"], body)]) + "\n"


def _throughput_markdown(rows: list[dict]) -> str:
    body = [[row["key"], row["measured_on"], row["rounds"],
             f"{row['output_throughput']['median']:.0f} [{row['output_throughput']['low']:.0f}, "
             f"{row['output_throughput']['high']:.0f}]",
             f"{row['median_ttft_ms']['median']:.1f}", ", ".join(row["separated_from"]) or "none",
             len(row["arms"])] for row in rows]
    return "\n".join(markdown_table(["shape", "measured on", "rounds", "output tok/s median [range]", "TTFT p50 ms",
                             "ranges separated from", "arms"], body)
                     + ["", "Each round starts the shape's server, sends one warm-up request and replays the same "
                        "workload; round r of every shape runs before round r + 1 of any. Shapes whose ranges overlap "
                        "are inside each other's noise: no difference is claimed between them."]) + "\n"
