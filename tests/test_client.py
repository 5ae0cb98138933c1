"""The evaluation client and the throughput mode against a fake OpenAI-compatible server that streams canned replies
and fails on command: retries, refusals, resuming, and the latency arithmetic. No vLLM, a few seconds."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import threading
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from shortlvlm_vllm.cli import main
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.benchmarks.base import Benchmark, Item
from shortlvlm_vllm.evaluation.client import (
    RECORDS_NAME,
    SCORES_NAME,
    ClientConfig,
    Endpoint,
    ask_items,
    load_records,
    run_benchmark,
)
from shortlvlm_vllm.evaluation.throughput import (
    RequestTiming,
    arrival_offsets,
    describe,
    run_throughput,
    summarize,
    synthetic_requests,
)
from shortlvlm_vllm.serving.launcher import free_port

FAST = ClientConfig(concurrency=4, timeout_s=5.0, max_retries=3, backoff_s=0.01, max_backoff_s=0.05)
IMAGE = Image.new("RGB", (16, 16), "red")


class YesNo(Benchmark):
    """Item qN asks a yes/no question whose gold answer is yes for even N; its id is in the prompt for the server."""

    name = "yesno"
    hub_id = "none"
    max_tokens = 8

    def __init__(self, size: int = 12) -> None:
        self.size = size

    def load(self, source: str | None = None, limit: int | None = None, seed: int = 0) -> list[Item]:
        items = [Item(f"q{i}", IMAGE, f"[q{i}] Is the box red? Answer yes or no.", "no" if i % 2 else "yes")
                 for i in range(self.size)]
        return random.Random(seed).sample(items, limit) if limit else items

    def parse(self, item: Item, reply: str) -> str:
        match = re.search(r"\w+", reply)
        return match.group(0).lower() if match else ""

    def score(self, items: Sequence[Item], parsed: Mapping[str, str]) -> dict[str, float]:
        return {"accuracy": sum(parsed.get(item.id) == item.answer for item in items) / len(items)}


def _chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fake", "choices": choices}
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class FakeServer:
    """Streams "Yes, it is." to even ids and "No." to odd ones (or `max_tokens` tokens with ignore_eos).

    `faults[id]` lists what the next calls for that id get: an HTTP status, "drop" (connection closed mid-reply),
    "stall" (no byte for 2 s), "stream500" (an error event inside the stream). With `down`, every connection is
    closed before a reply; `down_after` turns `down` on once that many replies have been served.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.calls: Counter = Counter()
        self.bodies: list[dict] = []
        self.faults: dict[str, list] = {}
        self.served = 0
        self.down = False
        self.down_after: int | None = None
        self.delay_s = 0.0

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(f"http://127.0.0.1:{self.port}/v1", "fake")

    async def models(self, request: web.Request) -> web.Response:
        if self.down:
            request.transport.abort()
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model", "created": 0,
                                                               "owned_by": "test"}]})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        text = body["messages"][0]["content"][1]["text"]
        match = re.match(r"\[(\w+)\]", text)
        rid = match.group(1) if match else text
        self.calls[rid] += 1
        fault = self.faults[rid].pop(0) if self.faults.get(rid) else None
        if self.down:
            request.transport.abort()
            return web.Response()
        if isinstance(fault, int):
            return web.json_response({"error": {"message": f"fault {fault}", "code": fault}}, status=fault)
        if fault == "stall":
            await asyncio.sleep(2.0)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if body.get("ignore_eos"):
            tokens = ["tok "] * body["max_tokens"]
        else:
            tokens = ["Yes", ",", " it", " is", "."] if int(rid[1:]) % 2 == 0 else ["No", "."]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_chunk({"role": "assistant", "content": ""}))
        for i, token in enumerate(tokens):
            await response.write(_chunk({"content": token}))
            if i == 0 and fault == "drop":
                request.transport.abort()
                return response
            if i == 0 and fault == "stream500":
                await response.write(b'data: {"error": {"message": "engine died", "code": 500}}\n\n')
                return response
        await response.write(_chunk({}, finish="length" if body.get("ignore_eos") else "stop"))
        if body.get("stream_options", {}).get("include_usage"):
            usage = {"prompt_tokens": 10, "completion_tokens": len(tokens), "total_tokens": 10 + len(tokens)}
            await response.write(_chunk(None, usage=usage))
        await response.write(b"data: [DONE]\n\n")
        self.served += 1
        if self.down_after is not None and self.served >= self.down_after:
            self.down = True
        return response

    def __enter__(self) -> FakeServer:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self.handle)
            app.router.add_get("/v1/models", self.models)
            self.runner = web.AppRunner(app)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        ready.wait()
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


