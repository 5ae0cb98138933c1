"""The cheap stage: every arm of the axes answered in-process by transformers on the dev set, judged against the
target with its interval, line by line so that a way of pruning that falls clearly below the target at one ratio is
not tried at higher ones.

The arms are built by a matrix scored by transformers: one calibration pass (cached) gives every localizer's
ranking and every layer's SCP features, so each arm costs its checkpoint's write and its answers; arms whose weights
are byte-identical (two localizers choosing the same layers) are answered once. Each arm's result is written as it
finishes (the matrix's DIR/screen/arms/<slug>/result.json), so an interrupted screen resumes where it stopped.
Quantized and token-budget arms cannot be answered by stock transformers: they stand or fall with the
full-precision, every-token arm they stack on, and are judged when served.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from shortlvlm_vllm.evaluation.matrix import RESULT_NAME, Arm, Matrix
from shortlvlm_vllm.evaluation.tables import correct_of, write_tables
from shortlvlm_vllm.search.select import BELOW, Candidate, Margin, margin
from shortlvlm_vllm.search.space import FULL, base_arm, lines, screenable

log = logging.getLogger(__name__)


@dataclass
class Screened:
    """What the screen decided about one arm, and why."""

    arm: Arm
    decision: str  # "candidate", "dropped", "not tried"
    reason: str
    result: dict | None = None  # the matrix's result (None: not measured)
    margin: Margin | None = None

    def candidate(self, num_layers: int) -> Candidate:
        layers = self.result["layers"] if self.result else num_layers - round(self.arm.ratio * num_layers)
        return Candidate(self.arm.name, layers, self.margin, self.arm.token_fraction, self.arm.quantize != "none",
                         _own_kl(self.result))

    def as_dict(self) -> dict:
        return {"arm": self.arm.name, "stage": "screen", "decision": self.decision, "reason": self.reason,
                "dev_transformers": self.margin.as_dict() if self.margin else None,
                "layers": self.result["layers"] if self.result else None,
                "pruned_layers": self.result["pruned_layers"] if self.result else None,
                "heldout_kl": _own_kl(self.result)}


def _own_kl(result: dict | None) -> float | None:
    drift = (result or {}).get("heldout_drift") or {}
    own = drift.get(result["compensate"]) if result else None
    return own["kl"] if own else None


def screen(matrix: Matrix, arms: list[Arm], keep: float, deadline: float | None = None) -> tuple[dict, list[Screened]]:
    """The full model's dev result and every arm's screen decision, in screening order. `deadline`
    (time.monotonic()): arms not measured (in this run or an earlier one) by then are not tried."""
    full = matrix.measure_accuracy(FULL)
    measured = [full]
    done: dict[Arm, Screened] = {}
    ordered = [arm for line in lines(arms) for arm in line]
    for line in lines(arms):
        below: Screened | None = None
        for arm in line:
            position = f"[screen {ordered.index(arm) + 1}/{len(ordered)}] {arm.name}"
            if below is not None:
                done[arm] = Screened(arm, "not tried", f"{below.arm.name} already fell clearly below the target")
                log.info("%s: not tried (%s)", position, done[arm].reason)
                continue
            if not screenable(arm):
                base = base_arm(arm)
                judged = done.get(base)
                if base != FULL and (judged is None or judged.decision != "candidate"):
                    done[arm] = Screened(arm, "dropped", f"stacks on {base.name}, which the screen did not keep")
                else:
                    done[arm] = Screened(arm, "candidate", f"transformers cannot answer for it; stacks on "
                                         f"{base.name}, kept by the screen: judged when served")
                log.info("%s: %s (%s)", position, done[arm].decision, done[arm].reason)
                continue
            measured_before = (matrix.out / "arms" / arm.slug / RESULT_NAME).is_file()
            if deadline is not None and time.monotonic() > deadline and not measured_before:
                done[arm] = Screened(arm, "not tried", "the search's time cap (--max-minutes) was reached")
                log.info("%s: not tried (time cap)", position)
                continue
            log.info("%s: %s", position, "read back" if measured_before else
                     "building and answering the dev set through transformers")
            result = matrix.measure_accuracy(arm, measured)
            measured.append(result)
            m = margin(correct_of(result), correct_of(full), keep)
            if m.status == BELOW:
                done[arm] = below = Screened(arm, "dropped", "clearly below the target (interval's upper end < 0)",
                                             result, m)
            else:
                done[arm] = Screened(arm, "candidate", f"{m.status} on the screen", result, m)
            log.info("%s: dev %.1f%% (full %.1f%%), margin %+.1f [%+.1f, %+.1f] points: %s", position,
                     100 * m.accuracy, 100 * m.full, 100 * m.margin, 100 * m.low, 100 * m.high, done[arm].decision)
        write_tables(measured, matrix.out)
    return full, [done[arm] for arm in ordered]
