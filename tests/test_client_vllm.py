"""The evaluation client and the throughput mode against a live vLLM server of the tiny LLaVA, and the fault the
client exists for: the server killed mid-run and restarted on the same port; and two replicas of the model sharing one
evaluation (data parallelism). Two server starts for the module (the server and its replica), one restart in the last
test."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import threading
import time
from collections import defaultdict

import pytest

from shortlvlm_vllm.cli import main
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation import client as client_module
from shortlvlm_vllm.evaluation.benchmarks import Synthetic
from shortlvlm_vllm.evaluation.client import RECORDS_NAME, SCORES_NAME, ClientConfig, Endpoint, ask_items, run_benchmark
from shortlvlm_vllm.evaluation.throughput import run_throughput, synthetic_requests
from shortlvlm_vllm.serving.launcher import VLLMServer

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(3000)]  # a start or restart can take 10 minutes on a busy CPU
MODEL = "tiny"
ITEMS = 40


class LongSynthetic(Synthetic):
    """The synthetic benchmark with replies long enough (random weights rarely stop) that requests are in flight
    when the server is killed; items generated once."""

    max_tokens = 48

    @functools.lru_cache  # noqa: B019 - a test-lifetime object: the cache keeping it alive is harmless
    def load(self, source: str | None = None, limit: int | None = None, seed: int = 0):
        return super().load(source, limit, seed)


def _serve(tiny_llava, tmp_path_factory, log_name: str):
    log_path = tmp_path_factory.mktemp("logs") / log_name
    # Starts have taken 6 and restarts over 10 minutes while other jobs held both cores: generous limits.
    return VLLMServer(tiny_llava, log_path=log_path, dtype="float32", served_model_name=MODEL, startup_timeout=1500,
                      extra_args=["--limit-mm-per-prompt", '{"image": 1}'])


@pytest.fixture(scope="module")
def server(tiny_llava, tmp_path_factory):
    with _serve(tiny_llava, tmp_path_factory, "vllm.log") as running:
        yield running


@pytest.fixture(scope="module")
def endpoint(server) -> Endpoint:
    return Endpoint(server.base_url, MODEL, server.api_key)


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_synthetic_end_to_end(endpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "synthetic", "--base-url", endpoint.base_url, "--model", MODEL, "--limit", "20",
                 "--concurrency", "4", "-o", str(out)]) == 0
    assert "accuracy" in capsys.readouterr().out
    records = _records(out / RECORDS_NAME)
    assert sorted(r["id"] for r in records) == sorted(item.id for item in Synthetic().load(limit=20))
    assert all(r["error"] is None and 1 <= r["completion_tokens"] <= Synthetic.max_tokens for r in records)
    assert all(r["prompt_tokens"] > 64 and 0 < r["ttft_s"] <= r["latency_s"] for r in records if r["answer"])
    summary = json.loads((out / SCORES_NAME).read_text())
    assert summary["items"] == 20 and summary["failed"] == 0
    assert summary["scores"]["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 20)


def test_throughput_does_the_requested_work(endpoint):
    result = run_throughput(endpoint, synthetic_requests(8, image_size=64), output_len=8, concurrency=4)
    assert (result.completed, result.failed, result.total_output_tokens) == (8, 0, 64)
    assert result.total_input_tokens > 8 * 64  # the image alone is 64 tokens
    assert result.duration > 0 and result.request_throughput == pytest.approx(8 / result.duration)
    assert 0 < result.median_ttft_ms <= result.p99_ttft_ms and 0 < result.median_tpot_ms <= result.p99_tpot_ms
    assert result.mean_itl_ms > 0


@pytest.fixture(scope="module")
def replica(tiny_llava, tmp_path_factory):
    """A second server of the same checkpoint under the same name: a data-parallel replica."""
    with _serve(tiny_llava, tmp_path_factory, "replica.log") as running:
        yield running


def test_two_replicas_answer_each_question_once_and_score_as_one_server(endpoint, replica, tmp_path, monkeypatch):
    """One request in flight per server, so each reply is computed alone, as in the single-server run: the same
    answers, whichever replica gave them."""
    items = Synthetic().load(limit=24)
    ids = sorted(item.id for item in items)
    one_at_a_time = ClientConfig(concurrency=1, timeout_s=300)
    asked: list[str] = []
    original = client_module.with_retries

    def counting(call, config, what):
        if what.startswith("request "):
            asked.append(what.removeprefix("request "))
        return original(call, config, what)

    monkeypatch.setattr(client_module, "with_retries", counting)
    single = run_benchmark(endpoint, Synthetic(), tmp_path / "one", limit=24, config=one_at_a_time)
    assert sorted(asked) == ids
    asked.clear()
    replicas = [endpoint, Endpoint(replica.base_url, MODEL, replica.api_key)]
    both = run_benchmark(replicas, Synthetic(), tmp_path / "two", limit=24, config=one_at_a_time)
    assert sorted(asked) == ids  # each question asked once, of one replica
    records = {name: {r["id"]: r for r in _records(tmp_path / name / RECORDS_NAME)} for name in ("one", "two")}
    assert sorted(records["two"]) == ids and len(_records(tmp_path / "two" / RECORDS_NAME)) == len(ids)
    by_server = {url: sum(r["server"] == url for r in records["two"].values()) for url in
                 (endpoint.base_url, replica.base_url)}
    # both replicas answered; how many each takes is a race (on a quiet machine a toy reply takes ~50 ms, and one
    # slow first request lets the other server take nearly all 24)
    assert min(by_server.values()) >= 1, by_server
    assert {i: r["answer"] for i, r in records["two"].items()} == {i: r["answer"] for i, r in records["one"].items()}
    assert both == single


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _lines(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@contextlib.contextmanager
def _background_loop():
    """An event loop in a thread, for runs the test watches and interrupts; whatever still runs is cancelled at exit
    (a failed check must not wait for a patient client's retries)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def cancel_all() -> None:
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        yield loop
    finally:
        asyncio.run_coroutine_threadsafe(cancel_all(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_server_killed_mid_run_loses_and_repeats_no_request(server, endpoint, tmp_path, monkeypatch, caplog):
    """Two runs are in flight when vLLM is SIGKILLed: a patient one whose retries ride through the restart, and an
    impatient one that stops with the resumable error and is rerun. Both end with every id once, each asked once."""
    benchmark = LongSynthetic()
    items = benchmark.load(None, ITEMS, 0)
    ids = sorted(item.id for item in items)
    # patient enough for the restart (a retry every 4-6 s for up to 25 minutes)
    patient = ClientConfig(concurrency=4, timeout_s=300, max_retries=300, backoff_s=0.5, max_backoff_s=4)
    impatient = ClientConfig(concurrency=4, timeout_s=300, max_retries=2, backoff_s=0.1)
    asked: dict[ClientConfig, list[str]] = defaultdict(list)  # ids each run sent (once per id, retries aside)
    original = client_module.with_retries

    def counting(call, config, what):
        if what.startswith("request "):
            asked[config].append(what.removeprefix("request "))
        return original(call, config, what)

    monkeypatch.setattr(client_module, "with_retries", counting)
    dir_a, dir_b = tmp_path / "patient", tmp_path / "impatient"
    caplog.set_level(logging.INFO, logger="shortlvlm_vllm.evaluation.client")
    with _background_loop() as loop:
        run_a = asyncio.run_coroutine_threadsafe(
            ask_items(endpoint, benchmark, items, dir_a / RECORDS_NAME, patient), loop)
        run_b = asyncio.run_coroutine_threadsafe(
            ask_items(endpoint, benchmark, items, dir_b / RECORDS_NAME, impatient), loop)
        _wait_for(lambda: min(_lines(dir_a / RECORDS_NAME), _lines(dir_b / RECORDS_NAME)) >= 8, 600, "8 records")
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
        killed_with = {"a": _lines(dir_a / RECORDS_NAME), "b": _lines(dir_b / RECORDS_NAME)}
        assert max(killed_with.values()) < ITEMS, f"a run finished before the kill: {killed_with}"

        with pytest.raises(ShortLVLMError, match="rerunning the same command resumes") as gave_up:
            run_b.result(timeout=120)
        assert endpoint.base_url in str(gave_up.value)
        server.start()  # same port
        run_a.result(timeout=1500)

    # (a) the patient run rode through the restart: each id asked once (retries aside), none lost or doubled
    assert any("retry" in m and "ConnectionError" in m for m in caplog.messages), "no retry was logged"
    assert sorted(asked[patient]) == ids
    # (b) the stopped run, rerun, asked exactly the ids it had not finished
    finished_b = [r["id"] for r in _records(dir_b / RECORDS_NAME)]
    asked_before = len(asked[impatient])
    scores_b = run_benchmark(endpoint, benchmark, dir_b, limit=ITEMS, config=impatient)
    assert any(f"resuming: {len(finished_b)} of {ITEMS} items already answered" in m for m in caplog.messages)
    assert sorted(asked[impatient][asked_before:]) == sorted(set(ids) - set(finished_b))
    # both: every id exactly once on disk, and scored once (scoring run A asks nothing more)
    scores_a = run_benchmark(endpoint, benchmark, dir_a, limit=ITEMS, config=patient)
    assert sorted(asked[patient]) == ids
    for out, scores in ((dir_a, scores_a), (dir_b, scores_b)):
        records = _records(out / RECORDS_NAME)
        assert sorted(r["id"] for r in records) == ids
        assert all(r["error"] is None for r in records)
        summary = json.loads((out / SCORES_NAME).read_text())
        assert summary["items"] == ITEMS and summary["scores"] == scores
        assert scores["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / ITEMS)