@pytest.fixture
def server():
    with FakeServer() as running:
        yield running


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ids(path) -> list[str]:
    return [r["id"] for r in _lines(path)]


def test_run_writes_one_record_per_item_and_scores(server, tmp_path):
    scores = run_benchmark(server.endpoint, YesNo(), tmp_path, config=FAST)
    assert scores == {"accuracy": 1.0}
    records = _lines(tmp_path / RECORDS_NAME)
    assert sorted(r["id"] for r in records) == sorted(f"q{i}" for i in range(12))
    first = next(r for r in records if r["id"] == "q0")
    assert first["answer"] == "Yes, it is." and first["parsed"] == "yes" and first["gold"] == "yes"
    assert first["correct"] is True and first["error"] is None
    assert first["prompt_tokens"] == 10 and first["completion_tokens"] == 5
    assert 0 < first["ttft_s"] <= first["latency_s"]
    summary = json.loads((tmp_path / SCORES_NAME).read_text())
    assert summary["scores"] == scores and summary["items"] == 12 and summary["failed"] == 0
    body = server.bodies[0]
    assert body["stream"] is True and body["temperature"] == 0.0 and body["max_tokens"] == YesNo.max_tokens
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("fault", [503, 500, "drop", "stall", "stream500"])
def test_transient_failures_are_retried_and_counted_once(server, tmp_path, caplog, fault):
    server.faults = {"q3": [fault, fault]}
    config = ClientConfig(concurrency=4, timeout_s=0.5, max_retries=3, backoff_s=0.01)
    with caplog.at_level(logging.WARNING, logger="shortlvlm_vllm.evaluation.client"):
        scores = run_benchmark(server.endpoint, YesNo(), tmp_path, config=config)
    assert server.calls["q3"] == 3
    assert scores == {"accuracy": 1.0}
    assert _ids(tmp_path / RECORDS_NAME).count("q3") == 1
    retries = [m for m in caplog.messages if m.startswith("request q3 failed")]
    assert len(retries) == 2 and "retry 2 of 3" in retries[1]


def test_4xx_is_not_retried_but_recorded_as_failed(server, tmp_path):
    server.faults = {"q4": [400, 400, 400]}
    scores = run_benchmark(server.endpoint, YesNo(), tmp_path, config=FAST)
    assert server.calls["q4"] == 1
    record = next(r for r in _lines(tmp_path / RECORDS_NAME) if r["id"] == "q4")
    assert record["correct"] is False and record["parsed"] == "" and record["answer"] is None
    assert "400" in record["error"] and "fault 400" in record["error"]
    assert scores == {"accuracy": 11 / 12}
    assert json.loads((tmp_path / SCORES_NAME).read_text())["failed"] == 1
    assert len(_ids(tmp_path / RECORDS_NAME)) == 12


def test_unreachable_server_stops_the_run_with_a_resumable_error(tmp_path):
    endpoint = Endpoint(f"http://127.0.0.1:{free_port()}/v1", "fake")
    with pytest.raises(ShortLVLMError, match="rerunning the same command resumes") as exc:
        run_benchmark(endpoint, YesNo(), tmp_path, config=FAST)
    assert endpoint.base_url in str(exc.value)
    assert (tmp_path / RECORDS_NAME).read_text() == ""


def test_server_down_mid_run_then_rerun_resumes_without_asking_twice(server, tmp_path):
    server.down_after = 5
    with pytest.raises(ShortLVLMError, match="5 finished records"):
        run_benchmark(server.endpoint, YesNo(), tmp_path, config=FAST)
    finished = _ids(tmp_path / RECORDS_NAME)
    assert len(finished) == 5
    server.down, server.down_after = False, None
    server.calls.clear()
    assert run_benchmark(server.endpoint, YesNo(), tmp_path, config=FAST) == {"accuracy": 1.0}
    ids = _ids(tmp_path / RECORDS_NAME)
    assert sorted(ids) == sorted(f"q{i}" for i in range(12))  # every id exactly once
    assert not any(server.calls[i] for i in finished)
    assert all(server.calls[f"q{i}"] == 1 for i in range(12) if f"q{i}" not in finished)


