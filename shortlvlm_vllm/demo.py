"""The main job end to end: prune a LLaVA checkpoint with Short-LVLM, serve the full and the pruned model
with vLLM, ask both the same test questions through the openai client, and compare."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.data.calibration import CalibrationSource
from shortlvlm_vllm.evaluation.benchmarks import Benchmark, get_benchmark
from shortlvlm_vllm.evaluation.client import RECORDS_NAME, Endpoint, load_records, run_benchmark
from shortlvlm_vllm.prune.pipeline import describe_plan, plan_pruning, write_plan
from shortlvlm_vllm.prune.recipe import PruneRecipe
from shortlvlm_vllm.serving.launcher import VLLMServer


def _serve_and_ask(model_dir: Path, name: str, benchmark: Benchmark, limit: int,
                   workdir: Path) -> tuple[dict[str, float], dict[str, dict], float]:
    """Scores, records by item id, and the seconds the questions took (server start-up excluded)."""
    started = time.perf_counter()
    print(f"[demo] serving the {name} model with vLLM (log: {workdir / f'server-{name}.log'})", flush=True)
    with VLLMServer(model_dir, log_path=workdir / f"server-{name}.log", served_model_name=name) as server:
        ready = time.perf_counter()
        out = workdir / f"eval-{name}"
        scores = run_benchmark(Endpoint(server.base_url, name, server.api_key), benchmark, out, limit=limit)
        asked = time.perf_counter() - ready
    print(f"[demo] {name}: server ready in {ready - started:.0f} s, {limit} questions in {asked:.1f} s")
    return scores, load_records(out / RECORDS_NAME), asked


def run_demo(
    model: str | None, workdir: Path, ratio: float = 0.3, calib: str = "synthetic", num_questions: int = 100
) -> None:
    started = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = PruneRecipe(model=model or "toy", ratio=ratio, calibration=CalibrationSource(calib))
    if model is None:
        print("[demo] model: toy, the project's LLaVA trained on the synthetic VQA set (shipped with the package)")
    src = open_checkpoint(recipe.model)
    print(f"[demo] pruning {ratio:.0%} of {src.num_layers} decoder layers with Short-LVLM (TIS + SCP), "
          f"calibrated on {calib}", flush=True)
    plan = plan_pruning(src, recipe)
    print(describe_plan(src, recipe, plan))
    pruned_dir = write_plan(src, workdir / "pruned", recipe, plan, overwrite=True)
    print(f"[demo] wrote {pruned_dir}")

    benchmark = get_benchmark("synthetic")
    scores, records, seconds = {}, {}, {}
    for name, model_dir in (("full", src.path), ("pruned", pruned_dir)):
        shutil.rmtree(workdir / f"eval-{name}", ignore_errors=True)  # an earlier run's answers: other weights
        scores[name], records[name], seconds[name] = _serve_and_ask(model_dir, name, benchmark, num_questions, workdir)

    print("\n[demo] a few of the questions (synthetic test split):")
    for item in benchmark.load(limit=5):
        full, pruned = (records[name][item.id]["parsed"] for name in ("full", "pruned"))
        print(f"  Q: {item.prompt.splitlines()[0]}  expected {item.answer!r}; full {full!r}, pruned {pruned!r}")
    rows = [(key.removeprefix("accuracy/"), key) for key in scores["full"] if key.startswith("accuracy/")]
    print(f"\n[demo] accuracy on {num_questions} test questions, through vLLM and the openai client:")
    print(f"  {'family':16s} {'full':>6s} {'pruned':>7s}")
    for family, key in [*rows, ("overall", "accuracy")]:
        print(f"  {family:16s} {scores['full'][key]:6.1%} {scores['pruned'][key]:7.1%}")
    kept = src.num_layers - len(plan.pruned)
    print(f"[demo] pruned model: {kept} of {src.num_layers} layers; answering took {seconds['pruned']:.1f} s "
          f"against {seconds['full']:.1f} s for the full model")
    print(f"[demo] done in {time.perf_counter() - started:.0f} s; checkpoints and server logs under {workdir}")
