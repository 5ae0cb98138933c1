"""The soak's bookkeeping against a fake server that misbehaves on purpose (500s, errors inside a stream, dropped
connections): every 5xx counted, every dropped connection retried once and counted, lost valid requests and the
server's memory reported; and its limits (loopback targets, bounded clients and time). A few seconds, no vLLM."""

from __future__ import annotations

import json
import os

import pytest
from aiohttp import web

from shortlvlm_vllm.cli import main
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.client import Endpoint
from shortlvlm_vllm.evaluation.soak import INVALID_KINDS, Soak, SoakConfig, describe_soak, memory_summary
from shortlvlm_vllm.evaluation.throughput import synthetic_requests

from .test_client import FakeServer


def _sse(data: dict | str) -> bytes:
    return b"data: " + (data if isinstance(data, str) else json.dumps(data)).encode() + b"\n\n"


class Misbehaving(FakeServer):
    """Refuses what a real server refuses; drops the connection the first time it sees each valid body, and answers
    every fourth valid request it serves with 500 (inside the stream, for a streamed one)."""

    def __init__(self, valid_urls: set[str]) -> None:
        super().__init__()
        self.valid_urls = valid_urls
        self.seen: set[str] = set()
        self.drops = 0
        self.errors = 0
        self.invalid = 0
        self.served = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            self.invalid += 1
            return web.json_response({"error": {"message": "bad JSON", "code": 400}}, status=400)
        urls = [part["image_url"]["url"] for m in body["messages"] for part in m["content"] if "image_url" in part]
        if body["model"] != "m":
            self.invalid += 1
            return web.json_response({"error": {"message": "no such model", "code": 404}}, status=404)
        if not urls or urls[0] not in self.valid_urls or body["max_tokens"] < 1:
            self.invalid += 1
            return web.json_response({"error": {"message": "invalid", "code": 400}}, status=400)
        if raw not in self.seen:
            self.seen.add(raw)
            self.drops += 1
            request.transport.abort()
            return web.Response()
        self.served += 1
        fail = self.served % 4 == 0
        if not body["stream"]:
            if fail:
                self.errors += 1
                return web.json_response({"error": {"message": "cache drift", "code": 500}}, status=500)
            return web.json_response({"choices": [{"message": {"role": "assistant", "content": "a box"}}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if fail:  # as vLLM does when the engine fails a request after the 200 went out
            self.errors += 1
            await response.write(_sse({"error": {"message": "cache drift", "code": 500}}))
            return response
        await response.write(_sse({"choices": [{"delta": {"content": "a"}}]}))
        await response.write(_sse({"choices": [{"delta": {"content": " box"}}]}))
        await response.write(_sse("[DONE]"))
        return response


REQUESTS = synthetic_requests(3, image_size=32)


def _soak(**config) -> tuple[object, Misbehaving]:
    soak_config = SoakConfig(**{"clients": 6, "duration_s": 3.0, "sample_every_s": 0.5, "baseline_s": 1.0,
                                "timeout_s": 10.0, **config})
    with Misbehaving(set()) as server:
        soak = Soak(Endpoint(f"http://127.0.0.1:{server.port}/v1", "m"), REQUESTS, soak_config,
                    server_pid=os.getpid())
        server.valid_urls = {url for _, url in soak.valid}
        return soak.run(), server


def test_every_5xx_drop_and_retry_is_counted():
    result, server = _soak()
    assert result.requests > 12
    assert result.status["5xx"] == server.errors > 0
    # the warm-up request (not counted) is the first valid body the server sees, so its first drop is not counted
    retried = result.valid["retried"] + result.by_kind.get("abandoned", {}).get("retried", 0)
    assert retried == server.drops - 1 > 0
    # a 5xx on a valid request loses it; a dropped connection was retried and answered
    assert result.valid["lost"] == sum(result.by_kind[k].get("5xx", 0) for k in ("valid", "valid-stream")) > 0
    assert result.valid["answered"] + result.valid["lost"] == result.valid["sent"]
    invalid = sum(result.by_kind[k]["sent"] for k in INVALID_KINDS if k in result.by_kind)
    assert invalid == server.invalid == sum(result.by_kind[k].get("4xx", 0) for k in INVALID_KINDS
                                            if k in result.by_kind)
    assert result.passed["no_5xx"] is False and result.passed["no_valid_request_lost"] is False
    assert len(result.memory["samples_mb"]) >= 3 and result.memory["baseline_mb"] > 0
    assert result.load_average["mean_1min"] is not None
    assert result.valid["latency_p50_s"] <= result.valid["latency_p99_s"]
    assert "cache drift" in describe_soak(result)


def test_memory_growth_is_measured_from_the_first_sample_after_the_baseline():
    samples = [[0, 100.0, 1], [30, 900.0, 1], [60, 1000.0, 1], [120, 1015.0, 1], [180, 1010.0, 1]]
    summary = memory_summary(samples, baseline_s=60)
    assert summary["baseline_mb"] == 1000.0 and summary["max_after_baseline_mb"] == 1015.0
    assert summary["growth_after_baseline"] == pytest.approx(0.015) and summary["final_mb"] == 1010.0
    assert memory_summary(samples[:3], baseline_s=60)["growth_after_baseline"] is None


@pytest.mark.parametrize(("url", "config", "message"), [
    ("http://10.1.2.3:8000/v1", {}, "only a server on this machine"),
    ("http://127.0.0.1:8000/v1", {"clients": 0}, "1 to 512 clients"),
    ("http://127.0.0.1:8000/v1", {"clients": 10_000}, "1 to 512 clients"),
    ("http://127.0.0.1:8000/v1", {"duration_s": 7200}, "up to 3600 s"),
    ("http://127.0.0.1:8000/v1", {"valid_fraction": 0.9, "abandon_fraction": 0.2}, "add up to at most 1"),
])
def test_targets_and_bounds_are_checked_before_anything_is_sent(url, config, message):
    with pytest.raises(ShortLVLMError, match=message):
        Soak(Endpoint(url, "m"), REQUESTS, SoakConfig(**config))


def test_cli_soak_writes_the_figures_and_exits_1_on_a_5xx(tmp_path, capsys):
    with Misbehaving(set()) as server:
        server.valid_urls = {url for _, url in Soak(Endpoint(f"http://127.0.0.1:{server.port}/v1", "m"),
                                                    synthetic_requests(2)).valid}
        code = main(["bench", "--soak", "2", "--base-url", f"http://127.0.0.1:{server.port}/v1", "--model", "m",
                     "--concurrency", "4", "--num-prompts", "2", "--server-pid", str(os.getpid()),
                     "-o", str(tmp_path / "soak.json")])
    figures = json.loads((tmp_path / "soak.json").read_text())
    assert code == (1 if figures["status"].get("5xx") or figures["valid"]["lost"] else 0)
    assert figures["config"]["clients"] == 4 and figures["requests"] > 0
    assert "status classes:" in capsys.readouterr().out
    assert main(["bench", "--soak", "2", "--request-rate", "3", "--base-url", "http://127.0.0.1:9/v1",
                 "--model", "m"]) == 2
