"""The search's report: DIR/report.json (everything), DIR/report.md (the answer first, then every finalist, the
paper's default recipe at the same target, the cost against the full matrix), DIR/arms.md (every arm: how far it
went and why) and DIR/accuracy_vs_throughput.png (every arm tried; the front of the served ones)."""

from __future__ import annotations

import json
from pathlib import Path

from shortlvlm_vllm.data.synthetic import SOURCE_VERSIONS
from shortlvlm_vllm.evaluation.matrix import RESULT_NAME, Arm
from shortlvlm_vllm.evaluation.statistics import accuracy
from shortlvlm_vllm.evaluation.tables import correct_of, markdown_table, pareto_front
from shortlvlm_vllm.files import write_atomic
from shortlvlm_vllm.search.select import margin
from shortlvlm_vllm.search.space import PAPER_DEFAULT, SearchConfig

PLOT_NAME = "accuracy_vs_throughput.png"


def servers_started(stage_dir: Path, replicas: int) -> int:
    """vLLM servers the stage's kept results took: one per served accuracy run (arms answered with a twin's replies
    took none) and one per throughput round, times the replicas."""
    runs = 0
    for path in (stage_dir / "arms").glob(f"*/{RESULT_NAME}"):
        result = json.loads(path.read_text())
        runs += result.get("scorer") == "vllm" and not result.get("same_weights_as")
    rounds = len(list((stage_dir / "throughput").glob("*/round-*.json")))
    return (runs + rounds) * replicas


def _speed(result: dict | None) -> dict | None:
    return (result or {}).get("throughput", {}) and result["throughput"]["output_throughput"]


def _find(results: list[dict], name: str) -> dict | None:
    return next((r for r in results if r["arm"] == name), None)


def build_report(config: SearchConfig, out: Path, report: dict, num_layers: int) -> dict:
    """The report's JSON from the stages' results (see the driver)."""
    keep = config.keep
    screened, served, tested = report["screened"], report["served"], report["tested"]
    full_screen = report["screen_full"]
    full_served = served[0] if served else None
    full_test = _find(tested, "full")

    def judged(result: dict | None, full: dict | None) -> dict | None:
        return margin(correct_of(result), correct_of(full), keep).as_dict() if result and full else None

    arms = [s.as_dict() for s in screened]
    for entry in arms:
        result = _find(served[1:], entry["arm"])
        if result is not None:
            entry.update(stage="served", dev_vllm=judged(result, full_served), throughput=_speed(result),
                         throughput_shape=result["throughput_key"])
    winner: Arm | None = report["winner"]
    for entry in arms:
        if entry["stage"] == "served":
            won = winner is not None and entry["arm"] == winner.name
            status = entry["dev_vllm"]["status"]
            entry["decision"] = "chosen" if won else "served, not chosen"
            entry["reason"] = ("the fastest arm that meets the target (see reasons)" if won else
                               f"{status} on the served dev set" + ("" if status != "meets" else
                                                                   ", slower than (or tied and behind) the winner"))
    seconds = json.loads((out / "stages.json").read_text()) if (out / "stages.json").is_file() else {}
    servers = {stage: servers_started(out / stage, config.replicas) for stage in ("served", "test")}
    served_seconds = [r["seconds"] for r in served if not r.get("same_weights_as")]
    rounds = len(list((out / "served" / "throughput").glob("*/round-*.json")))
    per_arm = sum(served_seconds) / len(served_seconds) if served_seconds else None
    per_round = ((seconds.get("served", 0.0) - sum(served_seconds)) / rounds) if rounds else None
    grid = [*config.arms(), None]  # None: the full model
    shapes = {(num_layers - round(a.ratio * num_layers), a.quantize, a.token_fraction) if a else (num_layers, "none",
                                                                                                   1.0) for a in grid}
    estimate = None
    if per_arm is not None and per_round is not None:
        estimate = {"arms": len(grid), "shapes": len(shapes), "rounds_per_shape": config.repeats,
                    "servers": (len(grid) + len(shapes) * config.repeats) * config.replicas,
                    "seconds": round(len(grid) * per_arm + len(shapes) * config.repeats * per_round, 1),
                    "served_seconds_per_arm": round(per_arm, 1), "seconds_per_throughput_round": round(per_round, 1),
                    "note": "every arm served on the same dev questions and every shape timed; checkpoint builds, "
                            "which both pay, not counted"}
    spent = {"seconds": {**seconds, "total": round(sum(seconds.values()), 1)},
             "servers": {**servers, "total": sum(servers.values())}}
    win = None
    if winner is not None:
        dev = _find(served, winner.name)
        test = _find(tested, winner.name)
        full_speed, dev_speed = _speed(full_served), _speed(dev)
        win = {"arm": winner.name, "layers": dev["layers"], "pruned_layers": dev["pruned_layers"],
               "dev_vllm": judged(dev, full_served), "dev_transformers": next(
                   (a["dev_transformers"] for a in arms if a["arm"] == winner.name), None),
               "test_vllm": judged(test, full_test), "throughput": dev_speed,
               "speedup_vs_full": round(dev_speed["median"] / full_speed["median"], 4) if full_speed else None,
               "speedup_inside_noise": bool(full_speed) and dev_speed["low"] <= full_speed["high"],
               "checkpoint": "chosen", "recipe": "chosen/short_lvlm_recipe.yaml"}
    paper = next((a for a in arms if a["arm"] == PAPER_DEFAULT.name), None)
    paper_default = None
    if paper is not None:
        paper_default = {**paper, "test_vllm": judged(_find(tested, PAPER_DEFAULT.name), full_test),
                         "throughput_shape_of_winner": bool(win and paper.get("layers") == win["layers"])}
    return {
        "target": {"keep": keep, "rule": "lower end of the paired-bootstrap 95% interval of accuracy(arm) - keep x "
                                         "accuracy(full) >= 0 on the dev set"},
        "dev": {"benchmark": config.dev, "split": _split_name(config, "dev"),
                "questions": len(correct_of(full_screen))},
        "test": {"benchmark": config.dev, "split": _split_name(config, "test"),
                 "questions": len(correct_of(full_test)) if full_test else None},
        "full": {"dev_transformers": _point(full_screen), "dev_vllm": _point(full_served),
                 "test_vllm": _point(full_test), "throughput": _speed(full_served), "layers": num_layers},
        "winner": win, "reasons": report["reasons"], "failure": report["failure"], "paper_default": paper_default,
        "arms": arms, "cost": {"search": spent, "full_matrix_estimate": estimate},
        "config": {k: v for k, v in config.fingerprint().items()},
    }


