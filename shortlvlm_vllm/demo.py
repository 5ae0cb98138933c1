"""The main job end to end: prune a LLaVA checkpoint, serve it with vLLM, ask it about an image."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from shortlvlm_vllm.checkpoint import open_checkpoint, write_pruned_checkpoint
from shortlvlm_vllm.images import data_url, demo_image, image_message
from shortlvlm_vllm.serve import VLLMServer

log = logging.getLogger(__name__)


def run_demo(model: str | None, drop_layers: Sequence[int], workdir: Path, question: str) -> str:
    """Returns the pruned model's answer; prints what happens on the way."""
    started = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    if model is None:
        from shortlvlm_vllm.fixtures import build_tiny_llava

        model_dir = workdir / "tiny-llava"
        if not (model_dir / "config.json").is_file():
            print(f"[demo] building the embedded default model (tiny random-weight LLaVA-1.5) in {model_dir}")
            build_tiny_llava(model_dir)
        model = str(model_dir)
        print("[demo] note: its weights are random, so its answer is noise; the point is the path.")

    src = open_checkpoint(model)
    pruned_dir = workdir / "pruned"
    print(f"[demo] pruning {model}: removing decoder layers {list(drop_layers)} of {src.num_layers}")
    write_pruned_checkpoint(src, pruned_dir, drop_layers, {"method": "explicit"}, overwrite=True)

    import openai

    print(f"[demo] starting vLLM on {pruned_dir} (log: {workdir / 'server.log'})")
    with VLLMServer(pruned_dir, log_path=workdir / "server.log",
                    served_model_name="pruned") as server:
        print(f"[demo] vLLM is serving at {server.base_url}")
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key)
        t0 = time.perf_counter()
        response = client.chat.completions.create(
            model="pruned", messages=image_message(data_url(demo_image()), question),
            max_tokens=32, temperature=0.0,
        )
        answer = response.choices[0].message.content
        print(f"[demo] question: {question}")
        print(f"[demo] answer from the pruned model: {answer!r} "
              f"({response.usage.completion_tokens} tokens in {time.perf_counter() - t0:.2f} s)")
    print(f"[demo] done in {time.perf_counter() - started:.0f} s; checkpoints under {workdir}")
    return answer