def test_truncated_last_line_is_dropped_and_its_request_asked_again(server, tmp_path, caplog):
    records = tmp_path / RECORDS_NAME
    run_benchmark(server.endpoint, YesNo(size=3), tmp_path, config=FAST)
    text = records.read_text()
    records.write_text(text + '{"id": "q5", "prompt": "[q5] Is th')  # the run writing q5's record was killed
    server.calls.clear()
    with caplog.at_level(logging.WARNING, logger="shortlvlm_vllm.evaluation.client"):
        assert run_benchmark(server.endpoint, YesNo(size=12), tmp_path, config=FAST) == {"accuracy": 1.0}
    assert any("truncated last line" in m for m in caplog.messages)
    assert sorted(_ids(records)) == sorted(f"q{i}" for i in range(12))
    assert not any(server.calls[f"q{i}"] for i in range(3))
    assert sum(server.calls.values()) == 9


def test_cancelled_run_resumes(server, tmp_path):
    server.delay_s = 0.05
    records = tmp_path / RECORDS_NAME
    items = YesNo(size=16).load()

    async def interrupted() -> None:
        task = asyncio.ensure_future(ask_items(server.endpoint, YesNo(), items, records, FAST))
        while not records.exists() or len(records.read_text().splitlines()) < 4:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    finished = _ids(records)
    assert 4 <= len(finished) < 16
    server.calls.clear()
    result = asyncio.run(ask_items(server.endpoint, YesNo(), items, records, FAST))
    assert sorted(result) == sorted(_ids(records)) == sorted(item.id for item in items)
    assert not any(server.calls[i] for i in finished)


def test_records_outside_the_item_set_are_kept_but_not_scored(server, tmp_path):
    run_benchmark(server.endpoint, YesNo(), tmp_path, config=FAST)
    server.calls.clear()
    assert run_benchmark(server.endpoint, YesNo(), tmp_path, limit=4, seed=1, config=FAST) == {"accuracy": 1.0}
    assert not server.calls
    assert json.loads((tmp_path / SCORES_NAME).read_text())["items"] == 4
    assert len(_ids(tmp_path / RECORDS_NAME)) == 12


def test_a_model_the_server_does_not_serve_is_refused_before_any_request(server, tmp_path):
    with pytest.raises(ShortLVLMError, match="serves fake, not llava"):
        run_benchmark(Endpoint(server.endpoint.base_url, "llava"), YesNo(), tmp_path, config=FAST)
    assert not server.bodies


def test_output_of_another_run_is_refused(server, tmp_path):
    run_benchmark(server.endpoint, YesNo(size=2), tmp_path, config=FAST)
    with pytest.raises(ShortLVLMError, match="another output directory"):
        run_benchmark(Endpoint(server.endpoint.base_url, "other-model"), YesNo(size=2), tmp_path, config=FAST)
    changed = YesNo(size=2).load()
    changed[0] = Item("q0", IMAGE, "[q0] Another question?", "yes")
    with pytest.raises(ShortLVLMError, match="another prompt"):
        asyncio.run(ask_items(server.endpoint, YesNo(), changed, tmp_path / RECORDS_NAME, FAST))


def test_corrupt_line_inside_the_records_is_an_error(tmp_path):
    path = tmp_path / RECORDS_NAME
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ShortLVLMError, match="line 2"):
        load_records(path)


