"""`shortlvlm search`: the fastest arm that keeps a fraction of the full model's accuracy, chosen on a dev set through
the server the user will run, and confirmed on a test set the search never looked at.

Stages, each a matrix of the evaluation package under DIR (its results written arm by arm, so a rerun with the same
config resumes where the last one stopped; DIR/search.json holds the config):
1. screen (DIR/screen): every arm built and answered in-process by transformers on the dev set (`screen.screen`);
2. served (DIR/served): the finalists (`select.finalists`) and the full model, each served by its own vLLM server,
   scored on the dev set, and timed with `bench` per serving shape, `repeats` interleaved rounds; the winner is
   `select.choose`'s;
3. test (DIR/test): the full model, the winner and the paper's default recipe (TIS + SCP at 30%) served and scored on
   the test set.
Then DIR/chosen/ (the winner's checkpoint, with the recipe that rebuilds it), DIR/report.{md,json},
DIR/accuracy_vs_throughput.png (every arm tried, the served front) and DIR/arms.md (every arm: how far it went and
why). Cost: wall time per stage and vLLM servers started, against an estimate of the full matrix over the same
axes (every arm served on the dev set, every shape timed).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.matrix import Arm, Matrix, MatrixConfig, arm_of
from shortlvlm_vllm.evaluation.tables import correct_of
from shortlvlm_vllm.files import atomic_output_dir, check_apart, write_atomic
from shortlvlm_vllm.search.screen import screen
from shortlvlm_vllm.search.select import Served, choose, finalists, margin
from shortlvlm_vllm.search.space import CONFIG_NAME, FULL, PAPER_DEFAULT, SearchConfig, load_config
from shortlvlm_vllm.search.splits import check_disjoint, dev_and_test

log = logging.getLogger(__name__)

STAGES = ("screen", "served", "test")
STAGES_NAME = "stages.json"
CHOSEN = "chosen"


class Search:
    """One search into `out_dir` (see the module's docstring)."""

    def __init__(self, config: SearchConfig, out_dir: str | Path) -> None:
        self.config = config
        self.out = Path(out_dir)
        self.dev, self.test = dev_and_test(config.dev)

    def matrix(self, stage: str, arms: list[Arm]) -> Matrix:
        """The stage's matrix: transformers on the dev set to screen, vLLM on the dev set (timed) or the test set."""
        c = self.config
        test = stage == "test"
        settings = MatrixConfig(
            model=c.model, arms=arms, rank=c.rank, batch_size=c.batch_size, server=dict(c.server),
            replicas=c.replicas, scorer="transformers" if stage == "screen" else "vllm",
            calibration={"source": c.calib, "num_samples": c.num_samples, "heldout": c.heldout},
            benchmark={"name": c.dev, "limit": c.test_limit if test else c.dev_limit, "data": c.data, "seed": c.seed},
            throughput={**c.throughput, "repeats": c.repeats if stage == "served" else 0, "per": "shape"})
        return Matrix(settings, self.out / stage, self.test if test else self.dev, cache=self.out / "checkpoints")

    def check_config(self) -> None:
        """A directory holds one search: resume only the same settings."""
        path = self.out / CONFIG_NAME
        if path.is_file():
            before = load_config(path.read_text())
            if before.fingerprint() != self.config.fingerprint():
                changed = sorted(k for k, v in self.config.fingerprint().items() if before.fingerprint().get(k) != v)
                raise ShortLVLMError(f"{self.out} holds a search with other settings ({', '.join(changed)}): search "
                                     f"into a new directory, or delete {self.out} to start over.")
        write_atomic(path, json.dumps(asdict(self.config), indent=1) + "\n")

    def run(self) -> dict:
        """The three stages, the chosen checkpoint and the report; returns the report's JSON."""
        c = self.config
        started = time.monotonic()
        screen_matrix = self.matrix("screen", [])
        check_apart(self.out, screen_matrix.protected())
        self.check_config()
        bench = screen_matrix.config.benchmark
        dev_items = self.dev.load(c.data, c.dev_limit, c.seed)
        test_items = self.test.load(c.data, c.test_limit, c.seed)
        check_disjoint(dev_items, test_items)
        arms = c.arms()
        num_layers = open_checkpoint(c.model).num_layers
        log.info("stage 1/3 screen: %d arms through transformers on %d dev questions (%s)", len(arms),
                 len(dev_items), bench["name"])
        deadline = started + 60 * c.max_minutes if c.max_minutes else None
        with self.timed("screen"):
            screen_matrix.check_source()
            full_screen, screened = screen(screen_matrix, arms, c.keep, deadline)
        chosen = finalists([s.candidate(num_layers) for s in screened if s.decision == "candidate"], c.finalists)
        by_name = {s.arm.name: s for s in screened}
        final_arms = [by_name[f.name].arm for f in chosen]
        log.info("stage 2/3 served: the full model and %d finalists (%s), each served by vLLM on the dev set, %d "
                 "throughput rounds per serving shape", len(final_arms), ", ".join(a.name for a in final_arms),
                 c.repeats)
        served_matrix = self.matrix("served", [FULL, *final_arms])
        with self.timed("served"):
            served = served_matrix.run() if final_arms else []
        report: dict = {"screen_full": full_screen, "screened": screened, "served": served}
        winner_arm, reasons, failure = None, [], None
        if served:
            full = served[0]
            candidates = [Served(r["arm"], r["layers"], margin(correct_of(r), correct_of(full), c.keep),
                                 tuple(r["throughput"]["output_throughput"]["values"]) if r.get("throughput") else ())
                          for r in served[1:]]
            try:
                winner, reasons = choose(candidates, c.keep)
                winner_arm = next(arm_of(r) for r in served if r["arm"] == winner.name)
            except ShortLVLMError as exc:
                failure = str(exc)
        else:
            failure = (f"every screened arm fell clearly below {100 * c.keep:g}% of the full model on the dev set: "
                       f"lower --keep or widen the axes.")
        tested = []
        if winner_arm is not None:
            log.info("stage 3/3 test: the full model, %s and the paper's default recipe served on %d test questions",
                     winner_arm.name, len(test_items))
            test_arms = list(dict.fromkeys([FULL, winner_arm, *([PAPER_DEFAULT] if PAPER_DEFAULT in arms else [])]))
            with self.timed("test"):
                tested = self.matrix("test", test_arms).run()
            self.copy_chosen(served_matrix, winner_arm)
        report.update(tested=tested, winner=winner_arm, reasons=reasons, failure=failure)
        document = self.write_report(report, num_layers)
        if failure:
            raise ShortLVLMError(failure + f" (report in {self.out / 'report.md'})")
        return document

    def timed(self, stage: str):
        """Adds the block's wall time to the stage's total in DIR/stages.json (summed over resumed runs)."""
        import contextlib

        @contextlib.contextmanager
        def block():
            path = self.out / STAGES_NAME
            begun = time.perf_counter()
            try:
                yield
            finally:
                totals = json.loads(path.read_text()) if path.is_file() else {}
                totals[stage] = round(totals.get(stage, 0.0) + time.perf_counter() - begun, 1)
                write_atomic(path, json.dumps(totals, indent=1) + "\n")
        return block()

    def copy_chosen(self, matrix: Matrix, arm: Arm) -> Path:
        """The winner's checkpoint as DIR/chosen (its short_lvlm_recipe.yaml rebuilds it with `prune --recipe`)."""
        source = matrix.checkpoint(arm)
        with atomic_output_dir(self.out / CHOSEN, overwrite=True, sources=matrix.protected(),
                               marker="config.json") as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        return self.out / CHOSEN

    def write_report(self, report: dict, num_layers: int) -> dict:
        from shortlvlm_vllm.search.report import build_report, write_report_files

        document = build_report(self.config, self.out, report, num_layers)
        write_report_files(self.out, document, report)
        return document

