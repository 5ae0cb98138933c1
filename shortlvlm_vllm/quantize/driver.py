"""Weight-only quantization (W4A16, compressed-tensors) of a vision-language checkpoint, pruned or not: every linear
weight of the decoder layers, nothing of the vision side (the architecture's adapter says which modules those are).

llm-compressor cannot be installed beside vLLM (their compressed-tensors and transformers pins
exclude each other), so the quantization pass runs in a second environment, `.venv-quant`, made by
setup.sh: this module checks everything it can up front, runs shortlvlm_vllm.quantize.worker there
as a subprocess (streaming its log lines), then renames the tensors llm-compressor wrote to the
source's own key names (the hub layout vLLM loads) and writes them with the side files, the `short_lvlm`
record and its model card through the checkpoint writer, atomically: on failure nothing is left at the output.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from shortlvlm_vllm import __version__
from shortlvlm_vllm.checkpoint.model_card import render_model_card, short_lvlm_section
from shortlvlm_vllm.checkpoint.reader import SourceCheckpoint, open_checkpoint
from shortlvlm_vllm.checkpoint.safetensors_io import OutputTensor, TensorInfo, read_header
from shortlvlm_vllm.checkpoint.writer import INDEX_NAME, Shard, check_checkpoint_output, write_checkpoint
from shortlvlm_vllm.data.calibration import CalibrationSource
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.quantize.worker import ERROR_MARKER, RESULT_NAME

log = logging.getLogger(__name__)
worker_log = logging.getLogger("shortlvlm_vllm.quantize.worker")

METHODS = ("gptq", "awq", "rtn")
SCHEMES = ("W4A16",)
# Group sizes that both vLLM's GPU (Marlin) and CPU W4A16 kernels take.
GROUP_SIZES = (32, 64, 128)
QUANT_PYTHON_ENV = "SHORTLVLM_QUANT_PYTHON"
QUANT_VENV = ".venv-quant"
# vLLM's CPU W4A16 kernel (CPUWNA16) takes only matrices whose two dimensions are multiples of 32.
KERNEL_MULTIPLE = 32
RECIPE_NAME = "recipe.yaml"
# The tensors compressed-tensors writes in place of a quantized `weight`.
_QUANTIZED_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
_QUANTIZED_KEY = re.compile(r"^(.+)\.(" + "|".join(_QUANTIZED_SUFFIXES) + r")$")


@dataclass
class QuantizeRecipe:
    """How to quantize; `calibration` is used by gptq and awq, never by rtn (data-free)."""

    method: str = "gptq"
    scheme: str = "W4A16"
    group_size: int = 128
    calibration: CalibrationSource | None = None


def check_quantize_recipe(recipe: QuantizeRecipe) -> None:
    if recipe.method not in METHODS:
        raise ShortLVLMError(f"unknown quantization method {recipe.method!r}; choose from {', '.join(METHODS)}.")
    if recipe.scheme not in SCHEMES:
        raise ShortLVLMError(
            f"unsupported quantization scheme {recipe.scheme!r}; supported: {', '.join(SCHEMES)} "
            f"(4-bit weights, 16-bit activations)."
        )
    if recipe.group_size not in GROUP_SIZES:
        raise ShortLVLMError(
            f"unsupported group size {recipe.group_size}; choose from {', '.join(map(str, GROUP_SIZES))}."
        )
    if recipe.method != "rtn" and recipe.calibration is None:
        raise ShortLVLMError(f"{recipe.method} needs calibration data: pass --calib (e.g. synthetic).")
    if recipe.calibration is not None and recipe.calibration.num_samples < 1:
        raise ShortLVLMError(f"--num-samples must be at least 1, not {recipe.calibration.num_samples}.")


def quantized_weight_keys(src: SourceCheckpoint) -> list[str]:
    """The decoder layers' linear (2-D) weights: what gets quantized (vision side, lm_head and norms stay)."""
    return [t.name for t in src.tensors()
            if src.adapter.match_layer_key(t.name) and t.name.endswith(".weight") and len(t.shape) == 2]


def check_quantizable(src: SourceCheckpoint, group_size: int) -> None:
    """Fail before the long pass on shapes vLLM's W4A16 kernels or the group size cannot take."""
    if "quantization_config" in src.config:
        method = src.config["quantization_config"].get("quant_method", "unknown")
        raise ShortLVLMError(
            f"{src.name} is already quantized ({method}); quantize the full-precision checkpoint instead."
        )
    for key in quantized_weight_keys(src):
        out_features, in_features = src.tensor_info(key).shape
        if out_features % KERNEL_MULTIPLE or in_features % KERNEL_MULTIPLE:
            raise ShortLVLMError(
                f"{src.name}: {key} is {out_features} x {in_features}; vLLM's W4A16 CPU kernel needs both "
                f"dimensions to be multiples of {KERNEL_MULTIPLE}. This model cannot be served quantized "
                f"on CPU; serve it unquantized."
            )
        if in_features % group_size:
            fits = [g for g in GROUP_SIZES if in_features % g == 0]
            raise ShortLVLMError(
                f"{src.name}: {key} has {in_features} input features, not a multiple of the group size "
                f"{group_size}; pass --group-size {max(fits)}."
            )


