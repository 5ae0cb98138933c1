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
    p = sub.add_parser(
        "prune",
        help="write a copy of a vision-language checkpoint with decoder layers removed",
        description="Remove decoder layers from a checkpoint (streamed shard by shard) and write a "
        "checkpoint that stock transformers and vLLM load.",
    )
    p.add_argument("model", help="source checkpoint: a local directory or a Hugging Face Hub id")
    p.add_argument("-o", "--output", required=True, type=Path, help="directory to write")
    p.add_argument("--drop-layers", required=True, type=_layer_list, metavar="I,J,...",
                   help="decoder layers to remove (0-based, original numbering), e.g. 3,5")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of the source")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_run_prune)


def _run_prune(args: argparse.Namespace) -> int:
    from shortlvlm_vllm.checkpoint import open_checkpoint, write_pruned_checkpoint

    src = open_checkpoint(args.model, args.revision)
    dst = write_pruned_checkpoint(src, args.output, args.drop_layers, {"method": "explicit"},
                                  overwrite=args.overwrite)
    kept = src.num_layers - len(args.drop_layers)
    print(f"wrote {dst}: {kept} of {src.num_layers} decoder layers "
          f"(removed {', '.join(map(str, sorted(args.drop_layers)))})")
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
        help="prune a model, serve it with vLLM and ask it about an image",
        description="The main job end to end: prune, serve the pruned checkpoint with vLLM, ask it "
        "a question about an image through the openai client, print the answer.",
    )
    p.add_argument("--model", help="source checkpoint (default: the embedded tiny LLaVA, built offline)")
    p.add_argument("--drop-layers", type=_layer_list, default=[3, 5], metavar="I,J,...",
                   help="decoder layers to remove (default: 3,5)")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"),
                   help="where checkpoints and the server log go (default: %(default)s)")
    p.add_argument("--question", default="What shape is in the picture?")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from shortlvlm_vllm.demo import run_demo

    run_demo(args.model, args.drop_layers, args.workdir, args.question)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shortlvlm",
        description="Short-LVLM: remove redundant decoder layers from vision-language models "
        "and serve the result with vLLM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_prune, _add_serve, _add_demo, _add_tiny):
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
