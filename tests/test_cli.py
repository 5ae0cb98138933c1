"""The `shortlvlm` command's surface: help for every verb, clear errors."""

from __future__ import annotations

import json

import pytest

from shortlvlm_vllm.cli import main


@pytest.mark.parametrize("verb", ["prune", "serve", "demo", "make-tiny-llava"])
def test_help(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    assert "usage: shortlvlm " + verb in capsys.readouterr().out


def test_serve_missing_model(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_serve_passes_arguments_after_double_dash_to_vllm(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr("os.execvpe", lambda prog, cmd, env: seen.update(cmd=cmd, env=env))
    main(["serve", str(tmp_path), "--port", "9001", "--api-key", "k", "--", "--max-num-seqs", "4"])
    cmd = seen["cmd"]
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--port") + 1] == "9001" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--api-key") + 1] == "k" and cmd[-2:] == ["--max-num-seqs", "4"]


def test_serve_with_tensor_parallelism_binds_one_share_of_the_cores_per_worker(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr("os.execvpe", lambda prog, cmd, env: seen.update(cmd=cmd, env=env))
    monkeypatch.setattr("shortlvlm_vllm.serving.launcher.has_cuda", lambda: False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    main(["serve", str(tmp_path), "--tensor-parallel-size", "2"])
    cmd, env = seen["cmd"], seen["env"]
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and "--pipeline-parallel-size" not in cmd
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1|2-3" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert "VLLM_CPU_OMP_THREADS_BIND=0-1|2-3" in capsys.readouterr().out
    # the user's own binding wins
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    main(["serve", str(tmp_path), "--pipeline-parallel-size", "2"])
    assert seen["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_pipeline_parallel_on_cpu_runs_the_warm_up_that_eager_mode_skips(monkeypatch):
    """vLLM's CPU runner allocates a later stage's input buffer only in its warm-up (see EAGER_PIPELINE_ON_CPU)."""
    from shortlvlm_vllm.serving.launcher import EAGER_PIPELINE_ON_CPU, server_command

    monkeypatch.setattr("shortlvlm_vllm.serving.launcher.has_cuda", lambda: False)
    pipeline = server_command("m", pipeline_parallel_size=2)
    at = pipeline.index("--compilation-config")
    assert "--enforce-eager" not in pipeline and pipeline[at:at + 2] == EAGER_PIPELINE_ON_CPU
    assert json.loads(pipeline[at + 1]) == {"mode": 2, "backend": "eager"}
    assert "--enforce-eager" in server_command("m") and "--compilation-config" not in server_command("m")
    monkeypatch.setattr("shortlvlm_vllm.serving.launcher.has_cuda", lambda: True)
    assert "--compilation-config" not in server_command("m", pipeline_parallel_size=2)
    assert "--enforce-eager" in server_command("m", pipeline_parallel_size=2, enforce_eager=True)


def test_placement_of_replicas(monkeypatch):
    from shortlvlm_vllm.errors import ShortLVLMError
    from shortlvlm_vllm.serving.launcher import placement_env

    for name in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("shortlvlm_vllm.serving.launcher.has_cuda", lambda: False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert placement_env() == {}  # one server of one worker: vLLM's own binding
    assert placement_env(2, replica=1, replicas=2)["VLLM_CPU_OMP_THREADS_BIND"] == "4-5|6-7"
    assert placement_env(1, replica=0, replicas=3)["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    with pytest.raises(ShortLVLMError, match="need 16 CPU cores"):
        placement_env(4, replica=0, replicas=4)
    monkeypatch.setattr("shortlvlm_vllm.serving.launcher.has_cuda", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    assert placement_env(2, replica=1, replicas=2) == {"CUDA_VISIBLE_DEVICES": "2,3"}
    with pytest.raises(ShortLVLMError, match="need 6 GPUs"):
        placement_env(2, replica=2, replicas=3)
