"""The quantization pass, run inside the quantization environment (`.venv-quant`).

llm-compressor pins compressed-tensors and transformers versions that vLLM's own pins exclude, so
it lives in a second environment and `shortlvlm quantize` runs this module there as a subprocess:

    .venv-quant/bin/python -m shortlvlm_vllm.quantize.worker '{"source": ..., "output": ...}'

It loads the source model, runs llm-compressor's `oneshot` with the chosen modifier (calibration
batches built here, with images, through the model's own processor and chat template) and saves
the compressed-tensors checkpoint to `output`. Renaming keys to the source's layout, side files
and the final atomic write happen in the main environment (shortlvlm_vllm.quantize.driver). This module
must not import vLLM. A problem with the user's input ends with one line, ERROR_MARKER followed by
the message as a JSON string, and exit code 2; the parent shows that message as the error.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

from shortlvlm_vllm.errors import ShortLVLMError

log = logging.getLogger("shortlvlm_vllm.quantize.worker")

ERROR_MARKER = "SHORTLVLM_WORKER_ERROR: "
RESULT_NAME = "worker_result.json"
MAX_SHARD_SIZE = "5GB"


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if len(argv) != 1:
        log.error("%s%s", ERROR_MARKER, json.dumps("usage: python -m shortlvlm_vllm.quantize.worker SPEC_JSON"))
        return 2
    try:
        run(json.loads(argv[0]))
    except ShortLVLMError as exc:
        log.error("%s%s", ERROR_MARKER, json.dumps(str(exc)))  # one line, whatever the message holds
        return 2
    return 0


def run(spec: dict) -> None:
    """Quantize spec["source"] into spec["output"] (a directory that must not exist yet)."""
    started = time.monotonic()
    samples = None
    if spec["calibration"] is not None:  # first: a bad calibration source fails before the heavy imports
        from shortlvlm_vllm.data.calibration import CalibrationSource

        source = CalibrationSource(**spec["calibration"])
        samples = source.load(source.num_samples)
    llmcompressor = _import_llmcompressor()
    import compressed_tensors
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from shortlvlm_vllm.adapters import adapter_for_config
    from shortlvlm_vllm.models import register_with_transformers

    source, output = Path(spec["source"]), Path(spec["output"])
    adapter = adapter_for_config(json.loads((source / "config.json").read_text()), str(source))
    log.info("loading %s with transformers %s", source, transformers.__version__)
    register_with_transformers()
    processor = AutoProcessor.from_pretrained(source)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype="auto").eval()
    layer_class = type(adapter.decoder_layers(model)[0]).__name__

    loader = None if samples is None else _calibration_loader(processor, samples)
    num_samples = 0 if loader is None else len(loader)
    recipe = _recipe(spec["method"], spec["scheme"], spec["group_size"], adapter)
    if spec["method"] == "awq" and not torch.accelerator.is_available():
        _skip_memory_pinning()

    log.info("running %s %s (group size %d) with llm-compressor %s on %d calibration samples",
             spec["method"], spec["scheme"], spec["group_size"], llmcompressor.__version__, num_samples)
    llmcompressor.oneshot(
        model=model, processor=processor, recipe=recipe, dataset=loader, sequential_targets=[layer_class],
    )
    log.info("saving the compressed checkpoint")
    # transformers warns about llm-compressor's CPU offloading wrappers; the shards are small enough.
    warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
    model.save_pretrained(output, save_compressed=True, max_shard_size=MAX_SHARD_SIZE)
    result = {
        "llmcompressor_version": llmcompressor.__version__,
        "compressed_tensors_version": compressed_tensors.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "num_calibration_samples": num_samples,
        "seconds": round(time.monotonic() - started, 1),
    }
    (output / RESULT_NAME).write_text(json.dumps(result, indent=2) + "\n")
    log.info("quantization done in %.0f s", result["seconds"])


def _import_llmcompressor():
    try:
        import llmcompressor
        from loguru import logger
    except ImportError as exc:
        raise ShortLVLMError(
            f"llm-compressor cannot be imported in {sys.executable} ({exc}). Run `bash setup.sh` (or "
            f"`make setup`) to create the quantization environment .venv-quant, or point "
            f"SHORTLVLM_QUANT_PYTHON at a python that has llmcompressor 0.14 and this project installed."
        ) from exc
    # One plain line per message: the parent process adds its own timestamps.
    logger.remove()
    logger.add(sys.stderr, level="INFO", format="llm-compressor {level}: {message}")
    return llmcompressor


def _calibration_loader(processor, samples: list):
    """Batches of one (prompt + reference answer, image) as the model's forward takes them."""
    from torch.utils.data import DataLoader

    from shortlvlm_vllm.data.calibration import calibration_inputs

    batches = []
    for sample in samples:
        try:
            batches.append(dict(calibration_inputs(processor, sample)))
        except ValueError as exc:  # the processor's complaints about prompt and image
            raise ShortLVLMError(f"calibration sample {sample.id}: {exc}; check the chat template.") from None
    log.info("built %d calibration batches", len(batches))
    # batch_size=None: the loader yields each prepared batch as it is.
    return DataLoader(batches, batch_size=None, shuffle=False)


def _recipe(method: str, scheme: str, group_size: int, adapter) -> list:
    """The llm-compressor modifiers for `method`: everything but the decoder layers stays unquantized (the
    adapter's ignore list), and AWQ smooths only inside them (the adapter's mappings)."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    groups = preset_name_to_scheme(scheme, ["Linear"])
    groups.weights = groups.weights.model_copy(update={"group_size": group_size})
    config = {"config_groups": {"group_0": groups}, "ignore": list(adapter.quantization_ignore)}
    if method == "gptq":
        return [GPTQModifier(**config)]
    if method == "rtn":
        return [QuantizationModifier(**config)]
    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier

        inside = f"re:{adapter.decoder_module_regex}.*"
        mappings = [AWQMapping(f"{inside}{smooth}$", [f"{inside}{name}$" for name in balanced])
                    for smooth, balanced in adapter.awq_mappings]
        return [AWQModifier(mappings=mappings), QuantizationModifier(**config)]
    raise ShortLVLMError(f"unknown quantization method {method!r}; use gptq, awq or rtn.")


def _skip_memory_pinning() -> None:
    """llm-compressor 0.14's AWQ pins cached activations for faster GPU copies; without a GPU torch
    cannot pin memory at all (RuntimeError: Found no NVIDIA driver), and pinning serves no purpose."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
