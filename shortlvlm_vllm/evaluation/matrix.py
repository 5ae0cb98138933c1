"""The evaluation matrix: arms (layer ratio x localization x compensation x quantization x visual tokens) built,
measured for accuracy and for throughput, and compared with their uncertainty.

A YAML config names the model, the benchmark, the throughput workload and the axes; every combination of the axes is
an arm. Each arm's checkpoint is built once and cached under a key of its recipe, and one calibration pass serves
every arm with the same calibration settings (its statistics are cached by source, calibration draw, candidates and
top-p). Accuracy: each arm served by its own vLLM server (`scorer: vllm`), or answered in-process by transformers in
batches (`scorer: transformers`, for large ablations; it agrees with vLLM on the toy within 0.1 point); arms whose
weights are byte-identical (two localizers picking the same layers) are scored once. Throughput depends on an arm's
serving shape (layer count, quantization, visual tokens, side paths), not on which layers went, so by default it is
measured once per shape (`throughput.per: shape`), `throughput.repeats` times, the rounds interleaved across shapes
so that drift on a shared machine hits every shape alike (`replicas: N` gives each arm N servers, placed on
their own GPUs or CPU cores, that share the requests). Tables and plots are written by `tables.write_tables`,
with intervals and paired tests; they name checkpoints relative to the results directory. The visual-token axis
(`token_fraction`, the fraction of each image's tokens kept, 1 = all) changes no checkpoint: the arm's server gets
the budget through `--hf-overrides`, and with it
the selection (`token_selection`: visionzip, or random for a test arm of the same budget).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shortlvlm_vllm.data.calibration import CalibrationSource
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.benchmarks.base import Benchmark
from shortlvlm_vllm.evaluation.tables import compensation_name
from shortlvlm_vllm.files import check_apart, portable_name, protected_paths, write_atomic
from shortlvlm_vllm.prune.compensate import CompensationSettings
from shortlvlm_vllm.prune.recipe import PruneRecipe

log = logging.getLogger(__name__)

_SCP = CompensationSettings()
# The compensate axis takes "none", "scp" (the default pairing and target) or "scp/PAIRING/TARGET".
AXES = ("ratio", "localize", "compensate", "quantize", "token_fraction", "token_selection", "seed")
ARM_DEFAULTS = {"ratio": 0.0, "localize": "tis", "compensate": "scp", "quantize": "none", "token_fraction": 1.0,
                "token_selection": "visionzip", "seed": 0}
SCORERS = ("vllm", "transformers")
THROUGHPUT_DEFAULTS = {"num_prompts": 64, "concurrency": 16, "output_len": 16, "repeats": 3, "per": "shape"}


@dataclass(frozen=True)
class Arm:
    """One point of the matrix; ratio 0 is the unpruned model, whatever the localization and compensation."""

    ratio: float
    localize: str
    compensate: str
    quantize: str
    token_fraction: float = 1.0  # fraction of each image's visual tokens kept (K is `visual_tokens(N)`)
    token_selection: str = "visionzip"  # which K: serving.visual_tokens.SELECTIONS
    seed: int = 0  # --localize random's seed (0 for every other localizer)
    scp_pairing: str = _SCP.pairing  # SCP's settings (the defaults for every other compensation)
    scp_target: str = _SCP.target

    @property
    def compensation_name(self) -> str:
        """"scp" with the default pairing and target, else "scp/PAIRING/TARGET"; other compensations by name."""
        return compensation_name(asdict(self))

    @property
    def localize_name(self) -> str:
        return f"random#{self.seed}" if self.localize == "random" else self.localize

    @property
    def pruning_name(self) -> str:
        if not self.ratio:
            return "full"
        return f"{self.localize_name}+{self.compensation_name}-{round(self.ratio * 100)}%"

    @property
    def weights_name(self) -> str:
        """The part of the name that decides the weights (the visual tokens are chosen by the server)."""
        return self.pruning_name if self.quantize == "none" else f"{self.pruning_name}+{self.quantize}"

    @property
    def name(self) -> str:
        name = self.weights_name
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
    scorer: str = "vllm"  # who answers the accuracy questions: each arm's vLLM server, or transformers in-process
    batch_size: int = 64  # scorer transformers: items per batch
    client: dict[str, Any] = field(default_factory=lambda: {"concurrency": 8})
    # the workload (num_prompts, concurrency, output_len), how often it is replayed per shape or arm (repeats; 0: not
    # measured), and whether per distinct serving shape (per: shape) or per arm (per: arm)
    throughput: dict[str, Any] = field(default_factory=lambda: dict(THROUGHPUT_DEFAULTS))
    server: dict[str, Any] = field(default_factory=dict)  # VLLMServer keyword arguments (max_model_len, ...)
    replicas: int = 1  # servers per arm (data parallelism: each on its own GPUs or CPU cores), sharing the requests
    quantize: dict[str, Any] = field(default_factory=lambda: {"scheme": "W4A16", "num_samples": 64})

    def __post_init__(self) -> None:
        self.throughput = {**THROUGHPUT_DEFAULTS, **self.throughput}
        if self.scorer not in SCORERS:
            raise ShortLVLMError(f"unknown scorer {self.scorer!r}; choose from {', '.join(SCORERS)}.")
        if self.throughput["per"] not in ("shape", "arm"):
            raise ShortLVLMError(f"throughput.per is {self.throughput['per']!r}: measure per shape or per arm.")
        if int(self.throughput["repeats"]) < 0:
            raise ShortLVLMError("throughput.repeats must be 0 (no throughput measured) or more.")
        if self.scorer == "transformers":
            odd = [arm.name for arm in self.arms if arm.quantize != "none" or arm.token_fraction != 1]
            if odd:
                raise ShortLVLMError(f"scorer transformers answers with stock transformers, which serves neither "
                                     f"quantized checkpoints nor visual-token budgets ({', '.join(odd)}): use scorer "
                                     f"vllm for those arms.")


def load_config(path: str | Path) -> MatrixConfig:
    """Read a matrix YAML: `grid` holds a list per axis, and every combination becomes an arm; a list of such grids
    gives the union of their arms (e.g. the random localizer's seeds with fewer compensations than the rest)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ShortLVLMError(f"matrix config {path} does not exist; see eval/configs/ for examples.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ShortLVLMError(f"matrix config {path} is not valid YAML: {e}") from e
    grids = raw.pop("grid", None)
    grids = grids if isinstance(grids, list) else [grids]
    if not all(isinstance(grid, dict) and grid for grid in grids):
        raise ShortLVLMError(f"{path}: give the axes under `grid:` (any of {', '.join(AXES)}), each a list, or a "
                             f"list of such grids.")
    unknown = set().union(*grids) - set(AXES)
    if unknown:
        raise ShortLVLMError(f"{path}: unknown axes {sorted(unknown)}; the axes are {', '.join(AXES)}.")
    known = {f for f in MatrixConfig.__dataclass_fields__ if f != "arms"}
    extra = set(raw) - known
    if extra:
        raise ShortLVLMError(f"{path}: unknown keys {sorted(extra)}; the keys are grid, {', '.join(sorted(known))}.")
    if "model" not in raw:
        raise ShortLVLMError(f"{path}: name the model to prune (`model: toy` for the shipped toy model).")
    replicas = raw.get("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ShortLVLMError(f"{path}: replicas {replicas!r} must be a whole number of servers per arm, at least 1.")
    from shortlvlm_vllm.serving.visual_tokens import SELECTIONS

    combinations = (values for grid in grids
                    for values in itertools.product(*(_as_list(grid.get(axis, ARM_DEFAULTS[axis])) for axis in AXES)))
    arms = list(dict.fromkeys(normalise_arm(Arm(**dict(zip(AXES, values, strict=True)))) for values in combinations))
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


def normalise_arm(arm: Arm) -> Arm:
    """The unpruned arm ignores localization and compensation, so it appears once per quantization and budget; a seed
    only matters to the random localizer; an arm that keeps every token has no selection to make.
    "scp/PAIRING/TARGET" on the compensate axis sets SCP's settings."""
    from shortlvlm_vllm.prune.compensate import PAIRINGS, SCP_TARGETS

    fraction = float(arm.token_fraction)
    selection = str(arm.token_selection) if fraction < 1 else ARM_DEFAULTS["token_selection"]
    if not arm.ratio:
        return Arm(0.0, "-", "-", str(arm.quantize), fraction, selection)
    method, *variant = str(arm.compensate).split("/")
    pairing, target = variant if len(variant) == 2 else (_SCP.pairing, _SCP.target)
    if variant and (method != "scp" or len(variant) != 2 or pairing not in PAIRINGS or target not in SCP_TARGETS):
        raise ShortLVLMError(f"compensate {arm.compensate!r}: write none, scp, or scp/PAIRING/TARGET with a pairing "
                             f"of {', '.join(PAIRINGS)} and a target of {', '.join(SCP_TARGETS)}.")
    return Arm(float(arm.ratio), str(arm.localize), method, str(arm.quantize), fraction, selection,
               int(arm.seed) if arm.localize == "random" else 0, pairing, target)


SOURCE_NAME = "source.json"


def source_fingerprint(model: str, path: Path) -> dict:
    """The model as the config names it, and what tells two versions of its checkpoint apart."""
    from shortlvlm_vllm.checkpoint.reader import checkpoint_fingerprint

    return {"model": model, **checkpoint_fingerprint(path)}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("%", "pct"))


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


RESULT_NAME = "result.json"
UNITS_NAME = "units.json"


class Matrix:
    """Builds, measures and compares every arm of a config into `out_dir`."""

    def __init__(self, config: MatrixConfig, out_dir: str | Path, benchmark: Benchmark | None = None,
                 cache: Path | None = None) -> None:
        """`benchmark`: the questions, when not the registered benchmark `config.benchmark` names (a split of it);
        `cache`: where checkpoints and calibration statistics are cached (default OUT/checkpoints), shared by several
        matrices over one model."""
        from shortlvlm_vllm.evaluation.benchmarks import get_benchmark

        self.config = config
        self.out = Path(out_dir)
        self.cache = cache or self.out / "checkpoints"
        self.benchmark = benchmark or get_benchmark(config.benchmark["name"])

    def source(self) -> Path:
        """The model's directory (`model` is a local directory, a hub id or a shipped model such as "toy")."""
        from shortlvlm_vllm.checkpoint.hub import resolve_model_dir

        return resolve_model_dir(self.config.model)[0]

    def checkpoint(self, arm: Arm) -> Path:
        """The arm's checkpoint: pruned (cached by its prune recipe), then quantized (cached by both; arms that differ
        only in their visual tokens share it)."""
        pruned = self._pruned(arm)
        if arm.quantize == "none":
            return pruned
        from shortlvlm_vllm.quantize.driver import QuantizeRecipe, quantize_checkpoint

        q = self.config.quantize
        dst = self.cache / f"{_slug(arm.weights_name)}-{_key(str(pruned), arm.quantize, q, self.config.calibration)}"
        if not (dst / "config.json").is_file():
            log.info("quantizing %s with %s", pruned, arm.quantize)
            recipe = QuantizeRecipe(arm.quantize, q.get("scheme", "W4A16"), q.get("group_size", 128),
                                    None if arm.quantize == "rtn" else self._calibration(q.get("num_samples")))
            quantize_checkpoint(pruned, dst, recipe, overwrite=True)
        return dst

    def prune_recipe(self, arm: Arm) -> PruneRecipe:
        """The recipe that builds the arm's pruned checkpoint (the same `shortlvlm prune --recipe` replays)."""
        compensation = CompensationSettings(arm.compensate, self.config.rank, arm.scp_target, arm.scp_pairing)
        return PruneRecipe(model=self.config.model, ratio=arm.ratio, localize=arm.localize, seed=arm.seed,
                           compensation=compensation, calibration=self._calibration())

    def _pruned(self, arm: Arm) -> Path:
        from shortlvlm_vllm.prune.pipeline import prune

        if not arm.ratio:
            return self.source()
        recipe = self.prune_recipe(arm)
        dst = self.cache / f"{_slug(arm.pruning_name)}-{_key(recipe.to_yaml())}"
        if not (dst / "config.json").is_file():
            log.info("pruning %s: %s", self.config.model, arm.name)
            prune(recipe, dst, overwrite=True, statistics_cache=self.cache / "calibration")
        return dst

    def _calibration(self, num_samples: int | None = None) -> CalibrationSource:
        settings = dict(self.config.calibration)
        if num_samples:
            settings["num_samples"] = num_samples
        return CalibrationSource(**settings)

    def protected(self) -> list[Path]:
        """What the matrix reads and must never write into: the model (with the hub cache for a download), and the
        local benchmark and calibration data."""
        from shortlvlm_vllm.checkpoint.hub import hub_cache_dir

        source = self.source()
        cache = hub_cache_dir().resolve()
        calibration = self.config.calibration
        data = [Path(p) for p in (self.config.benchmark.get("data"), calibration.get("source"),
                                  calibration.get("image_root")) if p]
        return [*protected_paths(source), *([cache] if cache in source.resolve().parents else []), *data]

    def run(self) -> list[dict]:
        """Every arm's accuracy, then every shape's (or arm's) throughput rounds; what was measured before (its file
        exists) is read back, not rerun. Tables are rewritten as results come in."""
        from shortlvlm_vllm.evaluation.tables import write_tables

        check_apart(self.out, self.protected())
        self.check_source()
        results = []
        for i, arm in enumerate(self.config.arms, 1):
            log.info("arm %d/%d: %s", i, len(self.config.arms), arm.name)
            measured_before = (self.out / "arms" / arm.slug / RESULT_NAME).is_file()
            results.append(self.measure_accuracy(arm, results))
            if not measured_before:  # arms read back change nothing until the next new one (tables are slow at size)
                write_tables(results, self.out)
        speeds = self.measure_throughput(results)
        for result in results:
            result["throughput"] = speeds.get(result["throughput_key"])
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
            recorded = fingerprint if not any((self.out / "arms").glob(f"*/{RESULT_NAME}")) else None
        if recorded != fingerprint:
            what = f"another version of {fingerprint['model']}" if recorded else "a source it did not record"
            raise ShortLVLMError(f"{self.out} holds arms measured on {what} (config or weight files differ): measure "
                                 f"into a new directory, or delete {self.out} to start over.")
        write_atomic(path, json.dumps(fingerprint, indent=2) + "\n")

    def measure_accuracy(self, arm: Arm, measured: list[dict] = ()) -> dict:
        """The arm's accuracy on the benchmark, with each unit's correctness (for intervals and paired tests); an arm
        whose weights are byte-identical to one in `measured`, served the same way, takes its answers."""
        from shortlvlm_vllm.evaluation.client import RECORDS_NAME, load_records

        arm_dir = self.out / "arms" / arm.slug
        result_path = arm_dir / RESULT_NAME
        if result_path.is_file():
            return json.loads(result_path.read_text())
        checkpoint = self.checkpoint(arm)
        started = time.perf_counter()
        config = json.loads((checkpoint / "config.json").read_text())
        record = config.get("short_lvlm") or {}
        bench, benchmark = self.config.benchmark, self.benchmark
        server_kwargs, visual_tokens = self.server_kwargs(arm, checkpoint)
        # what is served, not only the weights (server_kwargs carry the budget and the token selection): a random
        # selection of K tokens shares its weights with VisionZip's
        digest = _key(weights_sha256(checkpoint), server_kwargs, self.config.scorer)
        twin = next((r for r in measured if r.get("weights_key") == digest), None)
        result = {**asdict(arm), "arm": arm.name, "checkpoint": self.checkpoint_name(checkpoint),
                  "visual_tokens": visual_tokens, "layers": _num_layers(config),
                  "pruned_layers": record.get("pruned_layers", []),
                  "compensation_pairs": record.get("compensation_pairs"),
                  "heldout_drift": record.get("heldout_drift"), "feature_gap": _gap_summary(record),
                  "weights_key": digest, "scorer": self.config.scorer,
                  "throughput_key": self.throughput_key(arm, checkpoint, config, visual_tokens)}
        if twin is not None:
            log.info("%s has the weights of %s: its answers are reused", arm.name, twin["arm"])
            result.update(accuracy=twin["accuracy"], units=twin["units"], same_weights_as=twin["arm"])
        else:
            scores = self._score(arm, checkpoint, benchmark, bench, arm_dir / "accuracy", server_kwargs)
            items = benchmark.load(bench.get("data"), bench.get("limit"), bench.get("seed", 0))
            records = load_records(arm_dir / "accuracy" / RECORDS_NAME)
            units = benchmark.units(items, {item.id: records[item.id]["parsed"] for item in items})
            self._check_units(units)
            result.update(accuracy=scores, units={"ids_sha256": _ids_key(units),
                                                  "correct": "".join("1" if right else "0" for *_, right in units)})
        result["seconds"] = round(time.perf_counter() - started, 1)
        write_atomic(result_path, json.dumps(result, indent=1, default=str) + "\n")
        return result

    def _score(self, arm: Arm, checkpoint: Path, benchmark, bench: dict, out: Path, server_kwargs: dict) -> dict:
        if self.config.scorer == "transformers":
            from shortlvlm_vllm.evaluation.reference import score_with_transformers

            return score_with_transformers(checkpoint, benchmark, out, model_name=arm.name, source=bench.get("data"),
                                           limit=bench.get("limit"), seed=bench.get("seed", 0),
                                           batch_size=self.config.batch_size)
        from shortlvlm_vllm.evaluation.client import ClientConfig, run_benchmark

        with self.servers(arm, checkpoint, out.parent, "server", server_kwargs) as endpoints:
            return run_benchmark(endpoints, benchmark, out, source=bench.get("data"), limit=bench.get("limit"),
                                 seed=bench.get("seed", 0), config=ClientConfig(**self.config.client))

    @contextlib.contextmanager
    def servers(self, arm: Arm, checkpoint: Path, log_dir: Path, log_stem: str, server_kwargs: dict):
        """The arm's `replicas` vLLM servers, each on its own GPUs or CPU cores; yields their endpoints."""
        from shortlvlm_vllm.evaluation.client import Endpoint
        from shortlvlm_vllm.serving.launcher import VLLMServer

        replicas = self.config.replicas
        with contextlib.ExitStack() as stack:
            endpoints = []
            for replica in range(replicas):
                log_name = f"{log_stem}.log" if replicas == 1 else f"{log_stem}-{replica}.log"
                server = stack.enter_context(VLLMServer(
                    checkpoint, log_path=log_dir / log_name, served_model_name=arm.name, replica=replica,
                    replicas=replicas, **server_kwargs))
                endpoints.append(Endpoint(server.base_url, arm.name, server.api_key))
            yield endpoints

    def _check_units(self, units: list[tuple[str, str, bool]]) -> None:
        """Every arm is scored on the same units in the same order (OUT/units.json), or paired tests mean nothing."""
        path = self.out / UNITS_NAME
        entry = {"ids_sha256": _ids_key(units), "ids": [u for u, _, _ in units], "groups": [g for _, g, _ in units]}
        if not path.is_file():
            write_atomic(path, json.dumps(entry) + "\n")
        elif json.loads(path.read_text())["ids_sha256"] != entry["ids_sha256"]:
            raise ShortLVLMError(f"{self.out} holds arms scored on other questions (another benchmark, limit or seed):"
                                 " measure into a new directory.")

    def throughput_key(self, arm: Arm, checkpoint: Path, config: dict, visual_tokens: int | None) -> str:
        """Which throughput measurement the arm shares: its serving shape, or the arm itself (`per: arm`)."""
        if self.config.throughput["per"] == "arm":
            return arm.slug
        from shortlvlm_vllm.serving.vllm_plugin import side_path

        shape = f"{_num_layers(config)}-layers"
        if arm.quantize != "none":
            shape += f"+{arm.quantize}"
        if visual_tokens is not None:
            shape += f"+tokens-{visual_tokens}"
        if side_path.side_path_spec(config.get("short_lvlm")):
            shape += "+side-paths"
        return shape

    def measure_throughput(self, results: list[dict]) -> dict[str, dict]:
        """Each throughput key's rounds, interleaved: round r of every key before round r + 1 of any; a round is one
        server start, one warm-up request and one replay of the workload. Key -> the spread of each figure."""
        from shortlvlm_vllm.evaluation.statistics import Spread
        from shortlvlm_vllm.evaluation.throughput import requests_from_items, run_throughput

        speed = dict(self.config.throughput)
        repeats, _ = int(speed.pop("repeats")), speed.pop("per")
        bench = dict(self.config.benchmark)
        representative: dict[str, dict] = {}
        for result in results:
            representative.setdefault(result["throughput_key"], result)
        workload = None
        for round_ in range(repeats):
            for key, result in representative.items():
                path = self.out / "throughput" / _slug(key) / f"round-{round_}.json"
                if path.is_file():
                    continue
                if workload is None:
                    workload = requests_from_items(
                        self.benchmark.load(bench.get("data"), speed["num_prompts"], bench.get("seed", 0)))
                arm = arm_of(result)
                checkpoint = self.checkpoint(arm)
                kwargs, _ = self.server_kwargs(arm, checkpoint)
                log.info("throughput round %d/%d: %s (%s)", round_ + 1, repeats, key, arm.name)
                with self.servers(arm, checkpoint, path.parent, path.stem, kwargs) as endpoints:
                    measured = run_throughput(endpoints, workload,
                                              **{k: v for k, v in speed.items() if k != "num_prompts"})
                write_atomic(path, json.dumps({"arm": arm.name, **measured.to_dict()}, indent=1) + "\n")
        summaries = {}
        for key in representative if repeats else ():
            rounds = [json.loads((self.out / "throughput" / _slug(key) / f"round-{r}.json").read_text())
                      for r in range(repeats)]
            summaries[key] = {"key": key, "measured_on": rounds[0]["arm"], "rounds": repeats,
                              "servers": rounds[0].get("servers", 1),
                              **{figure: Spread(tuple(float(r[figure]) for r in rounds)).as_dict()
                                 for figure in ("output_throughput", "request_throughput", "median_ttft_ms",
                                                "median_tpot_ms")}}
        return summaries

    def checkpoint_name(self, checkpoint: Path) -> str:
        """How results name a checkpoint: the model as the config names it, or its path relative to the results."""
        return self.config.model if checkpoint == self.source() else portable_name(checkpoint, self.out)

    def server_kwargs(self, arm: Arm, checkpoint: Path) -> tuple[dict, int | None]:
        """The arm's VLLMServer arguments (with the visual-token budget as --hf-overrides, and what the class that
        serves it needs besides) and its K (None: all)."""
        from shortlvlm_vllm.serving.visual_tokens import fraction_token_count
        from shortlvlm_vllm.serving.vllm_plugin import budget_overrides, serving_args

        kwargs = dict(self.config.server)
        if arm.token_fraction == 1:
            return kwargs, None
        config = json.loads((checkpoint / "config.json").read_text())
        budget = arm.visual_tokens(fraction_token_count(checkpoint, config))
        overrides = budget_overrides(config, budget, arm.token_selection)
        # the served class's own arguments first: vLLM takes an option's last value, so the config's extra_args win
        kwargs["extra_args"] = [*serving_args({**config, **overrides}), *kwargs.get("extra_args", []),
                                "--hf-overrides", json.dumps(overrides)]
        return kwargs, budget


def arm_of(result: dict) -> Arm:
    return Arm(**{name: result[name] for name in Arm.__dataclass_fields__})


def _gap_summary(record: dict) -> dict | None:
    gap = record.get("feature_gap")
    return None if not gap else {key: gap[key] for key in gap if key.startswith("mean_")}


def _ids_key(units: list[tuple[str, str, bool]]) -> str:
    return hashlib.sha256("\n".join(u for u, _, _ in units).encode()).hexdigest()[:16]


def weights_sha256(checkpoint: Path) -> str:
    """sha256 over the checkpoint's weight files in name order: two arms with the same bytes answer alike."""
    digest = hashlib.sha256()
    for path in sorted(checkpoint.glob("*.safetensors")):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _num_layers(config: dict) -> int | None:
    text = config.get("text_config", config)
    return text.get("num_hidden_layers")
