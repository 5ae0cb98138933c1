"""The evaluation matrix: arms (layer ratio x localization x compensation x quantization x visual tokens) built,
served, measured.

A YAML config names the model, the benchmark, the throughput workload and the axes; every combination of
the axes is an arm. Each arm's checkpoint is built once and cached under a key of its recipe, so a rerun
(or another config sharing arms) reuses it; each arm gets its own vLLM server, started and stopped around
the same accuracy requests and the same throughput workload. Results go out as JSON, CSV, markdown and a
plot of accuracy against throughput with the Pareto front marked; they name checkpoints relative to the results
directory, never by a path of the machine that ran them. The visual-token axis (`token_fraction`, the fraction of
each image's tokens kept, 1 = all) changes no checkpoint: the arm's server gets the budget through `--hf-overrides`,
and with it the selection (`token_selection`: visionzip, or random for a test arm of the same budget).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shortlvlm_vllm.data.calibration import CalibrationSource
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.files import portable_name
from shortlvlm_vllm.plots import plot_accuracy_vs_throughput
from shortlvlm_vllm.prune.compensate import CompensationSettings
from shortlvlm_vllm.prune.recipe import PruneRecipe

log = logging.getLogger(__name__)

AXES = ("ratio", "localize", "compensate", "quantize", "token_fraction", "token_selection")
ARM_DEFAULTS = {"ratio": 0.0, "localize": "tis", "compensate": "scp", "quantize": "none", "token_fraction": 1.0,
                "token_selection": "visionzip"}


@dataclass(frozen=True)
class Arm:
    """One point of the matrix; ratio 0 is the unpruned model, whatever the localization and compensation."""

    ratio: float
    localize: str
    compensate: str
    quantize: str
    token_fraction: float = 1.0  # fraction of each image's visual tokens kept (K is `visual_tokens(N)`)
    token_selection: str = "visionzip"  # which K: serving.visual_tokens.SELECTIONS

    @property
    def pruning_name(self) -> str:
        return f"{self.localize}+{self.compensate}-{round(self.ratio * 100)}%" if self.ratio else "full"

    @property
    def name(self) -> str:
        name = self.pruning_name if self.quantize == "none" else f"{self.pruning_name}+{self.quantize}"
        if self.token_fraction == 1:
            return name
        tokens = f"{name}+tokens-{round(self.token_fraction * 100)}%"
        return tokens if self.token_selection == "visionzip" else f"{tokens}-{self.token_selection}"

    def visual_tokens(self, num_tokens: int) -> int:
        """K for an image of `num_tokens` tokens."""
        return max(1, round(self.token_fraction * num_tokens))

    @property
    def slug(self) -> str:
        """The name as a directory name."""
        return _slug(self.name)


@dataclass
class MatrixConfig:
    model: str  # a checkpoint directory, a hub id, or "toy" (the shipped toy model)
    arms: list[Arm]
    calibration: dict[str, Any] = field(default_factory=lambda: {"source": "synthetic", "num_samples": 256})
    rank: int = 64
    benchmark: dict[str, Any] = field(default_factory=lambda: {"name": "synthetic", "limit": 500})
    client: dict[str, Any] = field(default_factory=lambda: {"concurrency": 8})
    throughput: dict[str, Any] = field(default_factory=lambda: {"num_prompts": 64, "concurrency": 16,
                                                                 "output_len": 16})
    server: dict[str, Any] = field(default_factory=dict)  # VLLMServer keyword arguments (max_model_len, ...)
    quantize: dict[str, Any] = field(default_factory=lambda: {"scheme": "W4A16", "num_samples": 64})


def load_config(path: str | Path) -> MatrixConfig:
    """Read a matrix YAML: `grid` holds a list per axis, and every combination becomes an arm."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ShortLVLMError(f"matrix config {path} does not exist; see eval/configs/ for examples.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ShortLVLMError(f"matrix config {path} is not valid YAML: {e}") from e
    grid = raw.pop("grid", None)
    if not isinstance(grid, dict) or not grid:
        raise ShortLVLMError(f"{path}: give the axes under `grid:` (any of {', '.join(AXES)}), each a list.")
    unknown = set(grid) - set(AXES)
    if unknown:
        raise ShortLVLMError(f"{path}: unknown axes {sorted(unknown)}; the axes are {', '.join(AXES)}.")
    known = {f for f in MatrixConfig.__dataclass_fields__ if f != "arms"}
    extra = set(raw) - known
    if extra:
        raise ShortLVLMError(f"{path}: unknown keys {sorted(extra)}; the keys are grid, {', '.join(sorted(known))}.")
    if "model" not in raw:
        raise ShortLVLMError(f"{path}: name the model to prune (`model: toy` for the shipped toy model).")
    from shortlvlm_vllm.serving.visual_tokens import SELECTIONS

    axes = {axis: _as_list(grid.get(axis, ARM_DEFAULTS[axis])) for axis in AXES}
    arms = list(dict.fromkeys(_normalise(Arm(**dict(zip(AXES, values, strict=True))))
                              for values in itertools.product(*axes.values())))
    for arm in arms:
        if not 0 <= arm.ratio < 1:
            raise ShortLVLMError(f"{path}: ratio {arm.ratio} must be in [0, 1).")
        if not 0 < arm.token_fraction <= 1:
            raise ShortLVLMError(f"{path}: token_fraction {arm.token_fraction} must be in (0, 1]: the fraction of "
                                 f"visual tokens kept.")
        if arm.token_selection not in SELECTIONS:
            raise ShortLVLMError(f"{path}: token_selection {arm.token_selection!r} is unknown; use "
                                 f"{' or '.join(SELECTIONS)}.")
    return MatrixConfig(arms=arms, **raw)


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _normalise(arm: Arm) -> Arm:
    """The unpruned arm ignores localization and compensation, so it appears once per quantization and budget;
    an arm that keeps every token has no selection to make."""
    fraction = float(arm.token_fraction)
    selection = str(arm.token_selection) if fraction < 1 else ARM_DEFAULTS["token_selection"]
    return Arm(0.0, "-", "-", arm.quantize, fraction, selection) if not arm.ratio else Arm(float(arm.ratio), *map(
        str, (arm.localize, arm.compensate, arm.quantize)), fraction, selection)


