"""The floor under keyhole's base-URL mode: aiohttp's server and client, forwarding to the
upstream over verified TLS and adding the header — and nothing else: no routing, rules,
redaction, audit line, metrics or egress check. What this reaches is what the aiohttp
architecture allows on the machine; the gap to keyhole is what keyhole's own work costs.

    python -m bench.floor PORT UPSTREAM_PORT CA_FILE     (run by bench.run --peer aiohttp-floor)
"""

from __future__ import annotations

import asyncio
import ssl
import sys

import aiohttp
import uvloop
from aiohttp import web

from bench.peers import HOST, TOKEN

_DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


async def serve(port: int, upstream_port: int, ca_file: str) -> None:
    tls = ssl.create_default_context(cafile=ca_file)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls, limit=256),
                                    auto_decompress=False)
    base = f"https://127.0.0.1:{upstream_port}"

    async def handle(request: web.BaseRequest) -> web.Response:
        path = request.raw_path.removeprefix("/bench")
        headers = {"Host": f"{HOST}:{upstream_port}", "Authorization": f"Bearer {TOKEN}"}
        async with session.get(base + path, headers=headers, server_hostname=HOST) as answer:
            body = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in _DROP}
            return web.Response(status=answer.status, body=body, headers=kept)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(web.Server(handle), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
