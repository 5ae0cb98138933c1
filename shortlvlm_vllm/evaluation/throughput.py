"""Serving throughput and latency, measured like `vllm bench serve`, so a pruned and a full model compare.

A fixed request set (benchmark items, or synthetic prompts with an image) is replayed at full concurrency, at a
concurrency cap, or at a request rate with seeded Poisson arrivals, on one server or spread in turn over several
replicas of one model (request i to replica i mod n; the cap and the rate are for all of them together). Every
request streams and generates exactly `output_len` tokens (`ignore_eos`, which vLLM honours), so two models do the
same work. The summary uses vLLM's definitions and JSON keys: TTFT to the first token, TPOT = (latency - TTFT) /
(output tokens - 1), ITL the gaps between streamed chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import openai
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from shortlvlm_vllm.chat import data_url, image_message
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.benchmarks.base import Item
from shortlvlm_vllm.evaluation.client import (
    Endpoint,
    IncompleteStreamError,
    Replicas,
    describe_error,
    make_client,
    replicas_of,
    stream_chat,
)
from shortlvlm_vllm.files import write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    image: Image.Image


@dataclass(frozen=True)
class RequestTiming:
    """One replayed request; `error` is set when it failed (its timings are then meaningless)."""

    latency_s: float
    ttft_s: float | None
    itl_s: tuple[float, ...]
    prompt_tokens: int
    output_tokens: int
    error: str | None = None


@dataclass(frozen=True)
class ThroughputResult:
    """The summary, with `vllm bench serve`'s key names (median = p50); None where no request gave a value."""

    num_prompts: int
    completed: int
    failed: int
    max_concurrency: int | None  # None: no cap
    request_rate: float | None  # requests/s of the Poisson arrivals; None: all sent at once
    output_len: int
    duration: float  # seconds from the first request sent to the last finished
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    mean_ttft_ms: float | None
    median_ttft_ms: float | None
    p99_ttft_ms: float | None
    mean_tpot_ms: float | None
    median_tpot_ms: float | None
    p99_tpot_ms: float | None
    mean_itl_ms: float | None
    median_itl_ms: float | None
    p99_itl_ms: float | None
    servers: int = 1  # replicas the requests were spread over

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: str | Path) -> Path:
        return write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


def requests_from_items(items: Sequence[Item]) -> list[BenchRequest]:
    return [BenchRequest(item.prompt, item.image) for item in items]


