"""Serving safely, without a server: the command line and environment `shortlvlm serve` builds (its defaults and
each way to change them), the binding rule, and the media-policy middleware on a stub ASGI app."""

from __future__ import annotations

import asyncio
import json

import pytest

from shortlvlm_vllm.cli import main
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.serving.launcher import ServingPolicy, server_command, server_env
from shortlvlm_vllm.serving.media_policy import MIDDLEWARE, POLICY_ENV, MediaPolicyMiddleware, media_urls

MODEL = "toy"


def _serve(monkeypatch, capsys, *argv: str) -> tuple[list[str], dict[str, str], str]:
    """What `shortlvlm serve toy ARGV` would exec: the command, its environment, and what it printed."""
    seen = {}
    monkeypatch.setattr("os.execvpe", lambda prog, cmd, env: seen.update(cmd=cmd, env=env))
    assert main(["serve", MODEL, *argv]) == 0
    return seen["cmd"], seen["env"], capsys.readouterr().out


def _value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_the_defaults_on_the_command_line(monkeypatch, capsys):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_MEDIA_URL_ALLOW_REDIRECTS", raising=False)
    cmd, env, out = _serve(monkeypatch, capsys)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert _value(cmd, "--host") == "127.0.0.1"
    assert _value(cmd, "--middleware") == MIDDLEWARE
    assert _value(cmd, "--mm-processor-cache-gb") == "0"
    assert "--allowed-media-domains" not in cmd and "--allowed-local-media-path" not in cmd
    assert "--api-key" not in cmd
    assert json.loads(env[POLICY_ENV]) == {"remote": False, "domains": [], "local": False}
    assert "VLLM_MEDIA_URL_ALLOW_REDIRECTS" not in env
    for line in ("bind address: 127.0.0.1: this machine only", "remote image URLs: refused with 400",
                 "local image files: refused with 400", "multimodal processor cache: off",
                 "cannot be fetched or read: 400, and the connection stays open"):
        assert line in out
    assert out.index("bind address") < out.index("running:")  # printed before vLLM starts


def test_named_media_hosts_go_to_vllms_allow_list_without_redirects(monkeypatch, capsys):
    monkeypatch.delenv("VLLM_MEDIA_URL_ALLOW_REDIRECTS", raising=False)
    cmd, env, out = _serve(monkeypatch, capsys, "--allow-media-domains", "images.example.org, cdn.example.org")
    i = cmd.index("--allowed-media-domains")
    assert cmd[i + 1:i + 3] == ["images.example.org", "cdn.example.org"]
    assert json.loads(env[POLICY_ENV])["domains"] == ["images.example.org", "cdn.example.org"]
    assert env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"
    assert "fetched only from images.example.org, cdn.example.org" in out and "redirects not followed" in out


def test_a_users_redirect_setting_is_kept(monkeypatch, capsys):
    monkeypatch.setenv("VLLM_MEDIA_URL_ALLOW_REDIRECTS", "1")
    _, env, out = _serve(monkeypatch, capsys, "--allow-media-domains", "images.example.org")
    assert env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "1" and "redirects followed" in out


def test_any_remote_host_only_when_asked(monkeypatch, capsys):
    cmd, env, out = _serve(monkeypatch, capsys, "--allow-remote-media")
    assert json.loads(env[POLICY_ENV])["remote"] is True and "--allowed-media-domains" not in cmd
    assert "fetched from any host" in out
    with pytest.raises(SystemExit):
        main(["serve", MODEL, "--allow-remote-media", "--allow-media-domains", "a.org"])
    with pytest.raises(ShortLVLMError, match="exclude each other"):
        ServingPolicy(media_domains=("a.org",), allow_remote_media=True)
    with pytest.raises(ShortLVLMError, match="host names"):
        ServingPolicy(media_domains=("https://a.org/x",))


def test_the_cache_and_local_files_can_be_turned_on(monkeypatch, capsys):
    cmd, _, out = _serve(monkeypatch, capsys, "--mm-processor-cache-gb", "4")
    assert _value(cmd, "--mm-processor-cache-gb") == "4" and "multimodal processor cache: 4 GiB" in out
    cmd, env, out = _serve(monkeypatch, capsys, "--", "--mm_processor_cache_gb=2", "--allowed-local-media-path",
                           "/srv/images")
    assert cmd.count("--mm-processor-cache-gb") == 0 and cmd[-3:] == ["--mm_processor_cache_gb=2",
                                                                        "--allowed-local-media-path", "/srv/images"]
    assert json.loads(env[POLICY_ENV])["local"] is True
    assert "multimodal processor cache: as given after --" in out and "as vLLM's --allowed-local-media-path" in out
    assert main(["serve", MODEL, "--", "--allowed-media-domains", "a.org"]) == 2
    assert "--allow-media-domains HOST" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "myhost.example.org"])
