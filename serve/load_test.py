"""Load-test an OpenAI-compatible server with image questions: req/s and latency percentiles.

    .venv/bin/python serve/load_test.py --base-url http://127.0.0.1:8000/v1 --requests 64 --concurrency 8

A bounded number of requests, sent to the address you give (keep it to your own servers).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import openai

from shortlvlm_vllm.images import data_url, demo_image, image_message


async def _one(client: openai.AsyncOpenAI, model: str, image_url: str, max_tokens: int, gate: asyncio.Semaphore):
    async with gate:
        start = time.perf_counter()
        response = await client.chat.completions.create(
            model=model, messages=image_message(image_url, "Describe the picture."),
            max_tokens=max_tokens, temperature=0.0, extra_body={"ignore_eos": True},
        )
        return time.perf_counter() - start, response.usage.completion_tokens


async def run(args: argparse.Namespace) -> None:
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or (await client.models.list()).data[0].id
    image_url = data_url(demo_image())
    gate = asyncio.Semaphore(args.concurrency)
    start = time.perf_counter()
    results = await asyncio.gather(*(_one(client, model, image_url, args.max_tokens, gate)
                                     for _ in range(args.requests)))
    elapsed = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    print(f"model {model}: {args.requests} requests, concurrency {args.concurrency}, {elapsed:.1f} s")
    print(f"  {args.requests / elapsed:.2f} req/s, {tokens / elapsed:.1f} output tok/s")
    print(f"  latency p50 {statistics.median(latencies):.3f} s, p99 {p99:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--model", help="served model name (default: the server's first model)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
