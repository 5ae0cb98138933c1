"""Launching vLLM's OpenAI-compatible server for a (pruned) checkpoint.

`vllm serve DIR` is the way on a machine with the CUDA build. The CPU build's console script
fails at start (it looks up the distribution "vllm"), so everything here runs the server module
`vllm.entrypoints.openai.api_server`, which is the same server under both builds.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from shortlvlm_vllm.errors import ShortLVLMError

log = logging.getLogger(__name__)

DEFAULT_CPU_KVCACHE_GIB = "1"


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def server_command(
    model: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_model_len: int | None = None,
    dtype: str = "auto",
    served_model_name: str | None = None,
    enforce_eager: bool | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The vLLM OpenAI server command line; enforce_eager=None means "on when there is no GPU"."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", host, "--port", str(port), "--dtype", dtype]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if api_key:
        cmd += ["--api-key", api_key]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if enforce_eager if enforce_eager is not None else not has_cuda():
        cmd.append("--enforce-eager")
    return cmd + list(extra_args)


def server_env() -> dict[str, str]:
    """The environment for the server: on CPU, a bounded KV cache unless the user set one."""
    env = dict(os.environ)
    if not has_cuda():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer:
    """A vLLM server in a child process: started, health-checked, logged to a file, stopped.

    with VLLMServer(model_dir, log_path=...) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key)
    """

    def __init__(
        self,
        model: str | Path,
        *,
        log_path: str | Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        api_key: str = "EMPTY",
        startup_timeout: float = 600.0,
        **command_kwargs,
    ) -> None:
        self.model = str(model)
        self.host = host
        self.port = port or free_port(host)
        self.api_key = api_key
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.command = server_command(model, host=host, port=self.port, api_key=api_key, **command_kwargs)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> VLLMServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting vLLM for %s on %s (log: %s)", self.model, self.url, self.log_path)
        log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, stdout=log_file, stderr=subprocess.STDOUT,
                                        env=server_env(), start_new_session=True)
        log_file.close()
        self.wait_healthy()
        return self

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        started = time.monotonic()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ShortLVLMError(
                    f"vLLM exited with code {self.process.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        log.info("vLLM ready after %.0f s", time.monotonic() - started)
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        self.stop()
        raise ShortLVLMError(
            f"vLLM did not become healthy within {self.startup_timeout:.0f} s; "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
