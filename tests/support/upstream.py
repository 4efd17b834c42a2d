"""A real HTTPS upstream on 127.0.0.1 that records what it receives and can echo it back.

It plays the role of api.openai.com & co. Its certificate (from a trustme test CA) names
every test host, and the sidecar reaches it through ``--resolve``. The echo endpoints are
what a hostile or careless upstream might do with a credential: reflect it in bodies,
headers, cookies, redirects, compressed or encoded, split across chunks and events.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import socket
import time
import zlib
from dataclasses import dataclass, field
from urllib.parse import quote

import brotli
import trustme
from aiohttp import WSMsgType, web

from tests.support.serving import ThreadedApp

TEST_HOSTS = ("api.routed.test", "other.routed.test", "basic.routed.test", "query.routed.test",
              "rules.routed.test", "a.wild.test", "b.wild.test", "unrouted.test",
              "git.routed.test")


@dataclass
class Received:
    method: str
    path: str  # raw path and query, as sent
    headers: list[tuple[str, str]]
    body_size: int
    body_sha256: str
    version: str

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Upstream:
    ca: trustme.CA
    ca_file: str
    port: int
    received: list[Received] = field(default_factory=list)
    git_root: str | None = None

    def find(self, marker: str) -> list[Received]:
        return [r for r in self.received if marker in r.path]

    def wait_for(self, marker: str, count: int = 1, timeout: float = 30.0) -> list[Received]:
        """Wait until ``count`` requests with ``marker`` have arrived (a client in another
        thread or process sent them), and return them."""
        deadline = time.monotonic() + timeout
        while len(found := self.find(marker)) < count:
            assert time.monotonic() < deadline, (
                f"expected {count} request(s) with {marker!r} within {timeout}s, saw {len(found)}")
            time.sleep(0.02)
        return found

    def one(self, marker: str) -> Received:
        found = self.find(marker)
        assert len(found) == 1, f"expected one request with {marker!r}, upstream saw {len(found)}"
        return found[0]


def _credential(request: web.Request) -> str:
    """Whatever credential the proxy sent: a header, basic auth or a query parameter."""
    for name in ("Authorization", "X-Api-Key"):
        if name in request.headers:
            return request.headers[name]
    return request.query.get("key", "")


def _encode(value: bytes, how: str) -> tuple[bytes, dict[str, str]]:
    if how == "gzip":
        return gzip.compress(value), {"Content-Encoding": "gzip"}
    if how == "deflate":
        return zlib.compress(value), {"Content-Encoding": "deflate"}
    if how == "br":
        return brotli.compress(value), {"Content-Encoding": "br"}
    if how == "zstd-fake":
        return value, {"Content-Encoding": "zstd"}
    return value, {}


CHAT_USAGE = {"prompt_tokens": 24, "completion_tokens": 29, "total_tokens": 53}


def build_app(upstream: Upstream) -> web.Application:
    async def record(request: web.Request) -> bytes:
        body = await request.read()
        upstream.received.append(Received(
            method=request.method, path=request.raw_path, headers=list(request.headers.items()),
            body_size=len(body), body_sha256=hashlib.sha256(body).hexdigest(),
            version=f"{request.version.major}.{request.version.minor}",
        ))
        return body

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await record(request)
        answer = {
            "method": request.method, "path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_size": len(body),
        }
        if request.path == "/v1/models":  # also shaped as OpenAI's list, for real SDKs
            answer.update({"object": "list", "data": [{"id": "test-model", "object": "model"}]})
        return web.json_response(answer)

    async def reflect(request: web.Request) -> web.StreamResponse:
        """Reflect the received credential: ?where=body|header|cookie|location|www-auth|error
        &form=raw|value|b64|b64-offset|url &enc=gzip|deflate|br &split=N"""
        await record(request)
        credential = _credential(request)
        value = credential.split(" ", 1)[1] if request.query.get("form") == "value" else credential
        form = request.query.get("form", "raw")
        if form == "b64":
            value = base64.b64encode(value.encode()).decode()
        elif form == "b64-offset":
            value = base64.b64encode(b"xy" + value.encode() + b"z").decode()
        elif form == "url":
            value = quote(value, safe="")
        where = request.query.get("where", "body")
        if where == "header":
            return web.Response(text="ok", headers={"X-Echo": value})
        if where == "cookie":
            resp = web.Response(text="ok")
            resp.headers.add("Set-Cookie", f"session={value}; Path=/")
            return resp
        if where == "location":
            return web.Response(status=302, headers={"Location": f"https://evil.test/?k={value}"})
        if where == "www-auth":
            return web.Response(status=401, headers={"WWW-Authenticate": f'Bearer realm="{value}"'})
        payload = f"you sent: {value} (end)".encode()
        status = 500 if where == "error" else 200
        split = int(request.query.get("split", "0"))
        encoded, headers = _encode(payload, request.query.get("enc", ""))
        if not split:
            return web.Response(body=encoded, status=status, headers=headers)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        for i in range(0, len(encoded), split):
            await resp.write(encoded[i : i + split])
            await asyncio.sleep(0.005)
        await resp.write_eof()
        return resp

    async def sse(request: web.Request) -> web.StreamResponse:
        await record(request)
        count = int(request.query.get("n", "5"))
        delay = float(request.query.get("delay", "0.3"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i in range(count):
            await resp.write(f"data: event {i}\n\n".encode())
            await asyncio.sleep(delay)
        await resp.write_eof()
        return resp

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        """Just enough of OpenAI's chat completions for the official SDK: streamed, or (when
        the request does not ask for a stream) one JSON answer with its token usage."""
        body = await record(request)
        try:
            streamed = json.loads(body or b"{}").get("stream") is True
        except ValueError:
            streamed = True
        if not streamed:
            return web.json_response({
                "id": "chatcmpl-2", "object": "chat.completion", "created": 0,
                "model": "gpt-test", "choices": [{
                    "index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "Hello from upstream"}}],
                "usage": CHAT_USAGE})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, word in enumerate(["Hello", " from", " upstream"]):
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
                     "model": "gpt-test", "choices": [{"index": 0, "delta": {"content": word},
                                                       "finish_reason": None}]}
            if i == 0:
                chunk["choices"][0]["delta"]["role"] = "assistant"
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.05)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def download(request: web.Request) -> web.StreamResponse:
        await record(request)
        size = int(request.query["bytes"])
        block = bytes(range(256)) * 256  # 64 KiB
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            await resp.write(piece)
            sent += len(piece)
        await resp.write_eof()
        return resp

    async def upload(request: web.Request) -> web.StreamResponse:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        upstream.received.append(Received(request.method, request.raw_path,
                                          list(request.headers.items()), size,
                                          digest.hexdigest(), "1.1"))
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def redirect(request: web.Request) -> web.StreamResponse:
        await record(request)
        return web.Response(status=int(request.query.get("status", "302")),
                            headers={"Location": request.query["to"]})

    async def status(request: web.Request) -> web.StreamResponse:
        await record(request)
        return web.Response(status=int(request.match_info["code"]), text="status\n")

    async def ws(request: web.Request) -> web.StreamResponse:
        await record(request)
        sock = web.WebSocketResponse(protocols=("chat",))
        await sock.prepare(request)
        await sock.send_str(f"hello, you sent {_credential(request)}")
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str(f"echo: {msg.data} / {_credential(request)}")
        return sock

    async def git(request: web.Request) -> web.StreamResponse:
        """Dumb-HTTP git: static files of a bare repository, only with the right credential."""
        await record(request)
        if request.headers.get("Authorization") is None:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="git"'})
        assert upstream.git_root is not None
        path = request.match_info["path"]
        target = (upstream.git_root.rstrip("/") + "/" + path)
        if ".." in path:
            raise web.HTTPNotFound()
        try:
            with open(target, "rb") as fh:
                return web.Response(body=fh.read())
        except (FileNotFoundError, IsADirectoryError):
            raise web.HTTPNotFound() from None

    app = web.Application(client_max_size=2**31)
    app.router.add_get("/sse", sse)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/download", download)
    app.router.add_route("*", "/upload", upload)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/reflect", reflect)
    app.router.add_get("/git/{path:.*}", git)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


class UpstreamServer:
    """Runs :func:`build_app` over TLS in a thread of its own, on 127.0.0.1:``port``."""

    def __init__(self, ca: trustme.CA, ca_file: str, port: int = 443,
                 hosts: tuple[str, ...] = TEST_HOSTS, cert: trustme.LeafCert | None = None,
                 tls: bool = True, sock: socket.socket | None = None):
        self.state = Upstream(ca=ca, ca_file=ca_file, port=port)
        cert = cert or ca.issue_cert(*hosts)
        self._server = ThreadedApp(lambda: build_app(self.state), cert if tls else None, port,
                                   sock)

    def start(self) -> Upstream:
        self.state.port = self._server.start()
        return self.state

    def stop(self) -> None:
        self._server.stop()
