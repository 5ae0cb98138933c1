"""The `shortlvlm` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from shortlvlm_vllm import __version__
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.files import check_output_file, write_atomic


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of layer indices; write them comma-separated, like 3,5"
        ) from None


# prune flag -> (where in the recipe it goes, its default), the defaults read from the recipe's dataclasses
def _prune_flags() -> dict[str, tuple[str, object]]:
    from shortlvlm_vllm.data.calibration import CalibrationSource
    from shortlvlm_vllm.prune.compensate import CompensationSettings
    from shortlvlm_vllm.prune.recipe import PruneRecipe

    recipe, cal, comp = PruneRecipe(), CalibrationSource(""), CompensationSettings()
    flags = {name: (name, getattr(recipe, name)) for name in
             ("ratio", "drop_layers", "localize", "candidates", "top_p", "force", "visual_tokens", "revision")}
    flags |= {"compensate": ("compensation.method", None), "rank": ("compensation.rank", comp.rank),
              "scp_target": ("compensation.target", comp.target), "scp_pairing": ("compensation.pairing", comp.pairing),
              "scp_shared": ("compensation.shared", comp.shared), "calib": ("calibration.source", None)}
    flags |= {name: (f"calibration.{name}", getattr(cal, name)) for name in
              ("num_samples", "heldout", "image_root", "split", "image_column", "question_column", "answer_column")}
    flags["calib_batch_size"] = ("calibration.batch_size", cal.batch_size)
    flags["seed"] = ("seed", recipe.seed)  # also the calibration draw's seed
    return flags


def _add_prune(sub: argparse._SubParsersAction) -> None:
    from shortlvlm_vllm.prune.compensate import COMPENSATORS, PAIRINGS, SCP_TARGETS, SHARED_RULES
    from shortlvlm_vllm.prune.localize import LOCALIZERS
    from shortlvlm_vllm.prune.recipe import RECIPE_NAME

    defaults = {name: default for name, (_, default) in _prune_flags().items()}
    p = sub.add_parser(
        "prune",
        help="remove redundant decoder layers (Short-LVLM) and write a compensated checkpoint",
        description="Find redundant decoder layers with Token Importance Scores on calibration data, "
        "remove them, fold Subspace-Compensated Pruning into the kept layers, and write a checkpoint that "
        "stock transformers and vLLM load. With --drop-layers the layers are named instead of found. A W4A16 "
        "(compressed-tensors) source is calibrated on its dequantized weights and keeps SCP unfused, as bfloat16 side "
        f"paths that the plugin's registered model class applies. The flags build a recipe, saved as {RECIPE_NAME} "
        "in the output; --recipe replays one.",
    )

    def add(group, flag: str, help: str, **kwargs) -> None:
        name = flag.removeprefix("--").replace("-", "_")
        default = defaults[name]
        shown = "" if default in (None, False) else f" (default: {default})"
        group.add_argument(flag, help=help + shown, default=None, **kwargs)

    p.add_argument("model", nargs="?", help="source checkpoint: a local directory, a Hugging Face Hub id, or toy "
                   "(the shipped toy model); with --recipe, replaces the recipe's model")
    p.add_argument("-o", "--output", type=Path, help="directory to write (not needed with --dry-run)")
    p.add_argument("--recipe", type=Path, help=f"prune as this recipe says (a {RECIPE_NAME} that prune wrote, or "
                   "your own YAML); no other algorithm or calibration flag with it")
    what = p.add_mutually_exclusive_group()
    add(what, "--ratio", "fraction of decoder layers to remove, e.g. 0.3", type=float)
    add(what, "--drop-layers", "remove these decoder layers (0-based, original numbering), e.g. 3,5",
        type=_layer_list, metavar="I,J,...")
    cal = p.add_argument_group("calibration data")
    add(cal, "--calib", "a LLaVA conversation file (.json/.jsonl), a datasets directory or hub id, or synthetic "
        "(the project's generated VQA set)")
    add(cal, "--image-root", "directory the LLaVA file's image paths are relative to (default: the file's directory)")
    add(cal, "--num-samples", "calibration samples drawn with --seed", type=int)
    add(cal, "--heldout", "further samples, not calibrated on, to measure the pruned model's drift (0: skip)", type=int)
    add(cal, "--split", "datasets split")
    add(cal, "--image-column", "datasets column holding the image")
    add(cal, "--question-column", "datasets column holding the question")
    add(cal, "--answer-column", "datasets column holding the reference answer")
    add(cal, "--calib-batch-size", "calibration samples per forward pass, padded to the longest (more is faster on "
        "a GPU; the statistics are the same)", type=int)
    alg = p.add_argument_group("algorithm")
    add(alg, "--localize", "how to find redundant layers", choices=list(LOCALIZERS))
    add(alg, "--candidates", "layers that may be pruned, e.g. 16-31 or 3,5,10-12 (default: the second half)")
    add(alg, "--top-p", "fraction of vision+text tokens TIS keeps", type=float)
    add(alg, "--compensate", "how the removed layers are compensated (default: scp with --calib, else none)",
        choices=list(COMPENSATORS))
    add(alg, "--rank", "SCP subspace rank k", type=int)
    add(alg, "--scp-target", "which kept-layer weights absorb the compensation: the output side of down_proj "
        "(and o_proj), or the inputs (q/k/v, gate/up) with the norms' gains folded in, as the paper writes it",
        choices=list(SCP_TARGETS))
    add(alg, "--scp-pairing", "which kept layer bridges which pruned layers: the nearest (the paper), the nearest "
        "not yet used, or one bridge per run of pruned layers", choices=list(PAIRINGS))
    add(alg, "--scp-shared", "how the gaps bridged by one kept layer combine: one basis from their stacked "
        "differences, or their projections composed", choices=list(SHARED_RULES))
    add(alg, "--seed", "seed for sampling calibration data and --localize random", type=int)
    add(alg, "--force", "allow --ratio above 0.5", action="store_const", const=True)
    add(alg, "--visual-tokens", "keep K visual tokens per image (VisionZip-style, chosen before the language model); "
        "the checkpoint then names the plugin's model class. Alone, or with --ratio/--drop-layers",
        type=int, metavar="K")
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, several devices comma-separated "
                     "(cuda:0,cuda:1: the decoder layers split in contiguous groups over them), or auto (every GPU, "
                     "else the CPU) (default: %(default)s)")
    run.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                     help="calibration dtype (default: %(default)s)")
    add(run, "--revision", "hub revision (branch, tag or commit) of the source")
    run.add_argument("--dry-run", action="store_true", help="print which layers would go and why; write nothing")
    run.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_run_prune)


def prune_recipe_from_args(args: argparse.Namespace):
    """The recipe the prune flags spell (or --recipe holds); a flag beside --recipe is refused by name."""
    from shortlvlm_vllm.data.calibration import CalibrationSource
    from shortlvlm_vllm.prune.compensate import CompensationSettings
    from shortlvlm_vllm.prune.recipe import PruneRecipe, load_recipe

    flags = _prune_flags()
    given = {name: getattr(args, name) for name in flags if getattr(args, name) is not None}
    if args.recipe is not None:
        if given:
            flags_given = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ShortLVLMError(f"--recipe holds the settings: drop {flags_given}, or edit the recipe.")
        recipe = load_recipe(args.recipe)
        return recipe if args.model is None else dataclasses.replace(recipe, model=args.model)
    if args.model is None:
        raise ShortLVLMError("name the source checkpoint (MODEL), or pass --recipe.")
    value = {name: given.get(name, default) for name, (_, default) in flags.items()}
    removes_layers = value["ratio"] is not None or value["drop_layers"] is not None
    calibration = None
    if value["calib"]:
        calibration = CalibrationSource(value["calib"], **{path.removeprefix("calibration."): value[name]
                                                           for name, (path, _) in flags.items()
                                                           if path.startswith("calibration.") and name != "calib"},
                                        seed=value["seed"])
    method = value["compensate"] or ("scp" if calibration and removes_layers else "none")
    return PruneRecipe(
        model=args.model, revision=value["revision"], ratio=value["ratio"], drop_layers=value["drop_layers"],
        localize=value["localize"], candidates=value["candidates"], top_p=value["top_p"], seed=value["seed"],
        force=value["force"], compensation=CompensationSettings(method, value["rank"], value["scp_target"],
                                                                value["scp_pairing"], value["scp_shared"]),
        calibration=calibration, visual_tokens=value["visual_tokens"],
    )


def _run_prune(args: argparse.Namespace) -> int:
    from shortlvlm_vllm.checkpoint.reader import open_checkpoint
    from shortlvlm_vllm.checkpoint.writer import check_checkpoint_output
    from shortlvlm_vllm.prune.pipeline import describe_plan, plan_pruning, write_plan

    if args.output is None and not args.dry_run:
        raise ShortLVLMError("-o/--output is required (or --dry-run to only print the plan).")
    recipe = prune_recipe_from_args(args)
    src = open_checkpoint(recipe.model, recipe.revision)
    if args.output is not None and not args.dry_run:
        check_checkpoint_output(args.output, args.overwrite, src.protected)
    plan = plan_pruning(src, recipe, args.device, args.dtype)
    print(describe_plan(src, recipe, plan))
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    dst = write_plan(src, args.output, recipe, plan, overwrite=args.overwrite)
    print(f"wrote {dst}: {src.num_layers - len(plan.pruned)} of {src.num_layers} decoder layers "
          f"(removed {', '.join(map(str, plan.pruned)) or 'none'}; compensation: {recipe.compensation.method})"
          + (f"; {recipe.visual_tokens} visual tokens per image" if recipe.visual_tokens is not None else ""))
    print(f"serve it with: shortlvlm serve {dst}")
    return 0


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    from shortlvlm_vllm.quantize.driver import GROUP_SIZES, METHODS, QUANT_PYTHON_ENV, SCHEMES

    p = sub.add_parser(
        "quantize",
        help="quantize a (pruned) checkpoint's language model to 4-bit weights (W4A16) that vLLM serves",
        description="Quantize the decoder layers' weights with llm-compressor (GPTQ, AWQ or round-to-nearest) "
        "and write a compressed-tensors checkpoint in the source's layout; the vision tower, the projector and "
        "lm_head stay unquantized. GPTQ and AWQ calibrate on image + question + answer samples passed through "
        "the model's processor and chat template. Runs in the quantization environment .venv-quant made by "
        f"setup.sh (or the python named by ${QUANT_PYTHON_ENV}).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="source checkpoint (LLaVA, pruned or not): a local directory or a Hugging Face Hub id")
    p.add_argument("-o", "--output", type=Path, required=True, help="directory to write")
    p.add_argument("--method", default="gptq", choices=METHODS,
                   help="gptq and awq calibrate on data; rtn (round-to-nearest) needs none")
    p.add_argument("--scheme", default="W4A16", choices=SCHEMES, help="4-bit integer weights, 16-bit activations")
    p.add_argument("--group-size", type=int, default=128, choices=GROUP_SIZES,
                   help="input channels sharing one scale")
    cal = p.add_argument_group("calibration data (gptq, awq)")
    cal.add_argument("--calib", help="a LLaVA conversation file (.json/.jsonl), a datasets directory or hub id, or "
                     "synthetic (the project's generated VQA set; the default for gptq and awq)")
    cal.add_argument("--image-root", help="directory the LLaVA file's image paths are relative to "
                     "(default: the file's directory)")
    cal.add_argument("--num-samples", type=int, default=128, help="calibration samples drawn with --seed")
    cal.add_argument("--split", default="train", help="datasets split")
    cal.add_argument("--image-column", default="image")
    cal.add_argument("--question-column", default="question")
    cal.add_argument("--answer-column", default="answer")
    cal.add_argument("--seed", type=int, default=0, help="seed for sampling calibration data")
    run = p.add_argument_group("run")
    run.add_argument("--revision", help="hub revision (branch, tag or commit) of the source")
    run.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> int:
    from shortlvlm_vllm.data.calibration import CalibrationSource
    from shortlvlm_vllm.quantize.driver import QuantizeRecipe, quantize_checkpoint

    calibration = None
    if args.method != "rtn" or args.calib:  # rtn is data-free; quantize_checkpoint says so if --calib is given
        calibration = CalibrationSource(
            args.calib or "synthetic", args.num_samples, 0, args.seed, args.image_root, args.split,
            args.image_column, args.question_column, args.answer_column,
        )
    recipe = QuantizeRecipe(args.method, args.scheme, args.group_size, calibration)
    dst = quantize_checkpoint(args.model, args.output, recipe, revision=args.revision, overwrite=args.overwrite)
    print(f"wrote {dst}: {args.scheme} ({args.method}, group size {args.group_size}), compressed-tensors format")
    print(f"serve it with: shortlvlm serve {dst}")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint with vLLM's OpenAI-compatible server",
        description="Run vLLM's OpenAI-compatible server (the module behind `vllm serve`, which "
        "also works with the CPU build). Arguments after `--` go to vLLM unchanged.",
    )
    p.add_argument("model", help="checkpoint directory, hub id, or toy (the shipped toy model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"),
                   help="require this key from clients (default: $VLLM_API_KEY, else none)")
    p.add_argument("--max-model-len", type=int, help="maximum context length")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--served-model-name", help="model name clients use (default: the path)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="skip torch.compile and CUDA graphs (default: on without a GPU)")
    safety = p.add_argument_group("serving safely (each default is printed at start)")
    media = safety.add_mutually_exclusive_group()
    media.add_argument("--allow-media-domains", metavar="HOST,...", type=_host_list, default=(),
                       help="fetch image URLs from these hosts only, without following redirects "
                       "(default: no remote image URL is fetched; clients send images inline as data: URLs)")
    media.add_argument("--allow-remote-media", action="store_true",
                       help="fetch image URLs from any host the client names (vLLM's own default)")
    safety.add_argument("--mm-processor-cache-gb", type=float, default=None, metavar="GIB",
                        help="vLLM's multimodal processor cache (default: 0, off: vLLM's 4 GiB cache answered some "
                        "valid requests with HTTP 500 under concurrent load)")
    safety.add_argument("--insecure", action="store_true",
                        help="allow a --host beyond loopback without --api-key")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split every layer over this many GPUs (without a GPU: CPU worker processes, each bound "
                   "to its own share of the cores) (default: %(default)s)")
    p.add_argument("--pipeline-parallel-size", type=int, default=1,
                   help="split the decoder layers into this many stages, one per GPU or CPU worker "
                   "(default: %(default)s)")
    p.set_defaults(func=_run_serve)


def _host_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _run_serve(args: argparse.Namespace) -> int:
    from shortlvlm_vllm.checkpoint.hub import SHIPPED_MODELS, is_hub_id
    from shortlvlm_vllm.serving.launcher import (
        ServingPolicy,
        describe_policy,
        placement_env,
        server_command,
        server_env,
    )

    model = args.model
    if not Path(model).is_dir():
        if model in SHIPPED_MODELS:
            model = str(SHIPPED_MODELS[model])
        elif not is_hub_id(model):
            raise ShortLVLMError(f"model {model} not found: no such directory, and it is not a hub id.")
    policy = ServingPolicy(args.allow_media_domains, args.allow_remote_media, args.mm_processor_cache_gb,
                           args.insecure)
    cmd = server_command(model, host=args.host, port=args.port, api_key=args.api_key,
                         max_model_len=args.max_model_len, dtype=args.dtype,
                         served_model_name=args.served_model_name,
                         enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
                         pipeline_parallel_size=args.pipeline_parallel_size, extra_args=args.passthrough,
                         policy=policy)
    placement = placement_env(args.tensor_parallel_size * args.pipeline_parallel_size)
    print("serving with these settings:")
    print("\n".join(describe_policy(policy, args.host, args.api_key, args.passthrough)))
    shown = ["***" if i and cmd[i - 1] == "--api-key" else part for i, part in enumerate(cmd)]
    print("running:", " ".join([*(f"{name}={value}" for name, value in placement.items()), *shown]), flush=True)
    os.execvpe(cmd[0], cmd, server_env(policy, args.passthrough) | placement)
    return 0  # not reached


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="prune a model, serve full and pruned with vLLM, compare their answers",
        description="The main job end to end: prune a LLaVA checkpoint with Short-LVLM (TIS + SCP), serve the full "
        "and the pruned model with vLLM, ask both the same test questions through the openai client, and print "
        "their answers, accuracy and time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", help="source checkpoint (default: the project's toy LLaVA, shipped with the package)")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of decoder layers to remove")
    p.add_argument("--calib", default="synthetic", help="calibration source (see `shortlvlm prune --help`)")
    p.add_argument("--questions", type=int, default=100, help="test questions asked of each model")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="where checkpoints and server logs go")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from shortlvlm_vllm.demo import run_demo

    run_demo(args.model, args.workdir, args.ratio, args.calib, args.questions)
    return 0


def _add_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-tiny-llava",
        help="write a tiny random-weight LLaVA-1.5 checkpoint (offline, for tests and trials)",
    )
    p.add_argument("output", type=Path)
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run_tiny)


def _run_tiny(args: argparse.Namespace) -> int:
    from shortlvlm_vllm.tiny_models import build_tiny_llava

    out = build_tiny_llava(args.output, num_layers=args.layers, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _add_train_toy(sub: argparse._SubParsersAction) -> None:
    from shortlvlm_vllm.toy.training import ToyTrainingConfig

    p = sub.add_parser(
        "train-toy",
        help="train the toy LLaVA on the synthetic VQA set (under two hours on 2 CPU cores)",
        description="Train the project's toy LLaVA-1.5-architecture model from scratch on the synthetic VQA set "
        "and save it in the hub layout. Deterministic for a seed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-o", "--output", type=Path, required=True)
    defaults = ToyTrainingConfig()
    names = ("seed", "epochs", "batch_size", "learning_rate", "train_images", "eval_every", "stop_accuracy",
             "stop_family_accuracy", "max_steps", "compact_share")
    for name in names:
        value = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                       help="see shortlvlm_vllm.toy.training.ToyTrainingConfig")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on either); the weights are "
                   "deterministic for a seed on one device")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run_train_toy, config_names=names)


def _run_train_toy(args: argparse.Namespace) -> int:
    from shortlvlm_vllm.checkpoint.writer import check_checkpoint_output
    from shortlvlm_vllm.toy.training import ToyTrainingConfig, train_toy_model

    check_checkpoint_output(args.output, args.overwrite)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ShortLVLMError(f"--device {args.device}: torch sees no CUDA device here; train with --device cpu.")
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    config = ToyTrainingConfig(**{name: getattr(args, name) for name in args.config_names})
    print(f"training the toy model ({config}) on {args.device}; threads: {torch_threads or 'all cores'}", flush=True)
    final = train_toy_model(config, args.output, overwrite=args.overwrite, device=args.device)
    print(f"wrote {args.output}; test-split accuracy {final['overall']:.3f}")
    return 0


BENCHMARK_NAMES = "pope, mme, mmbench, scienceqa, seedbench, aokvqa or synthetic"


def _add_endpoint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, action="extend", nargs="+", metavar="URL",
                   help="the server's OpenAI API root, e.g. http://127.0.0.1:8000/v1; several (repeat the flag or "
                   "list them) are replicas of one model that share the requests (data parallelism)")
    p.add_argument("--model", required=True, help="the served model name (vLLM's --served-model-name, else its path)")
    p.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY", "EMPTY"),
                   help="key the server requires (default: $VLLM_API_KEY, else none)")


def _endpoints(args: argparse.Namespace) -> list:
    """The servers --base-url names, each serving --model."""
    from shortlvlm_vllm.evaluation.client import Endpoint

    return [Endpoint(url, args.model, args.api_key) for url in args.base_url]


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a served model on a benchmark through its OpenAI-compatible API",
        description="Ask a served model every item of a benchmark (image + question, greedy, streamed, "
        "--concurrency requests in flight) and score the replies with the benchmark's official metric. Each "
        "answered request is appended to OUT_DIR/records.jsonl at once; the scores go to OUT_DIR/scores.json. "
        "Connection errors, timeouts and 5xx replies are retried with exponential backoff; a request the server "
        "refuses (4xx) is recorded as failed and counted wrong. If the server stays unreachable the run stops, "
        "and rerunning the same command resumes where it stopped. Several --base-url replicas of one model (one "
        "vLLM per GPU or node) share the items, each asked once; on one machine, vLLM's own --data-parallel-size "
        "behind one URL does the same.",
    )
    p.add_argument("benchmark", help=BENCHMARK_NAMES)
    _add_endpoint_arguments(p)
    p.add_argument("--data", help="a local copy of the benchmark in its hub schema (default: the hub dataset)")
    p.add_argument("--limit", type=int, help="ask a subset of this many items, drawn with --seed (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8,
                   help="requests in flight on each server (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds without a reply byte before a request counts as timed out and is retried "
                   "(default: %(default)s)")
    p.add_argument("--max-retries", type=int, default=5,
                   help="retries of a request after a transient failure (default: %(default)s)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT_DIR",
                   help="directory for records.jsonl and scores.json; rerun with the same one to resume")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from shortlvlm_vllm.evaluation.benchmarks import get_benchmark
    from shortlvlm_vllm.evaluation.client import ClientConfig, run_benchmark

    config = ClientConfig(concurrency=args.concurrency, timeout_s=args.timeout, max_retries=args.max_retries)
    scores = run_benchmark(_endpoints(args), get_benchmark(args.benchmark), args.output, source=args.data,
                           limit=args.limit, seed=args.seed, config=config)
    width = max(len(name) for name in scores)
    print(f"{args.benchmark} on {args.model}:")
    for name, value in scores.items():
        print(f"  {name:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {name:<{width}}  {value}")
    print(f"records and scores in {args.output}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure a served model's throughput and latency (like `vllm bench serve`)",
        description="Replay a fixed set of image requests against a served model, streamed, all at once, with "
        "--concurrency in flight, or arriving at --request-rate (seeded Poisson), and report requests/s, tokens/s, "
        "TTFT, TPOT and ITL with vLLM's definitions. Every request generates exactly --output-len tokens "
        "(ignore_eos), so two models compare on the same work. One warm-up request per server goes first, not "
        "counted. With several --base-url replicas, request i goes to replica i mod n.",
    )
    _add_endpoint_arguments(p)
    p.add_argument("--benchmark", help=f"take the requests from this benchmark's items ({BENCHMARK_NAMES}); "
                   "default: synthetic pictures with a describe-it prompt")
    p.add_argument("--data", help="a local copy of --benchmark in its hub schema (default: the hub dataset)")
    p.add_argument("--num-prompts", type=int,
                   help="requests in the set; with --benchmark, a subset drawn with --seed (default: 100; with "
                   f"--soak {SOAK_DEFAULTS['num_prompts']}, each reused)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="requests in flight, on all servers together (default: all at "
                      f"once; with --soak the number of clients, {SOAK_DEFAULTS['concurrency']})")
    load.add_argument("--request-rate", type=float, help="requests per second, Poisson arrivals (default: all at once)")
    p.add_argument("--output-len", type=int, help="tokens generated per request (default: 128; with --soak at most "
                   f"{SOAK_DEFAULTS['output_len']})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the request set and of the arrivals (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds without a reply byte before a request fails (default: %(default)s)")
    p.add_argument("-o", "--output", type=Path, help="write the summary to this JSON file")
    soak = p.add_argument_group("soak (a server on this machine only)")
    soak.add_argument("--soak", type=float, metavar="SECONDS",
                      help="instead of a replay, keep --concurrency clients busy for SECONDS with a mix of valid, "
                      "streamed, abandoned and invalid requests; report status classes, lost valid requests, latency "
                      "and the server's memory; exit 1 if a 5xx came, a valid request was lost or memory grew 2%% "
                      "or more after the first minute")
    soak.add_argument("--server-pid", type=int, help="the server process whose tree's memory is sampled (default: "
                      "the process listening on the --base-url port)")
    p.set_defaults(func=_run_bench)


SOAK_DEFAULTS = {"num_prompts": 8, "concurrency": 64, "output_len": 16}


def _run_bench(args: argparse.Namespace) -> int:
    from shortlvlm_vllm.evaluation.throughput import describe, requests_from_items, run_throughput, synthetic_requests

    if args.data and not args.benchmark:
        raise ShortLVLMError("--data names a copy of a benchmark; say which one with --benchmark.")
    if args.output is not None:
        check_output_file(args.output, [args.data] if args.data else [])
    if args.soak is None and args.server_pid is not None:
        raise ShortLVLMError("--server-pid belongs to --soak.")
    defaults = SOAK_DEFAULTS if args.soak is not None else {"num_prompts": 100, "output_len": 128}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.benchmark:
        from shortlvlm_vllm.evaluation.benchmarks import get_benchmark

        requests = requests_from_items(get_benchmark(args.benchmark).load(args.data, args.num_prompts, args.seed))
    else:
        requests = synthetic_requests(args.num_prompts, args.seed)
    if args.soak is not None:
        return _soak(args, requests)
    result = run_throughput(_endpoints(args), requests, output_len=args.output_len,
                            concurrency=args.concurrency, request_rate=args.request_rate, seed=args.seed,
                            timeout_s=args.timeout)
    print(describe(result))
    if args.output:
        print(f"wrote {result.write_json(args.output)}")
    return 0


def _soak(args: argparse.Namespace, requests) -> int:
    from shortlvlm_vllm.evaluation.client import Endpoint
    from shortlvlm_vllm.evaluation.soak import Soak, SoakConfig, describe_soak

    if args.request_rate is not None:
        raise ShortLVLMError("--soak keeps --concurrency clients busy; --request-rate does not apply.")
    config = SoakConfig(clients=args.concurrency, duration_s=args.soak, output_len=args.output_len,
                        timeout_s=args.timeout, seed=args.seed)
    if len(args.base_url) != 1:
        raise ShortLVLMError("--soak loads one server: give one --base-url.")
    result = Soak(Endpoint(args.base_url[0], args.model, args.api_key), requests, config, args.server_pid).run()
    print(describe_soak(result))
    if args.output:
        path = write_atomic(args.output, json.dumps(result.to_dict(), indent=1) + "\n")
        print(f"wrote {path}")
    return 0 if all(ok is not False for ok in result.passed.values()) else 1


def _add_matrix(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "matrix",
        help="build, serve and measure every arm of an evaluation matrix (pruning x quantization x visual tokens)",
        description="Read a YAML config (see eval/configs/): every combination of its `grid` axes (ratio, localize, "
        "compensate, quantize, token_fraction, token_selection, seed) is an arm; `grid` may be a list of such grids "
        "(their union). Each arm's checkpoint is built once and cached by its recipe under OUT/checkpoints; each arm "
        "is answered by its own vLLM server (`scorer: vllm`) or by transformers in-process (`scorer: transformers`), "
        "on the same questions, and throughput is measured through vLLM per serving shape, the rounds interleaved. "
        "Writes OUT/results.{md,csv,json}, the paired comparisons and OUT/accuracy_vs_throughput.png (Pareto front "
        "marked). A rerun skips measured arms and resumes a half-measured one.",
    )
    p.add_argument("config", type=Path, help="the matrix YAML")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory (results, checkpoints, logs)")
    p.set_defaults(func=_run_matrix)


def _run_matrix(args: argparse.Namespace) -> int:
    from shortlvlm_vllm.evaluation.matrix import Matrix, load_config

    config = load_config(args.config)
    print(f"{len(config.arms)} arms: {', '.join(arm.name for arm in config.arms)}", flush=True)
    Matrix(config, args.output).run()
    print((args.output / "results.md").read_text())
    print(f"tables and plot in {args.output}")
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas, e.g. 0.2,0.3,0.4") from None


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_search(sub: argparse._SubParsersAction) -> None:
    from shortlvlm_vllm.search.space import SearchConfig

    d = SearchConfig()
    p = sub.add_parser(
        "search",
        help="find the fastest pruned model that keeps a fraction of the full model's accuracy, verified through vLLM",
        description="Search the axes named (layer ratio x localizer x compensation, optionally W4A16 and a "
        "visual-token fraction) for the arm with the highest served throughput whose dev-set accuracy keeps --keep "
        "of the full model's with confidence (the lower end of the 95% interval of accuracy(arm) - keep x "
        "accuracy(full), paired on the same questions, at least 0). Cheap first: one calibration pass serves every "
        "arm, each arm is answered on the dev set through transformers, and a way of pruning that falls clearly "
        "below the target at one ratio is not tried at higher ones. Then the --finalists cheapest surviving arms "
        "and the full model are served by vLLM one at a time, scored on the dev set and timed per serving shape; "
        "the winner is confirmed on a test set the search never looked at (synthetic: the validation split is the "
        "dev set, the test split the test set; another benchmark is halved by a hash of each question). Writes "
        "DIR/chosen/ (the checkpoint and the recipe that rebuilds it), DIR/report.{md,json}, DIR/arms.md and "
        "DIR/accuracy_vs_throughput.png. A rerun with the same settings resumes.",
    )
    p.add_argument("model", nargs="?", default=d.model, help="the model to prune: a directory, a hub id, or toy "
                   "(default)")
    p.add_argument("--keep", type=float, default=d.keep, help="fraction of the full model's dev accuracy to keep "
                   "(default %(default)s)")
    p.add_argument("--dev", default=d.dev, help=f"the benchmark to choose on ({BENCHMARK_NAMES}; default "
                   "%(default)s)")
    p.add_argument("--data", help="a local copy of --dev in its hub schema (default: the hub dataset; synthetic: "
                   "generated)")
    p.add_argument("--calib", default=d.calib, help="calibration source (see `shortlvlm prune --help`; default "
                   "%(default)s)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory (report, chosen checkpoint, "
                   "every stage's results)")
    p.add_argument("--ratios", type=_floats, default=d.ratios, help="layer ratios to try (default 0.2,0.3,0.4)")
    p.add_argument("--localize", type=_names, default=d.localize, help="localizers (default tis,all-tokens,"
                   "angular-block)")
    p.add_argument("--compensate", type=_names, default=d.compensate, help="compensations: none, scp, "
                   "scp/PAIRING/TARGET (default none,scp)")
    p.add_argument("--quantize", type=_names, default=d.quantize, help="quantization axis: none, gptq, awq, rtn "
                   "(W4A16; default none)")
    p.add_argument("--token-fractions", type=_floats, default=d.token_fraction, help="fractions of each image's "
                   "visual tokens kept (default 1)")
    p.add_argument("--max-ratio", type=float, default=d.max_ratio, help="cap on the ratio (default %(default)s)")
    p.add_argument("--max-minutes", type=float, help="stop starting screen arms after this many minutes; the "
                   "finalists are then chosen among the arms screened")
    p.add_argument("--finalists", type=int, default=d.finalists, help="arms served after the screen (default "
                   "%(default)s)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="throughput rounds per serving shape (default "
                   "%(default)s)")
    p.add_argument("--dev-limit", type=int, default=d.dev_limit, help="dev questions (default %(default)s)")
    p.add_argument("--test-limit", type=int, default=d.test_limit, help="test questions (default %(default)s)")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="calibration samples (default "
                   "%(default)s)")
    p.add_argument("--rank", type=int, default=d.rank, help="SCP rank (default %(default)s)")
    p.add_argument("--max-model-len", type=int, help="vLLM's --max-model-len for every server")
    p.add_argument("--replicas", type=int, default=d.replicas, help="vLLM servers per arm (default %(default)s)")
    p.set_defaults(func=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from shortlvlm_vllm.search.driver import Search
    from shortlvlm_vllm.search.space import SearchConfig

    config = SearchConfig(
        model=args.model, keep=args.keep, dev=args.dev, data=args.data, calib=args.calib, ratios=args.ratios,
        localize=args.localize, compensate=args.compensate, quantize=args.quantize,
        token_fraction=args.token_fractions, max_ratio=args.max_ratio, max_minutes=args.max_minutes,
        finalists=args.finalists, repeats=args.repeats, dev_limit=args.dev_limit, test_limit=args.test_limit,
        num_samples=args.num_samples, rank=args.rank, replicas=args.replicas,
        server={"max_model_len": args.max_model_len} if args.max_model_len else {})
    print(f"{len(config.arms())} arms to screen: {', '.join(arm.name for arm in config.arms())}", flush=True)
    Search(config, args.output).run()
    print((args.output / "report.md").read_text())
    print(f"report, plot and the chosen checkpoint in {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shortlvlm",
        description="Short-LVLM: remove redundant decoder layers from vision-language models "
        "and serve the result with vLLM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_prune, _add_quantize, _add_serve, _add_demo, _add_tiny, _add_train_toy, _add_eval, _add_bench,
                _add_matrix, _add_search):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` goes to the wrapped program (vLLM) unchanged.
    cut = argv.index("--") if "--" in argv else len(argv)
    argv, passthrough = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.passthrough = passthrough
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpx2"):  # one line per HTTP request from the openai client
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ShortLVLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
