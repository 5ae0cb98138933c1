"""The `shortlvlm` command's surface: help for every verb, clear errors."""

from __future__ import annotations

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
