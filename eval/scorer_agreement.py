"""Do the two scorers agree? The same arms answered by vLLM (one server per arm) and by transformers in batches,
compared question by question.

    .venv/bin/python eval/scorer_agreement.py VLLM_MATRIX_DIR TRANSFORMERS_MATRIX_DIR [--output DIR]

Both directories are matrix outputs (`shortlvlm matrix`); every arm of the first is looked up by name in the second
and compared on the questions both answered: the share of questions whose parsed answers agree, and the accuracy
difference (vLLM - transformers) with its paired-bootstrap interval and exact McNemar p. Writes agreement.md and
results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shortlvlm_vllm.evaluation.client import RECORDS_NAME, load_records
from shortlvlm_vllm.evaluation.statistics import accuracy, compare_paired
from shortlvlm_vllm.evaluation.throughput import write_summary
from shortlvlm_vllm.files import portable_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vllm", type=Path)
    parser.add_argument("transformers", type=Path)
    parser.add_argument("--output", type=Path, default=Path("eval/results/scorer_agreement"))
    args = parser.parse_args()
    rows = []
    for arm_dir in sorted((args.vllm / "arms").iterdir()):
        result = json.loads((arm_dir / "result.json").read_text())
        other = args.transformers / "arms" / arm_dir.name
        if not (other / "result.json").is_file():
            continue
        twin = json.loads((other / "result.json").read_text()).get("same_weights_as")
        if twin:
            other = args.transformers / "arms" / next(d.name for d in (args.transformers / "arms").iterdir()
                                                       if json.loads((d / "result.json").read_text())["arm"] == twin)
        served = load_records(arm_dir / "accuracy" / RECORDS_NAME)
        local = load_records(other / "accuracy" / RECORDS_NAME)
        ids = [i for i in served if i in local]
        a = [served[i]["correct"] for i in ids]
        b = [local[i]["correct"] for i in ids]
        c = compare_paired(a, b)
        rows.append({"arm": result["arm"], "questions": len(ids),
                     "same_answer": round(sum(served[i]["parsed"] == local[i]["parsed"] for i in ids) / len(ids), 6),
                     "vllm": accuracy(a).as_dict(), "transformers": accuracy(b).as_dict(), **c.as_dict()})
    lines = ["| arm | questions | same parsed answer | vLLM % | transformers % | vLLM - transformers (points) [95% CI] "
             "| p (McNemar) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['arm']} | {r['questions']} | {100 * r['same_answer']:.2f}% | {100 * r['vllm']['value']:.2f} | "
              f"{100 * r['transformers']['value']:.2f} | {100 * r['difference']:+.2f} [{100 * r['low']:+.2f}, "
              f"{100 * r['high']:+.2f}] | {r['p_value']:.3g} |" for r in rows]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "agreement.md").write_text("\n".join(lines) + "\n")
    write_summary({"vllm": portable_name(args.vllm), "transformers": portable_name(args.transformers),
                   "arms": rows}, args.output)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