def _split_name(config: SearchConfig, side: str) -> str:
    if config.dev in SOURCE_VERSIONS:
        return "validation" if side == "dev" else "test"
    return f"{side} half (hash of each question's unit)"


def _point(result: dict | None) -> dict | None:
    if result is None:
        return None
    acc = accuracy(correct_of(result))
    return {"accuracy": round(acc.value, 6), "low": round(acc.low, 6), "high": round(acc.high, 6), "n": acc.n}


def plot_points(document: dict, report: dict) -> list[dict]:
    """Every arm tried on the dev set: served ones at their accuracy through vLLM and their measured throughput;
    screened-only ones at their accuracy through transformers and the throughput of their serving shape when a served
    arm had it, else the full model's scaled by the ideal full / kept layers (marked as an estimate)."""
    served = report["served"]
    full = document["full"]
    shapes = {r["throughput_key"]: r["throughput"]["output_throughput"] for r in served if r.get("throughput")}
    points = []
    for r in served:
        speed = r["throughput"]["output_throughput"]
        points.append({"arm": r["arm"], **_point(r), "throughput": speed["median"], "throughput_low": speed["low"],
                       "throughput_high": speed["high"], "kind": "served",
                       "winner": bool(document["winner"]) and r["arm"] == document["winner"]["arm"]})
    names = {p["arm"] for p in points}
    for s in report["screened"]:
        if s.result is None or s.arm.name in names:
            continue
        speed = shapes.get(s.result["throughput_key"])
        if speed is None and full["throughput"]:
            ideal = full["throughput"]["median"] * full["layers"] / s.result["layers"]
            speed, kind = {"median": ideal, "low": ideal, "high": ideal}, "estimated"
        elif speed is None:
            continue
        else:
            kind = "screened"
        points.append({"arm": s.arm.name, **_point(s.result), "throughput": speed["median"],
                       "throughput_low": speed["low"], "throughput_high": speed["high"], "kind": kind,
                       "winner": False})
    served_points = [p for p in points if p["kind"] == "served"]
    front = pareto_front([(p["accuracy"], p["throughput"]) for p in served_points])
    for i, p in enumerate(served_points):
        p["front"] = i in front
    return points


def write_report_files(out: Path, document: dict, report: dict) -> None:
    from shortlvlm_vllm.plots import plot_search

    points = plot_points(document, report)
    document["plot"] = {"file": PLOT_NAME, "points": points}
    write_atomic(out / "report.json", json.dumps(document, indent=1, default=str) + "\n")
    write_atomic(out / "report.md", _markdown(document))
    write_atomic(out / "arms.md", _arms_markdown(document["arms"]))
    if points:
        full = document["full"]["dev_vllm"]
        write_atomic(out / PLOT_NAME, plot_search(points, document["target"]["keep"] * full["accuracy"] if full
                                                  else None))


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _judged(m: dict | None) -> str:
    if not m:
        return ""
    return (f"{_pct(m['accuracy'])}% ({_pct(m['kept'])}% of full; margin {100 * m['margin']:+.1f} "
            f"[{100 * m['margin_low']:+.1f}, {100 * m['margin_high']:+.1f}]: {m['status']})")


def _speed_text(s: dict | None) -> str:
    return "" if not s else f"{s['median']:.1f} [{s['low']:.1f}, {s['high']:.1f}]"


