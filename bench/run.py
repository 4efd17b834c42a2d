"""keyhole's benchmark: one command, a results file, a table.

    .venv/bin/python -m bench.run                  # every figure, 3 rounds
    .venv/bin/python -m bench.run --figure a --rounds 1 --seconds 3   # one figure, quickly
    .venv/bin/python -m bench.run --only keyhole --figure b --rounds 1 # one peer (and direct)
    .venv/bin/python -m bench.run --only keyhole --figure a --limits   # with spec.limits on
    .venv/bin/python -m bench.run --only keyhole --figure f --budgets  # with spec.llm budgets

Peers (all on 127.0.0.1; proxies pinned to CPU 1, upstream and load generator to CPU 0):
direct (the limit), keyhole (CONNECT + interception + injection), keyhole-base-url,
nginx-reverse (nginx adding the header; the peer of base-URL mode), squid and mitmproxy
(CONNECT peers that bump TLS), aiohttp-floor (aiohttp alone: see bench/floor.py). Each is
checked to inject and to refuse an untrusted upstream before it is measured. Each figure is
the median of the rounds, with the ratio to direct computed per round. Results:
bench/results/latest.json; ``python -m bench.plot`` draws docs/performance.png from them.
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
import threading
import time
from pathlib import Path

from bench import peers
from bench.peers import HOST, TOKEN, Workspace

RESULTS = Path(__file__).resolve().parent / "results"
CORE_PEERS = ("direct", "keyhole", "keyhole-base-url", "nginx-reverse")  # always started
EXTRA_PEERS = ("squid", "mitmproxy", "aiohttp-floor")  # started when asked for


def hey(url: str, *, seconds: float | None = None, requests: int | None = None,
        connections: int = 16, proxy: int | None = None, keepalive: bool = True,
        host: str | None = None) -> dict:
    command = peers.pinned(0, ["hey", "-c", str(connections)])
    command += ["-z", f"{seconds}s"] if seconds else ["-n", str(requests)]
    if proxy:
        command += ["-x", f"http://127.0.0.1:{proxy}"]  # a URL, whatever hey's help says
    if not keepalive:
        command.append("-disable-keepalive")
    if host:
        command += ["-host", host]
    done = subprocess.run([*command, url], capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr[-400:]
    statuses = re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)
    if not statuses or any(code != "200" for code, _ in statuses):
        raise RuntimeError(f"hey saw non-200 answers for {url}:\n{out[-800:]}")
    pct = dict(re.findall(r"(\d+)%% in ([\d.]+) secs".replace("%%", "%"), out))
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": float(pct["50"]) * 1000, "p99_ms": float(pct["99"]) * 1000}


def latency(url: str, *, proxy: int | None = None, host: str | None = None,
            requests: int = 2000) -> dict:
    """Figure (b): ``requests`` sequential requests on one kept-alive connection, timed to the
    microsecond by bench/latency (Go; hey's steps of 0.1 ms hid a regression of 0.2 ms)."""
    command = peers.pinned(0, [str(peers.go_binary("latency")), "-n", str(requests)])
    if proxy:
        command += ["-proxy", f"http://127.0.0.1:{proxy}"]
    if host:
        command += ["-host", host]
    done = subprocess.run([*command, url], capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"bench/latency failed for {url}:\n{done.stderr[-800:]}")
    times = json.loads(done.stdout)
    return {"p50_ms": round(times["p50_us"] / 1000, 3), "p99_ms": round(times["p99_us"] / 1000, 3)}


class PeerFailed(RuntimeError):
    """A peer broke a transfer that direct completes."""


class Peer:
    def __init__(self, name: str, url: str, proxy: int | None = None, host: str | None = None,
                 process: peers.Process | None = None, impostor: str | None = None):
        self.name, self.url, self.proxy, self.host, self.process = name, url, proxy, host, process
        self.impostor = impostor  # a URL behind an untrusted certificate, through this peer

    def check_verifies(self) -> None:
        """A peer that would talk to an upstream with an untrusted certificate is not measured.
        (direct is curl itself; keyhole-base-url is the keyhole process checked through CONNECT;
        aiohttp-floor reaches only the real upstream.)"""
        if self.impostor is None:
            return
        command = self._curl("-o", "/dev/null", "-w", "%{http_code}")
        done = subprocess.run([*command, self.impostor], capture_output=True, text=True,
                              timeout=30)
        if done.stdout.strip() == "200":
            raise RuntimeError(f"{self.name} fetched {self.impostor} from an upstream whose "
                               "certificate it must not trust")

    @property
    def proxy_url(self) -> str | None:
        return f"http://127.0.0.1:{self.proxy}" if self.proxy else None

    def _curl(self, *flags: str) -> list[str]:
        """curl, through this peer's proxy if it is one (-k: the peers' CAs are not the point),
        in HTTP/1.1: these are the HTTP/1.1 figures (bench/h2.py measures HTTP/2)."""
        return ["curl", "-sS", "-k", "--http1.1", *flags,
                *(["-x", self.proxy_url] if self.proxy else [])]

    def hey(self, path: str, **kwargs) -> dict:
        return hey(self.url + path, proxy=self.proxy, host=self.host, **kwargs)

    def curl(self, path: str, *extra: str) -> list[str]:
        command = self._curl("-o", "/dev/null", *extra)
        if self.host:
            command += ["--resolve", f"{HOST}:{self.url.split(':')[-1]}:127.0.0.1"]
        done = subprocess.run(peers.pinned(0, [*command, self.url + path]), capture_output=True,
                              text=True, timeout=600)
        if done.returncode:
            raise PeerFailed(f"curl exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout.split()

    def sse(self) -> dict:
        command = [sys.executable, "-m", "bench.source", "measure",
                   self.url + "/v1/chat/completions"]  # a path keyhole meters with spec.llm
        if self.proxy:
            command += ["--proxy", self.proxy_url]
        if self.host:
            command += ["--host", self.host]
        done = subprocess.run(peers.pinned(0, command), capture_output=True, text=True, timeout=120,
                              cwd=peers.ROOT)
        if done.returncode:
            raise RuntimeError(f"{self.name}: the SSE client failed:\n{done.stderr[-800:]}")
        return json.loads(done.stdout)

    def check_injects(self) -> None:
        """A peer that does not really add the header is not measured."""
        command = self._curl("-D", "-", "-o", "/dev/null")
        if self.host:
            command += ["-H", f"Host: {self.host}"]
        headers = subprocess.run([*command, self.url + "/1k"], capture_output=True, text=True,
                                 timeout=30).stdout
        seen = re.search(r"(?im)^x-seen-authorization: (.*?)\s*$", headers)
        value = seen.group(1) if seen else ""
        injected = value in (f"Bearer {TOKEN}", "[REDACTED]")
        if self.name == "direct":
            return
        if not injected:
            raise RuntimeError(f"{self.name} did not inject the header (upstream saw {value!r});"
                               f" the answer was:\n{headers}")


def start(ws: Workspace, others: list[str], limits: bool = False, budgets: bool = False,
          ) -> tuple[list[peers.Process], dict[str, Peer]]:
    source = peers.dynamic_source(ws)
    upstream = peers.nginx_upstream(ws, source.extra["port"])
    up, impostor = upstream.extra["port"], upstream.extra["impostor_port"]
    keyhole = peers.keyhole(ws, up, impostor, limits=limits, budgets=budgets)
    reverse = peers.nginx_reverse(ws, up, impostor)
    table = {
        "direct": Peer("direct", f"https://127.0.0.1:{up}", host=HOST),
        "keyhole": Peer("keyhole", f"https://{HOST}:{up}", proxy=keyhole.extra["port"],
                        process=keyhole, impostor=f"https://{HOST}:{impostor}/1k"),
        "keyhole-base-url": Peer("keyhole-base-url", f"http://127.0.0.1:{keyhole.extra['port']}/bench",
                                 process=keyhole),
        "nginx-reverse": Peer("nginx-reverse", f"http://127.0.0.1:{reverse.extra['port']}/bench",
                              process=reverse,
                              impostor=f"http://127.0.0.1:{reverse.extra['port']}/impostor/1k"),
    }
    for name in others:
        if name == "aiohttp-floor":  # the base-URL mode's floor: see bench/floor.py
            process = peers.aiohttp_floor(ws, up)
            table[name] = Peer(name, f"http://127.0.0.1:{process.extra['port']}/bench",
                               process=process)
            continue
        # CONNECT proxies that bump TLS and add the header, like keyhole
        process = {"squid": peers.squid, "mitmproxy": peers.mitmproxy}[name](ws, up)
        table[name] = Peer(name, f"https://{HOST}:{up}", proxy=process.extra["port"],
                           process=process, impostor=f"https://{HOST}:{impostor}/1k")
    return [upstream, source], table


def sampled_peak_rss(process: peers.Process, work) -> tuple[object, float]:
    """Run ``work()`` while sampling the process tree's RSS; return (result, peak MiB)."""
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.rss_mib())
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = work()
    finally:
        done.set()
        thread.join()
    return result, peak[0]


def _sampled(peer: Peer, work):
    return sampled_peak_rss(peer.process, work) if peer.process else (work(), None)


def _peak(row: dict, key: str, peak: float | None) -> None:
    if peak is not None:
        row[key] = round(peak, 1)


def figures(table: dict[str, Peer], wanted: set[str], seconds: float, ws: Workspace,
            failed: list[str]) -> dict:
    """One round of every wanted figure for every peer; a transfer a peer breaks is recorded
    in ``failed`` (and reported) rather than ending the run."""
    out: dict[str, dict] = {}
    for name, peer in table.items():
        row: dict[str, float] = {}
        if "a" in wanted:
            result, peak = (sampled_peak_rss(peer.process, lambda p=peer: p.hey("/1k", seconds=seconds))
                            if peer.process else (peer.hey("/1k", seconds=seconds), None))
            row["a_rps_keepalive"] = result["rps"]
            if peak is not None:
                row["d_rss_under_load_mib"] = round(peak, 1)
        if "b" in wanted:
            result = latency(peer.url + "/1k", proxy=peer.proxy, host=peer.host)
            row["b_p50_ms"], row["b_p99_ms"] = result["p50_ms"], result["p99_ms"]
        if "c" in wanted:
            row["c_rps_new_connection"] = peer.hey("/1k", seconds=seconds, keepalive=False)["rps"]
        if "e" in wanted and name in ("direct", "keyhole", "squid", "mitmproxy"):
            # RSS is sampled during each transfer (the process tree, like (d)), so the earlier
            # figures' load does not count against the streaming figure.
            before = peer.process.rss_mib() if peer.process else None
            try:
                (speed, ttfb), peak = _sampled(peer, lambda p=peer: p.curl(
                    "/big", "-w", "%{speed_download} %{time_starttransfer}"))
                row["e_download_mb_s"] = round(float(speed) / 1e6, 1)
                row["e_ttfb_ms"] = round(float(ttfb) * 1000, 2)
                _peak(row, "e_download_peak_rss_mib", peak)
            except PeerFailed as exc:
                failed.append(f"{name} (e) download: {exc}")
            try:
                (speed,), peak = _sampled(peer, lambda p=peer: p.curl(
                    "/upload", "-T", str(ws.root / "www" / "big"), "-X", "POST",
                    "-w", "%{speed_upload}"))
                row["e_upload_mb_s"] = round(float(speed) / 1e6, 1)
                _peak(row, "e_upload_peak_rss_mib", peak)
            except PeerFailed as exc:
                failed.append(f"{name} (e) upload: {exc}")
            if before is not None:
                row["e_rss_before_mib"] = round(before, 1)
        if "f" in wanted and name != "aiohttp-floor":  # it reads bodies whole
            result = peer.sse()
            row["f_event_delay_ms"] = round(result["median_ms"], 3)
            row["f_event_delay_p99_ms"] = round(result["p99_ms"], 3)
        out[name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load run")
    parser.add_argument("--figure", action="append", choices=list("abcdef"),
                        help="only these figures (repeatable); default all")
    parser.add_argument("--peer", action="append", choices=EXTRA_PEERS,
                        help="peers besides direct, keyhole and nginx (repeatable); default: "
                             "squid and mitmproxy. aiohttp-floor is aiohttp alone, forwarding "
                             "and adding the header: the floor under keyhole's base-URL mode")
    parser.add_argument("--limits", action="store_true",
                        help="run keyhole with every kind of spec.limits on (too high to refuse "
                             "anything): what checking and counting them costs")
    parser.add_argument("--budgets", action="store_true",
                        help="run keyhole with spec.llm and a token budget (too high to refuse "
                             "anything): what reading usage from each SSE event costs, in (f)")
    parser.add_argument("--only", action="append", choices=[*CORE_PEERS[1:], *EXTRA_PEERS],
                        help="measure only these peers (repeatable), and direct, which every "
                             "ratio needs: the quick loop while iterating")
    args = parser.parse_args()
    wanted = set(args.figure or "abcdef")
    others = args.peer or ["mitmproxy", "squid"]
    if args.only:
        others = [name for name in args.only if name in EXTRA_PEERS]
    rounds, failures = [], []
    with tempfile.TemporaryDirectory(prefix="keyhole-bench-") as folder:
        for number in range(args.rounds):
            ws = Workspace(Path(folder) / f"round-{number}")
            upstreams, table = start(ws, others, limits=args.limits, budgets=args.budgets)
            started = [p.process for p in table.values() if p.process]  # stopped, measured or not
            if args.only:
                table = {name: peer for name, peer in table.items()
                         if name == "direct" or name in args.only}
            try:
                for peer in table.values():
                    peer.check_injects()
                    peer.check_verifies()
                idle = {}
                if "keyhole" in table:  # before any load: (d) idle
                    keyhole = table["keyhole"].process
                    idle = {"d_idle_rss_mib": round(keyhole.rss_mib(), 1),
                            "d_ready_s": round(keyhole.extra["ready_s"], 3)}
                measured = figures(table, wanted, args.seconds, ws, failures)
                measured.get("keyhole", {}).update(idle)
                rounds.append(measured)
            finally:
                for process in {id(p): p for p in started}.values():
                    process.stop()
                for process in upstreams:
                    process.stop()
            print(f"round {number + 1}/{args.rounds} done", flush=True)
    summary = summarise(rounds)
    RESULTS.mkdir(exist_ok=True)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "rounds": rounds, "median": summary, "failures": failures,
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (RESULTS / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table_text(summary))
    for failure in failures:
        print(f"failed: {failure}")


RATIO_KEYS = ("a_rps_keepalive", "c_rps_new_connection", "e_download_mb_s", "e_upload_mb_s")
ADDED_KEYS = ("b_p50_ms", "b_p99_ms", "f_event_delay_ms")


def summarise(rounds: list[dict]) -> dict:
    summary: dict[str, dict] = {}
    for peer in rounds[0]:
        keys = {k for r in rounds for k in r.get(peer, {})}
        row = {k: statistics.median(r[peer][k] for r in rounds if k in r[peer]) for k in keys}
        for key in RATIO_KEYS:
            if key in row and all(key in r["direct"] for r in rounds):
                row[f"{key}_x_direct"] = round(
                    statistics.median(r[peer][key] / r["direct"][key] for r in rounds), 3)
        for key in ADDED_KEYS:
            if key in row and all(key in r["direct"] for r in rounds):
                row[f"{key}_added"] = round(statistics.median(
                    r[peer][key] - r["direct"][key] for r in rounds), 3)
        summary[peer] = row
    return summary


def table_text(summary: dict) -> str:
    columns = sorted({k for row in summary.values() for k in row})
    lines = ["| peer | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for peer, row in summary.items():
        lines.append(f"| {peer} | " + " | ".join(
            f"{row[c]:.3g}" if c in row else "" for c in columns) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
