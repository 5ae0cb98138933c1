"""A 7B-sized run on this machine: surgery against `cp`, and the calibration pass against a plain forward pass, on a
random-weight checkpoint with LLaVA-1.5-7B's shapes, all in one run.

    .venv/bin/python eval/bench_7b.py --workdir /tmp/bench-7b        # about 14 GB of disk for the model, 38 GB peak

The checkpoint: Llama decoder 4096 x 32 layers (intermediate 11008, 32 heads, vocabulary 32064), CLIP ViT-L/14-336
tower (1024 x 24 layers, 576 patches), MLP projector; bfloat16, written shard by shard in the hub layout (several
shards and an index, as llava-hf/llava-1.5-7b-hf), never held whole in memory. Then:
- surgery: `shortlvlm prune --drop-layers` (10 of 32 layers) as a user runs it, in a child process, against
  `cp -r` of the same directory, alternating, `--repeats` times each; speed is bytes written per second (target: at
  least 0.8x cp's), timed from after the imports (`process_seconds` includes the interpreter's start), and the
  child's peak resident memory (target: under 1 GB);
- calibration: eval/bench_calibration.py on `--samples` samples in a child process (time against a plain forward
  pass over the same samples, target 1.5x; peak memory with the model loaded, before and after).
Time ratios are measured in one run on the same work, so they hold on a shared machine; absolute times do not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from shortlvlm_vllm.tiny_models import build_byte_tokenizer, llava_config, llava_processor, write_random_llava

EVAL = Path(__file__).resolve().parent
LLAVA_7B = dict(num_layers=32, hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32,
                vocab_size=32064, vision_hidden_size=1024, vision_intermediate_size=4096, vision_heads=16,
                vision_layers=24, image_size=336, patch_size=14, initializer_range=0.02)
# The same script at a small size, to check it end to end in a minute (figures meaningless).
DRY_RUN = dict(LLAVA_7B, num_layers=32, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=4,
               vision_hidden_size=64, vision_intermediate_size=128, vision_heads=2, vision_layers=2)
DROPPED = list(range(20, 30))  # 10 of 32 layers: about 30%


def _run_child(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak resident memory (MB) and stdout of one child process.

    The peak is the child's own VmHWM, read from /proc while it runs (exec resets it; getrusage would report the
    forking parent's size instead)."""
    started = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_kb = 0
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
            peak_kb = max(peak_kb, int(line.split()[1]))
        except (OSError, StopIteration):
            pass
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    out, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed: {err[-2000:]}")
    return elapsed, peak_kb / 1024, out


# `shortlvlm prune` as the command runs it, timed from after the imports (interpreter start-up is not surgery).
PRUNE = """
import sys, time
import shortlvlm_vllm.prune.pipeline, shortlvlm_vllm.cli
started = time.perf_counter()
assert shortlvlm_vllm.cli.main(sys.argv[1:]) == 0
print(time.perf_counter() - started)
"""


def _weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the 7B-shaped checkpoint and copies go")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of surgery and cp")
    parser.add_argument("--samples", type=int, default=3, help="calibration samples")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--parts", default="surgery,calibration",
                        help="what to measure (the checkpoint is written first when missing); a run of one part "
                        "updates that part of --output and keeps the other")
    parser.add_argument("--output", type=Path, default=EVAL / "results" / "bench_7b.json")
    parser.add_argument("--dry-run", action="store_true", help="a small model of the same layer count")
    args = parser.parse_args()
    shape = DRY_RUN if args.dry_run else LLAVA_7B
    source = args.workdir / "llava-7b-shaped"
    args.workdir.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(args.workdir).free / 2**30
    print(f"free disk: {free_gb:.0f} GB", flush=True)

    parts = set(args.parts.split(","))
    result: dict = json.loads(args.output.read_text()) if args.output.is_file() else {}
    result |= {"model": "random LLaVA-1.5-7B-shaped (4096 x 32 layers, intermediate 11008, CLIP ViT-L/14-336), "
                        "bfloat16" if not args.dry_run else "dry run (small)", "dropped_layers": DROPPED}
    if not (source / "config.json").is_file():
        tokenizer = build_byte_tokenizer(shape["vocab_size"])
        config = llava_config(tokenizer, **shape)
        started = time.perf_counter()
        write_random_llava(config, llava_processor(tokenizer, config), source, dtype=torch.bfloat16,
                           max_shard_bytes=int(args.shard_gb * 2**30))
        result["write_random_s"] = round(time.perf_counter() - started, 1)
    weights = _weight_bytes(source)
    result |= {"weight_bytes": weights, "shards": len(list(source.glob("*.safetensors"))),
               "parameters": weights // 2}
    print(f"checkpoint: {weights / 1e9:.2f} GB in {result['shards']} shards", flush=True)

    if "surgery" in parts:
        result["surgery"] = _surgery_against_cp(source, args.workdir, args.repeats)
    if "calibration" in parts:
        calibration_json = args.workdir / "bench_calibration.json"
        seconds, rss, _ = _run_child([sys.executable, str(EVAL / "bench_calibration.py"), "--model", str(source),
                                   "--samples", str(args.samples), "--repeats", "1", "--warmup", "1",
                                   "--output", str(calibration_json)])
        calibration = json.loads(calibration_json.read_text())
        calibration["model"] = result["model"]
        result["calibration"] = calibration | {"child_peak_rss_mb": round(rss, 1), "child_seconds": round(seconds, 1),
                                               "load_average_at_end": os.getloadavg()}
    result["cpu_cores"] = len(os.sched_getaffinity(0))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _surgery_against_cp(source: Path, workdir: Path, repeats: int) -> dict:
    """`shortlvlm prune --drop-layers` and `cp -r` of the same checkpoint, alternating which goes first."""
    rounds = []
    for repeat in range(repeats):
        pruned, copied = workdir / "pruned", workdir / "copy"
        for path in (pruned, copied):
            shutil.rmtree(path, ignore_errors=True)
        order = ("cp", "surgery") if repeat % 2 == 0 else ("surgery", "cp")
        figures = {}
        for what in order:
            if what == "cp":
                seconds, rss, _ = _run_child(["cp", "-r", str(source), str(copied)])
                written, process_seconds = _weight_bytes(copied), seconds
            else:
                process_seconds, rss, out = _run_child([sys.executable, "-c", PRUNE, "prune", str(source),
                                                        "--drop-layers", ",".join(map(str, DROPPED)), "-o",
                                                        str(pruned)])
                seconds = float(out.strip().splitlines()[-1])
                written = _weight_bytes(pruned)
            figures[what] = {"seconds": round(seconds, 2), "process_seconds": round(process_seconds, 2),
                             "bytes_written": written, "gb_per_s": round(written / seconds / 1e9, 3),
                             "peak_rss_mb": round(rss, 1)}
            print(repeat, what, figures[what], flush=True)
        figures["speed_ratio"] = round(figures["surgery"]["gb_per_s"] / figures["cp"]["gb_per_s"], 3)
        rounds.append(figures)
        for path in (pruned, copied):
            shutil.rmtree(path, ignore_errors=True)
    ratios = [r["speed_ratio"] for r in rounds]
    return {"rounds": rounds, "speed_ratio_vs_cp": ratios, "speed_ratio_min": min(ratios),
            "speed_ratio_max": max(ratios), "peak_rss_mb_max": max(r["surgery"]["peak_rss_mb"] for r in rounds),
            "load_average_at_end": os.getloadavg()}


if __name__ == "__main__":
    main()