def _markdown(d: dict) -> str:
    keep = d["target"]["keep"]
    lines = [f"# Search: the fastest arm that keeps {100 * keep:g}% of the full model's accuracy", ""]
    if d["winner"]:
        w = d["winner"]
        lines += [f"**Chosen: {w['arm']}** ({w['layers']} decoder layers; pruned {w['pruned_layers']}), "
                  f"checkpoint `{w['checkpoint']}/`, rebuilt by `shortlvlm prune --recipe {w['recipe']} -o DIR`.", "",
                  f"- dev ({d['dev']['benchmark']} {d['dev']['split']}, {d['dev']['questions']} questions, vLLM): "
                  f"{_judged(w['dev_vllm'])}",
                  f"- test ({d['test']['benchmark']} {d['test']['split']}, {d['test']['questions']} questions, never "
                  f"seen by the search, vLLM): {_judged(w['test_vllm'])}",
                  f"- served throughput: {_speed_text(w['throughput'])} output tok/s (median [range]), "
                  f"{w['speedup_vs_full']}x the full model's"
                  + (" (the ranges overlap: no difference beyond the noise)" if w.get("speedup_inside_noise") else ""),
                  "", "Why:", *(f"- {r}" for r in d["reasons"]), ""]
    else:
        lines += [f"**Nothing chosen.** {d['failure']}", ""]
    f = d["full"]
    lines += ["## The full model", "",
              *markdown_table(["scorer / set", "accuracy % [95% CI]"],
                      [[name, f"{_pct(p['accuracy'])} [{_pct(p['low'])}, {_pct(p['high'])}] (n={p['n']})"]
                       for name, p in (("transformers / dev", f["dev_transformers"]), ("vLLM / dev", f["dev_vllm"]),
                                       ("vLLM / test", f["test_vllm"])) if p]),
              "", f"Served throughput: {_speed_text(f['throughput'])} output tok/s.", ""]
    p = d["paper_default"]
    if p:
        lines += ["## The paper's default recipe (TIS + SCP at 30%) at the same target", "",
                  f"- screen (transformers, dev): {_judged(p['dev_transformers'])}; decision: {p['decision']} "
                  f"({p['reason']})",
                  *([f"- served (vLLM, dev): {_judged(p['dev_vllm'])}"] if p.get("dev_vllm") else []),
                  f"- test (vLLM): {_judged(p['test_vllm'])}" if p.get("test_vllm") else "- test: not served", ""]
    served = [a for a in d["arms"] if a.get("dev_vllm")]
    if served:
        lines += ["## Finalists (served by vLLM)", "",
                  *markdown_table(["arm", "layers", "dev (vLLM)", "output tok/s median [range]", "decision"],
                          [[a["arm"], a["layers"], _judged(a["dev_vllm"]), _speed_text(a["throughput"]),
                            a["decision"]] for a in served]), ""]
    cost, est = d["cost"]["search"], d["cost"]["full_matrix_estimate"]
    lines += ["## Cost", "",
              *markdown_table(["", "wall time (s)", "vLLM servers started"],
                      [["screen (transformers)", cost["seconds"].get("screen", ""), 0],
                       ["served (dev + throughput)", cost["seconds"].get("served", ""), cost["servers"]["served"]],
                       ["test", cost["seconds"].get("test", ""), cost["servers"]["test"]],
                       ["**search, total**", cost["seconds"]["total"], cost["servers"]["total"]],
                       *([[f"full matrix over the same axes (estimate: {est['arms']} arms served, {est['shapes']} "
                           f"shapes x {est['rounds_per_shape']} rounds)", est["seconds"], est["servers"]]]
                         if est else [])]),
              "", "The estimate takes this search's own served cost per arm and per throughput round"
              + (f" ({est['served_seconds_per_arm']} s and {est['seconds_per_throughput_round']} s)" if est else "")
              + "; checkpoint builds, which both pay, are not counted.", "",
              f"Every arm and why it was kept or dropped: `arms.md`. Plot: `{PLOT_NAME}`. Stage tables: "
              "`screen/results.md`, `served/results.md`, `test/results.md`.", "",
              f"Rule: {d['target']['rule']}; among the arms that meet it, the highest median served throughput wins, "
              "arms whose throughput range overlaps the best one's count as tied with it, and ties go to fewer layers, "
              "then the larger margin, then the name."]
    return "\n".join(lines) + "\n"


def _arms_markdown(arms: list[dict]) -> str:
    body = [[a["arm"], a["stage"], a["decision"], a["reason"], a["layers"] or "",
             " ".join(map(str, a["pruned_layers"] or [])), _judged(a["dev_transformers"]),
             _judged(a.get("dev_vllm")), "" if a["heldout_kl"] is None else f"{a['heldout_kl']:.4f}"] for a in arms]
    return "\n".join(["Every arm of the search, in screening order: how far it went and why.", "",
                      *markdown_table(["arm", "stage reached", "decision", "why", "layers", "pruned",
                                       "dev (transformers)", "dev (vLLM)", "held-out KL"], body)]) + "\n"