def test_summary_arithmetic_on_known_timings():
    timings = [
        RequestTiming(latency_s=1.0, ttft_s=0.1, itl_s=(0.3, 0.3, 0.3), prompt_tokens=100, output_tokens=4),
        RequestTiming(latency_s=2.0, ttft_s=0.2, itl_s=(0.9, 0.9), prompt_tokens=50, output_tokens=3),
        RequestTiming(latency_s=0.5, ttft_s=0.5, itl_s=(), prompt_tokens=20, output_tokens=1),  # no TPOT
        RequestTiming(latency_s=9.0, ttft_s=None, itl_s=(), prompt_tokens=0, output_tokens=0, error="HTTP 500"),
    ]
    result = summarize(timings, duration=4.0, output_len=4, max_concurrency=2)
    assert (result.num_prompts, result.completed, result.failed) == (4, 3, 1)
    assert (result.total_input_tokens, result.total_output_tokens) == (170, 8)
    assert result.request_throughput == pytest.approx(0.75)
    assert result.output_throughput == pytest.approx(2.0)
    assert result.total_token_throughput == pytest.approx(44.5)
    # TTFT 100, 200, 500 ms: mean 266.67, p50 200, p99 = 200 + 0.98 * 300 (linear interpolation)
    assert result.mean_ttft_ms == pytest.approx(800 / 3)
    assert result.median_ttft_ms == pytest.approx(200.0)
    assert result.p99_ttft_ms == pytest.approx(494.0)
    # TPOT (1.0 - 0.1) / 3 = 300 ms and (2.0 - 0.2) / 2 = 900 ms; the 1-token request has none
    assert result.mean_tpot_ms == pytest.approx(600.0)
    assert result.median_tpot_ms == pytest.approx(600.0)
    assert result.p99_tpot_ms == pytest.approx(300 + 0.99 * 600)
    # ITL 300, 300, 300, 900, 900 ms: p50 300, p99 = 900
    assert result.mean_itl_ms == pytest.approx(540.0)
    assert result.median_itl_ms == pytest.approx(300.0)
    assert result.p99_itl_ms == pytest.approx(900.0)
    assert re.search(r"TTFT mean / p50 / p99 \(ms\) +266.67 / 200.00 / 494.00", describe(result))
    empty = summarize(timings[3:], duration=1.0, output_len=4)
    assert empty.completed == 0 and empty.mean_ttft_ms is None and "-" in describe(empty)


def test_poisson_arrivals_are_seeded_and_at_the_rate():
    assert arrival_offsets(3, None) == [0.0, 0.0, 0.0]
    offsets = arrival_offsets(4000, request_rate=20.0, seed=3)
    assert offsets == arrival_offsets(4000, request_rate=20.0, seed=3) != arrival_offsets(4000, 20.0, seed=4)
    assert offsets[0] == 0.0 and min(np.diff(offsets)) >= 0
    assert np.mean(np.diff(offsets)) == pytest.approx(1 / 20, rel=0.05)


@pytest.mark.parametrize("load", [{"concurrency": 2}, {"request_rate": 50.0}, {}])
def test_throughput_replays_every_request_with_fixed_output_length(server, load, tmp_path):
    result = run_throughput(server.endpoint, synthetic_requests(6, image_size=32), output_len=5, **load)
    assert (result.completed, result.failed, result.total_output_tokens) == (6, 0, 30)
    assert len(server.bodies) == 7  # one warm-up, not counted
    assert all(b["max_tokens"] == 5 and b["ignore_eos"] is True and b["stream"] for b in server.bodies)
    assert result.mean_ttft_ms > 0 and result.mean_tpot_ms > 0 and result.duration > 0
    assert result.max_concurrency == load.get("concurrency") and result.request_rate == load.get("request_rate")
    assert json.loads(result.write_json(tmp_path / "r.json").read_text())["completed"] == 6


def test_throughput_counts_failures_and_refuses_a_dead_server(server):
    requests = synthetic_requests(4, image_size=32)
    server.faults = {requests[2].prompt: [503]}
    result = run_throughput(server.endpoint, requests, output_len=3, concurrency=4)
    assert (result.completed, result.failed) == (3, 1)
    with pytest.raises(ShortLVLMError, match="warm-up request"):
        run_throughput(Endpoint(f"http://127.0.0.1:{free_port()}/v1", "fake"), requests, output_len=3)


