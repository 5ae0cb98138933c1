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
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The vLLM OpenAI server command line; enforce_eager=None means "on when there is no GPU"."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", host, "--port", str(port), "--dtype", dtype]
    if tensor_parallel_size != 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if pipeline_parallel_size != 1:
        cmd += ["--pipeline-parallel-size", str(pipeline_parallel_size)]
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


def placement_env(world_size: int = 1, replica: int = 0, replicas: int = 1) -> dict[str, str]:
    """Where one server's `world_size` workers (tensor x pipeline parallel) run, when it is replica `replica` of
    `replicas` servers sharing the machine: the variables to add to its environment.

    With GPUs, replica i gets GPUs i*world_size .. (CUDA_VISIBLE_DEVICES). On CPU, the machine's cores are split
    into one contiguous group per worker of every replica (VLLM_CPU_OMP_THREADS_BIND, groups joined by "|"), and
    no core is held back for the frontend (VLLM_CPU_NUM_OF_RESERVED_CPU=0): vLLM's default reserves one, which
    leaves a 2-core machine no core for a second worker. One server of one worker keeps vLLM's defaults. A
    variable the user set is never overridden.
    """
    if world_size < 1 or not 0 <= replica < replicas:
        raise ShortLVLMError(f"no placement for replica {replica} of {replicas} with {world_size} workers each.")
    if world_size == 1 and replicas == 1:
        return {}
    if has_cuda():
        import torch

        first, count = replica * world_size, torch.cuda.device_count()
        if first + world_size > count:
            raise ShortLVLMError(f"{replicas} servers of {world_size} GPUs each need {replicas * world_size} GPUs; "
                                 f"this machine has {count}. Start fewer replicas or smaller ones.")
        env = {"CUDA_VISIBLE_DEVICES": ",".join(str(first + i) for i in range(world_size))}
    else:
        cores = sorted(os.sched_getaffinity(0))
        per_worker = len(cores) // (world_size * replicas)
        if per_worker < 1:
            raise ShortLVLMError(f"{replicas} servers of {world_size} workers each need {replicas * world_size} CPU "
                                 f"cores; this process may use {len(cores)}.")
        groups = [cores[i * per_worker:(i + 1) * per_worker] for i in range(world_size * replicas)]
        mine = groups[replica * world_size:(replica + 1) * world_size]
        env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(_core_list(group) for group in mine),
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return {name: value for name, value in env.items() if name not in os.environ}


def _core_list(cores: Sequence[int]) -> str:
    """Cores as vLLM's binding syntax writes them: "0-3" for a contiguous run, else "0,2,5"."""
    if list(cores) == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
    return ",".join(map(str, cores))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer:
    """A vLLM server in a child process: started, health-checked, logged to a file, stopped.

    with VLLMServer(model_dir, log_path=...) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key)

    `replica` of `replicas` places it beside other servers on the same machine (placement_env).
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
        replica: int = 0,
        replicas: int = 1,
        **command_kwargs,
    ) -> None:
        self.model = str(model)
        self.host = host
        self.port = port or free_port(host)
        self.api_key = api_key
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.command = server_command(model, host=host, port=self.port, api_key=api_key, **command_kwargs)
        world_size = command_kwargs.get("tensor_parallel_size", 1) * command_kwargs.get("pipeline_parallel_size", 1)
        self.placement = placement_env(world_size, replica, replicas)
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
                                        env=server_env() | self.placement, start_new_session=True)
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
