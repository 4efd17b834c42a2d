"""The parts of the upstream nginx cannot play by itself, and the client of figure (f).

    python -m bench.source serve PORT     # plain HTTP behind nginx's TLS: /events, /upload
    python -m bench.source measure URL [--proxy P] [--host H]   # figure (f): event delays

``/events`` (also served as ``/v1/chat/completions``) streams Server-Sent Events shaped as
OpenAI's streamed chat chunks, each stamped with CLOCK_MONOTONIC (one clock for every process
on the machine; field ``t``) — so a keyhole with ``spec.llm`` reads them as it would a model's;
``measure`` reads each event as soon as it arrives and subtracts, so a
proxy's added delay is its median minus direct's, per round. ``/upload`` reads the whole body
before it answers: nginx's own ``return`` answers at once and discards the rest, and a proxy
that sees an answer before the upload ended may fairly stop sending it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time

EVENTS = 200
INTERVAL_S = 0.01
CHUNK = ('data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1741569952,'
         '"model":"gpt-4o-mini","t":%d,"choices":[{"index":0,"delta":{"content":" word"},'
         '"logprobs":null,"finish_reason":null}]}\n\n')


async def serve(port: int) -> None:
    async def events(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(EVENTS):
            event = (CHUNK % time.monotonic_ns()).encode()
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(INTERVAL_S)
        writer.write(b"0\r\n\r\n")

    async def upload(head: bytes, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        if length is None:  # nginx sends what it received with a length
            writer.write(b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\n\r\n")
            return
        left = int(length.group(1))
        while left:
            chunk = await reader.read(min(left, 1 << 20))
            if not chunk:
                raise ConnectionError("the upload ended early")
            left -= len(chunk)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                if head.startswith(b"POST /upload") or head.startswith(b"PUT /upload"):
                    await upload(head, reader, writer)
                else:
                    await events(writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def measure(url: str, proxy: str | None, host: str | None) -> dict:
    import httpx  # the bench extra; imported here so `serve` starts fast

    delays = []
    headers = {"Host": host} if host else {}
    client = httpx.Client(proxy=proxy, verify=False, timeout=30)  # noqa: S501 - a test CA
    with client, client.stream("GET", url, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: "):
                delays.append((time.monotonic_ns() - json.loads(line[6:])["t"]) / 1e6)
    if len(delays) != EVENTS:
        raise RuntimeError(f"{url}: {len(delays)} of {EVENTS} events arrived")
    return {"events": len(delays), "median_ms": statistics.median(delays),
            "p99_ms": sorted(delays)[int(len(delays) * 0.99) - 1]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.source", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve").add_argument("port", type=int)
    client = sub.add_parser("measure")
    client.add_argument("url")
    client.add_argument("--proxy")
    client.add_argument("--host")
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(serve(args.port))
    else:
        print(json.dumps(measure(args.url, args.proxy, args.host)))


if __name__ == "__main__":
    main()
