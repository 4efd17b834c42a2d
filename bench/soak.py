"""Memory under sustained load: the real sidecar, a mix of traffic for a while, its RSS sampled.

    .venv/bin/python -m bench.soak                                # h1, h2, mixed; 15 min each
    .venv/bin/python -m bench.soak --protocol h1 --minutes 10 --window 5

Each protocol runs on a fresh sidecar against the test suite's HTTPS upstreams on 127.0.0.1:
``h1`` — HTTP/1.1 through CONNECT, two kept-alive clients and two that open a connection per
request (echo, SSE, 1 MiB downloads, uploads, redirects, 500s, compressed answers); ``h2`` —
the same over HTTP/2 (httpx), kept-alive and fresh; ``mixed`` — both at once, with the
injections file rewritten every 20 s and the key rotated every minute. RSS is sampled every
5 s; the report gives the median of each window (5 minutes by default) and fails (exit 1) when
the last window's median exceeds the first's by more than ``--tolerance`` (10 %). Results:
bench/results/soak.json. Not part of the test suite (it takes minutes by design): run it
before a release and after a change to the wire (issue 30 found a climb this way).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import trustme  # noqa: E402

from tests.support.config import INJECTIONS, SECRETS, resolve_all  # noqa: E402
from tests.support.sidecar import write_injections, write_secrets  # noqa: E402
from tests.support.upstream import UpstreamServer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "soak.json"
PATHS = ("/reflect?m=soak", "/sse?m=soak&delay=0.01", "/download?bytes=1048576",
         "/v1/models", "/status/500", "/redirect?to=https://api.routed.test/x",
         "/reflect?enc=gzip&split=7")
SAMPLE_SECONDS = 5
MIX = random.Random(30)  # noqa: S311 - which request comes next, not a secret


class Load:
    """Client threads until ``stop``; counts requests and failures."""

    def __init__(self, proxy: str, ca_file: str, stop: threading.Event):
        self.proxy, self.ca_file, self.stop = proxy, ca_file, stop
        self.requests = self.failures = 0

    def _one(self, client: httpx.Client) -> None:
        try:
            if MIX.random() < 0.2:
                client.post("https://api.routed.test/upload",
                            content=b"x" * MIX.randint(1, 200_000))
            else:
                client.get("https://api.routed.test" + MIX.choice(PATHS))
            self.requests += 1
        except httpx.HTTPError:
            self.failures += 1

    def _client(self, h2: bool) -> httpx.Client:
        return httpx.Client(proxy=self.proxy, http2=h2, http1=not h2, timeout=20,
                            verify=ssl.create_default_context(cafile=self.ca_file))

    def kept_alive(self, h2: bool) -> None:
        with self._client(h2) as client:
            while not self.stop.is_set():
                self._one(client)

    def fresh(self, h2: bool) -> None:
        while not self.stop.is_set():
            with self._client(h2) as client:
                self._one(client)


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def churn(work: Path, stop: threading.Event) -> None:
    """The mixed soak's operator: the injections file rewritten every 20 s, the key rotated
    every minute."""
    rounds = 0
    while not stop.wait(20):
        rounds += 1
        write_injections(work / "inj.yaml", INJECTIONS[rounds % 2:] + INJECTIONS[:rounds % 2])
        if rounds % 3 == 0:
            secrets = {**SECRETS, "api-credentials": {"token": f"sk-live-ROTATED-{rounds:010d}"}}
            write_secrets(work / "secrets", secrets)


def soak(protocol: str, minutes: float, window_minutes: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="keyhole-soak-") as folder:
        work = Path(folder)
        ca = trustme.CA()
        ca_file = str(work / "upstream-ca.pem")
        ca.cert_pem.write_to_path(ca_file)
        upstream = UpstreamServer(ca, ca_file, port=443)
        upstream.start()
        write_secrets(work / "secrets", SECRETS)
        write_injections(work / "inj.yaml", INJECTIONS)
        command = [sys.executable, "-m", "keyhole_sidecar", "--injections", str(work / "inj.yaml"),
                   "--secrets-dir", str(work / "secrets"), "--ca-dir", str(work / "ca"),
                   "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                   "--upstream-ca", ca_file]
        for entry in resolve_all(443):
            command += ["--resolve", entry]
        log = work / "sidecar.log"
        with open(log, "w") as err:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        stop = threading.Event()
        threads: list[threading.Thread] = []
        try:
            deadline = time.monotonic() + 30
            while "proxying on" not in log.read_text():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the sidecar did not start:\n{log.read_text()}")
                time.sleep(0.1)
            port = log.read_text().split("proxying on 127.0.0.1:", 1)[1].split()[0]
            load = Load(f"http://127.0.0.1:{port}", str(work / "ca" / "tls.crt"), stop)
            plan = {"h1": [(load.kept_alive, False)] * 2 + [(load.fresh, False)] * 2,
                    "h2": [(load.kept_alive, True)] * 2 + [(load.fresh, True)],
                    "mixed": [(load.kept_alive, False), (load.kept_alive, True),
                              (load.fresh, False), (load.fresh, True)]}[protocol]
            threads = [threading.Thread(target=target, args=(h2,), daemon=True)
                       for target, h2 in plan]
            if protocol == "mixed":
                threads.append(threading.Thread(target=churn, args=(work, stop), daemon=True))
            for thread in threads:
                thread.start()
            samples: list[tuple[float, float]] = []
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < minutes * 60:
                time.sleep(SAMPLE_SECONDS)
                samples.append((elapsed, rss_mib(process.pid)))
                print(f"  {protocol} {elapsed:5.0f}s rss {samples[-1][1]:6.1f} MiB "
                      f"requests {load.requests} failures {load.failures}", flush=True)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            process.wait(30)
            upstream.stop()
    window = window_minutes * 60
    medians = []
    for start in range(0, int(minutes * 60), int(window)):
        inside = [rss for at, rss in samples if start <= at < start + window]
        if inside:
            medians.append(round(statistics.median(inside), 1))
    return {"protocol": protocol, "minutes": minutes, "window_minutes": window_minutes,
            "requests": load.requests, "failures": load.failures,
            "window_medians_mib": medians, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", action="append", choices=("h1", "h2", "mixed"),
                        help="repeatable; default: all three")
    parser.add_argument("--minutes", type=float, default=15, help="per protocol (default 15)")
    parser.add_argument("--window", type=float, default=5, help="minutes a median covers")
    parser.add_argument("--tolerance", type=float, default=0.10,
                        help="growth of the last window's median over the first's that fails")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("the test upstream listens on 127.0.0.1:443: run as root (or lower "
                     "net.ipv4.ip_unprivileged_port_start)")
    reports, failed = [], []
    for protocol in args.protocol or ["h1", "h2", "mixed"]:
        report = soak(protocol, args.minutes, args.window)
        first, last = report["window_medians_mib"][0], report["window_medians_mib"][-1]
        report["growth"] = round(last / first - 1, 3)
        report["ok"] = report["growth"] <= args.tolerance and report["failures"] == 0
        reports.append(report)
        print(f"{protocol}: window medians {report['window_medians_mib']} MiB, "
              f"growth {report['growth']:+.1%}, {report['requests']} requests, "
              f"{report['failures']} failures — {'ok' if report['ok'] else 'FAILED'}")
        if not report["ok"]:
            failed.append(protocol)
    RESULTS.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "reports": reports}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
