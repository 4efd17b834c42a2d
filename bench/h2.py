"""keyhole's HTTP/2 benchmark: one command, results in bench/results/h2.json, a table.

    .venv/bin/python -m bench.h2                    # both figures, 3 rounds
    .venv/bin/python -m bench.h2 --rounds 1 --seconds 3

Figures (h2load, from Debian's nghttp2-client, is the load generator):
(g) many streams on one connection: 1 connection, 100 concurrent streams, GET of 1 KiB;
(h) gRPC unary calls per second: 4 connections, 25 concurrent calls each, a 5-byte message.

Peers, all on 127.0.0.1 (the proxy pinned to CPU 1, upstreams and h2load to CPU 0):
direct (h2load to the upstream over TLS: the limit); keyhole in base-URL mode (h2c in, TLS
h2 out, the header injected, every check on); nghttpx (Debian's nghttp2-proxy, h2c in, TLS h2
out, the header added, one worker: the peer). The upstreams are nginx with ``http2`` for (g)
and a grpc-go server (bench/grpcserver) for (h). h2load cannot speak through a CONNECT proxy,
so these are base-URL figures; interception adds the client-side TLS that figure (a) measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import peers
from bench.peers import HOST, TOKEN, Workspace, free_port, pinned, spawn, wait_for_port

RESULTS = Path(__file__).resolve().parent / "results"
GRPC_MESSAGE = b"\x00\x00\x00\x00\x05hello"  # one uncompressed gRPC message: "hello"


def start_upstreams(ws: Workspace) -> tuple[peers.Process, peers.Process]:
    port = free_port()
    nginx = peers.nginx(ws, "nginx-h2", f"""
  server {{
    listen 127.0.0.1:{port} ssl http2; ssl_certificate {ws.root}/upstream.pem;
    ssl_certificate_key {ws.root}/upstream.pem; root {ws.root}/www;
    http2_max_concurrent_streams 1000; keepalive_requests 100000000;
    location = /1k {{ default_type text/plain; add_header X-Seen-Authorization $http_authorization; }}
  }}""", cpu=0)
    wait_for_port(port)
    nginx.extra["port"] = port
    grpc_port = free_port()
    grpc = spawn("grpcserver", pinned(0, [str(peers.go_binary("grpcserver")), str(ws.root / "upstream.pem"),
                                          str(grpc_port)]), ws.root / "grpcserver.log")
    wait_for_port(grpc_port)
    grpc.extra["port"] = grpc_port
    return nginx, grpc


def start_keyhole(ws: Workspace, web_port: int, grpc_port: int) -> peers.Process:
    (ws.root / "secrets" / "bench").mkdir(parents=True, exist_ok=True)
    (ws.root / "secrets" / "bench" / "token").write_text(TOKEN + "\n")
    header = """
  headers:
    - name: Authorization
      valueFrom: {secretKeyRef: {name: bench, key: token}}
      format: "Bearer {value}"
