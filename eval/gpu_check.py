"""The GPU check (issue 16): the registered classes on the CUDA build of vLLM, eager and compiled (CUDA graphs),
against the transformers reference, and the served speed-up of 30% layer pruning on a 7B-shaped model.

    eval/gpu_check.sh [OUT_DIR]                         # setup (CUDA flavour), then this script; about 10 minutes
    .venv/bin/python eval/gpu_check.py --dry-run -o DIR # on a machine without a GPU: builds and references only

1. Tiny checkpoints (seconds): stock LLaVA; a visual-token budget of 16 of 64; SCP side paths (dense, 5 of 8 layers
   kept); W4A16 (round-to-nearest, llm-compressor) pruned with SCP kept as side paths.
2. Each served twice at once on the one GPU (8 servers, a small fixed KV cache each): --enforce-eager, and compiled
   (torch.compile + CUDA graphs, vLLM's default on a GPU). Greedy 8 tokens on 4 image prompts, compared with the
   transformers reference by vLLM's rule (equal, or at the first divergence each side's token in the other's top 5).
3. Meanwhile, on the CPU, a random-weight LLaVA-1.5-7B-shaped checkpoint is written (bfloat16, 14 GB) and pruned by
   surgery to 22 of 32 layers; then the full and the pruned model are served one after the other, compiled, and
   replay the same 64 requests (concurrency 32, 64 tokens each). The output-throughput ratio is set against the ideal
   32/22 = 1.455.
Results: OUT/results.json (and each server's log). Never in CI: it needs a GPU and the registry.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the shared transformers references live in tests/

from shortlvlm_vllm.checkpoint.reader import open_checkpoint  # noqa: E402
from shortlvlm_vllm.checkpoint.surgery import layer_renumbering, write_pruned_checkpoint  # noqa: E402
from shortlvlm_vllm.cli import main as shortlvlm  # noqa: E402
from shortlvlm_vllm.data.calibration import CalibrationSource  # noqa: E402
from shortlvlm_vllm.evaluation.throughput import replay_on_servers, synthetic_requests  # noqa: E402
from shortlvlm_vllm.prune.compensate import CompensationSettings  # noqa: E402
from shortlvlm_vllm.prune.pipeline import plan_pruning, write_plan  # noqa: E402
from shortlvlm_vllm.prune.recipe import PruneRecipe  # noqa: E402
from shortlvlm_vllm.quantize.dequantize import dequantized_copy  # noqa: E402
from shortlvlm_vllm.quantize.driver import QuantizeRecipe, quantize_checkpoint  # noqa: E402
from shortlvlm_vllm.serving.launcher import VLLMServer  # noqa: E402
from shortlvlm_vllm.tiny_models import (  # noqa: E402
    build_byte_tokenizer,
    build_tiny_llava,
    llava_config,
    llava_processor,
    write_random_llava,
)
from tests.conftest import random_image  # noqa: E402
from tests.serving_reference import agrees, reference_generate, served_answers, with_side_paths  # noqa: E402

log = logging.getLogger("gpu_check")
QUESTIONS = ["What is in the image?", "Describe the colours.", "Is there a square? Answer yes or no.",
             "How many shapes are there?"]
PROMPTS = [(random_image(seed), question) for seed, question in enumerate(QUESTIONS)]
NEW_TOKENS = 8
BUDGET = 16
MODES = {"eager": True, "compiled": False}  # enforce_eager
# Eight servers share the GPU: each takes a small share and a fixed KV cache (no memory profiling to race on).
TINY_SERVER_ARGS = ["--limit-mm-per-prompt", '{"image": 1}', "--gpu-memory-utilization", "0.05",
                    "--kv-cache-memory-bytes", str(1 << 30)]
LLAVA_7B = dict(num_layers=32, hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32,
                vocab_size=32064, vision_hidden_size=1024, vision_intermediate_size=4096, vision_heads=16,
                vision_layers=24, image_size=336, patch_size=14, initializer_range=0.02)
DROPPED_7B = list(range(16, 26))  # 10 of 32 layers; which ones does not matter for speed


def build_tiny_checkpoints(work: Path) -> dict[str, dict]:
    """name -> {path, dtype, reference: [(prompt length, greedy tokens, top-5 ids)] per prompt}."""
    stock = build_tiny_llava(work / "stock")
    src = open_checkpoint(stock)
    calibration = CalibrationSource("synthetic", num_samples=24, heldout=0)

    recipe = PruneRecipe(compensation=CompensationSettings("none"), visual_tokens=BUDGET)
    visual_tokens = write_plan(src, work / "visual-tokens", recipe, plan_pruning(src, recipe, "cpu"))

    recipe = PruneRecipe(drop_layers=[1, 4, 6], compensation=CompensationSettings(rank=16), calibration=calibration)
    plan = plan_pruning(src, recipe, "cpu")
    edits = plan.compensation.side_paths(src, layer_renumbering(src.num_layers, plan.pruned))
    side_paths = write_pruned_checkpoint(src, work / "side-paths", plan.pruned, edits.record, added=edits.added,
                                         architectures=edits.architectures)

    small = build_tiny_llava(work / "stock-4", num_layers=4)
    quantized = quantize_checkpoint(small, work / "w4a16", QuantizeRecipe(method="rtn"))
    w4a16 = work / "w4a16-tis-scp"
    assert shortlvlm(["prune", str(quantized), "--ratio", "0.25", "--calib", "synthetic", "--num-samples", "16",
                      "--heldout", "0", "--rank", "8", "--device", "cpu", "-o", str(w4a16)]) == 0

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    def references(path: Path, model, budget: int | None = None) -> list:
        processor = AutoProcessor.from_pretrained(path)
        return [reference_generate(model, processor, image, question, budget, NEW_TOKENS)
                for image, question in PROMPTS]

    def stock_model(path: Path):
        return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()

    with dequantized_copy(open_checkpoint(w4a16)) as dense:
        w4a16_reference = references(w4a16, with_side_paths(dense.path, torch.bfloat16))
    return {
        "stock": {"path": stock, "dtype": "float32", "reference": references(stock, stock_model(stock))},
        "visual-tokens": {"path": visual_tokens, "dtype": "float32",
                          "reference": references(visual_tokens, stock_model(visual_tokens), BUDGET)},
        "side-paths": {"path": side_paths, "dtype": "float32",
                       "reference": references(side_paths, with_side_paths(side_paths))},
        # vLLM's W4A16 kernels compute in 16 bits: the reference is the dequantized model in bfloat16
        "w4a16": {"path": w4a16, "dtype": "bfloat16", "reference": w4a16_reference},
    }


def compare(answers, reference) -> dict:
    exact, diverged = 0, []
    for i, ((prompt_tokens, tokens, top), (length, ref_tokens, ref_top)) in enumerate(
            zip(answers, reference, strict=True)):
        assert prompt_tokens == length, f"prompt {i}: {prompt_tokens} tokens served, {length} in the reference"
        if agrees(tokens, top, ref_tokens, ref_top):
            exact += 1
        else:
            diverged.append(i)
    return {"prompts": len(answers), "exact": exact, "diverged_within_top5": diverged}


def serve_tiny(checkpoints: dict[str, dict], out: Path) -> dict:
    """Every checkpoint in both modes, all servers at once; a failure is recorded, not raised."""
    servers = {(name, mode): VLLMServer(spec["path"], log_path=out / f"server-{name}-{mode}.log",
                                        dtype=spec["dtype"], served_model_name="m", enforce_eager=eager,
                                        max_model_len=512, startup_timeout=480, extra_args=TINY_SERVER_ARGS)
               for name, spec in checkpoints.items() for mode, eager in MODES.items()}
    results: dict = {}
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
        futures = {key: pool.submit(server.start) for key, server in servers.items()}
        for key, future in futures.items():
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - the check reports every server, whatever failed
                results[f"{key[0]}/{key[1]}"] = {"error": str(exc)[-3000:]}
    log.info("tiny servers up after %.0f s", time.perf_counter() - started)
    try:
        for (name, mode), server in servers.items():
            key = f"{name}/{mode}"
            if key in results:
                continue
            try:
                answers = served_answers(server.base_url, server.api_key, "m", PROMPTS, NEW_TOKENS)
                results[key] = compare(answers, checkpoints[name]["reference"])
            except Exception as exc:  # noqa: BLE001
                results[key] = {"error": repr(exc)[-3000:]}
            server_log = server.log_tail(100_000)
            results[key]["cuda_graphs_captured"] = "Graph capturing finished" in server_log
    finally:
        for server in servers.values():
            server.stop()
    return results


def write_7b(work: Path) -> tuple[Path, Path]:
    tokenizer = build_byte_tokenizer(LLAVA_7B["vocab_size"])
    config = llava_config(tokenizer, **LLAVA_7B)
    full = write_random_llava(config, llava_processor(tokenizer, config), work / "llava-7b-shaped")
    pruned = write_pruned_checkpoint(open_checkpoint(full), work / "llava-7b-shaped-pruned", DROPPED_7B,
                                     {"method": "explicit", "ratio": 0.3})
    return full, pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--dry-run", action="store_true", help="build the checkpoints and references, serve nothing")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.output.mkdir(parents=True, exist_ok=True)
    summary: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not args.dry_run:
        import vllm

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run eval/gpu_check.sh on a machine with an NVIDIA GPU (or --dry-run).")
        summary |= {"gpu": torch.cuda.get_device_name(0), "vllm": vllm.__version__, "torch": torch.__version__}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        big: dict = {}

        def write_big() -> None:
            try:
                big["full"], big["pruned"] = write_7b(work)
            except Exception as exc:  # noqa: BLE001 - reported after the tiny checks
                big["error"] = repr(exc)

        writer = threading.Thread(target=write_big, daemon=True)
        if not (args.dry_run or args.skip_throughput):
            writer.start()  # on the CPU while the tiny servers use the GPU
        checkpoints = build_tiny_checkpoints(work)
        summary["built_s"] = round(time.perf_counter() - started, 1)
        if args.dry_run:
            summary["references"] = {name: spec["reference"] for name, spec in checkpoints.items()}
        else:
            summary["tiny"] = serve_tiny(checkpoints, args.output)
        summary["tiny_done_s"] = round(time.perf_counter() - started, 1)
        if not (args.dry_run or args.skip_throughput):
            writer.join()
            if "error" in big:
                raise SystemExit(f"writing the 7B-shaped checkpoint failed: {big['error']}")
            summary["written_7b_s"] = round(time.perf_counter() - started, 1)
            results = replay_on_servers(
                {"full": big["full"], "pruned": big["pruned"]}, synthetic_requests(64, image_size=336), args.output,
                server_kwargs={"max_model_len": 2048, "enforce_eager": False, "startup_timeout": 600,
                               "extra_args": ["--limit-mm-per-prompt", '{"image": 1}']},
                output_len=64, concurrency=32)
            ideal = 32 / (32 - len(DROPPED_7B))
            ratio = results["pruned"]["output_throughput"] / results["full"]["output_throughput"]
            summary["throughput_7b"] = {"ideal_ratio": round(ideal, 4), "output_throughput_ratio": round(ratio, 4),
                                        "fraction_of_ideal": round(ratio / ideal, 4), "results": results}
    summary["total_s"] = round(time.perf_counter() - started, 1)
    (args.output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "references"}, indent=2))


if __name__ == "__main__":
    main()
