"""The evaluation client: a benchmark's items asked of an OpenAI-compatible server (vLLM), one JSONL record each.

Streaming chat completions, greedy, `concurrency` requests in flight on each server. Transient failures (connection
errors, timeouts, 5xx) are retried with exponential backoff and jitter; a 4xx is the request's own fault, so it is
recorded as a failed request, counted wrong, and the run goes on. Each finished request is appended to the records
file at once, so a run that stopped (server gone, process killed) resumes where it stopped when rerun with the same
output. Several servers of one model (replicas: data parallelism, e.g. one vLLM per GPU or node) share the items:
each server's requests take the next unasked item from one queue, so every item is asked once, by whichever server
is free, and the record names it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import openai
from tqdm.auto import tqdm

from shortlvlm_vllm.chat import data_url, image_message
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.benchmarks.base import Benchmark, Item
from shortlvlm_vllm.files import check_apart, write_atomic

log = logging.getLogger(__name__)

RECORDS_NAME = "records.jsonl"
SCORES_NAME = "scores.json"
RUN_NAME = "run.json"
T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    """Where the model is served: `base_url` ends in /v1; `model` is the served model name."""

    base_url: str
    model: str
    api_key: str = "EMPTY"


Replicas = Endpoint | Sequence[Endpoint]  # one server, or several replicas of one model


def replicas_of(endpoints: Replicas) -> list[Endpoint]:
    """The servers as a list, once they are known to serve one model under one name."""
    replicas = [endpoints] if isinstance(endpoints, Endpoint) else list(endpoints)
    if not replicas:
        raise ShortLVLMError("no server to ask: give at least one --base-url.")
    names = {endpoint.model for endpoint in replicas}
    if len(names) > 1:
        raise ShortLVLMError(f"replicas must serve one model under one name, not {', '.join(sorted(names))}.")
    urls = [endpoint.base_url for endpoint in replicas]
    if len(set(urls)) < len(urls):
        raise ShortLVLMError(f"a server is named twice among {', '.join(urls)}; give each replica once.")
    return replicas


@dataclass(frozen=True)
class ClientConfig:
    """How hard to push each server and how long to wait for it when it fails."""

    concurrency: int = 8  # requests in flight on each server
    timeout_s: float = 60.0  # seconds without a byte from the server before an attempt counts as timed out
    max_retries: int = 5  # retries of one request after a transient failure; then the run stops
    backoff_s: float = 0.5  # first retry delay, doubled at each retry
    max_backoff_s: float = 30.0  # cap on the delay before jitter


@dataclass(frozen=True)
class StreamResult:
    """One streamed completion, timed from the request being sent."""

    text: str
    latency_s: float
    ttft_s: float | None  # to the first chunk with text; None when the reply is empty
    itl_s: tuple[float, ...]  # gaps between chunks with text
    prompt_tokens: int | None  # from the usage chunk
    completion_tokens: int | None


class IncompleteStreamError(Exception):
    """The stream ended without a finish reason: the server went away mid-reply."""


class RequestFailedError(Exception):
    """A request the server refused (4xx): its fault, so retrying cannot help."""


class GaveUpError(Exception):
    """A request still failed transiently after every retry: the server is down or broken."""


class _ServerGaveUp(Exception):
    """GaveUpError, with the server it happened on."""

    def __init__(self, endpoint: Endpoint, error: GaveUpError) -> None:
        super().__init__(str(error))
        self.endpoint = endpoint


def make_client(endpoint: Endpoint, timeout_s: float) -> openai.AsyncOpenAI:
    """The SDK's own retries are off (max_retries=0): retrying is this module's policy, and it logs each retry."""
    return openai.AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, timeout=timeout_s, max_retries=0)


async def stream_chat(
    client: openai.AsyncOpenAI,
    model: str,
    messages: list[dict],
    max_tokens: int,
    extra_body: Mapping[str, Any] | None = None,
) -> StreamResult:
    """One greedy chat completion, streamed so that time to first token and inter-token gaps can be read."""
    started = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body=dict(extra_body) if extra_body else None,
    )
    parts: list[str] = []
    ttft = last = None
    gaps: list[float] = []
    usage = None
    finished = False
    async with stream:
        async for chunk in stream:
            now = time.perf_counter()
            usage = chunk.usage or usage
            for choice in chunk.choices:
                finished = finished or choice.finish_reason is not None
                if choice.delta and choice.delta.content:
                    if ttft is None:
                        ttft = now - started
                    else:
                        gaps.append(now - last)
                    last = now
                    parts.append(choice.delta.content)
    if not finished:
        raise IncompleteStreamError("the reply stream ended without a finish reason")
    return StreamResult(
        "".join(parts), time.perf_counter() - started, ttft, tuple(gaps),
        usage.prompt_tokens if usage else None, usage.completion_tokens if usage else None,
    )


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the connection or the server failed (timeouts, 5xx), not the request (4xx)."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500
    if isinstance(exc, (openai.APIConnectionError, IncompleteStreamError)):
        return True
    if isinstance(exc, openai.APIError):  # an error event inside the stream; vLLM gives it an HTTP-like code
        return not _client_error_code(exc)
    return False


def _client_error_code(exc: openai.APIError) -> bool:
    try:
        return 400 <= int(exc.code or 0) < 500
    except ValueError:
        return False


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {exc.message}"
    if isinstance(exc, openai.APIError) and exc.code:
        return f"error {exc.code} in the stream: {exc.message}"
    cause = f" ({exc.__cause__!r})" if exc.__cause__ else ""
    return f"{type(exc).__name__}: {exc}{cause}"


def backoff_delay(config: ClientConfig, retry: int) -> float:
    """Exponential backoff, capped, plus up to 50% jitter so that clients that failed together do not retry together."""
    return min(config.max_backoff_s, config.backoff_s * 2**retry) * (1.0 + 0.5 * random.random())


async def with_retries(call: Callable[[], Awaitable[T]], config: ClientConfig, what: str) -> T:
    """`call()` retried on transient failures; a 4xx raises RequestFailedError, exhausted retries GaveUpError."""
    retry = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            if not is_transient(exc):
                if isinstance(exc, openai.APIError):
                    raise RequestFailedError(describe_error(exc)) from exc
                raise
            if retry == config.max_retries:
                raise GaveUpError(f"{what}: {describe_error(exc)}") from exc
            delay = backoff_delay(config, retry)
            retry += 1
            log.warning("%s failed (%s); retry %d of %d in %.1f s",
                        what, describe_error(exc), retry, config.max_retries, delay)
            await asyncio.sleep(delay)


async def check_model(client: openai.AsyncOpenAI, endpoint: Endpoint, config: ClientConfig) -> None:
    """Fail before the first request when the server does not serve `endpoint.model` or refuses the key: every
    request would otherwise be recorded as a failed one."""
    try:
        page = await with_retries(lambda: client.models.list(), config, "listing the served models")
    except RequestFailedError as exc:
        raise ShortLVLMError(
            f"the server at {endpoint.base_url} refused to list its models ({exc}); check --base-url and --api-key."
        ) from exc
    served = [model.id for model in page.data]
    if endpoint.model not in served:
        raise ShortLVLMError(
            f"the server at {endpoint.base_url} serves {', '.join(served) or 'no model'}, not {endpoint.model}; "
            "pass one of those as --model."
        )


def load_records(path: str | Path) -> dict[str, dict]:
    """The records already in a records file, by id; a truncated last line (a killed run) is cut off the file."""
    path = Path(path)
    if not path.exists():
        return {}
    *lines, tail = path.read_bytes().split(b"\n")
    if tail:
        log.warning("dropping the truncated last line of %s (the run writing it was killed); "
                    "its request is asked again", path)
        with open(path, "r+b") as f:
            f.truncate(sum(len(line) + 1 for line in lines))
    records: dict[str, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ShortLVLMError(
                f"{path} line {number} is not a JSON record; delete that line (its request is asked again) "
                "or write to another output directory."
            ) from None
        if record["id"] in records:
            log.warning("%s holds id %s twice; keeping the first", path, record["id"])
            continue
        records[record["id"]] = record
    return records


def _check_items(items: Sequence[Item], done: Mapping[str, dict], path: Path) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise ShortLVLMError(f"item id {item.id} occurs twice in the benchmark; ids must be unique to resume.")
        seen.add(item.id)
        if item.id in done and done[item.id]["prompt"] != item.prompt:
            raise ShortLVLMError(
                f"{path} holds a record for id {item.id} with another prompt: it belongs to another benchmark "
                "or data version. Write to another output directory."
            )


async def ask_items(
    endpoints: Replicas,
    benchmark: Benchmark,
    items: Sequence[Item],
    records_path: str | Path,
    config: ClientConfig = ClientConfig(),
) -> dict[str, dict]:
    """Every item's record, by id: those already in `records_path`, then the others asked and appended one by one,
    each of them once, spread over the servers (`config.concurrency` in flight on each).

    Raises ShortLVLMError when a request still fails transiently after `config.max_retries` retries; the records
    finished so far stay in the file, so the same call resumes.
    """
    replicas = replicas_of(endpoints)
    records_path = Path(records_path)
    records_path.parent.mkdir(parents=True, exist_ok=True)
    done = load_records(records_path)
    _check_items(items, done, records_path)
    ids = {item.id for item in items}
    stale = len(done.keys() - ids)
    if stale:
        log.info("ignoring %d records in %s whose ids are not among the %d items asked", stale, records_path,
                 len(items))
    todo = [item for item in items if item.id not in done]
    if len(todo) < len(items):
        log.info("resuming: %d of %d items already answered in %s; asking the other %d",
                 len(items) - len(todo), len(items), records_path, len(todo))
    results = {i: r for i, r in done.items() if i in ids}
    if not todo:
        return results

    clients = [make_client(endpoint, config.timeout_s) for endpoint in replicas]
    queue: asyncio.Queue[Item] = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=benchmark.name, unit="q", disable=None)

    async def check(endpoint: Endpoint, client: openai.AsyncOpenAI) -> None:
        try:
            await check_model(client, endpoint, config)
        except GaveUpError as exc:
            raise _ServerGaveUp(endpoint, exc) from exc

    async def serve_queue(endpoint: Endpoint, client: openai.AsyncOpenAI, out) -> None:
        """One request in flight on `endpoint` at a time, each for the next item nobody has taken."""
        while not queue.empty():
            item = queue.get_nowait()
            messages = image_message(await asyncio.to_thread(data_url, item.image), item.prompt)
            try:
                result = await with_retries(
                    functools.partial(stream_chat, client, endpoint.model, messages, benchmark.max_tokens), config,
                    f"request {item.id}")
                record = _record(benchmark, item, result, None, endpoint)
            except RequestFailedError as exc:
                log.warning("request %s refused (%s); recorded as failed, counted wrong", item.id, exc)
                record = _record(benchmark, item, None, str(exc), endpoint)
            except GaveUpError as exc:
                raise _ServerGaveUp(endpoint, exc) from exc
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            results[item.id] = record
            bar.update()

    with open(records_path, "a", encoding="utf-8") as out:
        tasks: list[asyncio.Future] = []
        try:
            await asyncio.gather(*(check(endpoint, client) for endpoint, client in zip(replicas, clients, strict=True)))
            tasks = [asyncio.ensure_future(serve_queue(endpoint, client, out))
                     for endpoint, client in zip(replicas, clients, strict=True) for _ in range(config.concurrency)]
            await asyncio.gather(*tasks)
        except _ServerGaveUp as exc:
            raise ShortLVLMError(
                f"gave up on the server at {exc.endpoint.base_url} after {config.max_retries} retries ({exc}). "
                f"Check that it is running and reachable; rerunning the same command resumes: the "
                f"{len(results)} finished records in {records_path} are kept."
            ) from exc
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            bar.close()
            for client in clients:
                await client.close()
    return results


def _record(benchmark: Benchmark, item: Item, result: StreamResult | None, error: str | None,
            endpoint: Endpoint) -> dict:
    record = answer_record(benchmark, item, result.text if result else None, error, server=endpoint.base_url)
    if result:
        record.update(latency_s=result.latency_s, ttft_s=result.ttft_s, prompt_tokens=result.prompt_tokens,
                      completion_tokens=result.completion_tokens)
    return record


def answer_record(benchmark: Benchmark, item: Item, reply: str | None, error: str | None = None,
                  server: str | None = None) -> dict:
    """One line of records.jsonl: the reply (None: the request failed), how it parsed, whether it is right, and the
    server that answered (None: answered in-process)."""
    parsed = benchmark.parse(item, reply) if reply is not None else ""
    return {
        "id": item.id, "server": server, "prompt": item.prompt, "answer": reply, "parsed": parsed,
        "gold": item.answer, "correct": reply is not None and benchmark.correct(item, parsed), "latency_s": None,
        "ttft_s": None, "prompt_tokens": None, "completion_tokens": None, "error": error,
    }


def check_run(out_dir: Path, benchmark: Benchmark, model: str) -> None:
    """Refuse to mix two models or benchmarks in one output directory (resuming would blend their records); the
    servers may change from one run to the next."""
    run = {"benchmark": benchmark.name, "model": model}
    path = out_dir / RUN_NAME
    if path.exists():
        before = json.loads(path.read_text())
        if before != run:
            raise ShortLVLMError(
                f"{out_dir} holds the run of {before['model']} on {before['benchmark']}, not {model} "
                f"on {benchmark.name}; write to another output directory."
            )
        return
    write_atomic(path, json.dumps(run) + "\n")


def run_benchmark(
    endpoints: Replicas,
    benchmark: Benchmark,
    out_dir: str | Path,
    *,
    source: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    config: ClientConfig = ClientConfig(),
) -> dict[str, float]:
    """A benchmark end to end: its items asked (resuming from `out_dir`), scored, scores written to scores.json.

    Records of ids outside this item set (another --limit or --seed before) stay in the file but are not scored.
    Several endpoints are replicas of one model, asked together (ask_items).
    """
    out_dir = Path(out_dir)
    if source is not None:
        check_apart(out_dir, [source])  # records and scores never go into the benchmark's data
    model = replicas_of(endpoints)[0].model
    check_run(out_dir, benchmark, model)
    items = benchmark.load(source, limit, seed)
    if not items:
        raise ShortLVLMError(f"{benchmark.name} gave no items (source {source or benchmark.hub_id}, limit {limit}).")
    records = asyncio.run(ask_items(endpoints, benchmark, items, out_dir / RECORDS_NAME, config))
    return write_scores(out_dir, benchmark, model, items, records)


def write_scores(out_dir: Path, benchmark: Benchmark, model: str, items: Sequence[Item],
                 records: Mapping[str, dict]) -> dict[str, float]:
    """Score every item's record by the benchmark's metric and write OUT/scores.json; returns the scores."""
    failed = sum(records[item.id]["error"] is not None for item in items)
    scores = benchmark.score(items, {item.id: records[item.id]["parsed"] for item in items})
    summary = {"benchmark": benchmark.name, "model": model, "items": len(items), "failed": failed, "scores": scores}
    write_atomic(out_dir / SCORES_NAME, json.dumps(summary, indent=2) + "\n")
    log.info("%s: %d items, %d failed requests; scores in %s", benchmark.name, len(items), failed,
             out_dir / SCORES_NAME)
    return scores
