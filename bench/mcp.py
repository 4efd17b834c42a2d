"""What the MCP stage costs: an allowed ``tools/call`` through the real sidecar, with and
without ``spec.mcp`` on its injection, against the official Python SDK's MCP server
(stateless, JSON answers) on 127.0.0.1.

    .venv/bin/python -m bench.mcp [--seconds 5] [--rounds 3]

Base-URL mode (no client TLS: the figure is the stage, not the handshake). Per round and
variant: p50 / p99 of 400 sequential calls on one connection, and calls per second from 16
connections for ``--seconds``. The rounds interleave the variants; the report gives the median
of each figure and of each round's difference. The server's own cost (Python, Starlette) is
most of each call, so the stage's own work is timed in-process too (``stage``). Results:
bench/results/mcp.json. Needs nothing beyond the test dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import trustme  # noqa: E402

from tests.support.config import injection, ref  # noqa: E402
from tests.support.serving import serving_process  # noqa: E402
from tests.support.sidecar import start_sidecar  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "mcp.json"
CALL = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                   "params": {"name": "get_issue", "arguments": {"number": 7}}}).encode()
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
           "MCP-Protocol-Version": "2025-11-25"}
POLICY = {"tools": {"allow": ["get_*", "list_*"], "deny": ["*delete*"], "when": [
    {"match": ["get_issue"], "expression": "arguments.number < 1000"}]}}


async def _calls(url: str, connections: int, *, seconds: float | None = None,
                 count: int | None = None) -> tuple[int, list[float], float]:
    """Calls made, each one's latency (s), and the wall time."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds if seconds else None
    left = [count or 0]

    async def worker(session: aiohttp.ClientSession) -> None:
        while (deadline is None and left[0] > 0) or (deadline and time.monotonic() < deadline):
            left[0] -= 1
            began = time.perf_counter()
            async with session.post(url, data=CALL, headers=HEADERS) as reply:
                body = await reply.read()
                if reply.status != 200 or b"issue 7" not in body:
                    raise RuntimeError(f"{reply.status}: {body[:200]!r}")
            latencies.append(time.perf_counter() - began)

    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    return len(latencies), latencies, time.monotonic() - started


def measure(url: str, seconds: float) -> dict:
    asyncio.run(_calls(url, 1, count=50))  # warm: connections, caches
    _, sequential, _ = asyncio.run(_calls(url, 1, count=400))
    done, _, wall = asyncio.run(_calls(url, 16, seconds=seconds))
    ordered = sorted(sequential)
    return {"p50_ms": ordered[len(ordered) // 2] * 1000,
            "p99_ms": ordered[int(len(ordered) * 0.99)] * 1000, "rps": done / wall}


def stage_costs() -> dict:
    """The MCP stage's own work, in-process, per call: the strict read of a tools/call body and
    its verdict (a glob and a CEL condition), and the filtering of a 50-tool listing."""
    import timeit

    from keyhole_common.spec.parse import parse_injection
    from keyhole_sidecar.mcp import jsonrpc
    from keyhole_sidecar.mcp.policy import filter_result, judge

    spec, problems = parse_injection(injection("mcp", hosts=["mcp.bench"], mcp=POLICY, headers=[
        {"name": "Authorization", "valueFrom": ref("t", "token")}]), "bench")
    assert not problems, problems
    mcp = spec.mcp
    listing = {"jsonrpc": "2.0", "id": 2, "result": {"tools": [
        {"name": f"{verb}_{n}", "description": "x" * 200, "inputSchema": {"type": "object"}}
        for n in range(25) for verb in ("get", "delete")]}}
    listing_text = json.dumps(listing)

    def read_and_judge():
        messages, _ = jsonrpc.read(CALL)
        return [judge(mcp, m) for m in messages]

    def filter_listing():
        return filter_result(mcp, json.loads(listing_text))

    read_and_judge()
    runs = 20000
    return {"call_read_and_judged_us": round(min(timeit.repeat(
                read_and_judge, number=runs, repeat=5)) / runs * 1e6, 2),
            "listing_of_50_filtered_us": round(min(timeit.repeat(
                filter_listing, number=runs // 10, repeat=5)) / (runs // 10) * 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    ca = trustme.CA()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        ca.cert_pem.write_to_path(str(root / "ca.pem"))
        (root / "server").mkdir()
        record = root / "server" / "received.jsonl"
        with serving_process([sys.executable, "-m", "tests.support.mcp_server", "stateless",
                              str(record)], ca.issue_cert("mcp.bench"), root / "server") as port:
            sidecars = {}
            for variant, mcp in (("without", None), ("with", POLICY)):
                spec = {"hosts": [f"mcp.bench:{port}"],
                        "headers": [{"name": "Authorization", "valueFrom": ref("t", "token"),
                                     "format": "Bearer {value}"}]}
                if mcp:
                    spec["mcp"] = mcp
                sidecars[variant] = start_sidecar(
                    root / variant, [injection("mcp", **spec)], {"t": {"token": "bench-token-0123456789"}},
                    resolve=[f"mcp.bench:{port}:127.0.0.1"], upstream_ca=str(root / "ca.pem"))
            try:
                rounds = []
                for number in range(options.rounds):
                    row = {}
                    for variant, sidecar in sidecars.items():
                        row[variant] = measure(f"{sidecar.url}/mcp/mcp", options.seconds)
                        record.write_text("")  # the server's record of calls: not kept
                    rounds.append(row)
                    print(f"round {number + 1}: {json.dumps(row)}", flush=True)
            finally:
                for sidecar in sidecars.values():
                    sidecar.stop()
    summary = {variant: {key: round(statistics.median(r[variant][key] for r in rounds), 3)
                         for key in ("p50_ms", "p99_ms", "rps")} for variant in ("without", "with")}
    # Each round's difference, then their median: the server's own drift between rounds
    # (it warms up) is larger than the stage.
    summary["added_p50_ms"] = round(statistics.median(
        r["with"]["p50_ms"] - r["without"]["p50_ms"] for r in rounds), 3)
    summary["rps_ratio"] = round(statistics.median(
        r["with"]["rps"] / r["without"]["rps"] for r in rounds), 3)
    summary["stage"] = stage_costs()
    RESULTS.write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
