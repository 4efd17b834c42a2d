"""Figure (f): how much delay each Server-Sent Event gains on its way through a proxy.

Two small programs, each run in its own process pinned to CPU 0:

    python -m bench.sse serve PORT            # plain HTTP behind nginx's TLS: /events
    python -m bench.sse measure URL [--proxy P] [--host H]   # prints the per-event delays

The source stamps every event with CLOCK_MONOTONIC (one clock for every process on the
machine); the client reads the event as soon as it arrives and subtracts. A proxy's added
delay is its median minus direct's, per round. nginx in front (``proxy_buffering off``) makes
the upstream the same HTTPS server the other figures use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

EVENTS = 200
INTERVAL_S = 0.01


async def serve(port: int) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (await reader.readuntil(b"\r\n\r\n")):  # one request per connection is enough
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(EVENTS):
                    event = f"data: {time.monotonic_ns()}\n\n".encode()
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                    await asyncio.sleep(INTERVAL_S)
                writer.write(b"0\r\n\r\n")
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
                delays.append((time.monotonic_ns() - int(line[6:])) / 1e6)
    if len(delays) != EVENTS:
        raise RuntimeError(f"{url}: {len(delays)} of {EVENTS} events arrived")
    return {"events": len(delays), "median_ms": statistics.median(delays),
            "p99_ms": sorted(delays)[int(len(delays) * 0.99) - 1]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.sse", description=__doc__,
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
