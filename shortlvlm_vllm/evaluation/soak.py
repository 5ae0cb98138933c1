"""`shortlvlm bench --soak`: C clients for T seconds against an OpenAI-compatible server on this machine.

Each client keeps one connection and sends, one after the other, a mix of valid requests (some streamed), requests
it abandons after the first streamed bytes, and invalid ones (a corrupt or empty image, malformed JSON, a remote or
a local image URL, no messages, a negative max_tokens, an unknown model). It reports the status classes per kind,
the valid requests lost (no 2xx answer: a timeout, a 4xx/5xx, a connection dropped twice; a dropped connection is
retried once, and such retries are counted), latency p50/p99 of the valid answers, the connections the server
closed after a response, and the resident memory of the server's process tree and the machine's load, sampled
over time. Targets are limited to loopback addresses, and every run to a bounded time and request count.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import os
import random
import socket
import ssl
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import httpx
import numpy as np
from tqdm.auto import tqdm

from shortlvlm_vllm.chat import data_url, image_message
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.client import Endpoint
from shortlvlm_vllm.evaluation.throughput import BenchRequest

log = logging.getLogger(__name__)

MAX_CLIENTS = 512
MAX_DURATION_S = 3600.0
VALID_KINDS = ("valid", "valid-stream")
ABANDONED = "abandoned"
# An image URL on the discard port of this machine: refused by a server that fetches nothing, and unreachable for one
# that fetches everything; either way the right answer is a 4xx.
REMOTE_URL = "http://127.0.0.1:9/soak.png"
LOCAL_URL = "file:///etc/hostname"
INVALID_KINDS = ("corrupt-image", "zero-byte-image", "remote-url", "file-url", "bad-json", "no-messages",
                 "negative-max-tokens", "unknown-model")
DROPPED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.ConnectError)


@dataclass(frozen=True)
class SoakConfig:
    clients: int = 64
    duration_s: float = 300.0
    output_len: int = 16  # max_tokens of a valid request
    valid_fraction: float = 0.85
    stream_fraction: float = 0.3  # of the valid requests
    abandon_fraction: float = 0.05  # the rest of the requests are invalid ones
    timeout_s: float = 120.0  # per request: no answer within it counts as lost
    max_requests: int = 1_000_000
    sample_every_s: float = 5.0
    baseline_s: float = 60.0  # memory growth is measured from the first sample after this
    seed: int = 0

    def check(self) -> None:
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise ShortLVLMError(f"a soak runs 1 to {MAX_CLIENTS} clients, not {self.clients}.")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ShortLVLMError(f"a soak runs for up to {MAX_DURATION_S:.0f} s, not {self.duration_s:g}.")
        if self.valid_fraction + self.abandon_fraction > 1 or min(self.valid_fraction, self.abandon_fraction) < 0:
            raise ShortLVLMError("the valid and abandoned fractions must be non-negative and add up to at most 1.")
        if self.output_len < 1 or self.max_requests < 1:
            raise ShortLVLMError("a soak needs --output-len and the request bound to be at least 1.")


@dataclass
class Outcome:
    kind: str
    status: int | None  # None: no answer (timeout, dropped twice)
    ok: bool  # a valid answer (2xx with a reply), an abandoned stream that started, a 4xx for an invalid request
    latency_s: float
    retries: int
    new_connection: bool  # the request had to open a connection although its client held one
    after: str | None  # the status class of the client's previous response, when it held its connection
    error: str | None = None


@dataclass
class SoakResult:
    base_url: str
    model: str
    config: dict
    duration_s: float
    requests: int
    status: dict[str, int]
    by_kind: dict[str, dict[str, int]]
    valid: dict[str, float | int | None]
    connections: dict[str, int]
    memory: dict
    load_average: dict
    server_errors: list[str] = field(default_factory=list)  # the first few 5xx bodies and lost-request reasons

    @property
    def passed(self) -> dict[str, bool | None]:
        growth = self.memory.get("growth_after_baseline")
        return {"no_5xx": self.status.get("5xx", 0) == 0, "no_valid_request_lost": self.valid["lost"] == 0,
                "memory_growth_under_2pct": None if growth is None else growth < 0.02}

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def check_loopback(base_url: str) -> None:
    """A soak loads a server hard: only one on this machine may be its target."""
    host = urlsplit(base_url).hostname
    if not host:
        raise ShortLVLMError(f"--base-url {base_url} names no host.")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ShortLVLMError(f"cannot resolve {host} ({exc}).") from exc
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ShortLVLMError(f"a soak targets only a server on this machine (a loopback address such as 127.0.0.1), "
                             f"not {host}.")


def listening_pid(port: int) -> int | None:
    """The process listening on a local TCP port, if this user may see it."""
    import psutil

    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def tree_rss(pid: int) -> int | None:
    """Resident bytes of a process and all its descendants (None once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


class Soak:
    """One run: `Soak(endpoint, requests, config).run()`; `requests` are the valid prompts and images, reused."""

    def __init__(self, endpoint: Endpoint, requests: Sequence[BenchRequest], config: SoakConfig = SoakConfig(),
                 server_pid: int | None = None) -> None:
        config.check()
        check_loopback(endpoint.base_url)
        if not requests:
            raise ShortLVLMError("a soak needs at least one valid request (--num-prompts).")
        self.endpoint = endpoint
        self.config = config
        self.url = endpoint.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Authorization": f"Bearer {endpoint.api_key}", "Content-Type": "application/json"}
        self.valid = [(r.prompt, data_url(r.image)) for r in requests]
        port = urlsplit(endpoint.base_url).port or 80
        self.server_pid = server_pid or listening_pid(port)
        self.tls = ssl.create_default_context()  # one for all clients: building one takes a while
        self.outcomes: list[Outcome] = []
        self.samples: list[list[float | None]] = []  # [seconds, tree RSS in MB, 1-minute load average]
        self.sent = 0

    # --- the requests ---

    def pick(self, rng: random.Random) -> str:
        c = self.config
        x = rng.random()
        if x < c.valid_fraction:
            return "valid-stream" if rng.random() < c.stream_fraction else "valid"
        if x < c.valid_fraction + c.abandon_fraction:
            return ABANDONED
        return rng.choice(INVALID_KINDS)

    def body(self, kind: str, rng: random.Random) -> bytes:
        prompt, image = rng.choice(self.valid)
        request = {"model": self.endpoint.model, "max_tokens": self.config.output_len, "temperature": 0.0,
                   "stream": kind in ("valid-stream", ABANDONED)}
        url = {"corrupt-image": "data:image/png;base64," + base64.b64encode(os.urandom(64)).decode(),
               "zero-byte-image": "data:image/png;base64,", "remote-url": REMOTE_URL, "file-url": LOCAL_URL}
        request["messages"] = image_message(url.get(kind, image), prompt)
        if kind == "no-messages":
            request["messages"] = []
        elif kind == "negative-max-tokens":
            request["max_tokens"] = -1
        elif kind == "unknown-model":
            request["model"] = "no-such-model"
        text = json.dumps(request)
        return text[: len(text) // 2].encode() if kind == "bad-json" else text.encode()

    async def send(self, client: httpx.AsyncClient, kind: str, body: bytes, held: bool,
                   after: str | None) -> Outcome:
        started = time.perf_counter()
        retries = 0
        while True:
            opened = False

            async def trace(event: str, info: dict) -> None:
                nonlocal opened
                opened = opened or event == "connection.connect_tcp.started"

            try:
                status, ok, error = await self._exchange(client, kind, body, trace)
                break
            except DROPPED as exc:
                if retries:
                    return Outcome(kind, None, False, time.perf_counter() - started, retries, False, after,
                                   f"connection dropped twice: {type(exc).__name__}")
                retries += 1
                held = False
            except httpx.TimeoutException:
                return Outcome(kind, None, False, time.perf_counter() - started, retries, False, after,
                               f"no answer within {self.config.timeout_s:g} s")
        return Outcome(kind, status, ok, time.perf_counter() - started, retries, opened and held,
                       after if held else None, error)

    async def _exchange(self, client: httpx.AsyncClient, kind: str, body: bytes, trace) -> tuple[int, bool, str | None]:
        invalid = kind in INVALID_KINDS
        if kind == "valid" or invalid:
            response = await client.post(self.url, content=body, headers=self.headers, extensions={"trace": trace})
            if invalid or response.status_code != 200:
                return response.status_code, invalid and 400 <= response.status_code < 500, _error(response.text)
            content = response.json()["choices"][0]["message"]["content"]
            return 200, isinstance(content, str), None
        async with client.stream("POST", self.url, content=body, headers=self.headers,
                                 extensions={"trace": trace}) as response:
            if response.status_code != 200:
                return response.status_code, False, _error((await response.aread()).decode(errors="replace"))
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return 200, True, None
                event = json.loads(line[6:])
                if "error" in event:  # vLLM reports a failure after the 200 inside the stream
                    return int(event["error"].get("code") or 500), False, _error(line[6:])
                if kind == ABANDONED:
                    return 200, True, None  # leaving the block closes the stream unread
        raise httpx.RemoteProtocolError("the stream ended without [DONE]")

    def http_client(self) -> httpx.AsyncClient:
        """A client that holds one connection at a time."""
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        return httpx.AsyncClient(timeout=self.config.timeout_s, limits=limits, verify=self.tls)

    async def client(self, index: int, client: httpx.AsyncClient, deadline: float) -> None:
        rng = random.Random(self.config.seed * 100_003 + index)
        held, after = False, None
        while time.monotonic() < deadline and self.sent < self.config.max_requests:
            self.sent += 1
            kind = self.pick(rng)
            outcome = await self.send(client, kind, self.body(kind, rng), held, after)
            self.outcomes.append(outcome)
            # an abandoned stream closes the connection; so does a request that got no answer
            held = outcome.status is not None and kind != ABANDONED
            after = _status_class(outcome.status)

    # --- the server's memory ---

    async def sample(self, started: float, stop: asyncio.Event, bar: tqdm) -> None:
        """Every `sample_every_s` until `stop`, and once more at the end."""
        while True:
            elapsed = time.monotonic() - started
            rss = await asyncio.to_thread(tree_rss, self.server_pid) if self.server_pid else None
            self.samples.append([round(elapsed, 1), None if rss is None else round(rss / 2**20, 1),
                                 os.getloadavg()[0]])
            bar.n = min(round(elapsed), bar.total)
            bar.set_postfix(requests=len(self.outcomes), refresh=False)
            bar.refresh()
            if stop.is_set():
                return
            try:
                await asyncio.wait_for(stop.wait(), self.config.sample_every_s)
            except asyncio.TimeoutError:
                pass

    def run(self) -> SoakResult:
        if self.server_pid is None:
            log.warning("no process listening on the target's port is visible: the server's memory is not sampled "
                        "(pass --server-pid)")
        log.info("soak: %d clients for %.0f s against %s (%d distinct valid requests)", self.config.clients,
                 self.config.duration_s, self.url, len(self.valid))
        return asyncio.run(self._run())

    async def _run(self) -> SoakResult:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(self.http_client()) for _ in range(self.config.clients)]
            # one request first, not counted, so that the clock starts with everything loaded and connected
            warm_up = await self.send(clients[0], "valid", self.body("valid", random.Random(0)), False, None)
            if not warm_up.ok:
                raise ShortLVLMError(f"the warm-up request to {self.url} failed ({warm_up.status or 'no answer'}: "
                                     f"{warm_up.error}); check --base-url, --model and --api-key.")
            started = time.monotonic()
            deadline = started + self.config.duration_s
            stop = asyncio.Event()
            with tqdm(total=round(self.config.duration_s), unit="s", desc="soak", disable=None) as bar:
                sampler = asyncio.ensure_future(self.sample(started, stop, bar))
                await asyncio.gather(*(self.client(i, client, deadline) for i, client in enumerate(clients)))
                stop.set()
                await sampler
        return self.summary(time.monotonic() - started)

    # --- the report ---

    def summary(self, duration: float) -> SoakResult:
        status = Counter(_status_class(o.status) or "no answer" for o in self.outcomes)
        by_kind: dict[str, Counter] = defaultdict(Counter)
        for o in self.outcomes:
            by_kind[o.kind].update({"sent": 1, _status_class(o.status) or "no answer": 1, "retried": o.retries})
        valid = [o for o in self.outcomes if o.kind in VALID_KINDS]
        answered = [o for o in valid if o.ok]
        latencies = np.asarray([o.latency_s for o in answered]) if answered else None
        connections = Counter()
        for o in self.outcomes:
            if o.after:
                connections[f"requests_after_{o.after}"] += 1
                connections[f"closed_by_server_after_{o.after}"] += o.new_connection
        errors = [f"{o.kind}: {o.status or 'no answer'} {o.error or ''}".strip() for o in self.outcomes
                  if (o.status or 0) >= 500 or (o.kind in VALID_KINDS and not o.ok)]
        return SoakResult(
            base_url=self.endpoint.base_url, model=self.endpoint.model, config=asdict(self.config),
            duration_s=round(duration, 1), requests=len(self.outcomes), status=dict(sorted(status.items())),
            by_kind={k: dict(v) for k, v in sorted(by_kind.items())},
            valid={"sent": len(valid), "answered": len(answered), "lost": len(valid) - len(answered),
                   "retried": sum(o.retries for o in valid),
                   "latency_p50_s": None if latencies is None else round(float(np.median(latencies)), 3),
                   "latency_p99_s": None if latencies is None else round(float(np.percentile(latencies, 99)), 3)},
            connections=dict(sorted(connections.items())), memory=memory_summary(self.samples, self.config.baseline_s),
            load_average=load_summary(self.samples), server_errors=errors[:20],
        )


def _status_class(status: int | None) -> str | None:
    return None if status is None else f"{status // 100}xx"


def _error(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return text[:300]


def memory_summary(samples: Sequence[Sequence[float | None]], baseline_s: float) -> dict:
    """The server tree's RSS over time, and its growth after `baseline_s`: (max after the baseline - baseline) /
    baseline, where the baseline is the first sample at or after `baseline_s`."""
    series = [(t, mb) for t, mb, _ in samples if mb is not None]
    summary: dict = {"samples_mb": [[t, mb] for t, mb in series]}
    later = [(t, mb) for t, mb in series if t >= baseline_s]
    if len(later) >= 2:
        (t0, base), rest = later[0], [mb for _, mb in later[1:]]
        summary |= {"baseline_at_s": t0, "baseline_mb": base, "max_after_baseline_mb": max(rest),
                    "final_mb": later[-1][1], "growth_after_baseline": round((max(rest) - base) / base, 5)}
    else:
        summary["growth_after_baseline"] = None
    return summary


def load_summary(samples: Sequence[Sequence[float | None]]) -> dict:
    loads = [load for *_, load in samples]
    return {"cpus": os.cpu_count(), "samples_1min": [round(x, 2) for x in loads],
            "mean_1min": round(float(np.mean(loads)), 2) if loads else None,
            "max_1min": round(max(loads), 2) if loads else None}


def describe_soak(result: SoakResult) -> str:
    v, m, c = result.valid, result.memory, result.connections
    lines = [
        f"soak of {result.base_url} ({result.model}): {result.config['clients']} clients, {result.duration_s:.0f} s, "
        f"{result.requests} requests",
        "status classes: " + ", ".join(f"{k} {n}" for k, n in result.status.items()),
        f"valid requests: {v['sent']} sent, {v['answered']} answered, {v['lost']} lost, {v['retried']} retried after "
        f"a dropped connection; latency p50 {v['latency_p50_s']} s, p99 {v['latency_p99_s']} s",
        "per kind: " + "; ".join(f"{k} " + " ".join(f"{n}={x}" for n, x in d.items()) for k, d in
                                 result.by_kind.items()),
        "connections closed by the server: " + ", ".join(
            f"after {kind} {c.get('closed_by_server_after_' + kind, 0)} of {n}"
            for kind, n in ((k.removeprefix("requests_after_"), n) for k, n in c.items()
                            if k.startswith("requests_after_"))),
    ]
    if m.get("growth_after_baseline") is not None:
        lines.append(f"server memory (RSS of its process tree): {m['baseline_mb']:.0f} MB at "
                     f"{m['baseline_at_s']:.0f} s, at most {m['max_after_baseline_mb']:.0f} MB after, "
                     f"final {m['final_mb']:.0f} MB: growth {m['growth_after_baseline']:.2%}")
    else:
        lines.append("server memory: not sampled (no server process visible, or the run was shorter than the "
                     "baseline)")
    la = result.load_average
    lines.append(f"machine load (1-minute average, {la['cpus']} CPUs): mean {la['mean_1min']}, max {la['max_1min']}")
    lines.append("passed: " + ", ".join(f"{k} {'yes' if ok else 'no' if ok is not None else 'not measured'}"
                                        for k, ok in result.passed.items()))
    lines += [f"  {error}" for error in result.server_errors[:5]]
    return "\n".join(lines)