def test_binding_beyond_loopback_needs_a_key_or_insecure(monkeypatch, capsys, host):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert main(["serve", MODEL, "--host", host]) == 2
    err = capsys.readouterr().err
    assert "lets other machines reach the server" in err and "--api-key KEY" in err and "--insecure" in err
    cmd, _, out = _serve(monkeypatch, capsys, "--host", host, "--api-key", "s3cret")
    assert _value(cmd, "--api-key") == "s3cret" and "clients need the API key" in out
    assert "s3cret" not in out  # the key is not printed with the command
    cmd, _, out = _serve(monkeypatch, capsys, "--host", host, "--insecure")
    assert "NO API KEY" in out
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    _serve(monkeypatch, capsys, "--host", host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_needs_no_key(monkeypatch, host):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert _value(server_command("m", host=host, enforce_eager=True), "--host") == host


def test_the_managed_server_gets_the_same_defaults():
    cmd = server_command("m", enforce_eager=True, extra_args=["--max-num-seqs", "4"])
    assert cmd[-2:] == ["--max-num-seqs", "4"] and _value(cmd, "--middleware") == MIDDLEWARE
    assert json.loads(server_env()[POLICY_ENV])["remote"] is False


def test_cpu_servers_get_a_fixed_mmap_threshold_unless_the_user_set_one(monkeypatch):
    from shortlvlm_vllm.serving import launcher

    monkeypatch.setattr(launcher, "has_cuda", lambda: False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert server_env()["MALLOC_MMAP_THRESHOLD_"] == "131072"
    lines = launcher.describe_policy(ServingPolicy(), "::1", None)
    assert any("MALLOC_MMAP_THRESHOLD_=131072" in line for line in lines)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4194304")
    assert server_env()["MALLOC_MMAP_THRESHOLD_"] == "4194304"
    assert any("=4194304 (as set)" in line for line in launcher.describe_policy(ServingPolicy(), "::1", None))
    monkeypatch.setattr(launcher, "has_cuda", lambda: True)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert "MALLOC_MMAP_THRESHOLD_" not in server_env()
    assert not any("MALLOC" in line for line in launcher.describe_policy(ServingPolicy(), "::1", None))


# --- the middleware, on a stub app ---

def _request(body: bytes | dict, app, policy: dict | None = None, monkeypatch=None) -> tuple[int, dict | None, list]:
    """Send one POST through the middleware around `app`; returns the status, the JSON body and the app's calls."""
    if policy is not None:
        monkeypatch.setenv(POLICY_ENV, json.dumps(policy))
    calls = []
    middleware = MediaPolicyMiddleware(app(calls))
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    chunks = [{"type": "http.request", "body": raw[:10], "more_body": True},
              {"type": "http.request", "body": raw[10:], "more_body": False}]
    sent = []

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware({"type": "http", "method": "POST", "path": "/v1/chat/completions"}, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(payload) if payload else None, calls


def _echo(calls):
    """An app that reads the whole body and answers 200 with it."""
    async def app(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        calls.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})
    return app


def _raising(exc):
    def make(calls):
        async def app(scope, receive, send):
            calls.append(exc)
            raise exc
        return app
    return make


def _chat(url: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}]}


@pytest.mark.parametrize(("url", "policy", "allowed"), [
    ("data:image/png;base64,iVBORw0KGgo=", {}, True),
    ("https://images.example.org/cat.png", {}, False),
    ("HTTP://Images.Example.org/cat.png", {"domains": ["images.example.org"]}, True),
    ("https://evil.example.org/cat.png", {"domains": ["images.example.org"]}, False),
    ("http://169.254.169.254/latest/meta-data", {"domains": ["images.example.org"]}, False),
    ("https://anywhere.example.net/x.png", {"remote": True}, True),
    ("file:///etc/passwd", {"remote": True}, False),
    ("file:///srv/images/a.png", {"local": True}, True),
])
def test_the_policy_decides_before_vllm_sees_the_request(monkeypatch, url, policy, allowed):
    status, body, calls = _request(_chat(url), _echo, policy, monkeypatch)
    if allowed:
        assert status == 200 and calls == [json.dumps(_chat(url)).encode()]  # the body passed on whole
    else:
        assert status == 400 and calls == [] and body["error"]["param"] == "image_url"
        assert "data: URL" in body["error"]["message"]


def test_urls_are_found_in_chat_and_responses_requests_only_where_media_go():
    chat = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://a/x"}},
                                                      {"type": "video_url", "video_url": {"url": "http://b/v"}},
                                                      {"type": "text", "text": "see http://c/not-media"}]}],
            "tools": [{"function": {"parameters": {"url": "http://d/schema-default"}}}]}
    responses = {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://e/y"}]}]}
    assert sorted(media_urls(chat)) == ["http://a/x", "http://b/v"]
    assert list(media_urls(responses)) == ["http://e/y"]
    assert list(media_urls([1, 2])) == []


def test_a_body_that_is_not_json_goes_to_vllm_unchanged(monkeypatch):
    status, _, calls = _request(b'{"model": "m", "messages": [', _echo, {}, monkeypatch)
    assert status == 200 and calls == [b'{"model": "m", "messages": [']


def test_a_failed_fetch_is_400_and_any_other_escaped_error_500_without_raising(monkeypatch):
    allowed = {"domains": ["127.0.0.1"]}
    status, body, _ = _request(_chat("http://127.0.0.1:9/x.png"), _raising(ConnectionRefusedError(111, "refused")),
                               allowed, monkeypatch)
    assert status == 400 and "could not load the image at http://127.0.0.1:9/x.png" in body["error"]["message"]
    status, body, _ = _request(_chat("data:image/png;base64,AAAA"), _raising(RuntimeError("engine")), {},
                               monkeypatch)
    assert status == 500 and body["error"]["type"] == "InternalServerError"


def test_an_error_after_the_response_started_is_raised(monkeypatch):
    def make(calls):
        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            raise RuntimeError("stream broke")
        return app

    with pytest.raises(RuntimeError, match="stream broke"):
        _request(_chat("data:image/png;base64,AAAA"), make, {}, monkeypatch)
