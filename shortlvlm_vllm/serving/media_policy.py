"""The ASGI middleware `shortlvlm serve` puts in front of vLLM's OpenAI server: which media URLs a client may name,
and a clear 4xx, on a connection that stays open, when an image cannot be had.

vLLM 0.32 (CPU) and 0.33 (CUDA) fetch any http(s) image URL a client names unless `--allowed-media-domains` is set,
and there is no way to turn remote fetching off. A URL that cannot be fetched (a closed port, a timeout) or a
`file://` URL without `--allowed-local-media-path` escapes vLLM's handlers as a raw exception: Starlette answers 500
and re-raises, and uvicorn then closes the connection. This middleware runs inside Starlette's error handler and
around vLLM's routes (vLLM's `--middleware`), reads the policy from the environment the launcher sets
(POLICY_ENV, JSON), refuses a disallowed URL with 400 before vLLM sees it, answers 400 for an image that could not
be fetched or read, and answers any other escaped exception itself (500, logged) so the connection survives.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

POLICY_ENV = "SHORTLVLM_MEDIA_POLICY"
MIDDLEWARE = f"{__name__}.MediaPolicyMiddleware"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def policy_from_env() -> dict:
    """{"remote": bool, "domains": [...], "local": bool}; without the variable: no remote host and no local file."""
    policy = {"remote": False, "domains": [], "local": False}
    policy.update(json.loads(os.environ.get(POLICY_ENV) or "{}"))
    policy["domains"] = [domain.lower() for domain in policy["domains"]]
    return policy


def media_urls(body: Any) -> Iterator[str]:
    """The URLs a request's messages (chat) or input (responses) name for media: values of `url` and `*_url` keys."""
    stack = [body.get(key) for key in ("messages", "input")] if isinstance(body, dict) else []
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and (key == "url" or key.endswith("_url")):
                    yield value.strip()
                elif isinstance(value, (dict, list)):
                    stack.append(value)


def refusal(url: str, policy: dict) -> str | None:
    """Why the policy refuses `url`, or None."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        host = (parts.hostname or "").lower()
        if policy["remote"] or host in policy["domains"]:
            return None
        if policy["domains"]:
            return (f"image URLs from {host or 'this URL'} are refused: this server fetches only from "
                    f"{', '.join(policy['domains'])}; send the image inline as a data: URL")
        return ("remote image URLs are refused by this server (it fetches nothing a client names); send the image "
                "inline as a data: URL, or restart the server with --allow-media-domains HOST,... or "
                "--allow-remote-media")
    if scheme == "file" and not policy["local"]:
        return ("local files are refused by this server; send the image inline as a data: URL, or restart the "
                "server with -- --allowed-local-media-path DIR")
    return None


def _fetch_errors() -> tuple[type[BaseException], ...]:
    """What a failed fetch or read of a media URL raises: socket and file errors, and aiohttp's (vLLM's client)."""
    try:
        import aiohttp
    except ImportError:
        return (OSError,)
    return (OSError, aiohttp.ClientError)


def error_body(status: int, message: str, kind: str, param: str | None = None) -> bytes:
    """vLLM's error format, which the openai client turns into its exception classes."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


async def send_json(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class MediaPolicyMiddleware:
    """Pure ASGI middleware (streaming passes through untouched); vLLM adds it with `--middleware MIDDLEWARE`."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.policy = policy_from_env()
        self.fetch_errors = _fetch_errors()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        messages = []
        more = True
        while more:  # vLLM parses the whole body too; a request's body is bounded by what the client sends
            message = await receive()
            messages.append(message)
            more = message["type"] == "http.request" and message.get("more_body", False)
        urls = self._urls(b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request"))
        for url in urls:
            if reason := refusal(url, self.policy):
                log.info("refused a request naming %.80s: %s", url, reason)
                await send_json(send, 400, error_body(400, reason, "BadRequestError", "image_url"))
                return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, tracked)
        except Exception as exc:
            if started:  # a stream broke off: nothing can be answered any more
                raise
            if urls and isinstance(exc, self.fetch_errors):
                message = f"could not load the image at {urls[0][:200]}: {type(exc).__name__}: {exc}"
                log.info("%s", message)
                await send_json(send, 400, error_body(400, message, "BadRequestError", "image_url"))
            else:
                log.exception("request to %s failed", scope.get("path"))
                await send_json(send, 500, error_body(500, f"internal server error ({type(exc).__name__})",
                                                      "InternalServerError"))

    @staticmethod
    def _urls(body: bytes) -> list[str]:
        """The non-data media URLs of a JSON body; none for a body that is not JSON (vLLM answers that with 400)."""
        try:
            parsed = json.loads(body)
        except ValueError:
            return []
        return [url for url in media_urls(parsed) if not url[:5].lower() == "data:"]