def test_cli_eval_and_bench(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("shortlvlm_vllm.evaluation.benchmarks.get_benchmark", lambda name: YesNo(), raising=False)
    url = server.endpoint.base_url
    assert main(["eval", "yesno", "--base-url", url, "--model", "fake", "--limit", "6",
                 "--concurrency", "3", "-o", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "accuracy  1.0000" in out and len(_ids(tmp_path / "eval" / RECORDS_NAME)) == 6
    assert main(["bench", "--base-url", url, "--model", "fake", "--num-prompts", "4", "--output-len", "3",
                 "--request-rate", "100", "-o", str(tmp_path / "bench.json")]) == 0
    assert "Requests completed / failed" in capsys.readouterr().out
    assert json.loads((tmp_path / "bench.json").read_text())["total_output_tokens"] == 12
    assert main(["bench", "--base-url", url, "--model", "fake", "--data", "x"]) == 2
    assert main(["eval", "yesno", "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--model", "fake",
                 "--max-retries", "0", "-o", str(tmp_path / "dead")]) == 2
    assert "resumes" in capsys.readouterr().err


# Data parallelism: several replicas of one model share the requests.


@pytest.fixture
def replica():
    with FakeServer() as running:
        yield running


def test_replicas_share_the_items_each_asked_once(server, replica, tmp_path):
    server.delay_s = replica.delay_s = 0.02  # both get work
    scores = run_benchmark([server.endpoint, replica.endpoint], YesNo(size=40), tmp_path / "two", config=FAST)
    records = _lines(tmp_path / "two" / RECORDS_NAME)
    assert sorted(r["id"] for r in records) == sorted(f"q{i}" for i in range(40))
    assert all(server.calls[f"q{i}"] + replica.calls[f"q{i}"] == 1 for i in range(40))
    by_server = Counter(r["server"] for r in records)
    assert by_server == {server.endpoint.base_url: sum(server.calls.values()),
                         replica.endpoint.base_url: sum(replica.calls.values())}
    assert min(by_server.values()) >= 10
    assert scores == run_benchmark(server.endpoint, YesNo(size=40), tmp_path / "one", config=FAST)


def test_a_replica_down_mid_run_stops_it_and_a_rerun_on_the_others_resumes(server, replica, tmp_path):
    server.delay_s = replica.delay_s = 0.02
    replica.down_after = 3
    with pytest.raises(ShortLVLMError, match="rerunning the same command resumes") as exc:
        run_benchmark([server.endpoint, replica.endpoint], YesNo(size=40), tmp_path, config=FAST)
    assert replica.endpoint.base_url in str(exc.value) and server.endpoint.base_url not in str(exc.value)
    finished = _ids(tmp_path / RECORDS_NAME)
    assert 3 <= len(finished) < 40
    server.calls.clear()
    assert run_benchmark([server.endpoint], YesNo(size=40), tmp_path, config=FAST) == {"accuracy": 1.0}
    assert sorted(_ids(tmp_path / RECORDS_NAME)) == sorted(f"q{i}" for i in range(40))  # every id exactly once
    assert sum(server.calls.values()) == 40 - len(finished) and not any(server.calls[i] for i in finished)


def test_replicas_must_be_one_model_each_named_once(server, replica, tmp_path):
    with pytest.raises(ShortLVLMError, match="one model under one name"):
        run_benchmark([server.endpoint, Endpoint(replica.endpoint.base_url, "other")], YesNo(), tmp_path, config=FAST)
    with pytest.raises(ShortLVLMError, match="named twice"):
        run_benchmark([server.endpoint, server.endpoint], YesNo(), tmp_path, config=FAST)
    assert not server.bodies and not replica.bodies


def test_throughput_spreads_the_requests_in_turn(server, replica):
    result = run_throughput([server.endpoint, replica.endpoint], synthetic_requests(6, image_size=32), output_len=5,
                            concurrency=4)
    assert (result.completed, result.failed, result.total_output_tokens, result.servers) == (6, 0, 30, 2)
    assert len(server.bodies) == len(replica.bodies) == 4  # one warm-up each, then requests 0, 2, 4 and 1, 3, 5


def test_cli_takes_several_base_urls(server, replica, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("shortlvlm_vllm.evaluation.benchmarks.get_benchmark", lambda name: YesNo(), raising=False)
    urls = [server.endpoint.base_url, replica.endpoint.base_url]
    assert main(["eval", "yesno", "--base-url", urls[0], "--base-url", urls[1], "--model", "fake",
                 "--concurrency", "1", "-o", str(tmp_path / "eval")]) == 0
    assert {r["server"] for r in _lines(tmp_path / "eval" / RECORDS_NAME)} == set(urls)
    assert main(["bench", "--base-url", *urls, "--model", "fake", "--num-prompts", "4", "--output-len", "3",
                 "-o", str(tmp_path / "bench.json")]) == 0
    assert json.loads((tmp_path / "bench.json").read_text())["servers"] == 2
    assert "Servers (replicas)" in capsys.readouterr().out