SOURCE_NAME = "source.json"


def source_fingerprint(model: str, path: Path) -> dict:
    """What tells two versions of a checkpoint apart cheaply: config.json's hash and each weight file's size."""
    return {"model": model, "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
            "weights": {f.name: f.stat().st_size for f in sorted(path.glob("*.safetensors"))}}


def _slug(name: str) -> str:
    return name.replace("%", "pct").replace("+", "_")


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Matrix:
    """Builds, serves and measures every arm of a config into `out_dir`."""

    def __init__(self, config: MatrixConfig, out_dir: str | Path) -> None:
        self.config = config
        self.out = Path(out_dir)
        self.cache = self.out / "checkpoints"

    def source(self) -> Path:
        """The model's directory (`model` is a local directory, a hub id or a shipped model such as "toy")."""
        from shortlvlm_vllm.checkpoint.hub import resolve_model_dir

        return resolve_model_dir(self.config.model)[0]

    def checkpoint(self, arm: Arm) -> Path:
        """The arm's checkpoint: pruned (cached by its prune recipe), then quantized (cached by both)."""
        pruned = self._pruned(arm)
        if arm.quantize == "none":
            return pruned
        from shortlvlm_vllm.quantize.driver import QuantizeRecipe, quantize_checkpoint

        q = self.config.quantize
        dst = self.cache / f"{arm.slug}-{_key(str(pruned), arm.quantize, q, self.config.calibration)}"
        if not (dst / "config.json").is_file():
            log.info("quantizing %s with %s", pruned, arm.quantize)
            recipe = QuantizeRecipe(arm.quantize, q.get("scheme", "W4A16"), q.get("group_size", 128),
                                    None if arm.quantize == "rtn" else self._calibration(q.get("num_samples")))
            quantize_checkpoint(pruned, dst, recipe, overwrite=True)
        return dst

    def prune_recipe(self, arm: Arm) -> PruneRecipe:
        """The recipe that builds the arm's pruned checkpoint (the same `shortlvlm prune --recipe` replays)."""
        return PruneRecipe(model=self.config.model, ratio=arm.ratio, localize=arm.localize,
                           compensation=CompensationSettings(arm.compensate, self.config.rank),
                           calibration=self._calibration())

    def _pruned(self, arm: Arm) -> Path:
        from shortlvlm_vllm.prune.pipeline import prune

        if not arm.ratio:
            return self.source()
        recipe = self.prune_recipe(arm)
        dst = self.cache / f"{_slug(arm.pruning_name)}-{_key(recipe.to_yaml())}"
        if not (dst / "config.json").is_file():
            log.info("pruning %s: %s", self.config.model, arm.name)
            prune(recipe, dst, overwrite=True)
        return dst

    def _calibration(self, num_samples: int | None = None) -> CalibrationSource:
        settings = dict(self.config.calibration)
        if num_samples:
            settings["num_samples"] = num_samples
        return CalibrationSource(**settings)

    def run(self) -> list[dict]:
        """Every arm in turn; an arm measured before (its result file exists) is read back, not rerun."""
        self.check_source()
        results = []
        for i, arm in enumerate(self.config.arms, 1):
            log.info("arm %d/%d: %s", i, len(self.config.arms), arm.name)
            results.append(self.measure(arm))
            write_tables(results, self.out)
        return results

    def check_source(self) -> None:
        """Refuse to resume in a directory whose arms and cached checkpoints came from other source weights.

        Arms and checkpoints are reused by name and recipe, which do not see a model retrained in place (the
        toy model is): OUT/source.json records the source's fingerprint at the first run.
        """
        fingerprint = source_fingerprint(self.config.model, self.source())
        path = self.out / SOURCE_NAME
        if path.is_file():
            recorded = json.loads(path.read_text())
        else:
            recorded = fingerprint if not any((self.out / "arms").glob("*/result.json")) else None
        if recorded != fingerprint:
            what = f"another version of {fingerprint['model']}" if recorded else "a source it did not record"
            raise ShortLVLMError(f"{self.out} holds arms measured on {what} (config or weight files differ): measure "
                                 f"into a new directory, or delete {self.out} to start over.")
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fingerprint, indent=2) + "\n")

    def measure(self, arm: Arm) -> dict:
        from shortlvlm_vllm.evaluation.benchmarks import get_benchmark
        from shortlvlm_vllm.evaluation.client import ClientConfig, Endpoint, run_benchmark
        from shortlvlm_vllm.evaluation.throughput import requests_from_items, run_throughput
        from shortlvlm_vllm.serving.launcher import VLLMServer

        arm_dir = self.out / "arms" / arm.slug
        result_path = arm_dir / "result.json"
        if result_path.is_file():
            return json.loads(result_path.read_text())
        checkpoint = self.checkpoint(arm)
        started = time.perf_counter()
        bench = dict(self.config.benchmark)
        benchmark = get_benchmark(bench.pop("name"))
        speed = dict(self.config.throughput)
        workload = benchmark.load(bench.get("data"), speed.pop("num_prompts"), bench.get("seed", 0))
        server_kwargs, visual_tokens = self.server_kwargs(arm, checkpoint)
        with VLLMServer(checkpoint, log_path=arm_dir / "server.log", served_model_name=arm.name,
                        **server_kwargs) as server:
            endpoint = Endpoint(server.base_url, arm.name, server.api_key)
            scores = run_benchmark(endpoint, benchmark, arm_dir / "accuracy", source=bench.get("data"),
                                   limit=bench.get("limit"), seed=bench.get("seed", 0),
                                   config=ClientConfig(**self.config.client))
            throughput = run_throughput(endpoint, requests_from_items(workload), **speed)
        result = {**asdict(arm), "arm": arm.name, "checkpoint": self.checkpoint_name(checkpoint),
                  "visual_tokens": visual_tokens,
                  "layers": _num_layers(json.loads((checkpoint / "config.json").read_text())),
                  "accuracy": scores, "throughput": throughput.to_dict(),
                  "seconds": round(time.perf_counter() - started, 1)}
        result_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        return result


    def checkpoint_name(self, checkpoint: Path) -> str:
        """How results name a checkpoint: the model as the config names it, or its path relative to the results."""
        return self.config.model if checkpoint == self.source() else portable_name(checkpoint, self.out)

    def server_kwargs(self, arm: Arm, checkpoint: Path) -> tuple[dict, int | None]:
        """The arm's VLLMServer arguments (with the visual-token budget as --hf-overrides) and its K (None: all)."""
        from shortlvlm_vllm.serving.visual_tokens import image_token_count
        from shortlvlm_vllm.serving.vllm_plugin import budget_overrides

        kwargs = dict(self.config.server)
        if arm.token_fraction == 1:
            return kwargs, None
        config = json.loads((checkpoint / "config.json").read_text())
        budget = arm.visual_tokens(image_token_count(config))
        kwargs["extra_args"] = [*kwargs.get("extra_args", []), "--hf-overrides",
                                json.dumps(budget_overrides(config, budget, arm.token_selection))]
        return kwargs, budget


