"""Serving safely, on a live vLLM server (the shipped toy model, one server for the module) that may fetch images
from 127.0.0.1 only: a disallowed host, a local file, an unreachable allowed host and a redirect are answered 4xx,
and the next valid request is answered on the same connection; an allowed host is fetched; a short soak gives no
5xx and loses no valid request."""

from __future__ import annotations

import http.client
import http.server
import io
import json
import threading

import pytest

from shortlvlm_vllm.chat import data_url, image_message
from shortlvlm_vllm.evaluation.client import Endpoint
from shortlvlm_vllm.evaluation.soak import Soak, SoakConfig
from shortlvlm_vllm.evaluation.throughput import synthetic_requests
from shortlvlm_vllm.serving.launcher import ServingPolicy, VLLMServer, free_port
from shortlvlm_vllm.toy import TOY_MODEL_DIR

from .conftest import random_image

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(2400)]
MODEL = "toy"


class ImageHost:
    """An HTTP server on 127.0.0.1 with /image.png and /redirect (to the same picture on "localhost")."""

    def __init__(self) -> None:
        buffer = io.BytesIO()
        random_image(3, (64, 64)).save(buffer, "PNG")
        png, host = buffer.getvalue(), self
        self.paths: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.paths.append(self.path)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", f"http://localhost:{host.port}/image.png")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def image_host():
    host = ImageHost()
    yield host
    host.server.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    logs = tmp_path_factory.mktemp("safe-server")
    with VLLMServer(TOY_MODEL_DIR, log_path=logs / "vllm.log", served_model_name=MODEL, startup_timeout=1500,
                    policy=ServingPolicy(media_domains=("127.0.0.1",))) as running:
        yield running


def _ask(conn: http.client.HTTPConnection, url: str, api_key: str) -> tuple[int, dict, str | None]:
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0.0, "messages": image_message(url, "What is it?")}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
    response = conn.getresponse()
    return response.status, json.loads(response.read()), response.getheader("connection")


def test_refused_and_failing_image_urls_are_4xx_and_the_connection_serves_the_next_request(server, image_host):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
    good = data_url(random_image(1))
    status, _, _ = _ask(conn, good, server.api_key)
    assert status == 200
    local_port = conn.sock.getsockname()[1]
    closed = free_port()  # nothing listens there
    cases = {
        "disallowed host": f"http://localhost:{image_host.port}/image.png",
        "file URL": "file:///etc/hostname",
        "unreachable allowed host": f"http://127.0.0.1:{closed}/image.png",
        "redirect to a disallowed host": f"http://127.0.0.1:{image_host.port}/redirect",
    }
    for case, url in cases.items():
        status, body, connection = _ask(conn, url, server.api_key)
        assert 400 <= status < 500, (case, status, body)
        assert body["error"]["message"], case
        assert connection != "close", case
        status, body, _ = _ask(conn, good, server.api_key)
        assert status == 200 and isinstance(body["choices"][0]["message"]["content"], str), (case, body)
        assert conn.sock.getsockname()[1] == local_port, f"the server closed the connection after the {case}"
    assert "/image.png" not in image_host.paths  # the redirect was not followed to localhost
    conn.close()


def test_an_allowed_host_is_fetched(server, image_host):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
    status, body, _ = _ask(conn, f"http://127.0.0.1:{image_host.port}/image.png", server.api_key)
    assert status == 200, body
    assert "/image.png" in image_host.paths
    conn.close()


def test_a_short_soak_gives_no_5xx_and_loses_no_valid_request(server):
    config = SoakConfig(clients=8, duration_s=30, output_len=8, timeout_s=600, sample_every_s=2, baseline_s=10)
    result = Soak(Endpoint(server.base_url, MODEL, server.api_key), synthetic_requests(4), config).run()
    assert result.status.get("5xx", 0) == 0, result.server_errors
    assert result.valid["sent"] > 0 and result.valid["lost"] == 0, result.server_errors
    assert result.status.get("4xx", 0) > 0  # invalid requests were sent and refused
    assert result.connections.get("closed_by_server_after_4xx", 0) == 0
    assert result.memory["baseline_mb"] > 100  # the server's process tree was found and sampled
