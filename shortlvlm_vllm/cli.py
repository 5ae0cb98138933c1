"""The `shortlvlm` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from shortlvlm_vllm import __version__
from shortlvlm_vllm.errors import ShortLVLMError


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of layer indices; write them comma-separated, like 3,5"
        ) from None


def _add_prune(sub: argparse._SubParsersAction) -> None:
    from shortlvlm_vllm.compensate import SCP_TARGETS
    from shortlvlm_vllm.localize import LOCALIZERS
    from shortlvlm_vllm.prune import COMPENSATIONS

    p = sub.add_parser(
        "prune",
        help="remove redundant decoder layers (Short-LVLM) and write a compensated checkpoint",
        description="Find redundant decoder layers with Token Importance Scores on calibration data, "
        "remove them, fold Subspace-Compensated Pruning into the kept layers, and write a checkpoint that "
        "stock transformers and vLLM load. With --drop-layers the layers are named instead of found.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="source checkpoint: a local directory or a Hugging Face Hub id")
    p.add_argument("-o", "--output", type=Path, help="directory to write (not needed with --dry-run)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ratio", type=float, help="fraction of decoder layers to remove, e.g. 0.3")
    what.add_argument("--drop-layers", type=_layer_list, metavar="I,J,...",
                      help="remove these decoder layers (0-based, original numbering), e.g. 3,5")
    cal = p.add_argument_group("calibration data")
    cal.add_argument("--calib", help="a LLaVA conversation file (.json/.jsonl), a datasets directory or hub id")
    cal.add_argument("--image-root", help="directory the LLaVA file's image paths are relative to "
                     "(default: the file's directory)")
    cal.add_argument("--num-samples", type=int, default=256, help="calibration samples drawn with --seed")
    cal.add_argument("--heldout", type=int, default=16,
                     help="further samples, not calibrated on, to measure the pruned model's drift (0: skip)")
    cal.add_argument("--split", default="train", help="datasets split")
    cal.add_argument("--image-column", default="image")
    cal.add_argument("--question-column", default="question")
    cal.add_argument("--answer-column", default="answer")
    alg = p.add_argument_group("algorithm")
    alg.add_argument("--localize", default="tis", choices=list(LOCALIZERS), help="how to find redundant layers")
    alg.add_argument("--candidates", help="layers that may be pruned, e.g. 16-31 or 3,5,10-12 "
                     "(default: the second half)")
    alg.add_argument("--top-p", type=float, default=0.10, help="fraction of vision+text tokens TIS keeps")
    alg.add_argument("--compensate", choices=COMPENSATIONS,
                     help="scp (Subspace-Compensated Pruning) or none (default: scp with --calib, else none)")
    alg.add_argument("--rank", type=int, default=64, help="SCP subspace rank k")
    alg.add_argument("--scp-target", default="down_proj", choices=list(SCP_TARGETS),
                     help="which kept-layer weights absorb the compensation")
    alg.add_argument("--seed", type=int, default=0, help="seed for sampling calibration data and --localize random")
    alg.add_argument("--force", action="store_true", help="allow --ratio above 0.5")
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (several GPUs: device_map)")
    run.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    run.add_argument("--revision", help="hub revision (branch, tag or commit) of the source")
    run.add_argument("--dry-run", action="store_true", help="print which layers would go and why; write nothing")
    run.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_run_prune)


def _run_prune(args: argparse.Namespace) -> int:
    from shortlvlm_vllm.checkpoint import check_output_dir, open_checkpoint
    from shortlvlm_vllm.prune import CalibrationSource, PruneRecipe, describe_plan, plan_pruning, write_plan

    if args.output is None and not args.dry_run:
        raise ShortLVLMError("-o/--output is required (or --dry-run to only print the plan).")
    if args.output is not None and not args.dry_run:
        check_output_dir(args.output, args.overwrite)
    calibration = None
    if args.calib:
        calibration = CalibrationSource(
            args.calib, args.num_samples, args.heldout, args.seed, args.image_root, args.split,
            args.image_column, args.question_column, args.answer_column,
        )
    recipe = PruneRecipe(
        ratio=args.ratio, drop_layers=args.drop_layers, localize=args.localize, candidates=args.candidates,
        top_p=args.top_p, compensate=args.compensate or ("scp" if args.calib else "none"), rank=args.rank,
        scp_target=args.scp_target, seed=args.seed, force=args.force, calibration=calibration,
    )
    src = open_checkpoint(args.model, args.revision)
    plan = plan_pruning(src, recipe, args.device, args.dtype)
    print(describe_plan(src, recipe, plan))
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    dst = write_plan(src, args.output, recipe, plan, overwrite=args.overwrite)
    print(f"wrote {dst}: {src.num_layers - len(plan.pruned)} of {src.num_layers} decoder layers "
          f"(removed {', '.join(map(str, plan.pruned))}; compensation: {recipe.compensate})")
    print(f"serve it with: shortlvlm serve {dst}")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint with vLLM's OpenAI-compatible server",
        description="Run vLLM's OpenAI-compatible server (the module behind `vllm serve`, which "
        "also works with the CPU build). Arguments after `--` go to vLLM unchanged.",
    )
    p.add_argument("model", help="checkpoint directory or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"),
                   help="require this key from clients (default: $VLLM_API_KEY, else none)")
    p.add_argument("--max-model-len", type=int, help="maximum context length")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--served-model-name", help="model name clients use (default: the path)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="skip torch.compile and CUDA graphs (default: on without a GPU)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from shortlvlm_vllm.serve import server_command, server_env

    if ("/" not in args.model or args.model.startswith((".", "/", "~"))) and not Path(args.model).is_dir():
        raise ShortLVLMError(f"model {args.model} not found: no such directory.")
    cmd = server_command(args.model, host=args.host, port=args.port, api_key=args.api_key,
                         max_model_len=args.max_model_len, dtype=args.dtype,
                         served_model_name=args.served_model_name,
                         enforce_eager=args.enforce_eager, extra_args=args.passthrough)
    print("running:", " ".join(cmd), flush=True)
    os.execvpe(cmd[0], cmd, server_env())
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
    from shortlvlm_vllm.fixtures import build_tiny_llava

    out = build_tiny_llava(args.output, num_layers=args.layers, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _add_train_toy(sub: argparse._SubParsersAction) -> None:
    from shortlvlm_vllm.toy import ToyTrainingConfig

    p = sub.add_parser(
        "train-toy",
        help="train the toy LLaVA on the synthetic VQA set (about an hour on 2 CPU cores)",
        description="Train the project's toy LLaVA-1.5-architecture model from scratch on the synthetic VQA set "
        "and save it in the hub layout. Deterministic for a seed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-o", "--output", type=Path, required=True)
    defaults = ToyTrainingConfig()
    for name in ("seed", "epochs", "batch_size", "learning_rate", "train_images", "eval_every"):
        value = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run_train_toy)


def _run_train_toy(args: argparse.Namespace) -> int:
    from shortlvlm_vllm.checkpoint import check_output_dir
    from shortlvlm_vllm.toy import ToyTrainingConfig, train_toy_model

    check_output_dir(args.output, args.overwrite)
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    config = ToyTrainingConfig(seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
                               learning_rate=args.learning_rate, train_images=args.train_images,
                               eval_every=args.eval_every)
    print(f"training the toy model ({config}); threads: {torch_threads or 'all cores'}", flush=True)
    final = train_toy_model(config, args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}; held-out accuracy {final['overall']:.3f}")
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
    for add in (_add_prune, _add_serve, _add_demo, _add_tiny, _add_train_toy):
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