"""
    (ws.root / "h2-injections.yaml").write_text(
        f"apiVersion: keyhole.dev/v1alpha1\nkind: SecretInjection\nmetadata: {{name: web}}\n"
        f"spec:\n  hosts: [\"{HOST}:{web_port}\"]{header}---\n"
        f"apiVersion: keyhole.dev/v1alpha1\nkind: SecretInjection\nmetadata: {{name: grpc}}\n"
        f"spec:\n  hosts: [\"{HOST}:{grpc_port}\"]{header}")
    port, admin = free_port(), free_port()
    process = spawn("keyhole", pinned(1, [
        sys.executable, "-m", "keyhole_sidecar", "--injections", str(ws.root / "h2-injections.yaml"),
        "--secrets-dir", str(ws.root / "secrets"), "--ca-dir", str(ws.root / "keyhole-ca"),
        "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
        "--resolve", f"{HOST}:{web_port}:127.0.0.1", "--resolve", f"{HOST}:{grpc_port}:127.0.0.1",
        "--upstream-ca", str(ws.root / "upstream-ca.pem"), "--log-level", "warning",
    ]), ws.root / "keyhole-h2.log", quiet_stdout=True)
    peers.wait_ready(admin, ws.root / "keyhole-h2.log")
    process.extra["port"] = port
    return process


def start_nghttpx(ws: Workspace, name: str, upstream_port: int) -> peers.Process:
    port = free_port()
    process = spawn(name, pinned(1, [
        "nghttpx", f"--frontend=127.0.0.1,{port};no-tls",
        f"--backend=127.0.0.1,{upstream_port};;proto=h2;tls;sni={HOST}",
        f"--cacert={ws.root}/upstream-ca.pem", "--workers=1",
        f"--add-request-header=authorization: Bearer {TOKEN}",
        "--no-ocsp", "--errorlog-file=/dev/stderr", "--accesslog-file=/dev/null",
        f"--pid-file={ws.root}/{name}.pid", "--conf=/dev/null",
    ]), ws.root / f"{name}.log")
    wait_for_port(port)
    process.extra["port"] = port
    return process


def h2load(url: str, seconds: float, *, clients: int, streams: int,
           grpc: Path | None = None) -> dict:
    command = pinned(0, ["h2load", "-c", str(clients), "-m", str(streams), "-D", str(int(seconds)),
                         "-t", "1"])
    if grpc is not None:
        command += ["-d", str(grpc), "-H", "content-type: application/grpc",
                    "-H", "te: trailers"]
    done = subprocess.run([*command, url], capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    counts = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not counts or not codes or int(counts.group(4)) == 0 or int(codes.group(2)) + int(
            codes.group(3)) + int(codes.group(4)) > 0 or int(counts.group(5)) > 0:
        raise RuntimeError(f"h2load saw failures for {url}:\n{out[-1500:]}")
    rps = float(re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out).group(1))
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out).group(1)
    unit = 1e-3 if mean.endswith("us") else (1 if mean.endswith("ms") else 1e3)
    return {"rps": rps, "mean_ms": float(re.sub(r"[a-z]+$", "", mean)) * unit}


def one_round(ws: Workspace, table: dict, seconds: float) -> dict:
    web, grpc, keyhole, nghttpx_web, nghttpx_grpc = (table[k] for k in (
        "nginx", "grpc", "keyhole", "nghttpx-web", "nghttpx-grpc"))
    message = ws.root / "grpc-message.bin"
    message.write_bytes(GRPC_MESSAGE)
    urls = {
        "direct": (f"https://127.0.0.1:{web.extra['port']}/1k",
                   f"https://127.0.0.1:{grpc.extra['port']}/echo.Echo/Unary"),
        "keyhole-base-url": (f"http://127.0.0.1:{keyhole.extra['port']}/web/1k",
                             f"http://127.0.0.1:{keyhole.extra['port']}/grpc/echo.Echo/Unary"),
        "nghttpx": (f"http://127.0.0.1:{nghttpx_web.extra['port']}/1k",
                    f"http://127.0.0.1:{nghttpx_grpc.extra['port']}/echo.Echo/Unary"),
    }
    out = {}
    for peer, (web_url, grpc_url) in urls.items():
        streams = h2load(web_url, seconds, clients=1, streams=100)
        calls = h2load(grpc_url, seconds, clients=4, streams=25, grpc=message)
        out[peer] = {"g_streams_rps": streams["rps"], "g_streams_mean_ms": streams["mean_ms"],
                     "h_grpc_unary_rps": calls["rps"], "h_grpc_mean_ms": calls["mean_ms"]}
    for peer in out:
        for key in ("g_streams_rps", "h_grpc_unary_rps"):
            out[peer][f"{key}_x_direct"] = out[peer][key] / out["direct"][key]
    return out


def check_injection(ws: Workspace, keyhole: peers.Process, web_port: int) -> None:
    """keyhole must add the header over HTTP/2 before it is measured: nginx echoes it."""
    done = subprocess.run(["curl", "-sS", "-i", "--http2-prior-knowledge",
                           f"http://127.0.0.1:{keyhole.extra['port']}/web/1k"],
                          capture_output=True, text=True, timeout=30)
    if "x-seen-authorization: [redacted]" not in done.stdout.lower():
        raise RuntimeError(f"keyhole did not inject over HTTP/2:\n{done.stdout[:500]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keyhole-bench-h2-") as tmp:
        ws = Workspace(Path(tmp) / "ws")
        table: dict[str, peers.Process] = {}
        try:
            table["nginx"], table["grpc"] = start_upstreams(ws)
            web_port, grpc_port = table["nginx"].extra["port"], table["grpc"].extra["port"]
            table["keyhole"] = start_keyhole(ws, web_port, grpc_port)
            table["nghttpx-web"] = start_nghttpx(ws, "nghttpx-web", web_port)
            table["nghttpx-grpc"] = start_nghttpx(ws, "nghttpx-grpc", grpc_port)
            check_injection(ws, table["keyhole"], web_port)
            rounds = []
            for number in range(args.rounds):
                rounds.append(one_round(ws, table, args.seconds))
                print(f"round {number + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            for process in table.values():
                process.stop()
    median = {peer: {key: statistics.median(r[peer][key] for r in rounds)
                     for key in rounds[0][peer]} for peer in rounds[0]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "h2.json").write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "rounds": rounds, "median": median,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    keys = list(next(iter(median.values())))
    print("| peer | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for peer, row in median.items():
        print(f"| {peer} | " + " | ".join(f"{row[k]:.3g}" for k in keys) + " |")


if __name__ == "__main__":
    main()