def synthetic_requests(num_prompts: int, seed: int = 0, image_size: int = 336) -> list[BenchRequest]:
    """Distinct prompts and pictures (a few coloured boxes), so that no request hits another's prefix cache."""
    rng = random.Random(seed)
    requests = []
    for i in range(num_prompts):
        image = Image.new("RGB", (image_size, image_size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randrange(image_size * 3 // 4), rng.randrange(image_size * 3 // 4)
            side = rng.randrange(image_size // 10, image_size // 4)
            draw.rectangle((x, y, x + side, y + side), fill=tuple(rng.randrange(256) for _ in range(3)))
        requests.append(BenchRequest(f"Picture {i}: describe every object in it, its colour and its position.",
                                     image))
    return requests


def arrival_offsets(num_requests: int, request_rate: float | None, seed: int = 0) -> list[float]:
    """Send times in seconds from the start: Poisson arrivals at `request_rate` (seeded), all 0 when it is None."""
    if request_rate is None or math.isinf(request_rate):
        return [0.0] * num_requests
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, num_requests)
    return [0.0, *np.cumsum(gaps[:-1]).tolist()][:num_requests]


def _stats_ms(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    ms = np.asarray(values) * 1000.0
    return float(ms.mean()), float(np.median(ms)), float(np.percentile(ms, 99))


def summarize(
    timings: Sequence[RequestTiming],
    duration: float,
    *,
    output_len: int,
    max_concurrency: int | None = None,
    request_rate: float | None = None,
    servers: int = 1,
) -> ThroughputResult:
    """The summary of a replay that took `duration` seconds; failed requests count only in `failed`."""
    ok = [t for t in timings if t.error is None]
    ttfts = [t.ttft_s for t in ok if t.ttft_s is not None]
    tpots = [(t.latency_s - t.ttft_s) / (t.output_tokens - 1)
             for t in ok if t.ttft_s is not None and t.output_tokens > 1]
    itls = [gap for t in ok for gap in t.itl_s]
    input_tokens = sum(t.prompt_tokens for t in ok)
    output_tokens = sum(t.output_tokens for t in ok)
    return ThroughputResult(
        len(timings), len(ok), len(timings) - len(ok), max_concurrency, request_rate, output_len, duration,
        input_tokens, output_tokens, len(ok) / duration, output_tokens / duration,
        (input_tokens + output_tokens) / duration, *_stats_ms(ttfts), *_stats_ms(tpots), *_stats_ms(itls),
        servers,
    )


def run_throughput(
    endpoints: Replicas,
    requests: Sequence[BenchRequest],
    *,
    output_len: int = 128,
    concurrency: int | None = None,
    request_rate: float | None = None,
    seed: int = 0,
    timeout_s: float = 300.0,
) -> ThroughputResult:
    """Replay `requests` once after one uncounted warm-up request per server; failed requests are counted, not
    retried. Several endpoints are replicas of one model: request i goes to replica i mod n."""
    if not requests:
        raise ShortLVLMError("no requests to replay; ask for at least one (--num-prompts).")
    return asyncio.run(_replay(replicas_of(endpoints), requests, output_len, concurrency, request_rate, seed,
                               timeout_s))


async def _replay(
    replicas: Sequence[Endpoint],
    requests: Sequence[BenchRequest],
    output_len: int,
    concurrency: int | None,
    request_rate: float | None,
    seed: int,
    timeout_s: float,
) -> ThroughputResult:
    messages = [image_message(data_url(r.image), r.prompt) for r in requests]  # encoded before the clock starts
    extra = {"ignore_eos": True}
    clients = [make_client(endpoint, timeout_s) for endpoint in replicas]
    try:
        for endpoint, client in zip(replicas, clients, strict=True):
            try:
                await stream_chat(client, endpoint.model, messages[0], output_len, extra)
            except (openai.APIError, IncompleteStreamError) as exc:
                raise ShortLVLMError(
                    f"the warm-up request to {endpoint.base_url} (model {endpoint.model}) failed: "
                    f"{describe_error(exc)}. Check that the server runs and the --base-url and --model it was given."
                ) from exc
        offsets = arrival_offsets(len(requests), request_rate, seed)
        gate = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
        bar = tqdm(total=len(requests), desc="bench", unit="req", disable=None)
        started = time.perf_counter()

        async def one(i: int) -> RequestTiming:
            endpoint, client = replicas[i % len(replicas)], clients[i % len(replicas)]
            await asyncio.sleep(max(0.0, started + offsets[i] - time.perf_counter()))
            async with gate:
                sent = time.perf_counter()
                try:
                    r = await stream_chat(client, endpoint.model, messages[i], output_len, extra)
                except (openai.APIError, IncompleteStreamError) as exc:
                    log.warning("request %d failed: %s", i, describe_error(exc))
                    return RequestTiming(time.perf_counter() - sent, None, (), 0, 0, describe_error(exc))
                finally:
                    bar.update()
            chunks = len(r.itl_s) + (r.ttft_s is not None)
            return RequestTiming(r.latency_s, r.ttft_s, r.itl_s, r.prompt_tokens or 0,
                                 r.completion_tokens if r.completion_tokens is not None else chunks)

        try:
            timings = await asyncio.gather(*(one(i) for i in range(len(requests))))
        finally:
            bar.close()
        duration = time.perf_counter() - started
    finally:
        for client in clients:
            await client.close()
    return summarize(timings, duration, output_len=output_len, max_concurrency=concurrency,
                     request_rate=None if request_rate is None or math.isinf(request_rate) else request_rate,
                     servers=len(replicas))


def describe(result: ThroughputResult) -> str:
    """The summary as a two-column table, in the order `vllm bench serve` prints it."""
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = [
        ("Requests completed / failed", f"{result.completed} / {result.failed} of {result.num_prompts}"),
        ("Servers (replicas)", str(result.servers)),
        ("Max concurrency", str(result.max_concurrency or "all at once")),
        ("Request rate (req/s)", "inf" if result.request_rate is None else f"{result.request_rate:g}"),
        ("Output length (tokens)", str(result.output_len)),
        ("Duration (s)", f"{result.duration:.2f}"),
        ("Input / output tokens", f"{result.total_input_tokens} / {result.total_output_tokens}"),
        ("Request throughput (req/s)", f"{result.request_throughput:.2f}"),
        ("Output token throughput (tok/s)", f"{result.output_throughput:.2f}"),
        ("Total token throughput (tok/s)", f"{result.total_token_throughput:.2f}"),
    ]
    for name, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl")):
        values = [getattr(result, f"{stat}_{key}_ms") for stat in ("mean", "median", "p99")]
        rows.append((f"{name} mean / p50 / p99 (ms)", " / ".join(ms(v) for v in values)))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def replay_on_servers(
    models: Mapping[str, str | Path],
    requests: Sequence[BenchRequest],
    log_dir: Path,
    *,
    server_kwargs: Mapping | None = None,
    **replay_kwargs,
) -> dict[str, dict]:
    """Serve each model in turn (one vLLM server at a time) and replay the same requests on it: name -> summary."""
    from shortlvlm_vllm.serving.launcher import VLLMServer

    results = {}
    for name, model in models.items():
        with VLLMServer(model, log_path=log_dir / f"server-{name}.log", served_model_name=name,
                        **(server_kwargs or {})) as server:
            result = run_throughput(Endpoint(server.base_url, name, server.api_key), requests, **replay_kwargs)
        log.info("%s:\n%s", name, describe(result))
        results[name] = result.to_dict()
    return results


def write_summary(summary: Mapping, out_dir: Path) -> Path:
    """A benchmark script's figures as OUT/results.json (per-server results included); returns the path."""
    return write_atomic(out_dir / "results.json", json.dumps(summary, indent=2) + "\n")