def quant_python() -> Path:
    """The quantization environment's python: $SHORTLVLM_QUANT_PYTHON, else the project's .venv-quant."""
    override = os.environ.get(QUANT_PYTHON_ENV)
    if override:
        python = Path(override).expanduser()
        if not (python.is_file() and os.access(python, os.X_OK)):
            raise ShortLVLMError(f"{QUANT_PYTHON_ENV}={override} is not an executable file.")
        return python
    venv = Path(__file__).resolve().parents[2] / QUANT_VENV  # beside the package, where setup.sh makes it
    python = venv / "bin" / "python"
    if not python.is_file():
        raise ShortLVLMError(
            f"the quantization environment {venv} is missing (llm-compressor cannot share vLLM's "
            f"environment). Run `bash setup.sh` (or `make setup`) in {venv.parent} to create it, or set "
            f"{QUANT_PYTHON_ENV} to a python that has llmcompressor 0.14 and this project installed."
        )
    return python


def quantize_checkpoint(
    source: str | Path,
    dst: str | Path,
    recipe: QuantizeRecipe,
    *,
    revision: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a compressed-tensors W4A16 copy of `source` to `dst` (atomically) and return `dst`."""
    check_quantize_recipe(recipe)
    src = open_checkpoint(source, revision)
    dst = check_checkpoint_output(dst, overwrite, src.protected)
    check_quantizable(src, recipe.group_size)
    python = quant_python()
    if any(src.tensor_info(key).dtype == "F32" for key in quantized_weight_keys(src)):
        log.warning("the source is float32: vLLM's CPU W4A16 kernel computes in bfloat16 or float16 only, so serve "
                    "the result with --dtype bfloat16 on a machine without a GPU")
    if recipe.method == "rtn" and recipe.calibration is not None:
        log.warning("rtn is data-free: the calibration data (%s) is not used", recipe.calibration.source)
    calibration = None
    if recipe.method != "rtn":
        calibration = asdict(recipe.calibration)
        for unused in ("heldout", "batch_size"):  # settings of the prune's calibration pass
            del calibration[unused]

    dst.parent.mkdir(parents=True, exist_ok=True)
    # llm-compressor's own output goes beside the destination (same disk), and is gone once renamed into it.
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.llmcompressor-", dir=dst.parent) as raw_parent:
        raw = Path(raw_parent) / "out"
        spec = {"source": str(src.path.absolute()), "output": str(raw), "method": recipe.method,
                "scheme": recipe.scheme, "group_size": recipe.group_size, "calibration": calibration}
        _run_worker(python, spec)
        result = json.loads((raw / RESULT_NAME).read_text())
        used = result.pop("num_calibration_samples")
        record = {"method": recipe.method, "scheme": recipe.scheme, "group_size": recipe.group_size,
                  "format": "compressed-tensors", "source": src.name, "source_revision": src.revision,
                  "calibration": calibration and {**calibration, "num_samples": used},
                  "recipe": RECIPE_NAME, "tool_version": __version__, **result}
        return _write_output(src, raw, dst, record, overwrite)


def _run_worker(python: Path, spec: dict) -> None:
    """Run the worker, passing its output lines on as log records; its failure becomes a ShortLVLMError."""
    cmd = [str(python), "-m", "shortlvlm_vllm.quantize.worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="5")
    log.info("running the quantization pass in %s", python)
    tail: collections.deque[str] = collections.deque(maxlen=30)
    error = None
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        for line in _lines(process.stdout):
            if line.startswith(ERROR_MARKER):
                error = json.loads(line[len(ERROR_MARKER):])
                continue
            worker_log.info("%s", line)
            tail.append(line)
        code = process.wait()
    finally:
        if process.poll() is None:  # interrupted: do not leave the pass running
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    if code == 0:
        return
    if error:
        raise ShortLVLMError(error)
    if "No module named 'shortlvlm_vllm'" in "\n".join(tail):
        raise ShortLVLMError(
            f"{python} cannot import this project. Run `bash setup.sh` (or `make setup`), which installs it "
            f"into {QUANT_VENV}, or install it into that environment with `pip install --no-deps -e .`."
        )
    how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"failed with exit code {code}"
    hint = " (out of memory?)" if code == -signal.SIGKILL else ""
    raise ShortLVLMError(
        f"the quantization pass {how}{hint}; nothing was written. Its last lines:\n" + "\n".join(tail)
    )


def _lines(stream) -> Iterator[str]:
    """Lines of a byte stream, where progress bars' carriage returns also end a line."""
    pending = b""
    while chunk := stream.read1(1 << 16):
        *complete, pending = re.split(rb"[\r\n]", pending + chunk)
        for raw in complete:
            if line := raw.decode(errors="replace").rstrip():
                yield line
    if line := pending.decode(errors="replace").rstrip():
        yield line


def _write_output(src: SourceCheckpoint, raw: Path, dst: Path, record: dict, overwrite: bool) -> Path:
    """llm-compressor's checkpoint in `raw`, renamed to the source's key names, with side files, written to `dst`."""
    config = json.loads((raw / "config.json").read_text())
    quantization = config.get("quantization_config")
    if not quantization:
        raise ShortLVLMError(f"llm-compressor wrote no quantization_config to {raw / 'config.json'}.")
    index = raw / INDEX_NAME
    shard_files = (list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                   else sorted(p.name for p in raw.glob("*.safetensors")))
    headers = [read_header(raw / name) for name in shard_files]
    renames = _source_names(src, [t for header in headers for t in header.tensors.values()])
    shards = [Shard([OutputTensor(renames[t.name], copy_from=t) for t in header.tensors.values()], header.metadata)
              for header in headers]
    # tensors the model recomputes and so did not save (the adapter's saved_buffers) come from the source
    written_names = set(renames.values())
    buffers = [OutputTensor(t.name, copy_from=t) for t in src.tensors()
               if t.name.endswith(src.adapter.saved_buffers) and t.name not in written_names]
    if buffers:
        shards[-1] = Shard([*shards[-1].tensors, *buffers], shards[-1].metadata)

    source = {t.name: t for t in src.tensors()}
    quantization["ignore"] = [_module_name(src, source, name) for name in quantization.get("ignore", [])]
    written = copy.deepcopy(src.config)
    written["quantization_config"] = quantization
    # A pruned source keeps its pruning record; the quantization is added beside it.
    section = copy.deepcopy(src.config.get("short_lvlm") or short_lvlm_section(src.name, src.revision, {}))
    section["quantization"] = record
    written["short_lvlm"] = section
    return write_checkpoint(dst, shards, written, side_files_from=src.path,
                            extra_files={RECIPE_NAME: (raw / RECIPE_NAME).read_bytes()},
                            model_card=render_model_card(section), overwrite=overwrite, sources=src.protected)


def _source_names(src: SourceCheckpoint, written: list[TensorInfo]) -> dict[str, str]:
    """Each tensor llm-compressor wrote -> its name in the source's layout; checks nothing is lost or added."""
    source = {t.name: t for t in src.tensors()}
    quantizable = set(quantized_weight_keys(src))
    renames, covered = {}, set()
    for info in written:
        m = _QUANTIZED_KEY.match(info.name)
        weight = _source_key(src, source, f"{m[1]}.weight" if m else info.name)
        if weight is None:
            raise ShortLVLMError(f"llm-compressor wrote a tensor {info.name} that the source {src.name} lacks.")
        if m:
            if weight not in quantizable:
                raise ShortLVLMError(f"llm-compressor quantized {weight}, which must stay unquantized.")
            renames[info.name] = f"{weight.removesuffix('weight')}{m[2]}"
        else:
            expected = source[weight]
            if (info.dtype, info.shape) != (expected.dtype, expected.shape):
                raise ShortLVLMError(
                    f"llm-compressor wrote {info.name} as {info.dtype} {info.shape}; the source has "
                    f"{expected.dtype} {expected.shape}."
                )
            renames[info.name] = weight
        covered.add(weight)
    missing = sorted(name for name in set(source) - covered if not name.endswith(src.adapter.saved_buffers))
    if missing:
        raise ShortLVLMError(f"llm-compressor's output lacks {len(missing)} source tensors, e.g. {missing[0]}.")
    return renames


def _source_key(src: SourceCheckpoint, source: dict, name: str) -> str | None:
    """`name` as the source calls it: the same, or mapped from transformers' in-memory names to the hub layout."""
    if name in source:
        return name
    hub = src.adapter.hub_key(name)
    return hub if hub in source else None


def _module_name(src: SourceCheckpoint, source: dict, name: str) -> str:
    """An ignore-list entry in the source's names; patterns ("re:...") and unknown names stay as written."""
    if name.startswith("re:"):
        return name
    key = _source_key(src, source, f"{name}.weight")
    return key.removesuffix(".weight") if key else name