def _num_layers(config: dict) -> int | None:
    text = config.get("text_config", config)
    return text.get("num_hidden_layers")


def headline(result: dict) -> tuple[float, float]:
    """(accuracy, output tokens/s) of an arm: the plot's two axes."""
    accuracy = result["accuracy"]["accuracy"]
    return float(accuracy), float(result["throughput"]["output_throughput"])


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both accuracy and throughput."""
    return [i for i, (a, t) in enumerate(points)
            if not any(a2 >= a and t2 >= t and (a2, t2) != (a, t) for a2, t2 in points)]


def write_tables(results: list[dict], out_dir: Path) -> None:
    """results.json, results.csv, results.md and accuracy_vs_throughput.png under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    points = [headline(r) for r in results]
    front = set(pareto_front(points))
    rows = []
    for i, r in enumerate(results):
        t = r["throughput"]
        rows.append({
            "arm": r["arm"], "ratio": r["ratio"], "localize": r["localize"], "compensate": r["compensate"],
            "quantize": r["quantize"], "visual_tokens": r.get("visual_tokens") or "all", "layers": r["layers"],
            "accuracy": round(points[i][0], 4),
            **{k.removeprefix("accuracy/"): round(v, 4) for k, v in r["accuracy"].items()
               if k.startswith("accuracy/")},
            "req_per_s": round(t["request_throughput"], 3), "output_tok_per_s": round(t["output_throughput"], 1),
            "ttft_p50_ms": round(t["median_ttft_ms"], 1), "tpot_p50_ms": round(t["median_tpot_ms"], 2),
            "pareto": i in front,
        })
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(rows)
    (out_dir / "results.csv").write_text(buffer.getvalue())
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    (out_dir / "accuracy_vs_throughput.png").write_bytes(
        plot_accuracy_vs_throughput([r["arm"] for r in rows], [r["quantize"] for r in rows], points, front))


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "**yes**" if value else ""
    return str(value)
